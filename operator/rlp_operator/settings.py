"""The operator's timings: retry backoff, how often it looks again, how long it lets things wait."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Settings:
    """Seconds throughout; `rlp operator` sets some from its flags (main.py)."""

    backoff_base: float = 10.0  # seconds before the 2nd attempt; doubles per failure
    backoff_max: float = 300.0
    store_cache_seconds: float = 300.0
    stale_job_requeue: float = 2.0
    storage_retry: float = 15.0  # look again this soon when the store cannot be read
    unschedulable_grace: float = 300.0  # a phase pod unschedulable this long is reported on the run
    error_backoff: tuple[float, float] = (1.0, 60.0)  # retry of an unexpected reconcile error: base, cap

    def backoff(self, failures: int) -> float:
        """Wait before the attempt that follows the `failures`-th failure: base·2^(failures-1), capped."""
        return min(self.backoff_base * (2 ** max(failures - 1, 0)), self.backoff_max)

    @property
    def workload_check(self) -> float:
        """How often a Job whose pods do not all run yet is looked at (FailedCreate, Kueue, scheduling)."""
        return min(max(self.unschedulable_grace / 2, 0.5), 10.0)
