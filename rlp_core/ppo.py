"""PPO for language models (the optimize phase), following specs/ppo.md.

One iteration: sample responses from the current policy; score them (RM at the last token, a fixed
penalty when a response has no EOS); shape per-token rewards with −β·KL to the frozen reference policy;
GAE (γ, λ) over the value model's estimates; whiten advantages over valid tokens; then `ppo_epochs`
passes of minibatch updates of the clipped policy loss plus the clipped value loss, stopping an epoch
early when the approximate KL to the rollout policy exceeds `max_approx_kl`. β is fixed, or adapted
towards `target_kl` (Ziegler et al. 2019). APA (rlp_core.apa) reuses this loop with another policy loss.

Training runs in plain torch, or under DeepSpeed ZeRO when enabled (auto: CUDA present or several
processes), where policy and value are one engine so a single `backward`/`step` updates both.
State is checkpointed every `checkpoint_every` iterations through a `Checkpointer`, and a restarted
phase resumes from the latest one.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerFast, get_scheduler

from rlp_core import losses
from rlp_core.models import position_ids, response_logprobs
from rlp_core.sampling import Rollout, decode_responses, sample_responses
from rlp_core.spec import Optimization
from rlp_core.telemetry import PhaseTelemetry

# (prompts, responses, rollout) -> scores (B,)
ScoreFn = Callable[[list[str], list[str], Rollout], torch.Tensor]


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
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    prompt_len: int

    def select(self, idx: torch.Tensor) -> Experience:
        return Experience(**{k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()})


def value_forward(value_model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """V(s_t) for each response token t: the value head read at the position before the token."""
    out = value_model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return out.logits.squeeze(-1)[:, prompt_len - 1 : -1].float()


class _PolicyAndValue(nn.Module):
    """Policy and critic in one module, so one optimiser / DeepSpeed engine trains both."""

    def __init__(self, policy: PreTrainedModel, value: PreTrainedModel):
        super().__init__()
        self.policy = policy
        self.value = value


def deepspeed_wanted(setting: str) -> bool:
    if setting != "auto":
        return setting == "true"
    return torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _single_process_rendezvous() -> None:
    """Outside torchrun, give DeepSpeed a one-process group on loopback instead of MPI discovery."""
    if "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


@dataclass
class PPOTrainer:
    config: Optimization
    policy: PreTrainedModel
    reference: PreTrainedModel
    value_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    score_fn: ScoreFn
    prompts: Sequence[str]
    seed: int = 0
    telemetry: PhaseTelemetry | None = None
    checkpointer: Checkpointer | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reference.eval().requires_grad_(False)
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

    # --- policy loss: the one thing APA changes -------------------------------------------------
    def policy_loss(self, logprobs: torch.Tensor, batch: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return losses.ppo_policy_loss(logprobs, batch.logprobs, batch.advantages, batch.mask, self.config.ppo.clip_range)

    # --- set-up -------------------------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        cfg = self.config
        self.module = _PolicyAndValue(self.policy, self.value_model)
        groups = [
            {"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": cfg.learning_rate},
            {"params": [p for p in self.value_model.parameters() if p.requires_grad],
             "lr": cfg.value_learning_rate or cfg.learning_rate},
        ]
        updates_per_step = cfg.ppo_epochs * math.ceil(cfg.rollout_batch_size / cfg.mini_batch_size)
        optimizer = torch.optim.AdamW(groups, eps=1e-5)
        scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.warmup_steps * updates_per_step)
        self.engine = None
        if deepspeed_wanted(cfg.deepspeed.enabled):
            import deepspeed

            _single_process_rendezvous()

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
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
            )
        else:
            self.optimizer, self.scheduler = optimizer, scheduler

    def _state(self, step: int) -> dict[str, Any]:
        state = {
            "step": step,
            "module": self.module.state_dict(),
            "kl_coef": self.kl_ctl.value,
            "history": list(self.history),
            "rng": {"python": self._rng.getstate(), "torch": torch.get_rng_state()},
        }
        if self.engine is None:  # ZeRO partitions optimizer state per rank: resume restarts Adam's moments
            state |= {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        if "optimizer" in state and self.engine is None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.value = state["kl_coef"]
        self.history = list(state["history"])
        self._rng.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        self.start_step = state["step"]

    # --- rollout ------------------------------------------------------------------------------------
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
        ref_logprobs, _ = response_logprobs(self.reference, rollout.sequences, rollout.attention_mask,
                                            rollout.prompt_len, cfg.temperature)
        ref_logprobs = ref_logprobs * mask
        self.value_model.eval()
        values = value_forward(self.value_model, rollout.sequences, rollout.attention_mask, rollout.prompt_len) * mask
        self.value_model.train()
        kl = losses.kl_per_token(rollout.logprobs, ref_logprobs) * mask
        rewards = losses.shaped_rewards(scores, kl, mask, self.kl_ctl.value)
        if cfg.whiten_rewards:
            rewards = losses.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = losses.gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)
        advantages = losses.masked_whiten(advantages, mask)
        exp = Experience(rollout.sequences, rollout.attention_mask, mask, rollout.logprobs, ref_logprobs,
                         values, advantages, returns, rollout.prompt_len)
        stats = {
            "reward_mean": scores.mean().item(),
            "kl": kl.sum(1).mean().item(),
            "response_length": mask.sum(1).float().mean().item(),
            "eos_fraction": rollout.finished.float().mean().item(),
            "kl_coef": self.kl_ctl.value,
        }
        return exp, stats

    # --- update -------------------------------------------------------------------------------------
    def _minibatch_loss(self, batch: Experience) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        logprobs, logits = response_logprobs(self.module.policy, batch.sequences, batch.attention_mask,
                                             batch.prompt_len, cfg.temperature)
        pg_loss, pg_stats = self.policy_loss(logprobs, batch)
        values = value_forward(self.module.value, batch.sequences, batch.attention_mask, batch.prompt_len)
        v_loss, v_stats = losses.value_loss(values, batch.values, batch.returns, batch.mask, cfg.value_clip)
        with torch.no_grad():
            entropy = losses.masked_mean(losses.entropy_from_logits(logits), batch.mask)
        stats = {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(), "entropy": entropy.item(),
                 **{k: float(v) for k, v in {**pg_stats, **v_stats}.items()}}
        return pg_loss + cfg.value_coef * v_loss, stats

    def _optimise(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
            return
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()

    def update(self, exp: Experience) -> dict[str, float]:
        cfg = self.config
        n = exp.sequences.shape[0]
        per_rank_mb = max(1, cfg.mini_batch_size // self.world_size)
        collected: list[dict[str, float]] = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, device=exp.sequences.device)
            epoch_stats = []
            for start in range(0, n, per_rank_mb):
                loss, stats = self._minibatch_loss(exp.select(order[start : start + per_rank_mb]))
                self._optimise(loss)
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
            prompts = [self._rng.choice(self.prompts) for _ in range(per_rank)]
            exp, roll_stats = self.make_experience(prompts)
            upd_stats = self.update(exp)
            self.kl_ctl.update(roll_stats["kl"], cfg.rollout_batch_size)
            tokens = int(exp.attention_mask.sum())
            stats = {"step": step + 1, **roll_stats, **upd_stats, "seconds": time.perf_counter() - t0,
                     "tokens_per_second": tokens / max(1e-9, time.perf_counter() - t0)}
            self.history.append(stats)
            bar.set_postfix(reward=f"{roll_stats['reward_mean']:.3f}", kl=f"{roll_stats['kl']:.3f}")
            if self.telemetry is not None:
                self.telemetry.step(tokens=tokens, reward_mean=roll_stats["reward_mean"], kl=roll_stats["kl"],
                                    policy_loss=upd_stats["policy_loss"], value_loss=upd_stats["value_loss"])
            if self.checkpointer is not None and self.rank == 0 and (
                (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps
            ):
                self.checkpointer.save(step + 1, self._state(step + 1))
        return self.history
