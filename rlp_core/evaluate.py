"""Win-rate of a policy against a baseline policy under a judge, with a confidence interval.

Each prompt gets one sampled response from each policy; the judge scores both; a win counts 1, a tie
½, a loss 0. Beside it, the paired change of the mean score (policy − baseline), with its interval: the
measure of "did the gold score go up" that a win-rate of mostly ties hides. The interval is the normal approximation on the mean of those outcomes (ties make the
outcome ternary, so a plain binomial interval would be too wide); clipped to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

Judge = Callable[[list[str], list[str]], list[float]]  # (prompts, responses) -> scores


@dataclass(frozen=True)
class WinRate:
    win_rate: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    n: int
    confidence: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def win_rate(candidate: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> WinRate:
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    outcomes = [1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline)]
    n = len(outcomes)
    mean = sum(outcomes) / n
    var = sum((o - mean) ** 2 for o in outcomes) / max(1, n - 1)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * math.sqrt(var / n)
    return WinRate(
        win_rate=mean, ci_low=max(0.0, mean - half), ci_high=min(1.0, mean + half),
        wins=sum(o == 1.0 for o in outcomes), ties=sum(o == 0.5 for o in outcomes),
        losses=sum(o == 0.0 for o in outcomes), n=n, confidence=confidence,
    )


@dataclass(frozen=True)
class PairedChange:
    change: float
    ci_low: float
    ci_high: float
    n: int

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def paired_change(candidate: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> PairedChange:
    """Mean of candidate − baseline over the same prompts, with a normal-approximation interval."""
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError("paired_change needs two equally long, non-empty score lists")
    diffs = [c - b for c, b in zip(candidate, baseline)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(1, n - 1)
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(var / n)
    return PairedChange(mean, mean - half, mean + half, n)
