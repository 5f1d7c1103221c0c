"""RLP-SPG grouping, confidence and pair selection on a hand-made sample set."""

from __future__ import annotations

import math

import pytest

from rlp_core.data import Sample
from rlp_core.spg import (
    cluster_prompts, greedy_clusters, key_equivalence, normalize_answer, select_confident, semantic_entropy,
    synthetic_pairs,
)


def _samples(prompt_id: str, prompt: str, answers: list[tuple[str, float]]) -> list[Sample]:
    return [Sample(prompt_id=prompt_id, prompt=prompt, response=r, sample_index=i, logprob=lp, num_tokens=1,
                   finished=True) for i, (r, lp) in enumerate(answers)]


SAMPLES = (
    # three renderings of "2" (3), "3" twice, "11" once: H = −(½ln½ + ⅓ln⅓ + ⅙ln⅙)
    _samples("p1", "1+1=", [("2", -1.0), ("3", -1.5), ("2 ", -0.5), ("11", -3.0), ("The 2", -2.0), ("3", -1.0)])
    + _samples("p2", "2+3=", [("5", -0.1)] * 6)  # unanimous: H = 0, no pair
    + _samples("p3", "2+2=", [("4", -1.0), ("5", -1.0)] * 3)  # a tie: no self-consistent answer
    + _samples("p4", "3+4=", [("7", -0.2)] * 5 + [("8", -2.0)])  # H = −(⅚ln⅚ + ⅙ln⅙)
    + _samples("p5", "4+5=", [("9", -0.3)] * 4 + [("10", -2.0), ("12", -4.0)])  # H = −(⅔ln⅔ + 2·⅙ln⅙)
)
H1 = -(0.5 * math.log(0.5) + math.log(1 / 3) / 3 + math.log(1 / 6) / 6)
H4 = -(5 / 6 * math.log(5 / 6) + math.log(1 / 6) / 6)
H5 = -(2 / 3 * math.log(2 / 3) + 2 * math.log(1 / 6) / 6)


def test_normalize_answer():
    assert normalize_answer("The  Answer: 12.") == "answer 12"
    assert normalize_answer("(42)") == "42"
    assert normalize_answer(" -3 ") == "-3"
    assert normalize_answer("1.5") == "1.5"
    assert normalize_answer("ＡＢＣ") == "abc"  # NFKC folds full-width letters


def test_semantic_entropy_hand_computed():
    assert semantic_entropy([6]) == 0.0
    assert semantic_entropy([3, 3]) == pytest.approx(math.log(2))
    assert semantic_entropy([3, 2, 1]) == pytest.approx(H1)
    assert H1 == pytest.approx(1.0114, abs=1e-4) and H4 == pytest.approx(0.4506, abs=1e-4)


def test_greedy_clusters_compare_with_first_member():
    # 0~1 and 1~2 but not 0~2: 2 is compared with cluster [0, 1]'s first member only.
    links = {(0, 1), (1, 2)}
    assert greedy_clusters(3, lambda i, j: (i, j) in links) == [[0, 1], [2]]


def test_clusters_entropy_and_eligibility_with_normalized_match():
    groups = {g.prompt_id: g for g in cluster_prompts(SAMPLES, key_equivalence(normalize_answer))}
    p1 = groups["p1"]
    assert p1.sizes == [3, 2, 1]
    assert [s.response for s in p1.clusters[0]] == ["2 ", "2", "The 2"]  # most probable rendering first
    assert p1.entropy == pytest.approx(H1)
    assert groups["p2"].entropy == 0.0 and not groups["p2"].eligible
    assert groups["p3"].entropy == pytest.approx(math.log(2)) and not groups["p3"].eligible
    assert groups["p4"].entropy == pytest.approx(H4) and groups["p4"].eligible
    assert groups["p5"].entropy == pytest.approx(H5) and groups["p5"].eligible


def test_exact_match_splits_renderings():
    p1 = cluster_prompts(SAMPLES[:6], key_equivalence(str))[0]
    assert p1.sizes == [2, 1, 1, 1, 1]
    assert p1.clusters[0][0].response == "3" and p1.clusters[0][0].logprob == -1.0


def test_selection_by_fraction_and_by_threshold():
    groups = cluster_prompts(SAMPLES, key_equivalence(normalize_answer))
    # eligible: p1 (1.011), p4 (0.451), p5 (0.868); half of three rounds up to two, the least entropic
    assert [g.prompt_id for g in select_confident(groups, None, 0.5)] == ["p4", "p5"]
    assert [g.prompt_id for g in select_confident(groups, None, 1.0)] == ["p1", "p4", "p5"]
    assert [g.prompt_id for g in select_confident(groups, 0.9, 0.5)] == ["p4", "p5"]
    assert [g.prompt_id for g in select_confident(groups, H4, 0.5)] == ["p4"]  # the bound is inclusive
    assert select_confident(groups, 0.0, 0.5) == []  # H = 0 prompts are confident but give no pair


