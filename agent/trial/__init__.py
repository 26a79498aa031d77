"""The trial side: what runs in a worker process (a local trial process or a Celery pool process).

    entry.py     run_trial(payload) -> result: the one function every executor calls
    pipeline.py  build a trial's model from its recipe (strategies stage by stage), then measure it
    measure.py   timing: warm-up, fixed threads, interleaved rounds, paired speedups and their bands
    confirm.py   the confirmation pass: fresh processes, combined into noise and confidence bands
    lock.py      the host lock local trial processes share (timing excludes compute)
"""

from optagent.trial.entry import run_trial

__all__ = ["run_trial"]
