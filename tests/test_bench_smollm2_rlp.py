"""The SmolLM2 RLP benchmark's set-up and statistics (bench/smollm2_rlp.py); no model is loaded.

- every arm of a seed starts from the same model, reads the same human pairs and names the same fixed RM
  (so no arm trains its own reward phase), and the seeds differ in their pairs;
- held-out questions are reasoning-gym's reserved eval split, disjoint from the preference and RL prompts;
- the matched-KL interpolation and the paired bootstrap on hand-computed numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.smollm2_rlp import ARMS, CONTROL, SETTINGS, arm_spec, at_kl, bootstrap, check_same_bases, uri  # noqa: E402
from rlp_core.data import Prompt, load_records  # noqa: E402
from rlp_core.spec import parse_run  # noqa: E402

SETTING = SETTINGS["headline"]


def _run(spec):
    return parse_run({"metadata": {"name": "arm"}, "spec": spec}).spec


def test_arms_of_a_seed_share_start_model_pairs_and_fixed_rm(tmp_path):
    specs = {arm: _run(arm_spec(SETTING, tmp_path, 0, arm)) for arm in ARMS}
    shared = {(s.policy.model, s.policy.system_prompt, s.reward_model.model, s.reward_model.human_preferences,
               s.prompts, s.evaluation.prompts, s.seed) for s in specs.values()}
    assert len(shared) == 1
    assert all((0, "reward") not in s.phase_plan() for s in specs.values())  # nobody trains its own RM
    assert {s.reward_learning.strategy for s in specs.values()} == {"none", "rlp-spg", "rlp-uml", "rlp", "ser"}
    assert {s.optimization.reward for s in specs.values()} == {"reward-model", "judge"}
    assert {s.rounds * s.optimization.steps for s in specs.values()} == {SETTING.steps}  # the same total steps
    # the control retrains as SPG does, with its synthetic pairs silenced; nothing else differs
    spg, control = specs["PPO + RLP-SPG (answer)"], specs[CONTROL]
    assert control.reward_learning.spg.synthetic_weight < 1e-5 < spg.reward_learning.spg.synthetic_weight
    assert control.model_copy(update={"reward_learning": spg.reward_learning}) == spg
    other = _run(arm_spec(SETTING, tmp_path, 1, next(iter(ARMS))))
    assert other.reward_model.human_preferences != shared.pop()[3]


def test_held_out_questions_are_reserved_from_training_prompts():
    held_out = {p.prompt for p in load_records(uri("eval", SETTING.eval_questions), Prompt)}
    trained = {p.prompt for p in load_records(uri("prompts", SETTING.rl_prompts), Prompt)}
    trained |= {p.prompt for s in range(SETTING.seeds)
                for p in load_records(uri("prompts", SETTING.preference_prompts, 1000 + s), Prompt)}
    assert len(held_out) >= 40 and not held_out & trained


def test_at_kl_interpolates_per_question_and_flags_an_unreached_target():
    curve = [{"kl": 0.0, "sampled": [0.0, 1.0]}, {"kl": 2.0, "sampled": [1.0, 0.0]}, {"kl": 4.0, "sampled": [0.5, 0.5]}]
    assert at_kl(curve, 1.0, "sampled") == ([0.5, 0.5], True)
    assert at_kl(curve, 3.0, "sampled") == ([0.75, 0.25], True)
    assert at_kl(curve, 9.0, "sampled") == ([0.5, 0.5], False)


def test_bootstrap_of_paired_differences():
    mean, lo, hi = bootstrap([[0.5, 0.5, 0.5], [0.5, 0.5]])
    assert (mean, lo, hi) == (0.5, 0.5, 0.5)  # no spread, no interval width
    mean, lo, hi = bootstrap([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]], reps=4000)
    assert mean == 0.5 and lo < 0.5 < hi and hi - lo > 0.2
    with pytest.raises(Exception):
        bootstrap([])


def test_merge_pairs_arms_only_over_identical_seed_bases():
    base = {"seed": 0, "pairs": 90, "start": {"greedy": [1.0, 0.0], "sampled": [0.5, 0.25], "rm_accuracy": 0.6}}
    check_same_bases([base], [json.loads(json.dumps(base))])
    moved = {**base, "start": {**base["start"], "sampled": [0.5, 0.5]}}
    for now in ([moved], [{**base, "pairs": 91}], [{**base, "seed": 1}]):
        with pytest.raises(SystemExit, match="seed"):
            check_same_bases([base], now)
