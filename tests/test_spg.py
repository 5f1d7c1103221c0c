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
