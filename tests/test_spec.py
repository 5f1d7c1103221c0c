"""The spec model: defaults, errors that name the field, the documented reference."""

from pathlib import Path

import pytest

from rlp_core.spec import SpecError, load_run, parse_run, reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_every_example_is_a_valid_run():
    for path in sorted((REPO / "examples").glob("*.yaml")):
        if "kind: Secret" in path.read_text():
            continue
        assert load_run(path).kind == "RLPRun", path


def test_defaults_give_a_complete_plan():
    run = parse_run({})
    assert run.spec.phase_plan() == [(0, "sft"), (0, "reward"), (1, "generate"), (1, "refine"), (1, "synthesize"),
                                     (1, "optimize"), (1, "evaluate")]
    assert run.spec.phase_enabled("synthesize") and not run.spec.phase_enabled("refine")


def test_given_models_skip_sft_and_reward_and_rounds_repeat():
    run = parse_run({"spec": {"policy": {"model": "s3://models/sft"}, "rewardModel": {"model": "s3://models/rm"}, "rounds": 2}})
    assert [p for _, p in run.spec.phase_plan()] == ["generate", "refine", "synthesize", "optimize"] * 2 + ["evaluate"]


@pytest.mark.parametrize("spec, expected", [
    ({"optimization": {"algoritm": "ppo"}}, "spec.optimization.algoritm: unknown field"),
    ({"optimization": {"algorithm": "dpo"}}, "spec.optimization.algorithm: Input should be 'ppo', 'apa', 'grpo' or 'rloo'"),
    ({"optimization": {"algorithm": "grpo", "rolloutBatchSize": 30, "miniBatchSize": 10}},
     "rolloutBatchSize (30) must be a multiple of grpo.groupSize (4)"),
    ({"optimization": {"algorithm": "rloo", "rloo": {"groupSize": 1}}}, "spec.optimization.rloo.groupSize"),
    ({"optimization": {"reward": "function"}}, "reward: function needs optimization.rewardFunction.uri"),
    ({"optimization": {"reward": "function", "rewardFunction": {"uri": "python://no colon"}}},
     "spec.optimization.rewardFunction.uri: Value error, must be an http(s):// reward endpoint"),
    ({"optimization": {"miniBatchSize": 64, "rolloutBatchSize": 32}}, "miniBatchSize (64) must not exceed rolloutBatchSize (32)"),
    ({"policy": {"sft": {"tiny": {"hiddenSize": 30, "numHeads": 4}}}}, "hiddenSize (30) must be a multiple of numHeads (4)"),
    ({"rewardLearning": {"strategy": "magic"}}, "spec.rewardLearning.strategy"),
    ({"evaluation": {"greedy": True, "samplesPerPrompt": 4}}, "set samplesPerPrompt: 1, or greedy: false"),
])
def test_bad_specs_name_the_field(spec, expected):
    with pytest.raises(SpecError) as err:
        parse_run({"spec": spec}, "run.yaml")
    assert expected in str(err.value) and str(err.value).startswith("run.yaml: invalid RLPRun")


def test_spec_hash_is_stable_and_content_sensitive():
    assert parse_run({}).spec.hash() == parse_run({}).spec.hash()
    assert parse_run({}).spec.hash() != parse_run({"spec": {"seed": 1}}).spec.hash()


def test_docs_spec_reference_is_current():
    assert (REPO / "docs" / "spec.md").read_text() == reference_markdown(), (
        "docs/spec.md is stale: regenerate it with "
        "python -c 'from rlp_core.spec import reference_markdown as r; open(\"docs/spec.md\",\"w\").write(r())'")

