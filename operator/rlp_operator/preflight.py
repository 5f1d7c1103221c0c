"""Preflight: what a run reads from the store, checked before its first Job (and GPU) starts.

A run whose data file is missing or malformed would otherwise find out when the phase that reads it
runs, possibly hours of GPU time later. Checked once per run, with the run's own storage endpoint and
credentials (as its pods will read): the storage root (endpoint reachable, bucket present, credentials
valid), the first record of every data file the plan reads, and the model directories it starts from.

Two outcomes besides success: a `StoreError` (the storage cannot be used: a missing bucket or Secret,
wrong keys, an unreachable endpoint; the user can fix it and the run waits) and `PreflightFailed` (an
input is missing or malformed: the run fails before any Job starts). The readers are rlp_core's own
(`load_records`, `parse_records`, `Store`), so what passes here parses the same way in the phase.
"""

from __future__ import annotations

from collections.abc import Callable

from rlp_core.data import DataError, load_records, parse_records, spec_sources
from rlp_core.spec import RLPRun
from rlp_core.store import Store
from rlp_core.tasks import gold_judge

CONDITION = "Validated"  # the run's condition recording a passed (or failed) preflight
HEAD_BYTES = 1 << 20  # the first record of a data file must be within its first MiB
PROBE = ".rlp-preflight"  # listing this prefix under the storage root proves bucket, keys and endpoint


class PreflightFailed(Exception):
    """An input the run needs is missing or malformed; `reason` is the run's condition reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


OpenStore = Callable[..., Store]  # open_store(uri=None): the run's storage root, or the store of `uri`


def check_run(run: RLPRun, open_store: OpenStore) -> str:
    """Check storage, data and models of `run`; a one-line summary when all is well."""
    spec = run.spec
    root = open_store()
    root.list(PROBE)  # StoreError when the bucket is missing, the keys are wrong or the endpoint is down
    sources = spec_sources(spec)
    for path, uri, record in sources:
        try:
            if uri.startswith("s3://"):
                parent, _, name = uri.rpartition("/")
                head = open_store(parent).get_head(name, HEAD_BYTES)
                parse_records(_first_line(head, uri), record, uri)
            elif uri.startswith("builtin://"):
                load_records(uri, record)
            else:  # the CRD refuses local paths; a run admitted by an older CRD may still have one
                raise DataError(f"{uri} is a local path, which the phase pods cannot read; give s3:// or builtin://")
        except FileNotFoundError:
            raise PreflightFailed("InputNotFound", f"{path}: {uri} does not exist; upload it or fix the URI") from None
        except DataError as e:
            raise PreflightFailed("InvalidInput", f"{path}: {e}") from None
    models = [(p, uri) for p, uri in (("spec.policy.model", spec.policy.model),
                                      ("spec.rewardModel.model", spec.reward_model.model)) if uri]  # fmt: skip
    for path, uri in models:
        if not open_store(uri.rstrip("/")).exists("config.json"):
            raise PreflightFailed(
                "InputNotFound", f"{path}: {uri.rstrip('/')}/config.json does not exist; give the directory that "
                "save_pretrained wrote (config.json, model weights, tokenizer)",
            )  # fmt: skip
    if spec.evaluation.judge.startswith("builtin://"):
        try:
            gold_judge(spec.evaluation.judge)
        except ValueError as e:
            raise PreflightFailed("InvalidInput", f"spec.evaluation.judge: {e}") from None
    return (f"storage {root.url()} reachable; {len(sources)} data file(s) and {len(models)} model(s) found "
            "and readable")  # fmt: skip


def _first_line(head: bytes, uri: str) -> list[str]:
    """The first non-empty complete line of a file's head (a line cut by the head's end is not complete)."""
    lines = head.split(b"\n")
    if len(head) >= HEAD_BYTES:
        lines = lines[:-1]
    for line in lines:
        if line.strip():
            try:
                return [line.decode()]
            except UnicodeDecodeError:
                raise DataError(f"{uri}:1: not UTF-8 text") from None
    if len(head) >= HEAD_BYTES:
        raise DataError(f"{uri}: no complete line in the first {HEAD_BYTES} bytes; expected JSONL")
    return []  # parse_records says: no records


__all__ = ["CONDITION", "PreflightFailed", "check_run"]
