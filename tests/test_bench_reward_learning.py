"""The reward-learning benchmark's set-up and measurements, on a small setting (seed 0, CPU).

- eval and probe prompts share no prompt with any preference pair or RL prompt;
- PPO with the gold judge as reward raises the gold score of its rollouts;
- the optimize phase's curve is recorded against KL (probe points with gold, KL, hack rate, RM accuracy);
- after refine + synthesize, SPG's synthetic pairs agree with the gold judge and the RM ranks gold-labelled pairs of
  held-out policy samples no worse than the fixed RM (that it ranks them better is not shown here).
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


def base_of(seed: int, work: Path) -> tuple[dict, dict]:
    """The data and the seed's SFT policy and fixed RM (shared by the measurements below)."""
    data = write_data(SETTING, work / "data")
    return data, train_base(SETTING, data, seed, work)


def gold_reward_ppo(work: Path, data: dict, base: dict, seed: int) -> tuple[float, float]:
    """PPO against the gold judge: the mean gold score of the rollouts over the first 5 and the last 10 steps."""
    spec = spec_for(replace(SETTING, steps=80, rollout_batch=32), data, seed, "none", {"reward": "judge"}, 1, base)
    metrics = execute(spec, "gold", work, {"optimize"})
    assert metrics[(1, "optimize")]["reward"] == "judge"
    history = [json.loads(line) for line in (output_dir(work, "gold", 1, "optimize") / "history.jsonl").open()]
    return statistics.fmean(h["gold_mean"] for h in history[:5]), statistics.fmean(h["gold_mean"] for h in history[-10:])


def rm_accuracies_after_rlp(work: Path, data: dict, base: dict, seed: int) -> dict:
    """generate -> refine -> synthesize (`strategy: rlp`), then each RM's accuracy on gold-labelled pairs of 8
    fresh samples per probe prompt from the SFT policy (held-out prompts), with the synthesize phase's metrics."""
    metrics = execute(spec_for(SETTING, data, seed, "rlp", {}, 1, base), "rlp", work, {"generate", "refine", "synthesize"})
    policy_dir = Path(base["policy"])
    tokenizer, policy = load_tokenizer(policy_dir), load_policy(policy_dir).eval()
    rollout, prompts, responses = sample_probe(policy, tokenizer, read_prompts(data["probe"]), 8, seed=seed)
    task = task_of(SETTING)

    def accuracy(rm_dir):
        return pairwise_accuracy(rm_scores(load_reward_model(rm_dir).eval(), tokenizer, rollout).tolist(),
                                 prompts, responses, task.gold_score, 8)

    synth = metrics[(1, "synthesize")]
    return {"fixed": accuracy(Path(base["reward_model"])), "refined": accuracy(output_dir(work, "rlp", 1, "refine") / RM_DIR),
            "synthesized": accuracy(output_dir(work, "rlp", 1, "synthesize") / RM_DIR),
            "synthetic_pairs": synth["synthetic_pairs"], "synthetic_pairs_gold_accuracy": synth["synthetic_pairs_gold_accuracy"]}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    torch.set_num_threads(2)
    work = tmp_path_factory.mktemp("bench")
    return (work, *base_of(0, work))


@pytest.mark.slow
def test_ppo_with_the_gold_reward_raises_the_gold_score(bench):
    """80 PPO steps against the gold judge raise the rollouts' gold score (last 10 steps against the first 5).

    Measured (docs/bench/outcome-spread.md, "reward-learning"; seeds 0-9 at 1 thread, 0-4 at 2 threads, the same
    to the bit): gain +0.170 to +0.345 (mean 0.241). With 40 steps it was +0.040 to +0.176 and seed 7 fell under
    the bound (+0.05) this test then had, so the run was made longer rather than the bound lower. The bound,
    +0.08, is half the smallest gain seen and about 2.7 sd under the mean; a PPO that stops learning gains ~0.
    """
    work, data, base = bench
    first, last = gold_reward_ppo(work, data, base, 0)
    assert last > first + 0.08, (first, last)


def fixed_rm_curve(work: Path, data: dict, base: dict, seed: int) -> list[dict]:
    """12 PPO steps against the fixed RM with a probe point every 4 (gold, KL to SFT, hack rate, RM accuracy)."""
    spec = spec_for(SETTING, data, seed, "none", {}, 1, base)
    recorder = CurveRecorder(SETTING, base, read_prompts(data["probe"]), seed, SETTING.steps, work, "fixed")
    execute(spec, "fixed", work, {"optimize"}, step_callback=recorder)
    return recorder.curve


@pytest.mark.slow
def test_the_fixed_rm_curve_is_recorded_against_kl(bench):
    """The optimize phase's step callback records a probe point every 4 steps, each with its gold score, KL to
    the SFT policy, hack rate and RM accuracy, and the policy has moved from SFT by the last one.

    Measured (docs/bench/outcome-spread.md, "rm-curve", `kl_last`; seeds 0-4 at 1 and 2 threads, 10 runs, the
    same to the bit at both thread counts, each with the SFT policy and RM of its seed): the probe's KL at step
    12 0.077-0.729 (it is not monotone: seed 4 had 0.143 at step 8). The bound, 0.01, sits 7.7 times under the
    smallest seen; a policy that PPO left where it started (no step taken, or a learning rate of 0) has KL 0.
    """
    work, data, base = bench
    curve = fixed_rm_curve(work, data, base, 0)
    assert [p["step"] for p in curve] == [4, 8, 12]
    for point in curve:
        assert {"gold", "kl", "hack_rate", "rm_accuracy", "proxy_reward"} <= point.keys()
        assert 0 <= point["gold"] <= 1 and 0 <= point["hack_rate"] <= 1 and 0 <= point["rm_accuracy"] <= 1
    assert curve[-1]["kl"] > 0.01  # the policy moved away from SFT


@pytest.mark.slow
def test_synthesize_makes_right_pairs_and_keeps_the_rms_accuracy_on_policy_samples(bench):
    """generate -> refine -> synthesize: SPG's synthetic pairs mostly agree with the gold judge, and the refreshed
    RM ranks gold-labelled pairs of held-out policy samples no worse than the fixed RM.

    That the refreshed RM ranks them *better* is not shown in this setting. Measured (docs/bench/outcome-spread.md,
    "reward-learning"; seeds 0-9, 1 and 2 threads the same to the bit): synthesized minus fixed -0.014 to +0.065
    (mean +0.011; 5 of 10 seeds at or under 0), refined minus fixed -0.043 to +0.056. This test asserted +0.02
    on one seed and failed once each phase was seeded (seed 0: +0.000). Whether RLP beats the fixed RM is the
    benchmark's question (docs/bench/reward-learning.md, issue 33), not a unit test's. Bounds here: synthetic
    pairs 37-47 (bound > 25), their gold accuracy 0.949-1.000 (bound > 0.85: one synthetic pair in seven wrong
    would fail it); synthesized minus fixed above -0.05, 0.036 under the lowest seen: on seed 0 (fixed 0.635) an
    RM the refresh left ranking at chance fails it.
    """
    work, data, base = bench
    rm = rm_accuracies_after_rlp(work, data, base, 0)
    assert rm["synthetic_pairs"] > 25 and rm["synthetic_pairs_gold_accuracy"] > 0.85, rm
    assert rm["synthesized"] > rm["fixed"] - 0.05, rm
