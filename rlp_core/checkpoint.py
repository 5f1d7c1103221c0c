"""Resumable training state in the store, without pickle: tensors in safetensors, the rest in JSON.

Whoever can write to the bucket must not be able to run code in a job pod, so a checkpoint is data
only. Under a phase prefix it is laid out as

    _checkpoints/step-{N}/state.safetensors   every tensor of the state, by a generated name
    _checkpoints/step-{N}/state.json          the rest (numbers, strings, lists, tuples, dicts) with
                                              {"$tensor": name} where a tensor was
    _checkpoints/LATEST.json                  {"step": N, "files": [{path, size, sha256}]}, written last

so a checkpoint is complete iff LATEST.json names it, and every file is verified by its sha256 before it
is used. Uploads run in a background thread and are retried by the store; a checkpoint that still cannot
be written is logged and skipped (training goes on, the next one tries again): a lost checkpoint costs a
few steps on a restart, a failed phase costs all of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from rlp_core.store import Store, StoreError

log = logging.getLogger("rlp.checkpoint")

CHECKPOINT_DIR = "_checkpoints"
LATEST = f"{CHECKPOINT_DIR}/LATEST.json"
TENSORS, REST = "state.safetensors", "state.json"


class CheckpointError(StoreError):
    """A checkpoint that is listed but unreadable; the message names it and how to start over."""


def encode_state(state: Any) -> tuple[dict[str, torch.Tensor], bytes]:
    """Split a nested state into safetensors-ready tensors and JSON for everything else."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
            return {"$tensor": name}
        if isinstance(value, tuple):
            return {"$tuple": [enc(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                return {k: enc(v, f"{where}[{k!r}]") for k, v in value.items()}
            return {"$items": [[enc(k, where), enc(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot checkpoint {type(value).__name__} at {where}: only tensors, numbers, strings, "
                        "lists, tuples and dicts are stored")

    rest = enc(state, "state")
    return tensors, json.dumps(rest).encode()


def decode_state(tensors: dict[str, torch.Tensor], rest: bytes) -> Any:
    def dec(value: Any) -> Any:
        if isinstance(value, list):
            return [dec(v) for v in value]
        if isinstance(value, dict):
            if "$tensor" in value:
                return tensors[value["$tensor"]]
            if "$tuple" in value:
                return tuple(dec(v) for v in value["$tuple"])
            if "$items" in value:
                return {dec(k): dec(v) for k, v in value["$items"]}
            return {k: dec(v) for k, v in value.items()}
        return value

    return dec(json.loads(rest))


class StoreCheckpointer:
    """The `Checkpointer` of rlp_core.ppo on a phase's store prefix (see the module docstring)."""

    def __init__(self, store: Store):
        self.store = store
        self._uploads = ThreadPoolExecutor(1, thread_name_prefix="rlp-checkpoint")
        self._pending: Future | None = None

    def save(self, step: int, state: dict[str, Any]) -> None:
        if self._pending is not None and not self._pending.done():  # the store is slow or away: train on
            log.warning("checkpoint at step %d skipped: the previous one is still being uploaded", step)
            return
        tensors, rest = encode_state(state)  # now, so training may change the live state meanwhile
        self._pending = self._uploads.submit(self._upload, step, save_tensors(tensors), rest)

    def wait(self) -> None:
        """Let the checkpoint upload in flight (if any) finish."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def _upload(self, step: int, tensors: bytes, rest: bytes) -> None:
        folder = f"{CHECKPOINT_DIR}/step-{step}"
        try:
            files = []
            for name, data in ((TENSORS, tensors), (REST, rest)):
                self.store.put_bytes(f"{folder}/{name}", data)
                files.append({"path": f"{folder}/{name}", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            previous = self._latest_step()
            self.store.put_bytes(LATEST, json.dumps({"step": step, "files": files}, indent=1).encode())
            if previous is not None and previous != step:
                self.store.delete_prefix(f"{CHECKPOINT_DIR}/step-{previous}")
        except StoreError as err:
            log.warning("checkpoint at step %d not saved (%s); training goes on, the next checkpoint tries again",
                        step, err)

    def _latest_step(self) -> int | None:
        try:
            return int(json.loads(self.store.get_bytes(LATEST))["step"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def load(self) -> dict[str, Any] | None:
        """The latest complete checkpoint, verified; None when there is none."""
        try:
            raw = self.store.get_bytes(LATEST)
        except FileNotFoundError:
            return None
        fix = f"delete {self.store.url(CHECKPOINT_DIR)}/ to restart the phase from step 0"
        try:
            latest = json.loads(raw)
            files = {f["path"].rsplit("/", 1)[-1]: f for f in latest["files"]}
            contents = {}
            for name in (TENSORS, REST):
                entry = files[name]
                data = self.store.get_bytes(entry["path"])
                if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    raise CheckpointError(f"checkpoint {self.store.url(entry['path'])} is corrupt (sha256 differs "
                                          f"from {LATEST}); {fix}")
                contents[name] = data
            return decode_state(load_tensors(contents[TENSORS]), contents[REST])
        except FileNotFoundError as err:
            raise CheckpointError(f"checkpoint incomplete: {err}; {fix}") from None
        except (ValueError, KeyError, TypeError, SafetensorError) as err:
            raise CheckpointError(f"checkpoint {self.store.url(LATEST)} is unreadable ({type(err).__name__}: "
                                  f"{err}); {fix}") from None

    def remove(self) -> None:
        """Delete every checkpoint (after the phase's output is published)."""
        self.wait()
        self.store.delete_prefix(CHECKPOINT_DIR)
