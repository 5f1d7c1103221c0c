"""SER (Self-Evolved Reward learning, Huang et al., arXiv 2411.00418) as the synthesize phase of
`strategy: ser`: the RM labels unlabeled pairs itself, keeps the ones it is sure of, retrains on human +
self-labelled pairs, and repeats.

- Unlabeled pairs: pairs of different responses the policy gave to the same prompt in this round's
  generate phase (at most `maxPairsPerPrompt` per prompt), so SER also learns on policy data and is
  comparable with RLP-SPG.
- Confidence of a pair: p = σ(r(x, a) − r(x, b)), c = max(p, 1 − p); the label is the RM's own preference.
- Learning status (selection): while at least `minNewPairs` pairs *not selected before* reach
  c ≥ `highConfidence`, the RM trains on the easy pairs (status "easy": it learns to tell good from
  bad). When easy pairs run out, the bar drops to `lowConfidence` (status "hard": the middle band of
  finer distinctions joins). Every iteration re-scores all pairs with the current RM and relabels the
  selected ones.
- Retraining continues from the current RM on the human train pairs plus every pair selected so far.
- Stopping rule, first that fires: fewer than `minNewPairs` new pairs at either bar; held-out human
  accuracy falls below the best so far (that iteration's RM is discarded, the best one is kept);
  `maxIterations` reached.

Choices (the spec's *(check)* items): we could consult only the paper's abstract and summaries in the
time set for checks. They confirm the loop, the start from a small labelled share, and the two learning
statuses (first good-vs-bad with high confidence, then finer comparisons between similar answers), but not
the exact thresholds; the numbers here are ours and live in the spec.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlp_core.context import RM_DIR, PhaseContext, train_reward_model
from rlp_core.data import PreferencePair
from rlp_core.models import load_reward_model, save_model
from rlp_core.reward_learning import distinct_pairs, gold_accuracy, gold_agreement, histogram
from rlp_core.supervised import encode_preferences, pair_rewards, preference_accuracy


@dataclass(frozen=True)
class Selection:
    status: str  # easy | hard | none
    indices: list[int]  # every pair at or above the bar
    new: list[int]  # of those, the ones not selected before


def confidence(p: float) -> float:
    return max(p, 1.0 - p)


def select_pairs(probabilities: Sequence[float], seen: set[int], high: float, low: float, min_new: int) -> Selection:
    """The learning-status rule: the easy bar while it still brings `min_new` new pairs, then the low bar."""
    for status, bar in (("easy", high), ("hard", low)):
        indices = [i for i, p in enumerate(probabilities) if confidence(p) >= bar]
        new = [i for i in indices if i not in seen]
        if new and len(new) >= min_new:
            return Selection(status, indices, new)
    return Selection("none", [], [])


def stop_reason(iteration: int, max_iterations: int, selection: Selection | None, accuracy: float | None,
                best_accuracy: float | None) -> str | None:
    """Why SER stops after `iteration` (1-based), or None to go on. `selection` None: not yet selected;
    `accuracy` None: not yet retrained this iteration."""
    if selection is not None and selection.status == "none":
        return "too few new confident pairs"
    if accuracy is not None and best_accuracy is not None and not math.isnan(accuracy) and accuracy < best_accuracy:
        return "held-out accuracy fell"
    if accuracy is not None and iteration >= max_iterations:
        return "max iterations"
    return None


@torch.no_grad()
def pair_probabilities(model, tokenizer, pairs: Sequence[tuple[str, str, str]], max_length: int,
                       batch_size: int) -> list[float]:
    """σ(r(x, a) − r(x, b)) for each (x, a, b)."""
    model.eval()
    out: list[float] = []
    for i in range(0, len(pairs), batch_size):
        chunk = [PreferencePair(prompt=x, chosen=a, rejected=b) for x, a, b in pairs[i : i + batch_size]]
        ra, rb = pair_rewards(model, encode_preferences(tokenizer, chunk, max_length, model.device))
        out += torch.sigmoid(ra - rb).tolist()
    return out


def self_label(pair: tuple[str, str, str], p: float) -> PreferencePair:
    x, a, b = pair
    return PreferencePair(prompt=x, chosen=a if p >= 0.5 else b, rejected=b if p >= 0.5 else a)


def run_ser(ctx: PhaseContext) -> dict[str, Any]:
    cfg = ctx.spec.reward_learning.ser
    samples = ctx.samples()
    candidates = distinct_pairs(samples, cfg.max_pairs_per_prompt, ctx.spec.seed + ctx.round)
    train, held_out = ctx.human_pairs()
    gold = ctx.gold()
    current = ctx.out_dir / RM_DIR  # the best RM so far; starts as a copy of the input RM
    shutil.copytree(ctx.reward_model_dir(), current)
    model, tokenizer = load_reward_model(current).to(ctx.device), ctx.tokenizer(current)
    best = preference_accuracy(model, tokenizer, held_out, ctx.max_length, ctx.scoring_rows(model))
    metrics: dict[str, Any] = {"unlabeled_pairs": len(candidates), "human_pairs": len(train),
                               "rm_accuracy_held_out_before": best}
    if gold is not None:
        metrics["rm_accuracy_policy_gold_before"], metrics["policy_gold_pairs"] = gold_accuracy(
            model, tokenizer, samples, gold, ctx.max_length, ctx.scoring_rows(model))
    labelled: dict[int, PreferencePair] = {}
    iterations: list[dict[str, Any]] = []
    reason = None
    for it in range(1, cfg.max_iterations + 1):
        probs = pair_probabilities(model, tokenizer, candidates, ctx.max_length, ctx.scoring_rows(model))
        selection = select_pairs(probs, set(labelled), cfg.high_confidence, cfg.low_confidence, cfg.min_new_pairs)
        row: dict[str, Any] = {"iteration": it, "status": selection.status, "pairs_selected": len(selection.indices),
                               "new_pairs": len(selection.new),
                               "confidence_histogram": histogram([confidence(p) for p in probs], 0.5, 1.0)}
        iterations.append(row)
        reason = stop_reason(it, cfg.max_iterations, selection, None, best)
        if reason:
            break
        trial = {**labelled, **{i: self_label(candidates[i], probs[i]) for i in selection.indices}}
        if gold is not None:
            row["self_labels_gold_accuracy"] = gold_agreement([trial[i] for i in selection.indices], gold)
        model, tokenizer, trained = train_reward_model(ctx, current, train + list(trial.values()), cfg.training,
                                                       f"ser {it}")
        row["rm_accuracy_held_out"] = trained["rm_accuracy_held_out"]
        reason = stop_reason(it, cfg.max_iterations, selection, row["rm_accuracy_held_out"], best)
        row["kept"] = reason != "held-out accuracy fell"
        if not row["kept"]:
            break
        labelled, best = trial, max(best, row["rm_accuracy_held_out"])
        save_model(model, tokenizer, current)
        if reason:
            break
    model, tokenizer = load_reward_model(current).to(ctx.device), ctx.tokenizer(current)
    metrics.update({"iterations": iterations, "stop_reason": reason, "iterations_kept": sum(r.get("kept", False) for r in iterations),
                    "self_labelled_pairs": len(labelled),
                    "rm_accuracy_held_out": preference_accuracy(model, tokenizer, held_out, ctx.max_length, ctx.scoring_rows(model))})
    ctx.telemetry.set_accuracy("held_out", metrics["rm_accuracy_held_out"])
    if gold is not None:
        metrics["rm_accuracy_policy_gold"], _ = gold_accuracy(model, tokenizer, samples, gold, ctx.max_length, ctx.scoring_rows(model))
        metrics["self_labelled_pairs_gold_accuracy"] = gold_agreement(list(labelled.values()), gold)
    return metrics
