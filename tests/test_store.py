"""Store tests: LocalStore always; S3Store against a real versitygw server (marker ``s3``)."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from rlp_core.store import FileEntry, IntegrityError, LocalStore, S3Store, Store, StoreError

MiB = 1 << 20


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# --- from_uri / keys ---------------------------------------------------------------------------


def test_from_uri_local_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Store.from_uri(f"file://{tmp_path}/a").uri == f"file://{tmp_path}/a"
    assert Store.from_uri("file://rel/dir").uri == f"file://{tmp_path}/rel/dir"
    assert Store.from_uri("plain/dir").uri == f"file://{tmp_path}/plain/dir"
    with pytest.raises(StoreError, match="unsupported store URI"):
        Store.from_uri("gs://bucket/x")


def test_from_uri_s3_without_io():
    s = Store.from_uri("s3://bkt/some/prefix", endpoint="http://127.0.0.1:1", access_key="a", secret_key="b")
    assert isinstance(s, S3Store) and s.bucket == "bkt" and s.prefix == "some/prefix"
    assert s.child("ns", "run/round-1").url("x.json") == "s3://bkt/some/prefix/ns/run/round-1/x.json"
    assert s.client.meta.config.s3["addressing_style"] == "path"
    assert s.client.meta.config.retries["mode"] == "standard"
    with pytest.raises(StoreError, match="both access_key and secret_key"):
        Store.from_uri("s3://bkt", access_key="a")


@pytest.mark.parametrize("key", ["/abs", "../up", "a/../../b", "a//b", ".", "a/./b", "a\\b", ""])
def test_rejects_bad_keys(tmp_path, key):
    s = LocalStore(tmp_path)
    with pytest.raises(StoreError, match="key"):
        s.put_bytes(key, b"x")
    with pytest.raises(StoreError):
        s.child(key or "/")


def test_child_and_url(tmp_path):
    s = LocalStore(tmp_path / "root")
    c = s.child("a", "b/c")
    assert c.uri == f"file://{tmp_path}/root/a/b/c"
    assert c.url("d.txt") == f"file://{tmp_path}/root/a/b/c/d.txt"
    assert not (tmp_path / "root").exists()  # no I/O until a write


# --- LocalStore --------------------------------------------------------------------------------


def test_local_round_trip(tmp_path):
    s = LocalStore(tmp_path / "store")  # root created on demand
    s.put_bytes("a/b.txt", b"hello")
    assert s.exists("a/b.txt") and not s.exists("a") and not s.exists("nope")
    assert s.get_bytes("a/b.txt") == b"hello"
    assert s.get_head("a/b.txt", 3) == b"hel"
    with pytest.raises(FileNotFoundError, match="nope"):
        s.get_bytes("nope")

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * MiB + 7))
    e = s.put_file(src, "ckpt/model.safetensors")
    assert e == FileEntry("ckpt/model.safetensors", src.stat().st_size, _sha(src.read_bytes()))
    assert s.sha256("ckpt/model.safetensors") == e.sha256
    s.get_file("ckpt/model.safetensors", tmp_path / "out" / "m.bin", sha256=e.sha256)
    assert (tmp_path / "out" / "m.bin").read_bytes() == src.read_bytes()

    assert [x.path for x in s.list()] == ["a/b.txt", "ckpt/model.safetensors"]
    assert [x.path for x in s.list("ckpt")] == ["ckpt/model.safetensors"]
    assert s.list("ck") == []  # prefixes are directories, not string prefixes
    assert s.delete("a/b.txt") and not s.delete("a/b.txt")
    assert s.delete_prefix("ckpt") == 1 and s.list() == []


def test_local_dir_round_trip(tmp_path):
    files = {"config.json": b"{}", "policy/model.safetensors": os.urandom(MiB), "policy/tok/vocab.txt": b"a\nb"}
    src = _tree(tmp_path / "src", files)
    s = LocalStore(tmp_path / "store").child("ns/run/round-1/optimize")
    entries = s.upload_dir(src, "out")
    assert {e.path: e.sha256 for e in entries} == {k: _sha(v) for k, v in files.items()}
    dst = tmp_path / "dst"
    (dst / "stale").mkdir(parents=True)  # an existing dir is replaced as a whole
    s.download_dir("out", dst, entries)
    assert _all_files(dst) == sorted(files)
    assert all((dst / k).read_bytes() == v for k, v in files.items())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_local_write_is_atomic(tmp_path):
    s = LocalStore(tmp_path)
    s.put_bytes("k", b"old")
    with pytest.raises(TypeError):
        s.put_bytes("k", "not bytes")  # fails after the temp file was opened
    assert s.get_bytes("k") == b"old"
    assert os.listdir(tmp_path) == ["k"]  # the temp file is gone


def test_local_if_absent(tmp_path):
    s = LocalStore(tmp_path)
    s.put_bytes("once", b"1", if_absent=True)
    with pytest.raises(FileExistsError, match="once"):
        s.put_bytes("once", b"2", if_absent=True)
    assert s.get_bytes("once") == b"1"
    assert os.listdir(tmp_path) == ["once"]


def test_local_get_file_integrity(tmp_path):
    s = LocalStore(tmp_path / "s")
    s.put_bytes("f", b"content")
    out = tmp_path / "out.bin"
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        s.get_file("f", out, sha256=_sha(b"other"))
    assert not out.exists() and os.listdir(tmp_path) == ["s"]
    with pytest.raises(FileNotFoundError):
        s.get_file("missing", out)


def test_local_download_dir_is_all_or_nothing(tmp_path):
    s = LocalStore(tmp_path / "s")
    entries = s.upload_dir(_tree(tmp_path / "src", {"a": b"1", "b": b"2"}))
    s.put_bytes("b", b"X")  # same size, other content
    dst = tmp_path / "dst"
    with pytest.raises(IntegrityError):
        s.download_dir("", dst, entries)
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "src"]


def test_local_list_skips_interrupted_writes(tmp_path):
    s = LocalStore(tmp_path)
    s.put_bytes("a", b"1")
    (tmp_path / ".b.rlp-tmp-abc123").write_bytes(b"partial")
    assert [e.path for e in s.list()] == ["a"]


# --- S3Store against versitygw -----------------------------------------------------------------


@pytest.fixture
def s3_store(s3_server, s3_bucket) -> S3Store:
    """A store under a fresh bucket; 2 attempts per request keeps outage tests quick."""
    return s3_server.store(f"s3://{s3_bucket}/root", max_attempts=2, timeout=10, retry_seconds=0)


@pytest.mark.s3
def test_s3_basic_operations(s3_store, s3_client, s3_bucket):
    s = s3_store
    s.put_bytes("a/b.txt", b"hello")
    assert s.exists("a/b.txt") and not s.exists("a") and not s.exists("nope")
    assert s.get_bytes("a/b.txt") == b"hello"
    assert s.get_head("a/b.txt", 3) == b"hel" and s.get_head("a/b.txt", 100) == b"hello"  # a ranged GET
    with pytest.raises(FileNotFoundError):
        s.get_head("nope", 3)
    assert s3_client.get_object(Bucket=s3_bucket, Key="root/a/b.txt")["Body"].read() == b"hello"
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/root/nope"):
        s.get_bytes("nope")
    with pytest.raises(FileNotFoundError):
        s.get_file("nope", Path("/nonexistent/never-written"))
    s.put_bytes("once", b"1", if_absent=True)
    with pytest.raises(FileExistsError, match="once"):
        s.put_bytes("once", b"2", if_absent=True)
    assert s.get_bytes("once") == b"1"
    s.child("ab").put_bytes("c", b"x")
    assert [e.path for e in s.list()] == ["a/b.txt", "ab/c", "once"]
    assert s.list("a") == [FileEntry("a/b.txt", 5, "")]  # "a" is a directory, "ab/c" is not under it
    assert [e.path for e in s.child("ab").list()] == ["c"]
    assert s.delete("once") and not s.delete("once")
    assert s.delete_prefix("a") == 1
    assert s.delete_prefix("") == 1 and s.list() == []


@pytest.mark.s3
def test_s3_checkpoint_round_trip_multipart(s3_store, s3_client, s3_bucket, tmp_path):
    files = {
        "policy/model-00001-of-00002.safetensors": os.urandom(24 * MiB + 3),
        "policy/model-00002-of-00002.safetensors": os.urandom(11 * MiB),
        "policy/config.json": b'{"hidden_size": 64}',
        "value/model.safetensors": os.urandom(5),
    }
    entries = s3_store.child("ckpt").upload_dir(_tree(tmp_path / "src", files), "step-10")
    assert {e.path: (e.size, e.sha256) for e in entries} == {k: (len(v), _sha(v)) for k, v in files.items()}
    head = s3_client.head_object(
        Bucket=s3_bucket, Key="root/ckpt/step-10/policy/model-00001-of-00002.safetensors", ChecksumMode="ENABLED"
    )
    # A composite checksum "<b64>-<parts>" proves a multipart upload, each part SHA256-checked by the server.
    assert head["ChecksumSHA256"].endswith(f"-{-(-(24 * MiB + 3) // (8 * MiB))}")

    dst = tmp_path / "dst" / "policy-and-value"
    s3_store.child("ckpt").download_dir("step-10", dst, entries)
    assert _all_files(dst) == sorted(files)
    assert all(_sha((dst / k).read_bytes()) == _sha(v) for k, v in files.items())
    assert os.listdir(tmp_path / "dst") == ["policy-and-value"]


@pytest.mark.s3
def test_s3_corrupted_object_is_detected(s3_store, s3_client, s3_bucket, tmp_path):
    files = {"a.bin": os.urandom(12 * MiB), "b.bin": os.urandom(1000)}
    entries = s3_store.upload_dir(_tree(tmp_path / "src", files), "out")
    corrupt = bytearray(files["a.bin"])
    corrupt[5 * MiB] ^= 0x01
    s3_client.put_object(Bucket=s3_bucket, Key="root/out/a.bin", Body=bytes(corrupt))  # behind the store's back

    dst = tmp_path / "dst"
    with pytest.raises(IntegrityError, match=r"sha256 mismatch for s3://.*/root/out/a\.bin"):
        s3_store.download_dir("out", dst, entries)
    assert sorted(os.listdir(tmp_path)) == ["src"]  # neither dst nor its temp dir remains
    a = next(e for e in entries if e.path == "a.bin")
    with pytest.raises(IntegrityError):
        s3_store.get_file("out/a.bin", tmp_path / "a.bin", sha256=a.sha256)
    assert sorted(os.listdir(tmp_path)) == ["src"]
    assert s3_store.sha256("out/a.bin") == _sha(bytes(corrupt))


def test_s3_unreachable_endpoint_gives_clear_error():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = Store.from_uri(
        "s3://bkt/x", endpoint=f"http://127.0.0.1:{port}", access_key="a", secret_key="b", max_attempts=2,
        retry_seconds=1,
    )
    with pytest.raises(StoreError, match=r"cannot write s3://bkt/x/k \(endpoint http://127\.0\.0\.1:\d+, up to 2.*"
                                         r"gave up after retrying for 1 s: storage.retrySeconds"):
        s.put_bytes("k", b"1")


def test_s3_endpoint_that_never_answers_fails_after_the_configured_timeouts():
    """A server that accepts connections but never replies: bounded by readTimeout and retrySeconds."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        port = sock.getsockname()[1]
        s = Store.from_uri("s3://bkt/x", endpoint=f"http://127.0.0.1:{port}", access_key="a", secret_key="b",
                           max_attempts=1, timeout=0.5, retry_seconds=0)
        with pytest.raises(StoreError, match=r"cannot read s3://bkt/x/k .*(timeout|timed out)"):
            s.get_bytes("k")


@pytest.mark.s3
def test_s3_outage_is_ridden_out_by_retries(s3_server, s3_bucket, tmp_path):
    """The server goes away mid-work and comes back: writes and reads wait for it instead of failing."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    store = s3_server.store(f"s3://{s3_bucket}/root", max_attempts=1, timeout=5, retry_seconds=60)
    store.put_bytes("before", b"1")
    s3_server.stop()
    try:
        with ThreadPoolExecutor(1) as pool:  # the server is restarted from this thread (its parent-death signal)
            write = pool.submit(store.put_bytes, "during", b"2")  # issued while the server is down
            time.sleep(4)
            assert not write.done()
            s3_server.start()
            write.result()
        assert store.get_bytes("during") == b"2"
        assert [e.path for e in store.list()] == ["before", "during"]
    finally:
        s3_server.start()
