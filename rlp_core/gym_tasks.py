"""`reasoning-gym://<task>`: procedural tasks from reasoning-gym (PyPI) as data and gold judges.

    reasoning-gym://basic_arithmetic/prompts?n=64&seed=1&max_terms=3&max_digits=1&operators=+,-
    reasoning-gym://basic_arithmetic?max_terms=3&max_digits=1&operators=+,-      (the judge)

Query parameters other than `n`, `seed` and `flip` are the task's own config fields (ints, true/false,
comma-separated lists); `+` is taken literally, not as a space. The gold judge is the task's
`score_answer` on the stripped response (1 for the exact answer, partial credit when the answer is
inside a longer text). Splits are disjoint by construction: a question belongs to `eval` or to the
training splits by a hash of its text, so held-out prompts never reach RM or policy training.
The judge reads the entry of a question from the records generated in this process (every phase
loads its prompts before judging), so it needs no second copy of the data.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from typing import Any
from urllib.parse import parse_qsl, urlparse

SCHEME = "reasoning-gym://"
SPLITS = ("demonstrations", "preferences", "prompts", "eval")
_SPLIT_SEED = {"demonstrations": 11, "preferences": 23, "prompts": 37, "eval": 53}
_DEFAULT_SIZE = {"demonstrations": 1000, "preferences": 300, "prompts": 256, "eval": 200}
EVAL_SHARE = 0.3
INSTRUCTION = " Reply with the number only."
_ENTRIES: dict[str, tuple[Any, dict]] = {}  # prompt text -> (dataset, entry), filled by records()


def _value(text: str) -> Any:
    if "," in text:
        return tuple(t for t in text.split(",") if t)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def parse(uri: str) -> tuple[str, str | None, dict[str, Any], dict[str, Any]]:
    """-> (task, split or None, {n, seed, flip}, task config)."""
    parsed = urlparse(uri.replace("+", "%2B"))
    task, split = parsed.netloc, parsed.path.strip("/") or None
    if split is not None and split not in SPLITS:
        raise ValueError(f"{uri}: no split {split!r}; choose one of {', '.join(SPLITS)}")
    ours, config = {}, {}
    for key, text in parse_qsl(parsed.query):
        (ours if key in ("n", "seed", "flip") else config)[key] = _value(text)
    return task, split, ours, config


def _dataset(task: str, size: int, seed: int, config: dict[str, Any], uri: str):
    try:
        with warnings.catch_warnings():  # its dependency cellpylib compares with `is` on first import
            warnings.simplefilter("ignore", SyntaxWarning)
            import reasoning_gym
    except ImportError:
        raise ValueError(f"{uri}: reasoning-gym is not installed; install the 'pretrained' extra") from None
    try:
        return reasoning_gym.create_dataset(task, size=size, seed=seed, **config)
    except (KeyError, ValueError, TypeError, AssertionError) as err:
        raise ValueError(f"{uri}: reasoning-gym cannot build task {task!r} with {config}: {err}") from None


def is_eval_question(question: str) -> bool:
    digest = int.from_bytes(hashlib.sha256(question.encode()).digest()[:4], "big")
    return digest % 1000 < EVAL_SHARE * 1000


def _wrong(answer: str, rng: random.Random) -> str:
    try:
        return str(int(answer) + rng.choice([-10, -2, -1, 1, 2, 10]))
    except ValueError:
        return answer[::-1] if answer[::-1] != answer else answer + "0"


def records(uri: str) -> list[dict]:
    task, split, ours, config = parse(uri)
    if split is None:
        raise ValueError(f"{uri}: name a split, e.g. {SCHEME}{task}/prompts")
    n = int(ours.get("n", _DEFAULT_SIZE[split]))
    seed = int(ours.get("seed", _SPLIT_SEED[split]))
    dataset = _dataset(task, 8 * n, seed, config, uri)
    rng = random.Random(seed)
    out: list[dict] = []
    for entry in dataset:
        if is_eval_question(entry["question"]) != (split == "eval"):
            continue
        prompt, answer = entry["question"] + INSTRUCTION, str(entry["answer"])
        _ENTRIES[prompt] = (dataset, entry)
        if split == "demonstrations":
            out.append({"prompt": prompt, "response": answer})
        elif split == "preferences":
            good, bad = answer, _wrong(answer, rng)
            if rng.random() < float(ours.get("flip", 0.2)):  # simulated annotator noise
                good, bad = bad, good
            out.append({"prompt": prompt, "chosen": good, "rejected": bad})
        else:
            out.append({"id": f"{split}-{len(out)}", "prompt": prompt})
        if len(out) == n:
            break
    return out


def gold_judge(uri: str):
    """(prompt, response) -> the task's score_answer of the response, for prompts of this task's records."""
    task, _, _, _ = parse(uri)
    _dataset(task, 1, 0, parse(uri)[3], uri)  # fail now on an unknown task or config, not at the first score

    def score(prompt: str, response: str) -> float:
        found = _ENTRIES.get(prompt)
        if found is None:
            raise ValueError(f"{uri}: prompt {prompt[:60]!r} is not from {SCHEME}{task} data loaded in this process")
        dataset, entry = found
        return float(dataset.score_answer(response.strip(), entry))

    return score
