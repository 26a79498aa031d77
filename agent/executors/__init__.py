"""Where trials run: local processes (the embedded default) or Celery workers over Redis.

Both run the same function, `optagent.pipeline.run_trial(payload) -> result`, on plain JSON.
"""

from optagent.executors._base import Executor, Outcome, failed_result

__all__ = ["Executor", "Outcome", "failed_result"]
