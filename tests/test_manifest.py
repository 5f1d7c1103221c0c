"""Manifest tests on a LocalStore: written last and once, verification, fetch of complete outputs only."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rlp_core.manifest import (
    MANIFEST_NAME,
    Manifest,
    code_version,
    fetch_phase_output,
    phase_prefix,
    publish_phase_output,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from rlp_core.store import LocalStore, S3Store, Store, StoreError

MiB = 1 << 20

FILES = {"config.json": b'{"a": 1}', "model.safetensors": os.urandom(200_000), "tok/vocab.txt": b"x\ny\n"}


def _src(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _publish(store, src, **kw):
    args = dict(phase="optimize", round=1, metrics={"kl": 0.1}, spec_hash="abc", code_version="v")
    return publish_phase_output(store, src, **(args | kw))


class RecordingStore(LocalStore):
    """A LocalStore that records the order of writes and can fail the N-th file upload (a crash)."""

    def __init__(self, root, fail_at: int | None = None):
        super().__init__(root)
        self.writes: list[str] = []
        self.fail_at = fail_at

    def put_file(self, local, key):
        if self.fail_at is not None and len(self.writes) == self.fail_at:
            raise OSError("simulated crash during upload")
        self.writes.append(key)
        return super().put_file(local, key)

    def put_bytes(self, key, data, *, if_absent=False):
        self.writes.append(key)
        return super().put_bytes(key, data, if_absent=if_absent)


def test_phase_prefix():
    assert phase_prefix("ns", "run1", 2, "generate") == "ns/run1/round-2/generate"
    assert phase_prefix("ns", "run1", 0, "sft") == "ns/run1/round-0/sft"
    for bad in [("", "r", 1, "p"), ("ns", "a/b", 1, "p"), ("ns", "r", -1, "p"), ("ns", "r", 1, "..")]:
        with pytest.raises(StoreError):
            phase_prefix(*bad)


def test_code_version():
    v = code_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+.*?(\+g[0-9a-f]{12}(\.dirty)?)?", v), v


def test_publish_then_fetch(tmp_path):
    store = LocalStore(tmp_path / "store").child(phase_prefix("ns", "run", 1, "optimize"))
    m = _publish(store, _src(tmp_path), started_at="2026-01-01T00:00:00Z")
    assert sorted(f.path for f in m.files) == sorted(FILES)
    assert m.created_at.endswith("Z") and m.started_at == "2026-01-01T00:00:00Z"
    raw = json.loads(store.get_bytes(MANIFEST_NAME))
    assert raw["phase"] == "optimize" and raw["round"] == 1 and raw["metrics"] == {"kl": 0.1}
    assert read_manifest(store) == m
    assert verify_manifest(store) == m and verify_manifest(store, deep=True) == m

    dst = tmp_path / "fetched"
    assert fetch_phase_output(store, dst) == m
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == sorted(FILES)
    assert all((dst / k).read_bytes() == v for k, v in FILES.items())


def test_manifest_is_written_last(tmp_path):
    store = RecordingStore(tmp_path / "store")
    _publish(store, _src(tmp_path))
    assert store.writes[-1] == MANIFEST_NAME and store.writes.count(MANIFEST_NAME) == 1


def test_crash_during_upload_leaves_no_manifest(tmp_path):
    store = RecordingStore(tmp_path / "store", fail_at=2)
    with pytest.raises(OSError, match="simulated crash"):
        _publish(store, _src(tmp_path))
    assert not store.exists(MANIFEST_NAME)
    assert read_manifest(store) is None and verify_manifest(store) is None
    with pytest.raises(StoreError, match="incomplete"):
        fetch_phase_output(store, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    # the rerun completes the output
    store.fail_at = None
    m = _publish(store, _src(tmp_path))
    assert verify_manifest(store) == m


def test_manifest_written_exactly_once(tmp_path):
    store = LocalStore(tmp_path)
    m = Manifest(phase="p", round=1, files=[], spec_hash="h", code_version="v")
    write_manifest(store, m)
    with pytest.raises(FileExistsError):
        write_manifest(store, m.model_copy(update={"phase": "other"}))
    assert read_manifest(store).phase == "p"


def test_publish_refuses_to_redo_a_complete_phase(tmp_path):
    store = LocalStore(tmp_path / "store")
    src = _src(tmp_path)
    _publish(store, src)
    (src / "model.safetensors").write_bytes(b"different")
    with pytest.raises(FileExistsError, match="already complete"):
        _publish(store, src)
    assert verify_manifest(store, deep=True) is not None  # nothing was overwritten


def test_publish_replaces_a_manifest_that_no_longer_verifies(tmp_path):
    store = LocalStore(tmp_path / "store")
    src = _src(tmp_path)
    _publish(store, src)
    store.delete("tok/vocab.txt")
    assert verify_manifest(store) is None
    m = _publish(store, src, metrics={"kl": 0.2})
    assert verify_manifest(store) == m and m.metrics == {"kl": 0.2}


def test_publish_refuses_reserved_name(tmp_path):
    src = _src(tmp_path)
    (src / MANIFEST_NAME).write_text("{}")
    store = LocalStore(tmp_path / "store")
    with pytest.raises(StoreError, match="reserved"):
        _publish(store, src)
    assert store.list() == []


def test_verify_detects_missing_and_resized_files(tmp_path):
    store = LocalStore(tmp_path / "store")
    _publish(store, _src(tmp_path))
    store.put_bytes("config.json", b'{"a": 12}')  # one byte longer
    assert verify_manifest(store) is None
    with pytest.raises(StoreError, match="incomplete"):
        fetch_phase_output(store, tmp_path / "dst")

    store2 = LocalStore(tmp_path / "store2")
    _publish(store2, _src(tmp_path))
    store2.delete("model.safetensors")
    assert verify_manifest(store2) is None


def test_deep_verify_detects_corruption(tmp_path):
    store = LocalStore(tmp_path / "store")
    _publish(store, _src(tmp_path))
    data = bytearray(FILES["model.safetensors"])
    data[1000] ^= 0xFF
    store.put_bytes("model.safetensors", bytes(data))  # same size
    assert verify_manifest(store) is not None  # a shallow check cannot see it
    assert verify_manifest(store, deep=True) is None
    dst = tmp_path / "dst"
    with pytest.raises(StoreError, match="sha256 mismatch"):  # fetch always checks hashes
        fetch_phase_output(store, dst)
    assert not dst.exists()


def test_unparsable_manifest(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes(MANIFEST_NAME, b"{not json")
    with pytest.raises(StoreError, match="unparsable manifest"):
        read_manifest(store)
    assert verify_manifest(store) is None


# --- on a real S3 server (versitygw) ------------------------------------------------------------


@pytest.fixture
def s3_phase(s3_server, s3_bucket) -> S3Store:
    """A phase prefix in a fresh bucket; 2 attempts per request and no outage retries keep outage tests quick."""
    return s3_server.store(f"s3://{s3_bucket}/data", max_attempts=2, timeout=10, retry_seconds=0).child(
        phase_prefix("ns", "run", 1, "optimize"))


def _big_src(tmp_path: Path) -> Path:
    root = _src(tmp_path)
    (root / "policy.safetensors").write_bytes(os.urandom(20 * MiB))  # multipart: several UploadPart calls
    return root


def _outage_on_first_upload_part(store: S3Store, s3_server) -> threading.Event:
    """Stop the real server as the first multipart part is sent (botocore's before-send event), so the
    outage hits the middle of a file. The returned event is set once the server is down."""
    fired = threading.Event()
    lock = threading.Lock()

    def hook(**_):
        with lock:  # parts are sent from several transfer threads
            if not fired.is_set():
                s3_server.stop()
                fired.set()

    store.client.meta.events.register("before-send.s3.UploadPart", hook)
    return fired


@pytest.mark.s3
def test_s3_publish_fetch_and_deep_verify(s3_phase, s3_client, s3_bucket, tmp_path):
    m = _publish(s3_phase, _big_src(tmp_path))
    assert verify_manifest(s3_phase, deep=True) == m
    dst = tmp_path / "dst"
    assert fetch_phase_output(s3_phase, dst) == m
    assert (dst / "policy.safetensors").read_bytes() == (tmp_path / "out" / "policy.safetensors").read_bytes()

    key = f"data/{phase_prefix('ns', 'run', 1, 'optimize')}/config.json"
    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=b'{"a": 2}')  # same size, other content
    assert verify_manifest(s3_phase) == m and verify_manifest(s3_phase, deep=True) is None
    with pytest.raises(StoreError, match="sha256 mismatch"):
        fetch_phase_output(s3_phase, tmp_path / "dst2")
    assert not (tmp_path / "dst2").exists()


@pytest.mark.s3
def test_s3_manifest_written_exactly_once(s3_phase):
    m = Manifest(phase="optimize", round=1, files=[], spec_hash="h", code_version=code_version())
    write_manifest(s3_phase, m)
    with pytest.raises(FileExistsError, match=MANIFEST_NAME):
        write_manifest(s3_phase, m.model_copy(update={"spec_hash": "other"}))
    assert read_manifest(s3_phase) == m


@pytest.mark.s3
def test_s3_outage_during_upload_leaves_no_manifest(s3_phase, s3_server, tmp_path):
    outage = _outage_on_first_upload_part(s3_phase, s3_server)
    try:
        with pytest.raises(StoreError, match="up to 2 attempts"):
            _publish(s3_phase, _big_src(tmp_path))
    finally:
        s3_server.start()
    assert outage.is_set()
    assert read_manifest(s3_phase) is None and verify_manifest(s3_phase) is None
    with pytest.raises(StoreError, match="incomplete"):
        fetch_phase_output(s3_phase, tmp_path / "dst")
    m = _publish(s3_phase, _big_src(tmp_path))  # the rerun completes the phase
    assert verify_manifest(s3_phase, deep=True) == m


@pytest.mark.s3
def test_s3_short_outage_is_ridden_out_by_retries(s3_server, s3_bucket, tmp_path):
    store = Store.from_uri(
        f"s3://{s3_bucket}/data",
        endpoint=s3_server.endpoint_url,
        region=s3_server.region,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        max_attempts=10,  # standard-mode backoff over 10 attempts outlasts a 1 s outage
    ).child("phase")
    outage = _outage_on_first_upload_part(store, s3_server)
    with ThreadPoolExecutor(1) as pool:
        publishing = pool.submit(_publish, store, _big_src(tmp_path))
        assert outage.wait(30)
        time.sleep(1.0)
        # Restarted from this thread, not a short-lived one: the server process is started with
        # PR_SET_PDEATHSIG, which kills it when the thread that started it ends.
        s3_server.start()
        m = publishing.result(timeout=120)
    assert verify_manifest(store, deep=True) == m
