"""RLP-UML, the refine phase: a multi-view information bottleneck (MIB) on policy samples, trained jointly
with the pairwise loss on human preferences:

    L = L_R(φ; D_L) + α · [ −I(z¹; z²) + β_t · D_SKL(p(z¹|v¹) ‖ p(z²|v²)) ]

- Views: two policy outputs of the same instruction, v¹ = (x, y¹), v² = (x, y²). An epoch pairs up each
  prompt's samples at random, disjointly, so every sample is a view once per epoch.
- Stochastic representation: p(z|v) = N(μ(v), diag σ²(v)) where μ(v) is the RM's own representation —
  the last token's final hidden state, exactly what the scalar head reads — and σ(v) = softplus(W·μ + b)
  comes from an auxiliary head. So the reward reads the mean representation and the bottleneck shapes the
  very features the reward uses; the saved RM is a plain sequence classifier (σ head and critic are
  training-only and discarded). z is drawn with the reparameterisation trick.
- I(z¹; z²): the Jensen–Shannon lower bound of Federici et al. (their code's estimator, after Hjelm et
  al.), E_pos[−softplus(−T)] − E_neg[softplus(T)], with an MLP critic T on [z¹, z²]; the negatives are
  all in-batch cross pairs (z¹_i, z²_j) whose prompts differ (other views of the same instruction are
  not negatives).
- D_SKL: ½(KL(p¹‖p²) + KL(p²‖p¹)) in closed form for diagonal Gaussians, summed over dimensions.
- β_t rises exponentially from `betaStart` to `beta` over the phase's steps (Federici et al. anneal β the
  same way, from small to final); α weighs MIB against the pairwise loss.

Choices (the spec's *(check)* items): the RLP paper's text and code (DAMO-ConvAI `rlp/`, a placeholder
README at the time of writing) could not be consulted in the time set for checks. The view construction
above is the spec's and is the direct analogue of MIB's two augmentations of one image (what is shared
between two answers to one instruction is the instruction's intent); α, β defaults are ours and modest,
so the human pairwise loss stays the main signal.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rlp_core.context import RM_DIR, PhaseContext, PhaseError, load_trainable_reward_model
from rlp_core.data import PreferencePair, Sample
from rlp_core.memory import DecoderShape
from rlp_core.models import enable_gradient_checkpointing, encode_pairs, last_token_hidden, save_model
from rlp_core.reward_learning import by_prompt, gold_accuracy
from rlp_core.supervised import fit, minibatches, preference_accuracy, reward_loss


# --- pure terms (unit-tested on hand-computed numbers) -------------------------------------------------
def gaussian_kl(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """KL(N(μ1, σ1²) ‖ N(μ2, σ2²)) per row, diagonal Gaussians, summed over the last dimension."""
    kl = torch.log(sigma2 / sigma1) + (sigma1**2 + (mu1 - mu2) ** 2) / (2 * sigma2**2) - 0.5
    return kl.sum(-1)


def symmetric_kl(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """½(KL(p¹‖p²) + KL(p²‖p¹)) per row."""
    return 0.5 * (gaussian_kl(mu1, sigma1, mu2, sigma2) + gaussian_kl(mu2, sigma2, mu1, sigma1))


def jsd_mi_lower_bound(scores: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon bound on I(z¹; z²) from critic scores T[i, j] = T(z¹_i, z²_j): the diagonal holds
    the positive (same-instruction) pairs, `negatives[i, j]` marks the off-diagonal pairs used as negatives."""
    positive = -F.softplus(-scores.diagonal()).mean()
    negative = F.softplus(scores[negatives]).mean() if negatives.any() else scores.new_zeros(())
    return positive - negative


def beta_at(step: int, total: int, start: float, end: float) -> float:
    """Exponential ramp from `start` (first step) to `end` (last step); linear when start is 0."""
    frac = step / max(1, total - 1)
    if start <= 0 or end <= 0:
        return start + (end - start) * frac
    return start * (end / start) ** frac


