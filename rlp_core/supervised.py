"""Supervised training shared by SFT, reward modelling and the reward-learning strategies.

`fit` is the one optimisation loop of the supervised phases: AdamW, linear warm-up/decay
(transformers' scheduler), gradient clipping, a tqdm bar and telemetry per step. Each caller supplies
only its loss on a minibatch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerFast, get_scheduler

from rlp_core.data import Demonstration, PreferencePair
from rlp_core.losses import bradley_terry_loss, masked_mean
from rlp_core.memory import chunks
from rlp_core.models import encode_pairs, position_ids, reward_scores, token_logprobs
from rlp_core.spec import Training
from rlp_core.telemetry import PhaseTelemetry

T = TypeVar("T")


def minibatches(items: Sequence[T], batch_size: int, epochs: float, seed: int) -> list[list[T]]:
    """Shuffled minibatches for `epochs` passes (a fractional last pass takes its first share)."""
    rng = random.Random(seed)
    batches: list[list[T]] = []
    total = max(1, math.ceil(len(items) * epochs / batch_size))
    while len(batches) < total:
        order = list(items)
        rng.shuffle(order)
        batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[:total]


# batch -> [(micro-batch, its share of the batch's loss)]: the shares sum to 1
MicroBatches = Callable[[Any], list[tuple[Any, float]]]


def whole(batch: Any) -> list[tuple[Any, float]]:
    return [(batch, 1.0)]


def weighted_pairs(size: int) -> MicroBatches:
    """Micro-batches of at most `size` preference pairs, each weighing its share of the pair weights: the
    Bradley-Terry loss is Σ w·ℓ / Σ w over the batch, so the accumulated gradient is the whole batch's."""

    def split(batch: list[PreferencePair]) -> list[tuple[list[PreferencePair], float]]:
        total = sum(p.weight for p in batch)
        return [(part, sum(p.weight for p in part) / total) for part in chunks(batch, size)]

    return split


def fit(
    parameters: list[torch.nn.Parameter],
    batches: list[Any],
    loss_fn: Callable[[Any], tuple[torch.Tensor, dict[str, float]]],
    training: Training,
    telemetry: PhaseTelemetry | None = None,
    description: str = "train",
    micro_batches: MicroBatches = whole,
) -> list[dict[str, float]]:
    """Minimise `loss_fn` over `batches`; returns the per-step stats. Each batch may be cut into
    `micro_batches` whose gradients accumulate into one optimiser step (batches sized by memory,
    rlp_core.memory); a step's stats are the share-weighted means of its micro-batches' (tokens summed)."""
    optimizer = torch.optim.AdamW(parameters, lr=training.learning_rate, weight_decay=training.weight_decay)
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=int(training.warmup_ratio * len(batches)), num_training_steps=len(batches)
    )
    if telemetry is not None:
        telemetry.total_steps = len(batches)
    history = []
    for batch in tqdm(batches, desc=description, leave=False, mininterval=1.0):
        optimizer.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        for part, share in micro_batches(batch):
            loss, part_stats = loss_fn(part)
            (loss * share).backward()
            for k, v in part_stats.items():
                stats[k] = stats.get(k, 0.0) + float(v) * (1.0 if k == "tokens" else share)
        torch.nn.utils.clip_grad_norm_(parameters, training.max_grad_norm)
        optimizer.step()
        scheduler.step()
        history.append(stats)
        if telemetry is not None:
            telemetry.step(tokens=int(stats.pop("tokens", 0)), **stats)
    return history


def sft_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, max_length: int):
    """Negative log-likelihood of the response tokens (and EOS) given the prompt."""

    def loss_fn(batch: list[Demonstration]) -> tuple[torch.Tensor, dict[str, float]]:
        enc = encode_pairs(tokenizer, [d.prompt for d in batch], [d.response for d in batch], max_length)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    position_ids=position_ids(enc["attention_mask"]))
        logp = token_logprobs(out.logits[:, :-1], enc["input_ids"][:, 1:])
        mask = enc["response_mask"][:, 1:]
        loss = -masked_mean(logp, mask)
        return loss, {"sft_loss": loss.item(), "tokens": int(enc["attention_mask"].sum())}

    return loss_fn


@dataclass
class PairBatch:
    """Chosen and rejected sequences of a list of pairs, encoded once."""

    chosen: dict[str, torch.Tensor]
    rejected: dict[str, torch.Tensor]


def encode_preferences(
    tokenizer: PreTrainedTokenizerFast, pairs: Sequence[PreferencePair], max_length: int, device: torch.device
) -> PairBatch:
    prompts = [p.prompt for p in pairs]
    c = encode_pairs(tokenizer, prompts, [p.chosen for p in pairs], max_length)
    r = encode_pairs(tokenizer, prompts, [p.rejected for p in pairs], max_length)
    keep = ("input_ids", "attention_mask")
    return PairBatch({k: c[k].to(device) for k in keep}, {k: r[k].to(device) for k in keep})


def pair_rewards(model: PreTrainedModel, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return reward_scores(model, **batch.chosen), reward_scores(model, **batch.rejected)


def reward_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, max_length: int):
    """Bradley–Terry pairwise loss on preference pairs."""

    def loss_fn(batch: list[PreferencePair]) -> tuple[torch.Tensor, dict[str, float]]:
        enc = encode_preferences(tokenizer, batch, max_length, model.device)
        chosen, rejected = pair_rewards(model, enc)
        weight = torch.tensor([p.weight for p in batch], dtype=chosen.dtype, device=chosen.device)
        loss = bradley_terry_loss(chosen, rejected, weight)
        acc = (chosen > rejected).float().mean()
        return loss, {"reward_loss": loss.item(), "rm_accuracy_train": acc.item(),
                      "tokens": int(enc.chosen["attention_mask"].sum() + enc.rejected["attention_mask"].sum())}

    return loss_fn


@torch.no_grad()
def preference_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, pairs: Sequence[PreferencePair],
    max_length: int, batch_size: int,
) -> float:
    """Share of pairs where the RM scores `chosen` above `rejected` (ties count half)."""
    if not pairs:
        return float("nan")
    was_training = model.training
    model.eval()
    score = 0.0
    for i in range(0, len(pairs), batch_size):
        chosen, rejected = pair_rewards(model, encode_preferences(tokenizer, pairs[i : i + batch_size], max_length, model.device))
        score += float((chosen > rejected).sum() + 0.5 * (chosen == rejected).sum())
    model.train(was_training)
    return score / len(pairs)
