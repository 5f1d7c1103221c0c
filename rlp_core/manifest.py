"""Phase manifests: the single record that makes a phase output complete.

A phase uploads all its files first and writes ``_MANIFEST.json`` last, exactly once. A phase is
complete iff its manifest exists and verifies (every listed file present with its size; with
``deep`` also its sha256), so a phase killed at any point leaves either no manifest (rerun it) or a
complete output (skip it). Layout: ``{storage}/{namespace}/{run}/round-{K}/{phase}/``.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import os
import subprocess
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from rlp_core.store import FileEntry, Store, StoreError

MANIFEST_NAME = "_MANIFEST.json"


def phase_prefix(namespace: str, run: str, round: int, phase: str) -> str:
    """Key prefix of one phase's output, relative to the storage root."""
    for what, value in (("namespace", namespace), ("run", run), ("phase", phase)):
        if not value or "/" in value or value in (".", ".."):
            raise StoreError(f"invalid {what} {value!r} for a store prefix: a non-empty name without '/'")
    if round < 0:
        raise StoreError(f"invalid round {round}: rounds are numbered from 0 (pre-round phases) upwards")
    return f"{namespace}/{run}/round-{round}/{phase}"


def utc_now() -> str:
    """ISO 8601 UTC timestamp, the format of ``created_at``/``started_at``."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@functools.cache
def code_version() -> str:
    """Installed ``rlp`` version plus the git commit when known, e.g. ``0.1.0+g1a2b3c4d5e6f.dirty``.

    Images built without ``.git`` can set ``RLP_GIT_COMMIT``; without either the bare version is used.
    """
    try:
        version = importlib.metadata.version("rlp")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    commit = os.environ.get("RLP_GIT_COMMIT", "")[:12]
    dirty = False
    if not commit:
        src = Path(__file__).resolve().parent
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short=12", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            if commit:
                dirty = bool(
                    subprocess.run(
                        ["git", "status", "--porcelain", "--untracked-files=no"],
                        cwd=src,
                        capture_output=True,
                        text=True,
                        timeout=5,
                    ).stdout.strip()
                )
        except (OSError, subprocess.SubprocessError):
            commit = ""
    if not commit:
        return version
    return f"{version}+g{commit}" + (".dirty" if dirty else "")


class ManifestFile(BaseModel):
    """One file of a phase output (the JSON form of ``FileEntry``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @classmethod
    def of(cls, entry: FileEntry) -> ManifestFile:
        return cls(path=entry.path, size=entry.size, sha256=entry.sha256)

    def entry(self) -> FileEntry:
        return FileEntry(self.path, self.size, self.sha256)


class Manifest(BaseModel):
    """What a phase produced: its files with sizes and hashes, its summary metrics and provenance."""

    model_config = ConfigDict(extra="forbid")
    phase: str
    round: int = Field(ge=0)
    files: list[ManifestFile]
    metrics: dict[str, Any] = Field(default_factory=dict)
    spec_hash: str
    code_version: str
    created_at: str = Field(default_factory=utc_now)
    started_at: str | None = None
    fingerprint: str | None = Field(None, description="sha256 of spec_fields and inputs (rlp_core.provenance).")
    spec_fields: dict[str, Any] = Field(default_factory=dict, description="The spec fields that affect this phase.")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="Upstream output (round-K/phase) or model URI -> digest of what was read."
    )
    _digest: str = PrivateAttr("")

    def entries(self) -> list[FileEntry]:
        return [f.entry() for f in self.files]

    @property
    def digest(self) -> str:
        """sha256 of the manifest as stored: identifies this output's exact content."""
        return self._digest


def _parse(data: bytes, url: str) -> Manifest:
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as e:
        raise StoreError(
            f"unparsable manifest {url}: {e}. The output is corrupt; delete it (and the phase output) to rerun"
        ) from None
    manifest._digest = hashlib.sha256(data).hexdigest()
    return manifest


