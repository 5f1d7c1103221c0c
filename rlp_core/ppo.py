"""PPO for language models (the optimize phase), following specs/ppo.md.

One iteration: sample responses from the current policy; score them (RM at the last token, a fixed
penalty when a response has no EOS); shape per-token rewards with −β·KL to the frozen reference policy;
GAE (γ, λ) over the value model's estimates; whiten advantages over valid tokens; then `ppo_epochs`
passes of minibatch updates of the clipped policy loss plus the clipped value loss, stopping an epoch
early when the approximate KL to the rollout policy exceeds `max_approx_kl`. β is fixed, or adapted
towards `target_kl` (Ziegler et al. 2019). APA (rlp_core.apa) reuses this loop with another policy loss;
GRPO and RLOO (rlp_core.grpo, rlp_core.rloo) with grouped prompts, group baselines and no critic.

Policy and critic each have their own optimiser (and DeepSpeed engine) and their gradients are
clipped separately, as OpenRLHF does: clipped together, the critic's larger gradient norm shrinks the
policy's steps several-fold. Dropout is off in all four models (as in TRL): the rollout's log-probs and
values come from eval mode, so the update must see the same functions. Training runs in plain torch, or
under DeepSpeed ZeRO when enabled (auto: CUDA present or several processes).
State is checkpointed every `checkpoint_every` iterations through a `Checkpointer`, and a restarted
phase resumes from the latest one.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerFast, get_scheduler

from rlp_core import losses
from rlp_core.checkpoint import CheckpointError
from rlp_core.models import (
    backbone_frozen, critic_features, disable_dropout, response_logprobs, stop_token_ids, suppressed_token_ids, value_head,
)
from rlp_core.sampling import Rollout, decode_responses, sample_responses
from rlp_core.spec import Optimization
from rlp_core.telemetry import POLICY_STATS, PhaseTelemetry

# (prompts, responses, rollout) -> scores (B,)
ScoreFn = Callable[[list[str], list[str], Rollout], torch.Tensor]
# (prompts, responses) -> gold scores: recorded beside the proxy reward when the run has a gold judge
GoldFn = Callable[[list[str], list[str]], list[float]]


class Checkpointer(Protocol):
    def save(self, step: int, state: dict[str, Any]) -> None: ...
    def load(self) -> dict[str, Any] | None: ...


@dataclass
class AdaptiveKL:
    """β update of Ziegler et al.: proportional control of the observed KL towards a target."""

    value: float
    target: float | None
    horizon: int = 10000

    def update(self, observed_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, observed_kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon


@dataclass
class Experience:
    """A scored rollout with everything the update needs, detached."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None  # None without a critic (grpo, rloo)
    advantages: torch.Tensor  # per token (ppo, apa) or per response (grpo, rloo)
    returns: torch.Tensor | None
    prompt_len: int
    critic_features: torch.Tensor | None = None  # a frozen critic backbone's, computed once per rollout

    def select(self, idx: torch.Tensor) -> Experience:
        return Experience(**{k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()})


def value_forward(value_model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                  features: torch.Tensor | None = None) -> torch.Tensor:
    """V(s_t) for each response token t: the value head read at the position before the token. Given the
    backbone's `features` there (`critic_features`), only the head runs."""
    if features is None:
        features = critic_features(value_model, sequences, attention_mask, prompt_len)
    return value_head(value_model)(features).squeeze(-1).float()


class _PolicyAndValue(nn.Module):
    """Policy and critic in one module: the unit checkpoints save and restore."""

    def __init__(self, policy: PreTrainedModel, value: PreTrainedModel | None):
        super().__init__()
        self.policy = policy
        self.value = value


@dataclass
class OptimisedModel:
    """One trained model with its own optimiser, scheduler, gradient clipping and (optional) DeepSpeed engine."""

    model: nn.Module
    optimizer: Any
    scheduler: Any
    engine: Any | None
    max_grad_norm: float

    def step(self, loss: torch.Tensor) -> float:
        """Backward, clip, step; returns the gradient norm before clipping (nan under DeepSpeed)."""
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else math.nan
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)


