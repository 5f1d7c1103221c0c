"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740; Kool et al. 2019).

For each prompt, `groupSize` responses; each response is one action (the whole sequence, as the paper
models it), its reward the score minus β·Σ_t log(π/π_ref) (the KL in the reward, as the paper), and its
baseline the mean reward of the other k − 1 responses to the same prompt: unbiased and critic-free. The
loss is −A·log π(y) = −A·Σ_t log π(y_t), averaged over responses. Choice: the ratio to the rollout policy
is clipped per token (rloo.clipRange) so that ppoEpochs > 1 stays on-policy enough; in the first epoch the
ratio is 1 and the update is exactly the paper's REINFORCE (TRL's RLOOTrainer clips likewise).
"""

from __future__ import annotations

import torch

from rlp_core import losses
from rlp_core.grouped import GroupedTrainer
from rlp_core.ppo import Experience


class RLOOTrainer(GroupedTrainer):
    def group_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return losses.leave_one_out_advantages(rewards, self.config.rloo.group_size)

    def policy_loss(self, logprobs: torch.Tensor, batch: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return losses.rloo_policy_loss(logprobs, batch.logprobs, batch.advantages, batch.mask, self.config.rloo.clip_range)
