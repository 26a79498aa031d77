"""Where trials run: local processes (the embedded default) or Celery workers over Redis.

Both run the same function, `optagent.trial.run_trial(payload) -> result`, on plain JSON (optagent.protocol).
"""

from optagent.executors._base import Executor, Outcome

__all__ = ["Executor", "Outcome"]
