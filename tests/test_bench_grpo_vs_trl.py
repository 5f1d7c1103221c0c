"""The GRPO-vs-TRL benchmark's settings mapping (bench/grpo_vs_trl.py); no model is loaded.

Each setting that must be the same on both sides is read off rlp's `Optimization` and off the `trl.GRPOConfig`
keyword arguments the benchmark builds; TRL itself is only imported (to build the config) where it is installed
(the `bench` dependency group).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.grpo_vs_trl import PRESETS, Settings, rlp_optimization, trl_grpo_args  # noqa: E402

SETTINGS = {model: replace(Settings(), model=model, **preset) for model, preset in PRESETS.items()}
SUPPRESS = [3, 1, 2]


@pytest.mark.parametrize("model", sorted(SETTINGS))
def test_the_settings_that_must_match_do(model, tmp_path):
    s = SETTINGS[model]
    opt = rlp_optimization(s)
    trl = trl_grpo_args(s, tmp_path, steps=5, suppress=SUPPRESS)
    # the same rollout: groups of the same size, the same number of completions, of the same length
    assert opt.algorithm == "grpo" and opt.group_size == trl["num_generations"] == s.group_size
    assert opt.rollout_batch_size == trl["per_device_train_batch_size"] * trl["steps_per_generation"] == s.batch
    assert opt.max_new_tokens == trl["max_completion_length"] and opt.temperature == trl["temperature"]
    assert trl["top_p"] == 1.0 and trl["top_k"] == 0 and not trl["use_vllm"]
    assert trl["generation_kwargs"] == {"suppress_tokens": sorted(SUPPRESS)}
    # the same update: E passes over the same minibatches, one AdamW step each
    assert opt.mini_batch_size == trl["per_device_train_batch_size"] and trl["gradient_accumulation_steps"] == 1
    assert opt.ppo_epochs == trl["num_iterations"]
    assert trl["max_steps"] == 5 * opt.ppo_epochs * (opt.rollout_batch_size // opt.mini_batch_size)
    assert trl["logging_steps"] == s.updates_per_step  # one log call per rollout
    # the same loss: std-scaled group advantages, clipped surrogate + β·k3, per-response token mean
    assert opt.grpo.scale_rewards and trl["scale_rewards"] == "group"
    assert opt.grpo.length_normalize and trl["loss_type"] == "grpo"
    assert opt.grpo.kl_in == "loss" and opt.kl_coef == trl["beta"] > 0 and trl["use_bias_correction_kl"] is False
    assert opt.grpo.clip_range == trl["epsilon"] and "epsilon_high" not in trl
    assert opt.target_kl is None and opt.max_approx_kl is None  # fixed β, no early stop (TRL has neither)
    assert opt.reward_clip is None and opt.missing_eos_penalty is None and not trl["mask_truncated_completions"]
    # the same optimiser
    assert opt.learning_rate == trl["learning_rate"] and opt.warmup_steps == trl["warmup_steps"] == 0
    assert trl["lr_scheduler_type"] == "constant" and trl["optim"] == "adamw_torch" and trl["adam_epsilon"] == 1e-5
    assert opt.max_grad_norm == trl["max_grad_norm"]
    # CPU, fp32, no gradient checkpointing on either side
    assert trl["use_cpu"] and not trl["bf16"] and not trl["fp16"] and not trl["gradient_checkpointing"]
    assert not opt.gradient_checkpointing and opt.deepspeed.enabled == "false"
    assert opt.lora == s.lora


def test_smollm2_trains_lora_and_the_tiny_model_in_full():
    assert SETTINGS["tiny"].lora is None and rlp_optimization(SETTINGS["tiny"]).lora is None
    assert SETTINGS["smollm2"].lora.rank == 8 and rlp_optimization(SETTINGS["smollm2"]).lora.rank == 8
    assert SETTINGS["smollm2"].threads == SETTINGS["tiny"].threads == 2  # benchmarks use both cores


def test_trl_derives_the_same_rollout_from_its_config(tmp_path):
    trl = pytest.importorskip("trl")
    s = SETTINGS["tiny"]
    config = trl.GRPOConfig(**trl_grpo_args(s, tmp_path, steps=2, suppress=SUPPRESS))
    assert config.generation_batch_size == s.batch and config.steps_per_generation == s.num_mini_batches
    assert config.scale_rewards == "group" and config.epsilon_high is None
