"""Preference pairs on the starting policy's own samples, labelled by a judge with annotator noise.

RLP's premise is a reward model trained on preferences over the *starting* policy's outputs, whose
accuracy drifts as RL moves the policy away from them. AlpacaFarm (Dubois et al. 2023) builds its human
preferences that way: two samples of the SFT policy per instruction, labelled by simulated annotators
that flip a share of the labels. This builder does the same for a task with a programmatic judge:

- k samples of the policy per prompt (the run's chat template and `policy.systemPrompt`, its sampling
  temperature and response length);
- per prompt one pair drawn uniformly from the pairs of samples the judge scores differently (ties
  are dropped, as AlpacaFarm's ties carry no label; a prompt whose samples all tie gives no pair);
- the judge's order, then each label flipped with probability `flip` (annotator noise);
- everything drawn from `seed`: the same seed, policy and prompts give the same pairs.

`rlp preferences RUN.yaml --prompts URI --out pairs.jsonl` writes them for `rewardModel.humanPreferences`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rlp_core.data import PreferencePair, Prompt, load_records, write_records
from rlp_core.hub import HF_SCHEME, PACKAGED_SCHEME, check_model_dir, fetch_hf
from rlp_core.judges import programmatic_judge
from rlp_core.models import load_policy, load_tokenizer
from rlp_core.pretrained import fetch_model
from rlp_core.sampling import decode_responses, sample_responses

Judge = Callable[[str, str], float]


@dataclass(frozen=True)
class Labelling:
    """How the policy is sampled and its samples labelled."""

    samples_per_prompt: int = 4
    flip: float = 0.2
    seed: int = 0
    temperature: float = 0.7
    max_new_tokens: int = 12
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples per prompt is {self.samples_per_prompt}: a pair needs at least 2")
        if not 0 <= self.flip < 0.5:
            raise ValueError(f"flip is {self.flip}: the share of flipped labels must be in [0, 0.5)")


def sample_policy(policy_dir: Path, tokenizer, prompts: list[str], labelling: Labelling) -> list[list[str]]:
    """k decoded samples per prompt, seeded."""
    model = load_policy(policy_dir).eval()
    k = labelling.samples_per_prompt
    asked = [p for p in prompts for _ in range(k)]
    torch.manual_seed(labelling.seed)
    responses: list[str] = []
    for i in range(0, len(asked), labelling.batch_size):
        roll = sample_responses(model, tokenizer, asked[i : i + labelling.batch_size],
                                max_new_tokens=labelling.max_new_tokens, temperature=labelling.temperature)
        responses += decode_responses(tokenizer, roll)
    return [responses[i : i + k] for i in range(0, len(responses), k)]


def label_pairs(prompts: list[str], samples: list[list[str]], judge: Judge, labelling: Labelling,
                limit: int | None = None) -> list[PreferencePair]:
    """One noisy-labelled pair per prompt whose samples the judge does not score all alike."""
    rng = random.Random(labelling.seed)
    pairs: list[PreferencePair] = []
    for prompt, responses in zip(prompts, samples):
        scores = [judge(prompt, r) for r in responses]
        decisive = [(i, j) for i in range(len(responses)) for j in range(i + 1, len(responses)) if scores[i] != scores[j]]
        if not decisive:
            continue
        i, j = rng.choice(decisive)
        better, worse = (i, j) if scores[i] > scores[j] else (j, i)
        if rng.random() < labelling.flip:
            better, worse = worse, better
        pairs.append(PreferencePair(prompt=prompt, chosen=responses[better], rejected=responses[worse]))
        if limit is not None and len(pairs) == limit:
            break
    return pairs


def policy_preferences(policy_dir: Path, tokenizer, prompts: list[str], judge: Judge, labelling: Labelling,
                       limit: int | None = None) -> list[PreferencePair]:
    return label_pairs(prompts, sample_policy(policy_dir, tokenizer, prompts, labelling), judge, labelling, limit)


def local_policy(spec, cache_dir: Path) -> Path:
    """The run's starting policy as a local directory (a local path, hf:// or packaged://)."""
    uri = spec.policy.model
    if uri is None:
        raise ValueError("spec.policy.model is unset: the pairs are sampled from a starting policy; set it to the "
                         "SFT model (or run the sft phase and point it at its output)")
    if uri.startswith(HF_SCHEME):
        local, _ = fetch_hf(uri, "spec.policy.model", cache_dir / "huggingface", spec.hub.endpoint)
    elif uri.startswith(PACKAGED_SCHEME):
        local = fetch_model(uri.removeprefix(PACKAGED_SCHEME))
    elif "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"spec.policy.model: {uri}: copy the model to a local directory first (file:// or a path)")
    else:
        local = Path(uri.removeprefix("file://")).expanduser()
    return check_model_dir(local, "spec.policy.model", uri)


def write_policy_preferences(spec, prompts_uri: str, out: Path, labelling: Labelling, limit: int | None,
                             cache_dir: Path) -> int:
    """`rlp preferences`: the run's policy, chat template and evaluation judge; returns the pairs written."""
    prompts = [p.prompt for p in load_records(prompts_uri, Prompt)]
    judge = programmatic_judge(spec.evaluation.judge)
    if judge is None:
        raise ValueError(f"spec.evaluation.judge: {spec.evaluation.judge!r} is not programmatic; the simulated "
                         "annotators need builtin://<task> or reasoning-gym://<task>")
    policy_dir = local_policy(spec, cache_dir)
    tokenizer = load_tokenizer(policy_dir, spec.policy.chat_template, spec.policy.system_prompt)
    pairs = policy_preferences(policy_dir, tokenizer, prompts, judge, labelling, limit)
    return write_records(out, pairs)