def test_pairs_expected():
    groups = {g.prompt_id: g for g in cluster_prompts(SAMPLES, key_equivalence(normalize_answer))}
    pairs = [(p.prompt, p.chosen, p.rejected) for p in synthetic_pairs(groups["p1"], 2)]
    # chosen: the largest cluster's most probable member; rejected: smallest cluster first
    assert pairs == [("1+1=", "2 ", "11"), ("1+1=", "2 ", "3")]
    assert [(p.chosen, p.rejected) for p in synthetic_pairs(groups["p4"], 3)] == [("7", "8")]
    # equal sizes: the less probable answer is rejected first
    assert [(p.chosen, p.rejected) for p in synthetic_pairs(groups["p5"], 1)] == [("9", "12")]
    assert [(p.chosen, p.rejected) for p in synthetic_pairs(groups["p5"], 2)] == [("9", "12"), ("9", "10")]


def test_embedding_equivalence_groups_paraphrases():
    from rlp_core.spg import embedding_equivalence

    responses = ["Paris is the capital of France.", "The capital of France is Paris.", "I like turtles."]
    same = embedding_equivalence(0.8)("What is the capital of France?", responses)
    assert greedy_clusters(3, same) == [[0, 1], [2]]


# answer equivalence: three phrasings of 13, one of 12, and replies with no number
WORDED = _samples("q1", "Calculate 8 + 5. Reply with the number only.", [
    ("8 + 5 = 13", -2.0), ("8 + 5 equals 13.", -3.0), ("The answer is 13.", -2.5), ("12", -1.0),
    ("Let's think about the numbers", -0.5), ("To solve this, we need to", -0.7), ("Sure!", -0.9),
    ("Here is a way", -0.8),
])


def test_answer_equivalence_clusters_phrasings_of_one_answer():
    from rlp_core.judges import answer_reader
    from rlp_core.spg import pattern_reader

    for read in (answer_reader("reasoning-gym://basic_arithmetic?answer=last-number"), pattern_reader(r"(-?\d+)")):
        group = cluster_prompts(WORDED, key_equivalence(read), read)[0]
        assert group.sizes == [3, 1]
        assert group.clusters[0][0].response == "8 + 5 = 13"  # the most probable rendering represents it
        assert [s.response for s in group.answerless][:1] == ["Let's think about the numbers"]
        assert group.entropy == pytest.approx(semantic_entropy([3, 1, 4]))  # answerless count as one outcome
        pairs = [(p.chosen, p.rejected) for p in synthetic_pairs(group, 2)]
        assert pairs == [("8 + 5 = 13", "12"), ("8 + 5 = 13", "Let's think about the numbers")]
    # the text equivalences see four different replies among the answered ones
    assert cluster_prompts(WORDED, key_equivalence(normalize_answer))[0].sizes[0] == 1


def test_reply_without_answer_is_never_chosen():
    from rlp_core.spg import pattern_reader

    read = pattern_reader(r"(-?\d+)")
    # the answerless replies are the majority (5 of 7), yet "13" is chosen against them
    mostly_silent = _samples("q2", "x", [("13", -1.0), ("13", -1.0)] + [("hmm", -0.1)] * 5)
    group = cluster_prompts(mostly_silent, key_equivalence(read), read)[0]
    assert group.eligible and [(p.chosen, p.rejected) for p in synthetic_pairs(group, 3)] == [("13", "hmm")]
    silent = cluster_prompts(_samples("q3", "x", [("hmm", -0.1)] * 4), key_equivalence(read), read)[0]
    assert silent.clusters == [] and not silent.eligible  # nothing to choose
    one_answer = cluster_prompts(_samples("q4", "x", [("5", -0.1)] * 4), key_equivalence(read), read)[0]
    assert not one_answer.eligible  # unanimous: nothing to reject


def test_answer_readings_never_see_the_reference():
    from rlp_core import gym_tasks, tasks
    from rlp_core.judges import answer_reader

    # builtin://arith: the leading integer and whether anything follows it, whatever the truth
    read = answer_reader("builtin://arith")
    assert (read("13+"), read("13 ="), read(" 07"), read("12"), read("no")) == ("13+...", "13+...", "7", "12", None)
    task = tasks.ArithTask()
    assert task.gold_score("5+7=", "13+") < 1  # ...while the judge, which sees the truth, scores it wrong
    # one reading, one score on every prompt; the judge halves the sloppy form, so it is its own answer
    assert task.gold_score("5+7=", "12+") == task.gold_score("5+7=", "12 =") == task.gold_score("5+7=", "12") / 2
    # reasoning-gym: readable before any record (so any entry, so any reference) is loaded in this process
    gym_tasks._ENTRIES.clear()
    last = answer_reader("reasoning-gym://basic_arithmetic?answer=last-number")
    assert (last("2 + 4 = 6"), last("13.0"), last("-1.5 or 2.50"), last("none")) == ("6", "13", "2.5", None)
    exact = answer_reader("reasoning-gym://basic_arithmetic")
    assert (exact(" 6 "), exact("  ")) == ("6", None)
    assert answer_reader("reward-model") is None


