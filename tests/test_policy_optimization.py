"""PPO, APA, GRPO and RLOO on a toy task with a known optimum (the exact sum), with the gold judge as reward.

Fixed seeds; each bound on an outcome comes from its spread over seeds, measured by bench/outcome_spread.py:
each algorithm must raise the tiny SFT policy's mean reward above its start while the KL to the reference
stays bounded.
"""

import os

import pytest
import torch

from recipes import improvement
from rlp_core.apa import APATrainer
from rlp_core.grouped import GroupedTrainer
from rlp_core.grpo import GRPOTrainer
from rlp_core.models import load_policy, load_tokenizer, load_value_model
from rlp_core.ppo import PPOTrainer
from rlp_core.rloo import RLOOTrainer
from rlp_core.spec import Optimization
from rlp_core.tasks import TASKS

pytestmark = pytest.mark.slow

TASK = TASKS["arith"]


@pytest.fixture
def sft_dir(tiny_sft_dir):
    return tiny_sft_dir


def gold_scores(prompts, responses, rollout):
    return torch.tensor([TASK.gold_score(p, r) for p, r in zip(prompts, responses)])


ALGORITHMS = {"ppo": PPOTrainer, "apa": APATrainer, "grpo": GRPOTrainer, "rloo": RLOOTrainer}


