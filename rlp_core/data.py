"""JSONL record formats of the pipeline, validated line by line.

A bad record fails the whole load before any training starts, with the file, the line number and the
field in the message (`prefs.jsonl:12: chosen: Field required`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlp_core.tasks import builtin_records

if TYPE_CHECKING:
    from rlp_core.spec import RLPRunSpec


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Prompt(Record):
    prompt: str = Field(..., min_length=1)
    id: str | None = None


class Demonstration(Record):
    prompt: str = Field(..., min_length=1)
    response: str


class PreferencePair(Record):
    prompt: str = Field(..., min_length=1)
    chosen: str
    rejected: str
    weight: float = Field(1.0, gt=0, description="Weight of the pair in the reward model's loss.")


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
    """Load a JSONL source: `builtin://task/split`, a local path / file:// URI, or any URI `read_bytes` reads."""
    if uri.startswith("builtin://"):
        try:
            docs = builtin_records(uri)
        except ValueError as err:
            raise DataError(str(err)) from None
        return parse_records((json.dumps(d) for d in docs), record, uri)
    if "://" in uri and not uri.startswith("file://"):
        if read_bytes is None:
            raise DataError(f"{uri}: no store configured to read this URI")
        text = read_bytes(uri).decode()
    else:
        path = Path(uri.removeprefix("file://"))
        try:
            text = path.read_text()
        except OSError as err:
            raise DataError(f"{uri}: cannot read ({err.strerror})") from None
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