def test_clustering_resolution_and_its_errors():
    from rlp_core.spec import SPG, RLPRunSpec, settings_problems
    from rlp_core.spg import clustering_for

    assert clustering_for(SPG(), "builtin://arith").name == "answer"
    assert clustering_for(SPG(), "reward-model").name == "normalized"
    assert clustering_for(SPG(answer_pattern=r"#### (\d+)"), "reward-model").read_answer("so #### 42") == "42"
    assert clustering_for(SPG(equivalence="exact"), "builtin://arith").read_answer is None
    with pytest.raises(ValueError, match="answerPattern"):
        clustering_for(SPG(equivalence="answer"), "reward-model")
    spec = RLPRunSpec.model_validate({"rewardLearning": {"strategy": "rlp-spg", "spg": {"equivalence": "answer"}},
                                      "evaluation": {"judge": "reward-model"}})
    errors, _ = settings_problems(spec)
    assert any("spec.rewardLearning.spg.answerPattern" in e for e in errors)


def test_gold_outcomes_hand_counted():
    from rlp_core.data import PreferencePair
    from rlp_core.reward_learning import gold_agreement, gold_outcomes

    gold = lambda prompt, response: float(response == "13")  # noqa: E731
    pairs = [PreferencePair(prompt="p", chosen=c, rejected=r) for c, r in
             [("13", "12"), ("13", "x"), ("12", "13"), ("12", "11")]]
    assert gold_outcomes(pairs, gold) == {"right": 2, "wrong": 1, "tied": 1, "decisive_accuracy": 2 / 3}
    assert gold_agreement(pairs, gold) == pytest.approx(2.5 / 4)
    assert gold_outcomes([], gold)["decisive_accuracy"] is None


def smollm2_answer_pairs(seed: int) -> dict:
    """SmolLM2-135M-Instruct's own samples (chat template, T 0.7, 12 tokens, 8 per prompt on 48 reasoning-gym
    sums), clustered by the answer its judge reads, paired as SPG pairs them: the pairs' gold outcomes."""
    import torch

    from rlp_core.data import Prompt, load_records
    from rlp_core.judges import answer_reader, programmatic_judge
    from rlp_core.models import load_policy, load_tokenizer
    from rlp_core.pretrained import fetch_model
    from rlp_core.reward_learning import gold_outcomes
    from rlp_core.sampling import decode_responses, sample_responses

    task = ("min_terms=2&max_terms=2&min_digits=1&max_digits=1&operators=+,-&allow_parentheses=false"
            "&allow_negation=false")
    judge_uri = f"reasoning-gym://basic_arithmetic?answer=last-number&{task}"
    prompts = [p.prompt for p in load_records(f"reasoning-gym://basic_arithmetic/prompts?n=48&{task}", Prompt)]
    path = fetch_model("smollm2")
    tokenizer, policy = load_tokenizer(path), load_policy(path).eval()
    torch.manual_seed(seed)
    k, samples = 8, []
    for i in range(0, len(prompts), 8):
        asked = [p for p in prompts[i : i + 8] for _ in range(k)]
        roll = sample_responses(policy, tokenizer, asked, max_new_tokens=12, temperature=0.7)
        logprobs = roll.logprobs.sum(1).tolist()
        for j, (prompt, response) in enumerate(zip(asked, decode_responses(tokenizer, roll))):
            samples.append(Sample(prompt_id=str(i + j // k), prompt=prompt, response=response, sample_index=j % k,
                                  logprob=logprobs[j], num_tokens=12, finished=True))
    read = answer_reader(judge_uri)
    groups = cluster_prompts(samples, key_equivalence(read), read)
    pairs = [p for g in select_confident(groups, None, 0.5) for p in synthetic_pairs(g, 1)]
    return gold_outcomes(pairs, programmatic_judge(judge_uri))


@pytest.mark.pretrained
def test_answer_equivalence_pairs_on_smollm2_samples_agree_with_the_gold_judge():
    """SmolLM2's own samples clustered by the answer its judge reads: among the synthetic pairs the gold judge
    orders, most put the right answer first (pairs of two wrong answers are tied, and not counted).

    Measured (docs/bench/outcome-spread.md, "spg-smollm2"; seeds 0-4, 1 thread): 13-15 pairs decided, 0-2 of them
    wrong (decisive accuracy 0.867-1.000; 3 wrong of 70 in all). The bound, above 0.75, fails at 4 wrong of 15:
    at the pooled error rate a draw gets there about once in 300, and pairs ordered at random (accuracy 0.5)
    fail it. The bound was 0.8 before it was measured, where 3 wrong of 15 (about once in 40) would fail."""
    outcome = smollm2_answer_pairs(0)
    assert outcome["right"] + outcome["wrong"] >= 8, outcome
    assert outcome["decisive_accuracy"] > 0.75, outcome
