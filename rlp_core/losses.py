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


def clipped_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) (A per token, or per response as (B, 1)); with the clip
    fraction and approximate KL to the rollout policy over valid tokens."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        }
    return torch.max(unclipped, clipped), stats


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate, token-averaged; also clip fraction and approximate KL."""
    per_token, stats = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range)
    return masked_mean(per_token, mask), stats


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantage of each response: its reward minus its group's mean, divided by the group's
    (unbiased) standard deviation + ε when `scale` (Dr. GRPO: centred only). A group is `group_size`
    consecutive responses to one prompt; a group whose rewards are all equal gets 0 everywhere."""
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if scale:
        centred = centred / (groups.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage: a response's reward minus the mean of the other k − 1 rewards of its group."""
    groups = scores.view(-1, group_size)
    baseline = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


def zero_signal_share(scores: torch.Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal: their advantages are 0, so they teach nothing."""
    groups = scores.view(-1, group_size)
    return (groups.max(1).values == groups.min(1).values).float().mean().item()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(π‖π_ref) per sampled token, exp(δ) − δ − 1 with δ = log π_ref − log π: unbiased
    and never negative (Schulman 2020; GRPO's KL term)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def grpo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, advantages: torch.Tensor,
    mask: torch.Tensor, clip_range: float, kl_coef: float, length_normalize: bool = True, max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO: the clipped surrogate with one advantage per response (B,), plus β·k3 KL per token (β = 0: the KL
    is in the reward instead). `length_normalize`: each response's token mean, then the mean over responses
    (the paper's 1/G Σ_i 1/|o_i| Σ_t); else each response's token sum over `max_tokens` (Dr. GRPO)."""
    per_token, stats = clipped_surrogate(logprobs, old_logprobs, advantages.unsqueeze(1), mask, clip_range)
    kl = k3_kl(logprobs, ref_logprobs)
    if kl_coef:
        per_token = per_token + kl_coef * kl
    m = mask.to(per_token.dtype)
    if length_normalize:
        per_response = (per_token * m).sum(1) / m.sum(1).clamp(min=1)
    else:
        if max_tokens is None:
            raise ValueError("length_normalize=False needs max_tokens (the constant the token sums are divided by)")
        per_response = (per_token * m).sum(1) / max_tokens
    with torch.no_grad():
        stats["k3_kl"] = masked_mean(kl, mask)
    return per_response.mean(), stats


def rloo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO: REINFORCE of each whole response, A·log π(y) = A·Σ_t log π(y_t), with one advantage per response
    (B,); the ratio is clipped per token, which changes nothing in the first epoch (ρ = 1)."""
    per_token, stats = clipped_surrogate(logprobs, old_logprobs, advantages.unsqueeze(1), mask, clip_range)
    return (per_token * mask.to(per_token.dtype)).sum(1).mean(), stats


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

