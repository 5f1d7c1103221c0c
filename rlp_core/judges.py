"""Programmatic gold judges by URI: `builtin://<task>` (rlp_core.tasks) and `reasoning-gym://<task>`
(rlp_core.gym_tasks). Anything else (`reward-model`) is not programmatic and gives None."""

from __future__ import annotations

from collections.abc import Callable

from rlp_core import gym_tasks, tasks

Judge = Callable[[str, str], float]
AnswerReader = Callable[[str], str | None]


def is_programmatic(uri: str) -> bool:
    return uri.startswith(("builtin://", gym_tasks.SCHEME))


def programmatic_judge(uri: str) -> Judge | None:
    """The gold scorer of a judge URI; ValueError (naming the URI) when it names no known task."""
    if uri.startswith("builtin://"):
        return tasks.gold_judge(uri)
    if uri.startswith(gym_tasks.SCHEME):
        return gym_tasks.gold_judge(uri)
    return None


def answer_reader(uri: str) -> AnswerReader | None:
    """response -> the part of it the judge of `uri` scores (None when it reads no answer), without the
    reference answer: two replies with one reading score alike on any prompt. None for a judge that
    reads no answer (`reward-model`)."""
    if uri.startswith("builtin://"):
        return tasks.answer_reader(uri)
    if uri.startswith(gym_tasks.SCHEME):
        return gym_tasks.answer_reader(uri)
    return None
