"""Operator metrics, exactly as named in docs/metrics.md.

Counters and the histogram are updated when a transition has been stored in the run's status. The
per-run gauges (`rlp_runs`, `rlp_run_info`, `rlp_phase_start_timestamp_seconds`) are computed at scrape
time from the last status the operator wrote or read for each run, so after a restart they are right
again as soon as every run has been reconciled once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from rlp_operator.status import RUN_STATES, RLPRunStatus, parse_time

NEW = "New"  # the state of a run the operator has seen but not yet given a status

# Phases last from seconds (kwok, tiny models) to days (large models).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200)


@dataclass
class _RunView:
    state: str
    current_phase: str
    round: str
    running: list[tuple[str, str, float]] = field(default_factory=list)  # (phase, round, start timestamp)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self.durations = Histogram(
            "rlp_phase_duration_seconds",
            "Wall time of one phase attempt, from Job creation to its end.",
            ["phase", "result"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.transitions = Counter(
            "rlp_phase_transitions",
            "Phase state changes (Pending, Running, Succeeded, Failed, Skipped).",
            ["phase", "state"],
            registry=self.registry,
        )
        self.retries = Counter(
            "rlp_phase_retries", "Phase attempts started after a failed one.", ["phase"], registry=self.registry
        )
        self.errors = Counter(
            "rlp_reconcile_errors", "Exceptions raised by an operator handler.", ["handler"], registry=self.registry
        )
        self._runs: dict[tuple[str, str], _RunView] = {}
        self._lock = threading.Lock()
        self.registry.register(_RunCollector(self))

    # ---- updates ----------------------------------------------------------------------------------
    def transition(self, phase: str, state: str) -> None:
        self.transitions.labels(phase=phase, state=state).inc()

    def retry(self, phase: str) -> None:
        self.retries.labels(phase=phase).inc()

    def phase_duration(self, phase: str, result: str, seconds: float) -> None:
        self.durations.labels(phase=phase, result=result).observe(max(seconds, 0.0))

    def error(self, handler: str) -> None:
        self.errors.labels(handler=handler).inc()

    def observe_run(self, namespace: str, name: str, status: RLPRunStatus) -> None:
        running = []
        for rec in status.phases:
            if rec.state == "Running":
                start = parse_time(rec.attempt_started_at or rec.started_at)
                if start is not None:
                    running.append((rec.name, str(rec.round), start.timestamp()))
        view = _RunView(
            state=status.phase or NEW,
            current_phase=status.current_phase or "",
            round="" if status.round is None else str(status.round),
            running=running,
        )
        with self._lock:
            self._runs[(namespace, name)] = view

    def observe_new_run(self, namespace: str, name: str, status: RLPRunStatus) -> None:
        """Count a run as soon as it is seen (a run whose reconcile keeps failing still counts)."""
        with self._lock:
            if (namespace, name) in self._runs:
                return
        self.observe_run(namespace, name, status)

    def forget_run(self, namespace: str, name: str) -> None:
        with self._lock:
            self._runs.pop((namespace, name), None)

    def snapshot(self) -> dict[tuple[str, str], _RunView]:
        with self._lock:
            return dict(self._runs)


class _RunCollector:
    def __init__(self, metrics: OperatorMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        runs = self.metrics.snapshot()
        by_state = GaugeMetricFamily("rlp_runs", "RLPRuns by state.", labels=["state"])
        counts = dict.fromkeys((NEW, *RUN_STATES), 0)
        for view in runs.values():
            counts[view.state] = counts.get(view.state, 0) + 1
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield by_state
        info = GaugeMetricFamily(
            "rlp_run_info",
            "One series per run: its state and current phase.",
            labels=["namespace", "run", "state", "current_phase", "round"],
        )
        starts = GaugeMetricFamily(
            "rlp_phase_start_timestamp_seconds",
            "Start time of each running phase attempt (removed when it ends).",
            labels=["namespace", "run", "phase", "round"],
        )
        for (ns, name), view in sorted(runs.items()):
            info.add_metric([ns, name, view.state, view.current_phase, view.round], 1)
            for phase, round_, ts in view.running:
                starts.add_metric([ns, name, phase, round_], ts)
        yield info
        yield starts