def trainer_for(trainer_cls, sft_dir, seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(steps=60, rollout_batch_size=32, mini_batch_size=16, ppo_epochs=2, learning_rate=5e-4,
                    kl_coef=0.02, max_new_tokens=4, missing_eos_penalty=0.0)
    algorithm = next(name for name, cls in ALGORITHMS.items() if cls is trainer_cls)
    config = Optimization(**(settings | {"algorithm": algorithm} | overrides))
    prompts = [r["prompt"] for r in TASK.records("prompts")]
    critic = None if issubclass(trainer_cls, GroupedTrainer) else load_value_model(sft_dir)
    return trainer_cls(config=config, policy=load_policy(sft_dir), reference=load_policy(sft_dir),
                       value_model=critic, tokenizer=load_tokenizer(sft_dir), score_fn=gold_scores, prompts=prompts,
                       seed=seed)


def train(trainer_cls, sft_dir, seed=0, **overrides):
    return trainer_for(trainer_cls, sft_dir, seed, **overrides).train()


@pytest.mark.parametrize("trainer_cls", list(ALGORITHMS.values()), ids=list(ALGORITHMS))
def test_raises_gold_reward_with_bounded_kl(trainer_cls, sft_dir):
    """The rollouts' mean gold reward over the last 10 of 60 steps is above its mean over the first 5, and the KL
    to the reference stays bounded.

    Measured (docs/bench/outcome-spread.md, "trainers"; seeds 0-9 of the SFT policy and the trainer together,
    1 thread; seed 0 also at 2 threads, the same to the bit), gain / last-10 mean KL / largest single-step KL:
    PPO 0.231-0.331 / 0.56-0.89 / 0.74-1.42; APA 0.146-0.239 / 0.67-1.10 / 0.99-4.25; GRPO 0.099-0.343 /
    0.58-0.98 / 0.93-3.49; RLOO 0.085-0.314 / 0.59-1.01 / 0.97-3.02. The bounds sit at half the smallest gain and
    about twice the largest KLs: a single step's KL is an estimate from 32 samples, and APA's exp(A/λ) target
    moves further in one step than PPO's clip. At the learning rate these tests used before, 1e-3, APA ended
    below its start on seed 4 of 5 and GRPO gained only 0.082 on seed 2 (APA's largest step KL 6.5): 5e-4 is
    where all four improve on every seed measured.
    """
    history = train(trainer_cls, sft_dir)
    first, last = improvement(history)
    assert last > first + 0.04, f"mean reward {first:.3f} -> {last:.3f}"
    assert sum(h["kl"] for h in history[-10:]) / 10 < 2.0
    assert max(h["kl"] for h in history) < 8.0
    assert all(h["kl"] > -1e-3 for h in history[:1])  # starts at the reference: KL ≈ 0


def test_critic_free_trainers_sample_whole_groups_and_hold_no_critic(sft_dir):
    trainer = trainer_for(GRPOTrainer, sft_dir, steps=1, ppo_epochs=1, grpo={"group_size": 8})
    prompts = trainer.draw_prompts(32)
    assert [len(set(prompts[i : i + 8])) for i in range(0, 32, 8)] == [1] * 4  # 4 prompts, 8 samples each in a row
    assert list(trainer.trained) == ["policy"] and not any(k.startswith("value") for k in trainer._state(0)["module"])
    history = trainer.train()
    assert 0 <= history[0]["zero_signal_groups"] <= 1 and "value_loss" not in history[0]
    with pytest.raises(ValueError, match="critic-free"):
        GRPOTrainer(config=trainer.config, policy=trainer.policy, reference=trainer.reference,
                    value_model=load_value_model(sft_dir), tokenizer=trainer.tokenizer, score_fn=gold_scores,
                    prompts=prompts)


def test_first_rollout_is_at_the_reference(sft_dir):
    history = train(PPOTrainer, sft_dir, steps=1, ppo_epochs=1)
    assert abs(history[0]["kl"]) < 1e-4


def test_deepspeed_zero2_trains_and_checkpoints_on_cpu(sft_dir):
    """The ZeRO path CI can run without a GPU: one process, CPU, stage 2; resumes from its checkpoint."""
    from rlp_core.spec import DeepSpeed

    class Memory:
        state = None

        def save(self, step, state):
            self.state = state

        def load(self):
            return self.state

    ckpt = Memory()
    config = Optimization(steps=2, rollout_batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4,
                          checkpoint_every=1, deepspeed=DeepSpeed(enabled="true", zero_stage=2, bf16="false"))
    prompts = [r["prompt"] for r in TASK.records("prompts", n=16)]

    def make():
        return PPOTrainer(config=config, policy=load_policy(sft_dir), reference=load_policy(sft_dir),
                          value_model=load_value_model(sft_dir), tokenizer=load_tokenizer(sft_dir),
                          score_fn=gold_scores, prompts=prompts, seed=0, checkpointer=ckpt)

    trainer = make()
    assert trainer.engine is not None
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & os.environ.keys()  # no leak to subprocesses
    before = next(trainer.policy.parameters()).detach().clone()
    history = trainer.train()
    assert len(history) == 2 and ckpt.state["step"] == 1
    assert not torch.equal(before, next(trainer.policy.parameters()).detach())
    resumed = make()
    assert resumed.start_step == 1 and len(resumed.train()) == 2


def test_lora_checkpoint_holds_only_trained_weights_and_resumes_exactly(sft_dir):
    """A LoRA policy with a head-only critic checkpoints its adapters, the value head and the optimiser state,
    not the frozen backbones (reloaded from their directories on a restart); resumed from step 1, step 2
    repeats the uninterrupted run's step 2 exactly."""
    from rlp_core.checkpoint import decode_state, encode_state
    from rlp_core.models import freeze_backbone, with_lora
    from rlp_core.spec import LoRA

    class Memory:  # a store round trip: tensors copied out, as StoreCheckpointer does
        saved = None

        def save(self, step, state):
            self.saved = encode_state(state)

        def load(self):
            return None if self.saved is None else decode_state(*self.saved)

    ckpt = Memory()
    config = Optimization(steps=2, rollout_batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4,
                          checkpoint_every=1, lora=LoRA(rank=4, alpha=8), critic_training="head")
    prompts = [r["prompt"] for r in TASK.records("prompts", n=16)]

    def make():
        torch.manual_seed(0)
        return PPOTrainer(config=config, policy=with_lora(load_policy(sft_dir), config.lora, "CAUSAL_LM"),
                          reference=None, value_model=freeze_backbone(load_value_model(sft_dir)),
                          tokenizer=load_tokenizer(sft_dir), score_fn=gold_scores, prompts=prompts, seed=0,
                          checkpointer=ckpt)

    uninterrupted = make().train()
    weights = ckpt.load()["module"]
    assert weights and all("lora_" in name or name.endswith(("score.weight", "score.bias")) for name in weights)
    resumed = make()
    assert resumed.start_step == 1
    untimed = lambda stats: {k: v for k, v in stats.items() if k not in ("seconds", "tokens_per_second")}  # noqa: E731
    assert untimed(resumed.train()[1]) == untimed(uninterrupted[1])
