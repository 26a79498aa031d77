"""The one function every executor calls in a worker process: a payload in, a result out (plain JSON).

Local trial processes (optagent.executors.local) and the Celery task (optagent.workers.tasks) both call
`run_trial`. It reads the message (refusing a protocol version it does not speak), runs a trial through
the pipeline or a confirmation pass, and turns every trial-level failure into a failed result with its
reason: it never raises for those, so one bad trial never stops a worker or a search.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from optagent.errors import TrialFailed, TrialPruned, UserError, describe
from optagent.protocol import ConfirmPayload, ConfirmResult, ProtocolError, TrialResult, WorkerInfo, parse_payload

log = logging.getLogger(__name__)


def quiet_libraries() -> None:
    """Silence what libraries print on import in a trial process: torchao's attempts to load CUDA kernels on
    a CPU build and torch's pytree deprecation notices (transformers imports torchao when it is installed).
    Warnings about the user's own code still show."""
    import warnings

    for name in ("torchao", "torch.utils._pytree", "torchao.kernel.intmm", "nncf"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*is an Enum subclass and is now natively supported")
    warnings.filterwarnings("ignore", message=r".*Failed to load .*torchao")


def run_trial(message: dict[str, Any]) -> dict[str, Any]:
    """Run one trial or confirmation payload and return its result JSON (never raises for trial failures)."""
    from optagent.trial.pipeline import steady_allocator

    started = time.perf_counter()
    quiet_libraries()
    steady_allocator()
    attempt = int(message.get("attempt", 1)) if isinstance(message, dict) else 1
    worker = asdict(WorkerInfo.here(attempt))
    hardware: dict[str, Any] = {}
    number = -1
    try:
        payload = parse_payload(message)
        number = payload.trial
        if isinstance(payload, ConfirmPayload):
            from optagent.trial.confirm import confirm

            try:
                return confirm(payload, worker).to_json()
            except (TrialFailed, UserError) as exc:
                return ConfirmResult.failed(str(exc), duration_s=time.perf_counter() - started,
                                            worker=worker).to_json()
        from optagent.trial.pipeline import run

        try:
            return run(payload, started, worker, hardware).to_json()
        except TrialPruned as exc:
            last = exc.intermediate[max(exc.intermediate)] if exc.intermediate else None
            metric = (payload.constraint or {}).get("metric")
            result = TrialResult.failed(number, str(exc), duration_s=time.perf_counter() - started, worker=worker,
                                        hardware=hardware, state="pruned")
            result.intermediate = {str(k): v for k, v in exc.intermediate.items()}
            if metric and last is not None:
                result.metrics = {metric: last}
            return result.to_json()
    except ProtocolError as exc:
        reason = f"worker refused the payload: {exc}"
        if isinstance(message, dict) and message.get("kind") == "confirm":
            return ConfirmResult.failed(reason, worker=worker).to_json()
        number = int(message.get("trial", -1)) if isinstance(message, dict) else -1
    except (TrialFailed, UserError) as exc:
        reason = str(exc)
    except MemoryError:
        reason = "out of memory"
    except Exception as exc:  # a strategy or the model file failed: record why, keep the search going
        reason = describe(exc)
        log.debug("trial %s failed", number, exc_info=True)
    return TrialResult.failed(number, reason, duration_s=time.perf_counter() - started, worker=worker,
                              hardware=hardware).to_json()