def write_manifest(store: Store, manifest: Manifest) -> None:
    """Write the manifest at the phase root; FileExistsError if one exists (a phase completes once)."""
    data = manifest.model_dump_json(indent=2).encode()
    store.put_bytes(MANIFEST_NAME, data, if_absent=True)
    manifest._digest = hashlib.sha256(data).hexdigest()


def read_manifest(store: Store) -> Manifest | None:
    """The phase's manifest, or None when absent; StoreError when present but unparsable."""
    try:
        data = store.get_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        return None
    return _parse(data, store.url(MANIFEST_NAME))


def inspect_output(store: Store, *, deep: bool = False) -> tuple[Manifest | None, str | None]:
    """(manifest, None) when the phase output is complete; (None, None) when there is no manifest;
    (None, what is wrong) when a manifest is there but the output does not match it (damaged).

    Complete: the manifest parses and every listed file exists with the listed size (one listing, cheap
    enough for every reconcile); ``deep`` also re-hashes every file's content.
    """
    try:
        data = store.get_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        return None, None
    try:
        manifest = _parse(data, store.url(MANIFEST_NAME))
    except StoreError as err:
        return None, str(err)
    sizes = {e.path: e.size for e in store.list()}
    for f in manifest.files:
        if f.path not in sizes:
            return None, f"{store.url(f.path)} is missing"
        if sizes[f.path] != f.size:
            return None, f"{store.url(f.path)} has {sizes[f.path]} bytes, its manifest says {f.size}"
        if deep and store.sha256(f.path) != f.sha256:
            return None, f"{store.url(f.path)} does not match its sha256 in the manifest"
    return manifest, None


def verify_manifest(store: Store, *, deep: bool = False) -> Manifest | None:
    """The manifest if the phase output is complete (see ``inspect_output``), else None."""
    return inspect_output(store, deep=deep)[0]


def publish_phase_output(
    store: Store,
    local_dir: Path,
    *,
    phase: str,
    round: int,
    metrics: dict,
    spec_hash: str,
    code_version: str,
    started_at: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> Manifest:
    """Upload ``local_dir`` to ``store`` (the phase prefix), then write its manifest.

    A crash or upload error between the two leaves no manifest, so the phase reruns. Refuses
    (FileExistsError) when a complete output is already there: a complete phase is never redone in
    place. A manifest that no longer verifies is removed first, so a rerun can replace it.
    Files already under the prefix but not in ``local_dir`` are left alone; the manifest lists
    exactly what belongs to the output. ``provenance`` sets the manifest's fingerprint, spec_fields
    and inputs (rlp_core.provenance).
    """
    local_dir = Path(local_dir)
    if (local_dir / MANIFEST_NAME).exists():
        raise StoreError(f"{local_dir} contains {MANIFEST_NAME}: that name is reserved for the store's manifest")
    if store.exists(MANIFEST_NAME):
        if verify_manifest(store) is not None:
            raise FileExistsError(
                f"{store.url(MANIFEST_NAME)} exists and verifies: the phase is already complete. "
                "Skip it, or delete the phase output to redo it"
            )
        store.delete(MANIFEST_NAME)
    entries = store.upload_dir(local_dir)
    manifest = Manifest(
        phase=phase,
        round=round,
        files=[ManifestFile.of(e) for e in entries],
        metrics=metrics,
        spec_hash=spec_hash,
        code_version=code_version,
        started_at=started_at,
        **(provenance or {}),
    )
    write_manifest(store, manifest)
    return manifest


def fetch_phase_output(store: Store, local_dir: Path) -> Manifest:
    """Download a complete phase output into ``local_dir`` (sha256-verified, atomic)."""
    manifest = verify_manifest(store)
    if manifest is None:
        raise StoreError(
            f"phase output {store.url()} is incomplete: no valid {MANIFEST_NAME}, or a listed file is missing "
            "or has the wrong size. Run (or rerun) the phase that produces it first"
        )
    store.download_dir("", Path(local_dir), manifest.entries())
    return manifest
