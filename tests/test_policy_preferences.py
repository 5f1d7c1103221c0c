"""Preference pairs on the starting policy's own samples (rlp_core.policy_preferences): ties dropped, the
judge's order with seeded annotator noise, and the `rlp preferences` command on a real model."""

from __future__ import annotations

import json

import pytest

from rlp_core.policy_preferences import Labelling, label_pairs

PROMPTS = [f"q{i}" for i in range(400)]
# per prompt four samples: "right" scores 1, anything else 0; every fourth prompt has only wrong samples
SAMPLES = [["right", "wrong", "wrong", "wrong"] if i % 4 else ["wrong", "nope", "wrong", "no"] for i in range(400)]


def judge(prompt: str, response: str) -> float:
    return float(response == "right")


def test_ties_are_dropped_and_the_judge_orders_the_pair():
    pairs = label_pairs(PROMPTS, SAMPLES, judge, Labelling(flip=0.0))
    assert len(pairs) == 300  # the all-wrong prompts give none
    assert all((p.chosen, p.rejected) == ("right", "wrong") for p in pairs)
    assert {p.prompt for p in pairs} == {q for i, q in enumerate(PROMPTS) if i % 4}


def test_annotator_noise_flips_a_seeded_share():
    noisy = label_pairs(PROMPTS, SAMPLES, judge, Labelling(flip=0.2, seed=3))
    flipped = sum(p.chosen == "wrong" for p in noisy) / len(noisy)
    assert 0.14 < flipped < 0.26
    assert noisy == label_pairs(PROMPTS, SAMPLES, judge, Labelling(flip=0.2, seed=3))  # reproducible from the seed
    assert noisy != label_pairs(PROMPTS, SAMPLES, judge, Labelling(flip=0.2, seed=4))
    assert len(label_pairs(PROMPTS, SAMPLES, judge, Labelling(flip=0.0), limit=7)) == 7


@pytest.mark.parametrize("bad, message", [({"samples_per_prompt": 1}, "at least 2"), ({"flip": 0.5}, "share of flipped")])
def test_bad_labelling_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        Labelling(**bad)


SMOLLM2_TASK = ("min_terms=2&max_terms=2&min_digits=1&max_digits=1&operators=+,-&allow_parentheses=false"
                "&allow_negation=false")
SMOLLM2_JUDGE = f"reasoning-gym://basic_arithmetic?answer=last-number&{SMOLLM2_TASK}"


def smollm2_preferences(tmp_path, seed: int = 1, out: str = "a.jsonl") -> list[str]:
    """`rlp preferences` on SmolLM2 (8 reasoning-gym sums, 4 samples each at temperature 0.7, flip 0, --seed
    `seed`): the lines of the pairs file it writes."""
    from rlp_cli.main import main

    spec = tmp_path / "run.yaml"
    spec.write_text(json.dumps({"apiVersion": "rlp.dev/v1alpha1", "kind": "RLPRun", "metadata": {"name": "p"},
                                "spec": {"policy": {"model": "packaged://smollm2", "maxPromptTokens": 96},
                                         "generation": {"temperature": 0.7, "maxNewTokens": 12},
                                         "evaluation": {"judge": SMOLLM2_JUDGE}}}))
    prompts = f"reasoning-gym://basic_arithmetic/prompts?n=8&seed=5&{SMOLLM2_TASK}"
    args = ["preferences", str(spec), "--prompts", prompts, "--flip", "0", "--seed", str(seed), "--cache-dir",
            str(tmp_path / "c")]
    assert main(args + ["--out", str(tmp_path / out)]) == 0
    return (tmp_path / out).read_text().splitlines()


@pytest.mark.pretrained
def test_rlp_preferences_on_smollm2_samples(tmp_path):
    """The command samples the real chat model and writes pairs whose labels agree with the judge on about
    1 − flip of them (here flip = 0); the same seed writes the same file.

    A pair needs a prompt whose 4 samples the judge does not score alike. Measured (docs/bench/outcome-spread.md,
    "smollm2-preferences", `preference_pairs`, of 8 prompts; --seed 0-4 at 1 and 2 threads, 10 runs, the same at
    both thread counts): 4-7 pairs, every one ordered as the gold judge orders it. The bound, at least one pair,
    sits 3 under the fewest seen; a sampler that gave every prompt 4 equally scored samples (greedy, or a
    broken temperature) writes none.
    """
    from rlp_core.gym_tasks import gold_judge

    lines = smollm2_preferences(tmp_path)
    assert lines and lines == smollm2_preferences(tmp_path, out="b.jsonl")
    gold = gold_judge(SMOLLM2_JUDGE)
    for pair in map(json.loads, lines):
        assert gold(pair["prompt"], pair["chosen"]) > gold(pair["prompt"], pair["rejected"])


def test_rlp_preferences_names_the_missing_policy(tmp_path, capsys):
    from rlp_cli.main import main

    spec = tmp_path / "run.yaml"
    spec.write_text(json.dumps({"apiVersion": "rlp.dev/v1alpha1", "kind": "RLPRun", "metadata": {"name": "p"},
                                "spec": {"evaluation": {"judge": "builtin://arith"}}}))
    assert main(["preferences", str(spec), "--prompts", "builtin://arith/prompts", "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "spec.policy.model is unset" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()
