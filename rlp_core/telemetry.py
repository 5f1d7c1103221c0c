"""Training telemetry of a phase: Prometheus gauges for the job pod's /metrics, plus a per-step history.

The training loops in rlp_core call `PhaseTelemetry.step(...)`; `rlp phase` serves the registry over HTTP
(`serve`), `rlp run` only keeps the history for the report. Metric names are a contract with the Helm
chart's dashboard and alerts: see docs/metrics.md.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LABELS = ("run", "round", "phase")
PROC_SELF = Path("/proc/self")


def _torch_cuda():
    """torch.cuda when torch is already loaded and has a GPU (telemetry never imports torch itself)."""
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() else None


def reset_peak_memory() -> None:
    """Start a new peak: the kernel's RSS high-water mark (where /proc/self/clear_refs may be written; else
    the peak stays the process's lifetime one) and torch's CUDA peak."""
    try:
        (PROC_SELF / "clear_refs").write_text("5")
    except OSError:
        pass
    if (cuda := _torch_cuda()) is not None:
        cuda.reset_peak_memory_stats()


def _peak_rss_kib() -> int:
    """VmHWM (resettable), or ru_maxrss (process lifetime) where /proc is missing; both in KiB on Linux."""
    try:
        for line in (PROC_SELF / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory_mb() -> dict[str, float]:
    """Peak memory since `reset_peak_memory`, in MiB to 0.1: {"rss": …} and, with CUDA, "cuda" (torch's
    allocator)."""
    peaks = {"rss": _peak_rss_kib() / 1024}
    if (cuda := _torch_cuda()) is not None:
        peaks["cuda"] = cuda.max_memory_allocated() / 2**20
    return {memory: round(mb, 1) for memory, mb in peaks.items()}


POLICY_STATS = ("clip_fraction", "gold_mean", "zero_signal_groups")


@dataclass
class _JobMetrics:
    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        self.progress = Gauge("rlp_job_progress", "Fraction of the phase's steps done (0-1).", LABELS, registry=r)
        self.steps = Counter("rlp_job_steps", "Training or sampling steps completed.", LABELS, registry=r)
        self.step_seconds = Histogram(
            "rlp_job_step_seconds", "Wall time of one step.", LABELS, registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.tokens_per_second = Gauge("rlp_job_tokens_per_second", "Tokens processed per second in the last step.", LABELS, registry=r)
        self.loss = Gauge("rlp_job_loss", "Latest value of a loss term.", LABELS + ("loss",), registry=r)
        self.reward_mean = Gauge("rlp_job_reward_mean", "Mean reward-model score of the latest batch.", LABELS, registry=r)
        self.kl = Gauge("rlp_job_kl", "Mean KL of the policy to the reference policy (nats per response).", LABELS, registry=r)
        self.rm_accuracy = Gauge("rlp_job_rm_accuracy", "Reward-model pairwise accuracy.", LABELS + ("split",), registry=r)
        self.policy_stat = Gauge("rlp_job_policy_stat", "Latest optimize-step statistic: clip_fraction, gold_mean "
                                 "(the gold judge's mean score of the rollout), zero_signal_groups (grpo / rloo).",
                                 LABELS + ("stat",), registry=r)
        self.peak_memory = Gauge("rlp_job_peak_memory_bytes", "Peak memory of the phase so far.", LABELS + ("memory",),
                                 registry=r)


@dataclass
class PhaseTelemetry:
    """Reports one phase's progress. One instance per phase execution."""

    run: str
    round: int
    phase: str
    total_steps: int = 1
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._metrics = _JobMetrics(self.registry)
        self._labels = dict(run=self.run, round=str(self.round), phase=self.phase)
        self._last = time.perf_counter()
        self._done = 0
        self._metrics.progress.labels(**self._labels).set(0.0)

    def step(self, *, tokens: int = 0, **values: float) -> None:
        """Record one finished step. Known keys: reward_mean, kl, *_loss, rm_accuracy*, POLICY_STATS; all go
        to history."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        self._done += 1
        m, lab = self._metrics, self._labels
        m.steps.labels(**lab).inc()
        m.step_seconds.labels(**lab).observe(elapsed)
        m.progress.labels(**lab).set(min(1.0, self._done / max(1, self.total_steps)))
        if tokens and elapsed > 0:
            m.tokens_per_second.labels(**lab).set(tokens / elapsed)
        for key, value in values.items():
            value = float(value)
            if key == "reward_mean":
                m.reward_mean.labels(**lab).set(value)
            elif key == "kl":
                m.kl.labels(**lab).set(value)
            elif key.endswith("_loss"):
                m.loss.labels(**lab, loss=key.removesuffix("_loss")).set(value)
            elif key in POLICY_STATS:
                m.policy_stat.labels(**lab, stat=key).set(value)
            elif key.startswith("rm_accuracy"):
                m.rm_accuracy.labels(**lab, split=key.removeprefix("rm_accuracy").strip("_") or "held_out").set(value)
        self._record_peak_memory()
        self.history.append({"step": float(self._done), "seconds": elapsed, "tokens": float(tokens), **values})

    def resume(self, done_steps: int) -> None:
        """A phase restarted from a checkpoint: progress continues from the steps already done."""
        self._done = done_steps
        self._metrics.progress.labels(**self._labels).set(min(1.0, done_steps / max(1, self.total_steps)))

    def set_accuracy(self, split: str, value: float) -> None:
        self._metrics.rm_accuracy.labels(**self._labels, split=split).set(value)

    def finish(self) -> None:
        self._metrics.progress.labels(**self._labels).set(1.0)
        self._record_peak_memory()

    def _record_peak_memory(self) -> None:
        for memory, mb in peak_memory_mb().items():
            self._metrics.peak_memory.labels(**self._labels, memory=memory).set(mb * 2**20)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose this phase's registry on http://addr:port/metrics (job pods)."""
        start_http_server(port, addr=addr, registry=self.registry)
