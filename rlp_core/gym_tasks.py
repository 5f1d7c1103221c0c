"""`reasoning-gym://<task>`: procedural tasks from reasoning-gym (PyPI) as data and gold judges.

    reasoning-gym://basic_arithmetic/prompts?n=64&seed=1&max_terms=3&max_digits=1&operators=+,-
    reasoning-gym://basic_arithmetic?max_terms=3&max_digits=1&operators=+,-      (the judge)

Query parameters other than `n`, `seed`, `flip` and `answer` are the task's own config fields (ints,
true/false, comma-separated lists); `+` is taken literally, not as a space. The gold judge is the task's
`score_answer` on the answer read from the response, and `answer=` says how it is read:

- `exact` (default): the whole stripped response (1 for the bare answer; reasoning-gym's own partial
  credit, len(answer)/len(response), when the answer is inside a longer text);
- `last-number`: the last number in the response, the "flexible extract" of lm-evaluation-harness's
  GSM8K task, scored 1 or 0 (score_answer's substring credit means nothing inside a number: "11"
  contains "1"). A small model works a sum out as "2 + 4 = 6", and a strict bare-number match would score
  its format, not its arithmetic (SmolLM2-135M: 50% right greedy by this reading, 0% exactly bare).

Preference pairs are what an annotator with the judge's taste would label: two candidate responses per
question, each in one of the forms a chat model writes (the bare number, the worked equation, a sentence,
a rambling start that never reaches a number), with the right or a wrong value; the one the judge scores
higher is `chosen` (ties are redrawn), then `flip` swaps a share of the labels (annotator noise). So a
reward model learns the judge's reading of form as well as correctness, which bare-number-only pairs
cannot teach. Splits are disjoint by construction: a question belongs to `eval` or to the
training splits by a hash of its text, so held-out prompts never reach RM or policy training. Prompt and
eval records are distinct questions, so a small task's split can hold fewer than `n`.
The judge reads the entry of a question from the records generated in this process (every phase
loads its prompts before judging), so it needs no second copy of the data.
"""

from __future__ import annotations

import hashlib
import random
import re
import warnings
from typing import Any
from urllib.parse import parse_qsl, urlparse

SCHEME = "reasoning-gym://"
SPLITS = ("demonstrations", "preferences", "prompts", "eval")
_SPLIT_SEED = {"demonstrations": 11, "preferences": 23, "prompts": 37, "eval": 53}
_DEFAULT_SIZE = {"demonstrations": 1000, "preferences": 300, "prompts": 256, "eval": 200}
EVAL_SHARE = 0.3
INSTRUCTION = " Reply with the number only."
ANSWER_MODES = ("exact", "last-number")
_OURS = ("n", "seed", "flip", "answer")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_RAMBLES = ("To solve this, we need to", "Here is a simple way to work it out:", "Let's think about the numbers",
            "The question asks us to")
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
        (ours if key in _OURS else config)[key] = _value(text)
    if ours.get("answer", "exact") not in ANSWER_MODES:
        raise ValueError(f"{uri}: answer={ours['answer']!r} is not a way to read the answer; choose one of "
                         f"{', '.join(ANSWER_MODES)}")
    return task, split, ours, config


def _last_number(response: str) -> str | None:
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def judge_score(dataset, entry: dict, response: str, mode: str) -> float:
    """The task's score of a response, the answer read from it as `mode` says (see the module docstring)."""
    response = response.strip()
    if mode == "last-number":
        number = _last_number(response)
        return float(number is not None and float(dataset.score_answer(number, entry)) == 1.0)
    return float(dataset.score_answer(response, entry))


def read_answer(response: str, mode: str) -> str | None:
    """The answer `judge_score` reads from a response, in a canonical form ("13.0" and "13" are one
    answer), or None when it reads none. It sees the response only, never the entry's answer."""
    response = response.strip()
    if mode != "last-number":
        return response or None
    number = _last_number(response)
    if number is None:
        return None
    value = float(number)
    return str(int(value)) if value.is_integer() else repr(value)


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


def _candidate(question: str, value: str, rng: random.Random) -> str:
    """One response to `question` in a form a chat model writes, giving `value` (rambles give none)."""
    expression = question.removeprefix("Calculate ").rstrip(".") if question.startswith("Calculate ") else None
    forms = [value, f"The answer is {value}.", rng.choice(_RAMBLES)]
    if expression:
        forms.append(f"{expression} = {value}")
    return rng.choice(forms)


def _preference(dataset, entry: dict, mode: str, rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected): two candidates the judge tells apart, the better one first."""
    answer = str(entry["answer"])
    for _ in range(20):
        a, b = (_candidate(entry["question"], rng.choice([answer, _wrong(answer, rng)]), rng) for _ in range(2))
        score_a, score_b = (judge_score(dataset, entry, r, mode) for r in (a, b))
        if score_a != score_b:
            return (a, b) if score_a > score_b else (b, a)
    return answer, _wrong(answer, rng)


def records(uri: str) -> list[dict]:
    task, split, ours, config = parse(uri)
    if split is None:
        raise ValueError(f"{uri}: name a split, e.g. {SCHEME}{task}/prompts")
    n = int(ours.get("n", _DEFAULT_SIZE[split]))
    seed = int(ours.get("seed", _SPLIT_SEED[split]))
    dataset = _dataset(task, 8 * n, seed, config, uri)
    rng = random.Random(seed)
    out: list[dict] = []
    seen: set[str] = set()
    for entry in dataset:
        if is_eval_question(entry["question"]) != (split == "eval"):
            continue
        if split != "preferences":  # distinct questions: a repeated eval question would narrow the intervals falsely
            if entry["question"] in seen:
                continue
            seen.add(entry["question"])
        prompt, answer = entry["question"] + INSTRUCTION, str(entry["answer"])
        _ENTRIES[prompt] = (dataset, entry)
        if split == "demonstrations":
            out.append({"prompt": prompt, "response": answer})
        elif split == "preferences":
            good, bad = _preference(dataset, entry, ours.get("answer", "exact"), rng)
            if rng.random() < float(ours.get("flip", 0.2)):  # simulated annotator noise
                good, bad = bad, good
            out.append({"prompt": prompt, "chosen": good, "rejected": bad})
        else:
            out.append({"id": f"{split}-{len(out)}", "prompt": prompt})
        if len(out) == n:
            break
    return out


def answer_reader(uri: str):
    """response -> the answer the judge of `uri` reads (None when it reads none); see `read_answer`."""
    _, _, ours, _ = parse(uri)
    mode = ours.get("answer", "exact")
    return lambda response: read_answer(response, mode)


def gold_judge(uri: str):
    """(prompt, response) -> the task's score_answer of the response, for prompts of this task's records."""
    task, _, ours, config = parse(uri)
    mode = ours.get("answer", "exact")
    _dataset(task, 1, 0, config, uri)  # fail now on an unknown task or config, not at the first score

    def score(prompt: str, response: str) -> float:
        found = _ENTRIES.get(prompt)
        if found is None:
            raise ValueError(f"{uri}: prompt {prompt[:60]!r} is not from {SCHEME}{task} data loaded in this process")
        dataset, entry = found
        return judge_score(dataset, entry, response, mode)

    return score
