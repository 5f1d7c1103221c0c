"""Built-in tasks: data generated on the spot plus a programmatic gold judge (no downloads).

`builtin://arith/<split>` is the quickstart's task: two-number addition ("17+5=" -> "22"). It is small
enough for a tiny model to learn partly in seconds on a CPU, has a known optimum (the exact sum), and
has short answers, so the self-consistency that RLP-SPG relies on is meaningful. The splits mimic the
AlpacaFarm setting of the RLP paper at toy scale:

- demonstrations: noisy SFT data, so SFT makes the policy only partly competent: a share of wrong
  answers (`demo_error_rate`), and independently a share of sloppy ones (`sloppy_rate`: the answer
  followed by a stray "+", as if the expression went on);
- preferences: a human-preference set labelled by simulated noisy annotators (`annotator_flip_rate` of
  the labels flipped); the rejected answer is wrong, sloppy, or both;
- prompts / eval: unlabeled prompts for RL, and held-out prompts for the win-rate.

Evaluation is on prompts no RLHF phase trains on: a fixed share of the operand pairs
(`held_out_share`, drawn once with a fixed seed) is reserved for the `eval` split, and the human
preferences and the RL prompts (which generate, SPG, SER and PPO all sample) draw only from the other
pairs. Without the reservation eval and RL would share almost every prompt (100 distinct ones in all).
The demonstrations cover the whole table on purpose: SFT stands in for pretraining, which gives a
real policy its knowledge of the held-out prompts too. A tiny model memorises the table entry by
entry (trained on 70% of it, it scores 0.15 on the rest), so eval prompts unseen even in SFT would
measure memory, not what RLHF changes: what RLHF can change here is how reliably the policy gives the
answer it knows (with 30% wrong demonstrations SFT leaves that well below 1), and that must carry over
to prompts it did not optimise on.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

_ANSWER = re.compile(r"^\s*(-?\d+)")


@dataclass(frozen=True)
class ArithTask:
    """Addition of two numbers in [0, max_operand]; split seeds keep splits disjoint-ish and stable."""

    max_operand: int = 9
    demo_error_rate: float = 0.3
    sloppy_rate: float = 0.3
    annotator_flip_rate: float = 0.2
    held_out_share: float = 0.3

    name = "arith"
    splits = ("demonstrations", "preferences", "prompts", "eval")
    _split_seed = {"demonstrations": 11, "preferences": 23, "prompts": 37, "eval": 53}
    _default_size = {"demonstrations": 3000, "preferences": 300, "prompts": 512, "eval": 200}
    _held_out_seed = 7

    def operand_pairs(self, split: str) -> list[tuple[int, int]]:
        """The operand pairs a split draws from: the reserved ones for `eval`, every pair for
        `demonstrations`, the others for `preferences` and `prompts`."""
        every = [(a, b) for a in range(self.max_operand + 1) for b in range(self.max_operand + 1)]
        if split == "demonstrations":
            return every
        held_out = set(random.Random(self._held_out_seed).sample(every, round(self.held_out_share * len(every))))
        return [p for p in every if (p in held_out) == (split == "eval")]

    def is_held_out(self, prompt: str) -> bool:
        a, b = prompt.rstrip("=").split("+")
        return (int(a), int(b)) in set(self.operand_pairs("eval"))

    @staticmethod
    def prompt(a: int, b: int) -> str:
        return f"{a}+{b}="

    def truth(self, prompt: str) -> int:
        a, b = prompt.rstrip("=").split("+")
        return int(a) + int(b)

    def _wrong(self, truth: int, rng: random.Random) -> str:
        delta = rng.choice([-10, -2, -1, 1, 2, 10])
        return str(truth + delta if truth + delta >= 0 else truth - delta)

    @staticmethod
    def _sloppy(answer: str) -> str:
        return f"{answer}+"

    @staticmethod
    def read_answer(response: str) -> str | None:
        """The answer the gold judge reads: the leading integer (what follows it is format, not answer:
        "13+" answers 13), or None when there is none. It never sees the prompt's truth."""
        match = _ANSWER.match(response)
        return str(int(match.group(1))) if match else None

    @staticmethod
    def scored_form(response: str) -> str | None:
        """What the gold judge's score depends on besides the truth: the leading integer and whether
        anything follows it ("13", or "13+..." for "13+" and "13 =" alike), None when no integer leads.
        Replies with one form score alike on every prompt, so SPG's answer equivalence clusters by it:
        the integer alone would put a clean "13" and a sloppy "13+", which the judge halves, in one
        cluster, and the quickstart's win-rate fell from 0.53 to 0.50 when it did."""
        match = _ANSWER.match(response)
        if not match:
            return None
        answer = str(int(match.group(1)))
        return answer if response[match.end():].strip() == "" else f"{answer}+..."

    @classmethod
    def parses(cls, response: str) -> bool:
        """Whether the gold judge can read an answer at all (a response that cannot is reward hacking)."""
        return cls.read_answer(response) is not None

    def gold_score(self, prompt: str, response: str) -> float:
        """Gold reward: 1 for the exact sum alone, partial credit for near misses, halved when anything
        follows the number (a sloppy answer), 0 when no number can be read."""
        match = _ANSWER.match(response)
        if not match:
            return 0.0
        error = abs(int(match.group(1)) - self.truth(prompt))
        score = 1.0 if error == 0 else 0.5 / (1 + error)
        return score if response[match.end():].strip() == "" else score / 2

    def records(self, split: str, n: int | None = None, seed: int | None = None) -> list[dict]:
        if split not in self.splits:
            raise ValueError(f"builtin://{self.name} has no split {split!r}; choose one of {', '.join(self.splits)}")
        rng = random.Random(self._split_seed[split] if seed is None else seed)
        n = self._default_size[split] if n is None else n
        pairs = self.operand_pairs(split)
        out: list[dict] = []
        for i in range(n):
            a, b = rng.choice(pairs)
            prompt, truth = self.prompt(a, b), a + b
            if split == "demonstrations":
                wrong, sloppy = rng.random() < self.demo_error_rate, rng.random() < self.sloppy_rate
                answer = self._wrong(truth, rng) if wrong else str(truth)
                out.append({"prompt": prompt, "response": self._sloppy(answer) if sloppy else answer})
            elif split == "preferences":
                kind = rng.choice(["wrong", "wrong", "sloppy", "both"])
                bad = str(truth) if kind == "sloppy" else self._wrong(truth, rng)
                good, bad = str(truth), self._sloppy(bad) if kind != "wrong" else bad
                if rng.random() < self.annotator_flip_rate:
                    good, bad = bad, good
                out.append({"prompt": prompt, "chosen": good, "rejected": bad})
            else:
                out.append({"id": f"{split}-{i}", "prompt": prompt})
        return out


