"""The reward-learning benchmark's set-up and measurements, on a small setting (seed 0, CPU).

- eval and probe prompts share no prompt with any preference pair or RL prompt;
- PPO with the gold judge as reward raises the gold score of its rollouts;
- the optimize phase's curve is recorded against KL (probe points with gold, KL, hack rate, RM accuracy);
- after refine + synthesize, the RM's accuracy on gold-labelled pairs of held-out policy samples beats the
  fixed RM's (the point of RLP).
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.reward_learning import (  # noqa: E402
    SETTINGS, CurveRecorder, execute, output_dir, pairwise_accuracy, read_prompts, rm_scores, sample_probe,
    spec_for, task_of, train_base, write_data,
)
from rlp_core.models import load_policy, load_reward_model, load_tokenizer  # noqa: E402
from rlp_core.pipeline import RM_DIR  # noqa: E402
from rlp_core.tasks import TASKS  # noqa: E402

SETTING = replace(SETTINGS["tiny"], demonstrations=2000, sft_epochs=6, human_pairs=600, prompts=256, probe_prompts=40,
                  steps=12, probe_every=4)


def test_eval_and_probe_prompts_are_disjoint_from_every_rlhf_training_prompt(tmp_path):
    data = write_data(SETTINGS["headline"], tmp_path)
    held_out = set(read_prompts(data["eval"])) | set(read_prompts(data["probe"]))
    trained = set(read_prompts(data["prompts"])) | set(read_prompts(data["preferences"]))
    assert len(held_out) >= 25 and len(trained) >= 60
    assert not held_out & trained
    task = TASKS["arith"]  # the quickstart's builtin://arith splits too
    assert all(task.is_held_out(r["prompt"]) for r in task.records("eval"))
    assert not any(task.is_held_out(r["prompt"]) for split in ("prompts", "preferences") for r in task.records(split))
    # SFT stands in for pretraining: its demonstrations cover the reserved pairs as well (see rlp_core.tasks)
    assert any(task.is_held_out(r["prompt"]) for r in task.records("demonstrations"))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    torch.set_num_threads(2)
    work = tmp_path_factory.mktemp("bench")
    data = write_data(SETTING, work / "data")
    return work, data, train_base(SETTING, data, 0, work)


@pytest.mark.slow
def test_ppo_with_the_gold_reward_raises_the_gold_score(bench):
    work, data, base = bench
    spec = spec_for(replace(SETTING, steps=40, rollout_batch=32), data, 0, "none", {"reward": "judge"}, 1, base)
    metrics = execute(spec, "gold", work, {"optimize"})
    assert metrics[(1, "optimize")]["reward"] == "judge"
    history = [json.loads(line) for line in (output_dir(work, "gold", 1, "optimize") / "history.jsonl").open()]
    first = statistics.fmean(h["gold_mean"] for h in history[:5])
    last = statistics.fmean(h["gold_mean"] for h in history[-10:])
    assert last > first + 0.05, (first, last)


@pytest.mark.slow
def test_the_fixed_rm_curve_is_recorded_against_kl(bench):
    work, data, base = bench
    spec = spec_for(SETTING, data, 0, "none", {}, 1, base)
    recorder = CurveRecorder(SETTING, base, read_prompts(data["probe"]), 0, SETTING.steps, work, "fixed")
    execute(spec, "fixed", work, {"optimize"}, step_callback=recorder)
    assert [p["step"] for p in recorder.curve] == [4, 8, 12]
    for point in recorder.curve:
        assert {"gold", "kl", "hack_rate", "rm_accuracy", "proxy_reward"} <= point.keys()
        assert 0 <= point["gold"] <= 1 and 0 <= point["hack_rate"] <= 1 and 0 <= point["rm_accuracy"] <= 1
    assert recorder.curve[-1]["kl"] > 0.01  # the policy moved away from SFT


@pytest.mark.slow
def test_refine_and_synthesize_beat_the_fixed_rm_on_policy_samples(bench):
    work, data, base = bench
    metrics = execute(spec_for(SETTING, data, 0, "rlp", {}, 1, base), "rlp", work, {"generate", "refine", "synthesize"})
    policy_dir = Path(base["policy"])
    tokenizer, policy = load_tokenizer(policy_dir), load_policy(policy_dir).eval()
    rollout, prompts, responses = sample_probe(policy, tokenizer, read_prompts(data["probe"]), 8, seed=0)
    task = task_of(SETTING)

    def accuracy(rm_dir):
        return pairwise_accuracy(rm_scores(load_reward_model(rm_dir).eval(), tokenizer, rollout).tolist(),
                                 prompts, responses, task.gold_score, 8)

    fixed = accuracy(Path(base["reward_model"]))
    refined = accuracy(output_dir(work, "rlp", 1, "synthesize") / RM_DIR)
    synth = metrics[(1, "synthesize")]
    assert synth["synthetic_pairs"] > 20 and synth["synthetic_pairs_gold_accuracy"] > 0.8
    assert refined > fixed + 0.02, (fixed, refined)
