"""APA: Advantage-Induced Policy Alignment (Zhu et al. 2023, arXiv 2306.02231), following specs/apa.md.

The KL-regularised optimum is π*(a|s) ∝ π_init(a|s)·exp(A(s,a)/λ); APA regresses log π_θ onto it with a
squared error instead of PPO's clipped ratio. Everything else (rollout, KL-shaped rewards, GAE, value
loss, minibatch epochs) is PPO's loop, so `optimization.algorithm: ppo|apa` switches with no other change.

Choices recorded from the paper and its trlx-based code (the *(check)* items of the spec):
- π_init is the frozen reference policy PPO uses for its KL penalty, not the rollout policy.
- log Z(s) is dropped: advantages are whitened per batch (centred), as in PPO's pipeline the code reuses.
- λ divides the advantage (`A/λ`); the paper's scripts expose its inverse as a coefficient on A
  (`ADV_COEFF_SQ`, 10 in most scripts), so our default λ=0.1 matches their usual setting.
"""

from __future__ import annotations

import torch

from rlp_core import losses
from rlp_core.ppo import Experience, PPOTrainer


class APATrainer(PPOTrainer):
    def policy_loss(self, logprobs: torch.Tensor, batch: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return losses.apa_policy_loss(logprobs, batch.ref_logprobs, batch.advantages, batch.mask,
                                      self.config.apa.lam, old_logprobs=batch.logprobs)