# --- the heads that exist only while training ----------------------------------------------------------
class MIBHeads(nn.Module):
    """σ(v) of the stochastic representation and the critic T(z¹, z²) of the MI bound."""

    def __init__(self, dim: int, critic_width: int | None = None):
        super().__init__()
        self.sigma = nn.Linear(dim, dim)
        width = critic_width or 2 * dim
        self.critic = nn.Sequential(nn.Linear(2 * dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                    nn.Linear(width, 1))

    def scale(self, mu: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.sigma(mu)) + 1e-4

    def scores(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """T[i, j] = critic([z1_i, z2_j]) for every i, j."""
        n = z1.shape[0]
        grid = torch.cat([z1.unsqueeze(1).expand(n, n, -1), z2.unsqueeze(0).expand(n, n, -1)], dim=-1)
        return self.critic(grid).squeeze(-1)



def view_pairs(samples: Sequence[Sample], epochs: float, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, y¹, y²) pairs: per epoch, each prompt's samples shuffled and paired up disjointly."""
    rng = random.Random(seed)
    groups = list(by_prompt(samples).values())
    out: list[tuple[str, str, str]] = []
    for _ in range(max(1, math.ceil(epochs))):
        epoch = []
        for group in groups:
            order = rng.sample(group, len(group))
            epoch += [(order[i].prompt, order[i].response, order[i + 1].response) for i in range(0, len(order) - 1, 2)]
        rng.shuffle(epoch)
        out += epoch
    return out[: max(1, round(len(out) * epochs / max(1, math.ceil(epochs))))]


def mib_loss_fn(model, heads: MIBHeads, tokenizer, max_length: int, alpha: float, beta_of_step):
    """Loss on one (human pairs, view pairs) step: L_R + α(−I + β·SKL)."""
    pairwise = reward_loss(model, tokenizer, max_length)
    step = 0

    def loss_fn(batch: tuple[list[PreferencePair], list[tuple[str, str, str]]]) -> tuple[torch.Tensor, dict[str, float]]:
        nonlocal step
        human, views = batch
        loss_r, stats = pairwise(human)
        prompts = [v[0] for v in views]
        enc = encode_pairs(tokenizer, prompts * 2, [v[1] for v in views] + [v[2] for v in views], max_length)
        ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
        mu1, mu2 = last_token_hidden(model, ids, mask).float().chunk(2)
        s1, s2 = heads.scale(mu1), heads.scale(mu2)
        z1, z2 = mu1 + s1 * torch.randn_like(s1), mu2 + s2 * torch.randn_like(s2)
        negatives = torch.tensor([[a != b for b in prompts] for a in prompts], device=model.device)
        mi = jsd_mi_lower_bound(heads.scores(z1, z2), negatives)
        skl = symmetric_kl(mu1, s1, mu2, s2).mean()
        beta = beta_of_step(step)
        step += 1
        mib = -mi + beta * skl
        stats.update(mib_loss=mib.item(), mib_mi_jsd=mi.item(), mib_skl=skl.item(), mib_beta=beta,
                     tokens=stats["tokens"] + int(mask.sum()))
        return loss_r + alpha * mib, stats

    return loss_fn


def run_refine(ctx: PhaseContext) -> dict[str, Any]:
    cfg = ctx.spec.reward_learning.uml
    training = cfg.training
    init_dir = ctx.reward_model_dir()
    tokenizer, model = ctx.tokenizer(init_dir), load_trainable_reward_model(ctx, init_dir)
    samples = ctx.samples()
    train, held_out = ctx.human_pairs()
    gold = ctx.gold()
    seed = ctx.spec.seed + ctx.round

    def accuracies(suffix: str) -> dict[str, float]:
        out = {f"rm_accuracy_held_out{suffix}": preference_accuracy(model, tokenizer, held_out, ctx.max_length, ctx.scoring_rows(model))}
        if gold is not None:
            out[f"rm_accuracy_policy_gold{suffix}"], out["policy_gold_pairs"] = gold_accuracy(
                model, tokenizer, samples, gold, ctx.max_length, ctx.scoring_rows(model))
        return out

    metrics: dict[str, Any] = {"human_pairs": len(train), **accuracies("_before")}
    views = view_pairs(samples, training.epochs, seed)
    if not views:
        raise PhaseError("rlp-uml needs two views per prompt: set spec.generation.samplesPerPrompt to 2 or more")
    view_batches = [views[i : i + training.batch_size] for i in range(0, len(views), training.batch_size)]
    human_epochs = len(view_batches) * training.batch_size / max(1, len(train))
    human_batches = minibatches(train, training.batch_size, human_epochs, seed)[: len(view_batches)]
    heads = MIBHeads(model.config.hidden_size).to(ctx.device)
    total = len(view_batches)
    loss_fn = mib_loss_fn(model, heads, tokenizer, ctx.max_length, cfg.alpha,
                          lambda step: beta_at(step, total, cfg.beta_start, cfg.beta))
    # a step's sequences (two per human pair, two per view pair) form one contrastive batch, which micro-
    # batches would change (its negatives are in-batch): when they do not fit spec.batchMemory, checkpoint
    per_step = 2 * len(human_batches[0]) + 2 * len(view_batches[0])
    checkpointing = ctx.rows_that_fit(model, DecoderShape.training_row, per_step) < per_step
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    history = fit(trainable + list(heads.parameters()), list(zip(human_batches, view_batches)),
                  loss_fn, training, ctx.telemetry, "refine")
    model.eval()
    metrics.update(accuracies(""))
    ctx.telemetry.set_accuracy("held_out", metrics["rm_accuracy_held_out"])
    first, last = history[: max(1, len(history) // 5)], history[-max(1, len(history) // 5):]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    metrics.update({
        "view_pairs": len(views), "steps": len(history), "gradient_checkpointing": checkpointing, "alpha": cfg.alpha, "beta_final": history[-1]["mib_beta"],
        **{f"{k}_first": mean(first, k) for k in ("reward_loss", "mib_loss", "mib_mi_jsd", "mib_skl")},
        **{f"{k}_last": mean(last, k) for k in ("reward_loss", "mib_loss", "mib_mi_jsd", "mib_skl")},
    })
    save_model(model, tokenizer, ctx.out_dir / RM_DIR)
    return metrics