def deepspeed_wanted(setting: str) -> bool:
    if setting != "auto":
        return setting == "true"
    return torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def _single_process_rendezvous() -> Iterator[None]:
    """Outside torchrun, give DeepSpeed a one-process group on loopback instead of MPI discovery.

    The launcher variables are set only while DeepSpeed forms its group and are removed after: left in
    `os.environ` they would make every later subprocess (a torchrun launch among them) think it is rank 0 of an
    existing world."""
    if "WORLD_SIZE" in os.environ:
        yield
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    saved = {k: os.environ.get(k) for k in launcher}
    os.environ.update(launcher)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class PPOTrainer:
    config: Optimization
    policy: PreTrainedModel
    reference: PreTrainedModel | None  # None: the policy is a peft model and its adapters-disabled self is the reference
    value_model: PreTrainedModel | None  # None: a critic-free algorithm (rlp_core.grpo, rlp_core.rloo)
    tokenizer: PreTrainedTokenizerFast
    score_fn: ScoreFn
    prompts: Sequence[str]
    seed: int = 0
    telemetry: PhaseTelemetry | None = None
    checkpointer: Checkpointer | None = None
    gold_fn: GoldFn | None = None
    step_callback: Callable[[PPOTrainer, dict[str, float]], None] | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for model in (self.policy, self.reference, self.value_model):
            if model is not None:
                disable_dropout(model)
        # criticTraining: head: the backbone's features do not change while the head trains, so each minibatch
        # reuses the rollout's and runs only the head (ppoEpochs forward passes of a whole model fewer a step)
        self.frozen_critic_backbone = self.value_model is not None and backbone_frozen(self.value_model)
        if self.reference is not None:
            self.reference.eval().requires_grad_(False)
        elif not hasattr(self.policy, "disable_adapter"):
            raise ValueError("reference=None needs a peft (LoRA) policy, whose disabled adapters give the reference")
        self.suppress = suppressed_token_ids(self.tokenizer, stop_token_ids(self.policy, self.tokenizer))
        self.kl_ctl = AdaptiveKL(self.config.kl_coef, self.config.target_kl)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self._build_optimizer()
        self.start_step = 0
        self._rng = random.Random(self.seed + self.rank)
        if self.checkpointer is not None:
            state = self.checkpointer.load()
            if state is not None:
                self._restore(state)

    # --- what the other algorithms change: the policy loss (APA), prompts and advantages (GRPO, RLOO) ----
    def policy_loss(self, logprobs: torch.Tensor, batch: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return losses.ppo_policy_loss(logprobs, batch.logprobs, batch.advantages, batch.mask, self.config.ppo.clip_range)

    def draw_prompts(self, n: int) -> list[str]:
        """The prompts of one rollout of n responses: drawn independently."""
        return [self._rng.choice(self.prompts) for _ in range(n)]

    def advantages(self, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, rollout: Rollout,
                   features: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict[str, float]]:
        """(advantages, old values, returns, stats): per-token rewards shaped by −β·KL, GAE over the critic's
        values (from its backbone's `features`), advantages whitened over valid tokens."""
        cfg = self.config
        values = value_forward(self.value_model, rollout.sequences, rollout.attention_mask, rollout.prompt_len,
                               features) * mask
        rewards = losses.shaped_rewards(scores, kl, mask, self.kl_ctl.value)
        if cfg.whiten_rewards:
            rewards = losses.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = losses.gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)
        return losses.masked_whiten(advantages, mask), values, returns, {}

    # --- set-up -------------------------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        cfg = self.config
        self.module = _PolicyAndValue(self.policy, self.value_model)
        updates_per_step = cfg.ppo_epochs * math.ceil(cfg.rollout_batch_size / cfg.mini_batch_size)
        use_deepspeed = deepspeed_wanted(cfg.deepspeed.enabled)
        with _single_process_rendezvous() if use_deepspeed else contextlib.nullcontext():
            self.trained = {"policy": self._optimised(self.policy, cfg.learning_rate, updates_per_step, use_deepspeed)}
            if self.value_model is not None:
                self.trained["value"] = self._optimised(self.value_model, cfg.value_learning_rate or cfg.learning_rate,
                                                        updates_per_step, use_deepspeed)

    def _optimised(self, model: nn.Module, lr: float, updates_per_step: int, use_deepspeed: bool) -> OptimisedModel:
        cfg = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, eps=1e-5)
        scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.warmup_steps * updates_per_step)
        if not use_deepspeed:
            return OptimisedModel(model, optimizer, scheduler, None, cfg.max_grad_norm)
        import deepspeed

        bf16 = cfg.deepspeed.bf16 == "true" or (
            cfg.deepspeed.bf16 == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        )
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.mini_batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.max_grad_norm,
            "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
        }
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        return OptimisedModel(model, optimizer, scheduler, engine, cfg.max_grad_norm)

    @property
    def engine(self) -> Any | None:
        return self.trained["policy"].engine

    def _trained_weights(self) -> dict[str, torch.Tensor]:
        """The weights training changes. Frozen ones (a LoRA policy's backbone, a head-only critic's) are
        reloaded from their model directories when the phase restarts, so a checkpoint leaves them out:
        on SmolLM2 with LoRA that is 1.1 GB of a 1.1 GB state, copied twice in memory at every save."""
        trained = {name for name, p in self.module.named_parameters() if p.requires_grad}
        return {name: t for name, t in self.module.state_dict().items() if name in trained}

    def _state(self, step: int) -> dict[str, Any]:
        state = {
            "step": step,
            "module": self._trained_weights(),
            "kl_coef": self.kl_ctl.value,
            "history": list(self.history),
            "rng": {"python": self._rng.getstate(), "torch": torch.get_rng_state()},
        }
        if self.engine is None:  # ZeRO partitions optimizer state per rank: resume restarts Adam's moments
            state |= {"optimizer": {k: t.optimizer.state_dict() for k, t in self.trained.items()},
                      "scheduler": {k: t.scheduler.state_dict() for k, t in self.trained.items()}}
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        # strict=False: frozen weights are not in the checkpoint (see _trained_weights); a name the model does
        # not have means the checkpoint is of another model
        unexpected = self.module.load_state_dict(state["module"], strict=False).unexpected_keys
        if unexpected:
            raise CheckpointError(f"the checkpoint holds weights this model does not have ({unexpected[:3]}…): it was "
                                  "made with other model settings; delete the phase's _checkpoints/ to start it over")
        if "optimizer" in state and self.engine is None:
            for name, trained in self.trained.items():
                trained.optimizer.load_state_dict(state["optimizer"][name])
                trained.scheduler.load_state_dict(state["scheduler"][name])
        self.kl_ctl.value = state["kl_coef"]
        self.history = list(state["history"])
        self._rng.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        self.start_step = state["step"]

    # --- rollout ------------------------------------------------------------------------------------
    @torch.no_grad()
    def reference_logprobs(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """log π_ref of the response tokens: the reference model's, or the LoRA policy's with adapters disabled."""
        args = (sequences, attention_mask, prompt_len, self.config.temperature, self.suppress)
        if self.reference is not None:
            return response_logprobs(self.reference, *args)[0]
        with self.policy.disable_adapter():
            return response_logprobs(self.policy, *args)[0]

    @torch.no_grad()
    def make_experience(self, prompts: list[str]) -> tuple[Experience, dict[str, float]]:
        cfg = self.config
        rollout = sample_responses(self.policy, self.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature)
        responses = decode_responses(self.tokenizer, rollout)
        scores = self.score_fn(prompts, responses, rollout).float().to(rollout.sequences.device)
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(rollout.finished, scores, torch.full_like(scores, cfg.missing_eos_penalty))
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        mask = rollout.response_mask
        ref_logprobs = self.reference_logprobs(rollout.sequences, rollout.attention_mask, rollout.prompt_len) * mask
        kl = losses.kl_per_token(rollout.logprobs, ref_logprobs) * mask
        features = None
        if self.value_model is not None:
            self.value_model.eval()
            features = critic_features(self.value_model, rollout.sequences, rollout.attention_mask, rollout.prompt_len)
            self.value_model.train()
        advantages, values, returns, advantage_stats = self.advantages(scores, kl, mask, rollout, features)
        exp = Experience(rollout.sequences, rollout.attention_mask, mask, rollout.logprobs, ref_logprobs,
                         values, advantages, returns, rollout.prompt_len,
                         features if self.frozen_critic_backbone else None)
        stats = {
            **advantage_stats,
            "reward_mean": scores.mean().item(),
            "kl": kl.sum(1).mean().item(),
            "response_length": mask.sum(1).float().mean().item(),
            "eos_fraction": rollout.finished.float().mean().item(),
            "kl_coef": self.kl_ctl.value,
        }
        if self.gold_fn is not None:
            gold = self.gold_fn(prompts, responses)
            stats["gold_mean"] = sum(gold) / len(gold)
        return exp, stats

    # --- update -------------------------------------------------------------------------------------
    def _minibatch_losses(self, batch: Experience) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """(policy loss, value_coef × value loss or None without a critic, stats) of one minibatch."""
        cfg = self.config
        logprobs, entropy = response_logprobs(self.policy, batch.sequences, batch.attention_mask,
                                              batch.prompt_len, cfg.temperature, self.suppress, entropy=True)
        pg_loss, pg_stats = self.policy_loss(logprobs, batch)
        stats = {"policy_loss": pg_loss.item(), "entropy": losses.masked_mean(entropy.detach(), batch.mask).item(),
                 **{k: float(v) for k, v in pg_stats.items()}}
        if self.value_model is None:
            return pg_loss, None, stats
        values = value_forward(self.value_model, batch.sequences, batch.attention_mask, batch.prompt_len,
                               batch.critic_features)
        v_loss, v_stats = losses.value_loss(values, batch.values, batch.returns, batch.mask, cfg.value_clip)
        stats |= {"value_loss": v_loss.item(), **{k: float(v) for k, v in v_stats.items()}}
        return pg_loss, cfg.value_coef * v_loss, stats

    def update(self, exp: Experience) -> dict[str, float]:
        cfg = self.config
        n = exp.sequences.shape[0]
        per_rank_mb = max(1, cfg.mini_batch_size // self.world_size)
        collected: list[dict[str, float]] = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, device=exp.sequences.device)
            epoch_stats = []
            for start in range(0, n, per_rank_mb):
                pg_loss, v_loss, stats = self._minibatch_losses(exp.select(order[start : start + per_rank_mb]))
                stats["policy_grad_norm"] = self.trained["policy"].step(pg_loss)
                if v_loss is not None:
                    stats["value_grad_norm"] = self.trained["value"].step(v_loss)
                epoch_stats.append(stats)
            collected += epoch_stats
            approx_kl = sum(s["approx_kl"] for s in epoch_stats) / len(epoch_stats)
            if cfg.max_approx_kl is not None and approx_kl > cfg.max_approx_kl:
                break
        return {k: sum(s[k] for s in collected) / len(collected) for k in collected[0]}

    # --- loop ---------------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        cfg = self.config
        per_rank = max(1, cfg.rollout_batch_size // self.world_size)
        if self.telemetry is not None:
            self.telemetry.total_steps = cfg.steps
            self.telemetry.resume(self.start_step)
        self.policy.train()
        bar = tqdm(range(self.start_step, cfg.steps), initial=self.start_step, total=cfg.steps,
                   desc="optimize", leave=False, disable=self.rank != 0, mininterval=1.0)
        for step in bar:
            t0 = time.perf_counter()
            prompts = self.draw_prompts(per_rank)
            exp, roll_stats = self.make_experience(prompts)
            upd_stats = self.update(exp)
            self.kl_ctl.update(roll_stats["kl"], cfg.rollout_batch_size)
            tokens = int(exp.attention_mask.sum())
            stats = {"step": step + 1, **roll_stats, **upd_stats, "seconds": time.perf_counter() - t0,
                     "tokens_per_second": tokens / max(1e-9, time.perf_counter() - t0)}
            self.history.append(stats)
            bar.set_postfix(reward=f"{roll_stats['reward_mean']:.3f}", kl=f"{roll_stats['kl']:.3f}")
            if self.step_callback is not None:
                self.step_callback(self, stats)
            if self.telemetry is not None:
                self.telemetry.step(tokens=tokens, reward_mean=roll_stats["reward_mean"], kl=roll_stats["kl"],
                                    **{k: stats[k] for k in ("policy_loss", "value_loss", *POLICY_STATS) if k in stats})
            if self.checkpointer is not None and self.rank == 0 and (
                (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps
            ):
                self.checkpointer.save(step + 1, self._state(step + 1))
        return self.history