TASKS = {"arith": ArithTask()}


def parse_builtin(uri: str) -> tuple[ArithTask, str | None, dict[str, int]]:
    """`builtin://arith/prompts?n=100&seed=3` -> (task, split, {n, seed}); split may be None (judge URIs)."""
    parsed = urlparse(uri)
    task = TASKS.get(parsed.netloc)
    if task is None:
        raise ValueError(f"{uri}: unknown built-in task {parsed.netloc!r}; known: {', '.join(TASKS)}")
    split = parsed.path.strip("/") or None
    params = {k: int(v[-1]) for k, v in parse_qs(parsed.query).items() if k in ("n", "seed")}
    return task, split, params


def builtin_records(uri: str) -> list[dict]:
    task, split, params = parse_builtin(uri)
    if split is None:
        raise ValueError(f"{uri}: name a split, e.g. builtin://{task.name}/prompts")
    return task.records(split, **params)


def gold_judge(uri: str):
    """The gold scorer (prompt, response) -> float of a built-in task URI such as `builtin://arith`."""
    task, _, _ = parse_builtin(uri)
    return task.gold_score


def answer_reader(uri: str):
    """response -> what its judge scores (None when it reads no answer), for a built-in task URI."""
    task, _, _ = parse_builtin(uri)
    return task.scored_form
