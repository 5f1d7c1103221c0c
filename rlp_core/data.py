"""JSONL record formats of the pipeline, validated line by line.

Prompts come as plain text (`{"prompt": "..."}`) or as chat messages, in the shapes TRL's and
OpenRLHF's data use: `{"messages": [...]}`, `{"prompt": [...messages]}`, and preference pairs as
`{"prompt": ..., "chosen": [...], "rejected": [...]}` or whole conversations `{"chosen": [...], "rejected":
[...]}` (the prompt is the shared turns before the last). A conversational prompt is carried through
the pipeline as the JSON text of its message list; `rlp_core.models.render_prompt` turns either form
into the model's input (with the tokenizer's chat template when `policy.chatTemplate` is auto).

A bad record fails the whole load before any training starts, with the file, the line number and the
field in the message (`prefs.jsonl:12: chosen: Field required`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlp_core import gym_tasks
from rlp_core.tasks import builtin_records

if TYPE_CHECKING:
    from rlp_core.spec import RLPRunSpec


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _messages_text(messages: list[dict]) -> str:
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages])


def _reply(value):
    """A response given as messages: the content of the last (assistant) turn."""
    return value[-1]["content"] if _is_messages(value) and value else value


class Prompt(Record):
    prompt: str = Field(..., min_length=1)
    id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _chat(cls, doc):
        if isinstance(doc, dict):
            msgs = doc.get("prompt", doc.get("messages"))
            if _is_messages(msgs):
                doc = {**doc, "prompt": _messages_text(msgs)}
        return doc


class Demonstration(Record):
    prompt: str = Field(..., min_length=1)
    response: str

    @model_validator(mode="before")
    @classmethod
    def _chat(cls, doc):
        if isinstance(doc, dict) and "prompt" not in doc and _is_messages(doc.get("messages")) and doc["messages"]:
            doc = {**doc, "prompt": _messages_text(doc["messages"][:-1]), "response": doc["messages"][-1]["content"]}
        elif isinstance(doc, dict) and _is_messages(doc.get("prompt")):
            doc = {**doc, "prompt": _messages_text(doc["prompt"]), "response": _reply(doc.get("response"))}
        return doc


class PreferencePair(Record):
    prompt: str = Field(..., min_length=1)
    chosen: str
    rejected: str
    weight: float = Field(1.0, gt=0, description="Weight of the pair in the reward model's loss.")

    @model_validator(mode="before")
    @classmethod
    def _chat(cls, doc):
        if not isinstance(doc, dict):
            return doc
        prompt = doc.get("prompt")
        if prompt is None and _is_messages(doc.get("chosen")):  # whole conversations: the prompt is their shared start
            prompt = doc["chosen"][:-1]
        if _is_messages(prompt):
            prompt = _messages_text(prompt)
        update = {"prompt": prompt, "chosen": _reply(doc.get("chosen")), "rejected": _reply(doc.get("rejected"))}
        return {**doc, **{k: v for k, v in update.items() if v is not None}}


class Sample(Record):
    """One policy sample written by the generate phase."""

    prompt_id: str
    prompt: str
    response: str
    sample_index: int = Field(..., ge=0)
    logprob: float = Field(..., description="Sum of the sampling policy's token log-probs.")
    num_tokens: int = Field(..., ge=0)
    finished: bool = Field(..., description="The response ended with EOS.")


class DataError(ValueError):
    """A data file that does not match its format; the message names the file, line and field."""


R = TypeVar("R", bound=Record)


def parse_records(lines: Iterable[str], record: type[R], source: str) -> list[R]:
    out: list[R] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{source}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        try:
            out.append(record.model_validate(doc))
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in err.errors())
            raise DataError(f"{source}:{lineno}: {problems} (expected a {record.__name__} record)") from None
    if not out:
        raise DataError(f"{source}: no records; expected JSONL with one {record.__name__} per line")
    return out


def load_records(uri: str, record: type[R], read_bytes: Callable[[str], bytes] | None = None) -> list[R]:
    """Load a JSONL source: `builtin://task/split`, `reasoning-gym://task/split`, a local path / file:// URI,
    or any URI `read_bytes` reads."""
    if uri.startswith(("builtin://", gym_tasks.SCHEME)):
        try:
            docs = builtin_records(uri) if uri.startswith("builtin://") else gym_tasks.records(uri)
        except ValueError as err:
            raise DataError(str(err)) from None
        return parse_records((json.dumps(d) for d in docs), record, uri)
    if "://" in uri and not uri.startswith("file://"):
        if read_bytes is None:
            raise DataError(f"{uri}: no store configured to read this URI")
        try:
            data = read_bytes(uri)
        except FileNotFoundError:
            raise DataError(f"{uri}: no such object; upload the JSONL file there or fix the URI in the spec") from None
    else:
        path = Path(uri.removeprefix("file://"))
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DataError(f"{uri}: cannot read ({err.strerror})") from None
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        raise DataError(f"{uri}: not UTF-8 text (invalid byte at offset {err.start}); "
                        f"expected JSONL with one {record.__name__} per line") from None
    return parse_records(text.splitlines(), record, uri)


def spec_sources(spec: RLPRunSpec) -> list[tuple[str, str, type[Record]]]:
    """(YAML path, URI, record type) of every data file the run's plan reads."""
    sources: list[tuple[str, str, type[Record]]] = [
        ("spec.prompts", spec.prompts, Prompt),
        ("spec.evaluation.prompts", spec.evaluation.prompts, Prompt),
    ]
    if spec.policy.model is None:  # the sft phase runs
        sources.append(("spec.policy.sft.demonstrations", spec.policy.sft.demonstrations, Demonstration))
    sources.append(("spec.rewardModel.humanPreferences", spec.reward_model.human_preferences, PreferencePair))
    return sources


def write_records(path: Path, records: Iterable[Record]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for r in records:
            f.write(r.model_dump_json() + "\n")
            n += 1
    return n


def split_held_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic (train, held_out) split; held_out is empty when fraction is 0."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    k = int(round(len(items) * fraction))
    held = set(order[:k])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]
