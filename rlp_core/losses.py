"""Losses and estimators as pure tensor functions (unit-tested on hand-computed numbers).

Shapes: `(batch, tokens)` for per-token quantities, with `mask` 1 on valid response tokens.
Averages over tokens are token-level: the sum over valid tokens divided by their count (the
"N implementation details" choice), so padding never dilutes a loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to unit variance over valid tokens only (padding neither counts nor changes)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if n > 1:  # unbiased, as PPO implementations do
        var = var * n / (n - 1)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask.to(x.dtype)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """−log σ(r_w − r_l), averaged over pairs (weighted: Σ w·ℓ / Σ w)."""
    losses = -F.logsigmoid(chosen - rejected)
    if weight is None:
        return losses.mean()
    return (weight * losses).sum() / weight.sum()


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    Values past the last valid token count as 0 (the episode ends at EOS or the length limit).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    T = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    advs = []
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advs.append(last)
    advantages = torch.stack(advs[::-1], dim=1)
    return advantages, advantages + values


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The k1 estimator log π − log π_ref of the sampled tokens (mean is KL(π‖π_ref) on-policy)."""
    return logprobs - ref_logprobs


def shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: −β·KL on every response token, the RM score added on the last valid one."""
    rewards = -kl_coef * kl * mask
    last = (mask.long().cumsum(1).argmax(1))  # index of the last valid token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), token-averaged; also clip fraction and approximate KL."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        }
    return loss, stats


def apa_policy_loss(
    logprobs: torch.Tensor,
    init_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    lam: float,
    old_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """APA: (log π_θ − log π_init − A/λ)², token-averaged (Zhu et al. 2023, eq. for L_APA).

    The normaliser log Z(s) is dropped because the advantages are centred (whitened per batch), as in the
    paper's trlx-based code, which shares PPO's advantage pipeline. `old_logprobs` only feeds the
    approximate-KL statistic used for early stopping.
    """
    target = init_logprobs + advantages / lam
    loss = masked_mean((logprobs - target) ** 2, mask)
    with torch.no_grad():
        ref = old_logprobs if old_logprobs is not None else init_logprobs
        stats = {"clip_fraction": torch.zeros(()), "approx_kl": masked_mean(0.5 * (logprobs - ref) ** 2, mask)}
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """½·max((V − R)², (clip(V, V_old ± ε_v) − R)²), token-averaged."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)
    with torch.no_grad():
        frac = masked_mean(((values - returns) ** 2 < (clipped - returns) ** 2).float(), mask)
    return loss, {"value_clip_fraction": frac}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
