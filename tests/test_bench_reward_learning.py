"""Acceptance on the benchmark's small setting (seed 0, CPU): after refine + synthesize, the reward
model's pairwise accuracy on gold-labelled pairs of held-out policy samples beats the fixed RM's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.reward_learning import (  # noqa: E402
    SETTINGS, execute, final_rm_dir, probe_accuracy, probe_samples, spec_for, task_of, train_base, write_data,
)

pytestmark = pytest.mark.slow

MARGIN = 0.03


def test_refine_and_synthesize_beat_the_fixed_rm_on_policy_samples(tmp_path):
    torch.set_num_threads(2)
    setting = SETTINGS["small"]
    data = write_data(setting, tmp_path / "data")
    base = train_base(setting, data, seed=0, work=tmp_path)
    prompts = [json.loads(line)["prompt"] for line in Path(data["probe"]).read_text().splitlines()]
    probe = probe_samples(base["policy"], prompts, setting.probe_samples, seed=0)
    metrics = execute(spec_for(setting, data, 0, "rlp", "ppo", base), "rlp", tmp_path,
                      {"generate", "refine", "synthesize"})
    fixed = probe_accuracy(base["reward_model"], probe, task_of(setting))
    refined = probe_accuracy(final_rm_dir(tmp_path, "rlp", "rlp", base), probe, task_of(setting))
    synth = metrics[(1, "synthesize")]
    assert synth["synthetic_pairs"] > 50 and synth["synthetic_pairs_gold_accuracy"] > 0.9
    assert refined > fixed + MARGIN, (fixed, refined)
