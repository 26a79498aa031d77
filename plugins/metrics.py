"""Built-in resource metrics measured on every trial's final (served) model.

Sizes are in MiB (2**20 bytes). Every metric gets the model as served (possibly int8 or wrapped in a
bf16/fp16 cast), the trial context, and one input batch at the trial's inference batch size, on
`trial.device`, in the model file's form (a tensor, a tuple or a dict: call the model with
`optagent.inputs.call`). They use only public API (`optagent.inputs`, `optagent.torchutils`), as a
third-party metric would.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from optagent import inputs as ins
from optagent.hookspecs import hookimpl
from optagent.metrics import Metric
from optagent.torchutils import is_quantized, model_device, state_tensors, to_device, weight_tensors

if TYPE_CHECKING:
    import torch

    from optagent.strategy import TrialContext

MIB = float(2**20)


def model_size_mb(model: Any, trial: TrialContext, batch: torch.Tensor) -> float:
    """Bytes of `torch.save(model.state_dict())`: the file a user would ship (int8 weights included)."""
    import torch

    buffer = io.BytesIO()
    try:
        torch.save(model.state_dict(), buffer)
    except Exception:  # an exotic module whose state does not serialise on its own
        buffer = io.BytesIO()
        torch.save(model, buffer)
    return buffer.getbuffer().nbytes / MIB


def param_count(model: Any, trial: TrialContext, batch: torch.Tensor) -> float:
    """Number of weights and biases, counting those packed inside quantized modules."""
    return float(sum(t.numel() for t in weight_tensors(model)))


def nonzero_params(model: Any, trial: TrialContext, batch: torch.Tensor) -> float:
    """Weights and biases that are not exactly zero (after dequantizing int8 ones)."""
    import torch

    total = 0
    with torch.no_grad():
        for t in weight_tensors(model):
            total += int(torch.count_nonzero(t.dequantize() if t.is_quantized else t))
    return float(total)


def flops(model: Any, trial: TrialContext, batch: torch.Tensor) -> float:
    """Floating-point operations of one call at this batch (torch.utils.flop_counter).

    NaN for int8 models: the counter only knows float aten kernels, so it would silently count the
    quantized layers as free. A failure to count (an op the counter cannot run) is NaN too.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if is_quantized(model):
        return float("nan")
    batch = to_device(batch, model_device(model, trial.device))
    counter = FlopCounterMode(display=False)
    try:
        with torch.inference_mode(), counter:
            ins.call(model, batch)
    except Exception:
        return float("nan")
    return float(counter.get_total_flops())


def _state_bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for v in model.state_dict().values() for t in state_tensors(v))


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} missing from /proc/self/status")


def _release_free_heap() -> None:
    """Return freed heap pages to the OS so the RSS baseline is not inflated by earlier work (glibc)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory_mb(model: Any, trial: TrialContext, batch: torch.Tensor) -> float:
    """Weights plus the peak extra memory of one inference call at this batch, in MiB.

    CUDA: `torch.cuda.max_memory_allocated` over the call (it includes the resident weights). CPU on Linux:
    resident-set growth, read as VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before
    the call, plus the bytes of the state_dict. The RSS is process-wide, so other threads allocating at
    the same time add noise; a warm-up call first keeps one-time kernel set-up out of the figure. NaN where
    neither is available (non-Linux CPU, or clear_refs not writable).
    """
    import torch

    device = model_device(model, trial.device)
    batch = to_device(batch, device)
    with torch.inference_mode():
        ins.call(model, batch)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            ins.call(model, batch)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) / MIB
        if not os.path.exists("/proc/self/clear_refs"):
            return float("nan")
        _release_free_heap()
        try:
            before = _proc_status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # reset the peak resident set size (VmHWM) to the current RSS
            ins.call(model, batch)
            peak = _proc_status_kib("VmHWM")
        except OSError:
            return float("nan")
    return (_state_bytes(model) + max(peak - before, 0) * 1024) / MIB


BUILTIN_METRICS = (
    Metric("model_size_mb", "minimize", "MiB", "serialized size of the model's state_dict", model_size_mb),
    Metric("param_count", "minimize", "count", "weights and biases, including int8 ones", param_count),
    Metric("nonzero_params", "minimize", "count", "weights and biases that are not exactly zero", nonzero_params),
    Metric("flops", "minimize", "FLOP", "floating-point operations per inference call (NaN for int8)", flops),
    Metric("peak_memory_mb", "minimize", "MiB", "weights plus peak extra memory of one inference call",
           peak_memory_mb),
)


@hookimpl
def optagent_register_metrics(register: Callable[[Metric], None]) -> None:
    for metric in BUILTIN_METRICS:
        register(metric)
