"""What the critic-free trainers (GRPO, RLOO) share: grouped rollouts and a baseline from the group.

Each rollout draws rolloutBatchSize / groupSize prompts and samples each groupSize times, in consecutive
rows, so a response's baseline is computed from the other responses to its prompt and no value model is
loaded, trained or checkpointed. Everything else is PPO's loop (rlp_core.ppo): the reference and its KL,
LoRA, DeepSpeed, minibatch epochs with early stopping, checkpoints and resume.
"""

from __future__ import annotations

import torch

from rlp_core import losses
from rlp_core.ppo import PPOTrainer
from rlp_core.sampling import Rollout


class GroupedTrainer(PPOTrainer):
    """PPOTrainer without a critic; subclasses say how a group's rewards become advantages."""

    kl_in_reward: bool = True

    def __post_init__(self) -> None:
        if self.value_model is not None:
            raise ValueError(f"{self.config.algorithm} is critic-free: pass value_model=None")
        super().__post_init__()
        k, per_rank = self.config.group_size, self.config.rollout_batch_size // self.world_size
        if per_rank % k:
            raise ValueError(f"optimization.rolloutBatchSize / processes ({per_rank}) must be a multiple of "
                             f"optimization.{self.config.algorithm}.groupSize ({k}): each process samples whole groups")

    def group_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def draw_prompts(self, n: int) -> list[str]:
        k = self.config.group_size
        return [prompt for prompt in (self._rng.choice(self.prompts) for _ in range(n // k)) for _ in range(k)]

    def advantages(self, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, rollout: Rollout,
                   features: torch.Tensor | None = None):
        """One advantage per response from its group's rewards (scores − β·KL summed over the response when
        the KL is in the reward); the share of groups whose scores are all equal, which carry no signal."""
        rewards = scores - self.kl_ctl.value * kl.sum(1) if self.kl_in_reward else scores
        stats = {"zero_signal_groups": losses.zero_signal_share(scores, self.config.group_size)}
        return self.group_advantages(rewards), None, None, stats
