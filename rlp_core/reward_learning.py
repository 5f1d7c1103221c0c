"""What the reward-learning strategies (rlp_core.uml, .spg, .ser) share: pairs of policy samples and
the measurements every one of them reports.

- `distinct_pairs`: the unordered pairs of *different* responses the policy gave to one prompt (SER labels
  them; identical responses carry no preference).
- `gold_pairs` / `gold_accuracy`: the same pairs ordered by a gold judge, keeping only those the judge
  separates. An RM's accuracy on them is its accuracy *on the policy's own distribution*, which is what
  RLP sets out to improve (held-out human pairs come from the SFT-era distribution and can miss it).
- `histogram`: fixed-range histograms for the manifests (entropy of SPG, confidence of SER).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from itertools import combinations
from typing import Any

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from rlp_core.data import PreferencePair, Sample
from rlp_core.supervised import preference_accuracy

Gold = Callable[[str, str], float]


def by_prompt(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    """Samples grouped by prompt id, in order of first appearance, each group in sample order."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.prompt_id, []).append(s)
    return {k: sorted(v, key=lambda s: s.sample_index) for k, v in groups.items()}


def distinct_pairs(samples: Iterable[Sample], max_per_prompt: int | None = None, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, a, b) for pairs of different responses to the same prompt; at most `max_per_prompt` each
    (a seeded random subset), a before b in sample order."""
    rng = random.Random(seed)
    out: list[tuple[str, str, str]] = []
    for group in by_prompt(samples).values():
        unique = list(dict.fromkeys(s.response for s in group))
        pairs = list(combinations(unique, 2))
        if max_per_prompt is not None and len(pairs) > max_per_prompt:
            pairs = [pairs[i] for i in sorted(rng.sample(range(len(pairs)), max_per_prompt))]
        out += [(group[0].prompt, a, b) for a, b in pairs]
    return out


def gold_pairs(samples: Iterable[Sample], gold: Gold, max_per_prompt: int | None = None, seed: int = 0) -> list[PreferencePair]:
    """Pairs of different policy responses that the gold judge scores differently, higher one chosen."""
    out = []
    for prompt, a, b in distinct_pairs(samples, max_per_prompt, seed):
        ga, gb = gold(prompt, a), gold(prompt, b)
        if ga != gb:
            out.append(PreferencePair(prompt=prompt, chosen=a if ga > gb else b, rejected=b if ga > gb else a))
    return out


def gold_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, samples: Sequence[Sample], gold: Gold,
                  max_length: int, batch_size: int) -> tuple[float, int]:
    """(pairwise accuracy, number of pairs) of an RM on the gold-labelled pairs of `samples` (nan, 0 if none)."""
    pairs = gold_pairs(samples, gold)
    return preference_accuracy(model, tokenizer, pairs, max_length, batch_size), len(pairs)


def gold_outcomes(pairs: Sequence[PreferencePair], gold: Gold) -> dict[str, Any]:
    """How the gold judge orders (synthetic or self-labelled) pairs: counts of right (chosen scored
    higher), wrong and tied, and the accuracy among the decisive ones (None without any)."""
    scores = [(gold(p.prompt, p.chosen), gold(p.prompt, p.rejected)) for p in pairs]
    right, wrong = sum(c > r for c, r in scores), sum(c < r for c, r in scores)
    return {"right": right, "wrong": wrong, "tied": len(scores) - right - wrong,
            "decisive_accuracy": right / (right + wrong) if right + wrong else None}


def gold_agreement(pairs: Sequence[PreferencePair], gold: Gold) -> float | None:
    """Share of pairs whose chosen the gold judge scores above the rejected, ties counting half; None for
    no pairs."""
    if not pairs:
        return None
    outcome = gold_outcomes(pairs, gold)
    return (outcome["right"] + 0.5 * outcome["tied"]) / len(pairs)


def histogram(values: Sequence[float], low: float, high: float, bins: int = 10) -> dict[str, Any]:
    """{"edges": bins+1 floats, "counts": bins ints}; values outside [low, high] are clipped into the end bins."""
    clipped = np.clip(np.asarray(values, dtype=float), low, high)
    counts, edges = np.histogram(clipped, bins=bins, range=(low, high))
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}
