"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300), and the
Dr. GRPO variant (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783).

For each prompt, `groupSize` responses; a response's advantage is its reward minus the group's mean,
divided by the group's standard deviation (outcome supervision, the paper's eq. for Â_i,t), the same for
all its tokens; the loss is PPO's clipped surrogate, averaged over each response's tokens and then over
responses (1/G Σ_i 1/|o_i| Σ_t), plus β·KL to the reference estimated per token by k3 (the paper's
π_ref/π − log(π_ref/π) − 1). Choices:
- the standard deviation is the unbiased one with ε = 1e-4, as TRL's GRPOTrainer;
- `klIn: reward` instead subtracts β·Σ_t log(π/π_ref) from each reward before the group baseline, as PPO
  here does (and as many GRPO runs that set the loss term's β to 0 do not do at all);
- `scaleRewards: false` and `lengthNormalize: false` give Dr. GRPO: both normalisations bias the update
  (the std one towards groups that are nearly all right or all wrong, the length one towards long wrong
  answers), so it centres only and divides each response's token sum by the constant maxNewTokens;
- groups whose scores are all equal have zero advantage; their share is the `zero_signal_groups` metric.
"""

from __future__ import annotations

import torch

from rlp_core import losses
from rlp_core.grouped import GroupedTrainer
from rlp_core.ppo import Experience


class GRPOTrainer(GroupedTrainer):
    def __post_init__(self) -> None:
        self.kl_in_reward = self.config.grpo.kl_in == "reward"
        super().__post_init__()

    def group_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        cfg = self.config.grpo
        return losses.group_advantages(rewards, cfg.group_size, scale=cfg.scale_rewards)

    def policy_loss(self, logprobs: torch.Tensor, batch: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        return losses.grpo_policy_loss(
            logprobs, batch.logprobs, batch.ref_logprobs, batch.advantages, batch.mask, cfg.grpo.clip_range,
            kl_coef=0.0 if self.kl_in_reward else self.kl_ctl.value, length_normalize=cfg.grpo.length_normalize,
            max_tokens=cfg.max_new_tokens)
