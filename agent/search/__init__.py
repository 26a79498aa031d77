"""The coordinator side: the ask/tell loop and its collaborators. Runs in the `optagent search` process.

Nothing here imports torch or runs a model; trials run in worker processes (optagent.trial), reached
through an executor (optagent.executors) with the messages of optagent.protocol.

    loop.py          Coordinator: baseline, ask, send, tell, resume, confirm
    space.py         the searched strategies' conditional space on the worker's hardware
    front.py         objectives, the constraint, the Pareto front and its hypervolume
    study.py         the Optuna study, storage and sampler (all private Optuna API is here)
    records.py       the job's rows (the coordinator is the only writer)
    calibration.py   every trial's latency on the job's reference scale
    recovery.py      what a resumed coordinator finds and picks up
    confirmation.py  the confirmation round trip, coordinator side
"""

from optagent.search.loop import Cancelled, Coordinator, EventSink
from optagent.search.records import create_job, job_dict, trial_dict

__all__ = ["Cancelled", "Coordinator", "EventSink", "create_job", "job_dict", "trial_dict"]
