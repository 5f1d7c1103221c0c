"""Checkpoint store: one small interface over a local directory and an S3 bucket.

Phases hand whole directories (HF checkpoints, JSONL data) to the next phase through a store. Both
backends guarantee the same things, so the local runner and the cluster behave alike:

* a key is either absent or holds complete content (local writes go through a temp file and
  ``os.replace``; S3 objects appear atomically when the PUT or multipart upload completes);
* ``put_bytes(..., if_absent=True)`` writes at most once (manifests rely on it);
* downloads are verified against a sha256 when one is given, and never leave a partial file behind.

Keys are posix paths relative to the store's root. Prefixes behave like directories: ``list("a")``
covers ``a/x`` but not ``ab/x``.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar
from urllib.parse import urlparse

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

_CHUNK = 1 << 20
# How long an S3 operation keeps retrying an unreachable or failing server (storage.retrySeconds).
DEFAULT_RETRY_SECONDS = 120.0
_BACKOFF_FIRST, _BACKOFF_MAX = 0.5, 8.0
# Temp files carry this marker so a listing never reports a write that was interrupted.
_TMP_MARK = ".rlp-tmp-"
T = TypeVar("T")
log = logging.getLogger("rlp.store")


@dataclass(frozen=True)
class FileEntry:
    """One stored file, by path relative to a prefix (for a phase output: the phase prefix)."""

    path: str
    size: int
    sha256: str


class StoreError(RuntimeError):
    """A store operation failed; the message names the URI and what to fix."""


class StoreUnavailable(StoreError):
    """The server could not be reached, timed out or answered 5xx: worth trying again later."""


class IntegrityError(StoreError):
    """Downloaded content does not match the expected sha256 (corrupted or replaced object)."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local file, read in chunks so checkpoints of any size fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_key(key: str, *, allow_empty: bool = False) -> str:
    """Normalise a key to a clean posix relative path, refusing anything that could escape the root."""
    if not isinstance(key, str):
        raise StoreError(f"store key must be a str, got {type(key).__name__}: {key!r}")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise StoreError(
            f"invalid store key {key!r}: keys are posix paths relative to the store root "
            "(no leading '/', no backslashes)"
        )
    key = key.rstrip("/")
    if not key:
        if allow_empty:
            return ""
        raise StoreError("empty store key: name a file relative to the store root")
    if any(p in ("", ".", "..") for p in key.split("/")):
        raise StoreError(
            f"invalid store key {key!r}: '.', '..' and empty path segments are not allowed; "
            "use a plain relative path such as 'policy/model.safetensors'"
        )
    return key


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _local_files(local_dir: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``local_dir`` (symlinks followed), as (relative posix path, path)."""
    if not local_dir.is_dir():
        raise StoreError(f"cannot upload {local_dir}: not a directory")
    files = []
    for root, _dirs, names in os.walk(local_dir, followlinks=True):
        for name in names:
            p = Path(root) / name
            if p.is_file():
                files.append((p.relative_to(local_dir).as_posix(), p))
    return sorted(files)


@contextlib.contextmanager
def _temp_beside(target: Path) -> Iterator[tuple[IO[bytes], Path]]:
    """An open temp file in ``target``'s directory (so ``os.replace`` is atomic); removed on error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{_TMP_MARK}")
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide checkpoints from other users of a shared volume
        with os.fdopen(fd, "wb") as f:
            yield f, tmp_path
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _check_hash(actual: str, expected: str | None, what: str) -> None:
    if expected is not None and actual != expected.lower():
        raise IntegrityError(
            f"sha256 mismatch for {what}: expected {expected}, got {actual}. The stored object is "
            "corrupted or was replaced after its manifest was written; rerun the phase that produced it."
        )


class Store(abc.ABC):
    """A root URI under which files are stored by key; see the module docstring for guarantees."""

    uri: str

    @staticmethod
    def from_uri(
        uri: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        max_attempts: int | None = None,
        retry_mode: str | None = None,
        timeout: float | None = None,
        connect_timeout: float | None = None,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        transfer_config: TransferConfig | None = None,
    ) -> Store:
        """Open ``file://path``, a plain path, or ``s3://bucket/prefix``.

        S3 settings not given fall back to the environment: credentials to boto3's default chain
        (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, IRSA), the endpoint to
        ``RLP_S3_ENDPOINT`` then ``AWS_ENDPOINT_URL``, retries to ``AWS_RETRY_MODE``/``AWS_MAX_ATTEMPTS``
        (default: standard mode, 3 attempts per request in all). ``timeout`` sets botocore's read timeout
        (and the connect timeout unless ``connect_timeout`` is given). On top of botocore's quick retries,
        an operation that fails because the server is unreachable, times out or answers 5xx is tried
        again with backoff until ``retry_seconds`` have passed, so an outage of that length is ridden out.
        """
        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise StoreError(f"invalid S3 URI {uri!r}: expected s3://bucket[/prefix]")
            return S3Store(
                bucket=parsed.netloc,
                prefix=_check_key(parsed.path.lstrip("/"), allow_empty=True),
                client=_make_s3_client(
                    endpoint=endpoint,
                    region=region,
                    access_key=access_key,
                    secret_key=secret_key,
                    max_attempts=max_attempts,
                    retry_mode=retry_mode,
                    read_timeout=timeout,
                    connect_timeout=connect_timeout if connect_timeout is not None else timeout,
                ),
                transfer_config=transfer_config,
                retry_seconds=retry_seconds,
            )
        if parsed.scheme == "file":
            # "file:///abs" -> "/abs"; "file://rel/dir" is read as a relative path "rel/dir".
            return LocalStore(Path(parsed.netloc + parsed.path))
        if parsed.scheme == "":
            return LocalStore(Path(uri))
        raise StoreError(f"unsupported store URI {uri!r}: use file://PATH, a plain path, or s3://BUCKET/PREFIX")

    @abc.abstractmethod
    def child(self, *parts: str) -> Store:
        """A store rooted at ``uri/parts``; no I/O."""

    def url(self, key: str = "") -> str:
        """Full URI of ``key`` (of the root when empty), for messages and specs."""
        return _join(self.uri.rstrip("/"), _check_key(key, allow_empty=True))

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Write ``data`` atomically; with ``if_absent`` raise FileExistsError instead of overwriting."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Content of ``key``; FileNotFoundError when absent."""

    def get_head(self, key: str, size: int) -> bytes:
        """The first ``size`` bytes of ``key`` (to check a large file's first records without reading it all)."""
        return self.get_bytes(key)[:size]

    @abc.abstractmethod
    def put_file(self, local: Path, key: str) -> FileEntry:
        """Upload one local file (streamed); the entry's path is ``key``, its sha256 computed locally."""

    @abc.abstractmethod
    def get_file(self, key: str, local: Path, *, sha256: str | None = None) -> None:
        """Download ``key`` to ``local``; with ``sha256`` verify it (IntegrityError, no partial file)."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[FileEntry]:
        """All files under ``prefix``, recursively, sorted; paths relative to this store's root.

        ``sha256`` is "" (unknown): hashes live in manifests, listing must stay cheap.
        """

    @abc.abstractmethod
    def sha256(self, key: str) -> str:
        """Hash the stored content of ``key`` (streams it; for deep verification)."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove one key; True when it existed."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every file under ``prefix`` (everything when empty); returns how many."""

    def upload_dir(self, local_dir: Path, prefix: str = "") -> list[FileEntry]:
        """Upload every file under ``local_dir`` to ``prefix``; entries are relative to ``prefix``."""
        prefix = _check_key(prefix, allow_empty=True)
        entries = []
        for rel, path in _local_files(Path(local_dir)):
            e = self.put_file(path, _join(prefix, rel))
            entries.append(FileEntry(rel, e.size, e.sha256))
        return entries

    def download_dir(self, prefix: str, local_dir: Path, files: list[FileEntry]) -> None:
        """Download ``files`` (relative to ``prefix``) into ``local_dir``, verifying every sha256.

        All files land in a temp dir beside ``local_dir`` that is renamed into place only when
        every one verified, so a reader never sees a half-fetched checkpoint. An existing
        ``local_dir`` is replaced.
        """
        prefix = _check_key(prefix, allow_empty=True)
        local_dir = Path(local_dir)
        local_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=local_dir.parent, prefix=f".{local_dir.name}{_TMP_MARK}"))
        try:
            tmp.chmod(0o755)  # mkdtemp's 0700 would survive the rename
            for f in files:
                rel = _check_key(f.path)
                self.get_file(_join(prefix, rel), tmp / rel, sha256=f.sha256 or None)
            if local_dir.exists():
                old = local_dir.with_name(f".{local_dir.name}{_TMP_MARK}old-{uuid.uuid4().hex[:8]}")
                os.replace(local_dir, old)
                os.replace(tmp, local_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, local_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalStore(Store):
    """A directory on a local or shared filesystem; created on first write."""

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().absolute()
        self.uri = "file://" + self.root.as_posix()

    def child(self, *parts: str) -> LocalStore:
        return LocalStore(self.root.joinpath(*(_check_key(p) for p in parts)))

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        dest = self._path(key)
        with _temp_beside(dest) as (f, tmp):
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._publish(tmp, key, if_absent=if_absent)

    def _publish(self, tmp: Path, key: str, *, if_absent: bool) -> None:
        """Move a complete temp file into place. ``if_absent`` uses link(), which, like O_EXCL,
        fails when the key exists, yet never exposes a partly written file."""
        dest = self._path(key)
        if dest.is_dir():
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write {self.url(key)}: a directory of that name exists")
        if not if_absent:
            os.replace(tmp, dest)
            return
        try:
            os.link(tmp, dest)
        except FileExistsError:
            raise FileExistsError(f"{self.url(key)} already exists") from None
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"{self.url(key)} does not exist") from None

    def put_file(self, local: Path, key: str) -> FileEntry:
        dest = self._path(key)
        h = hashlib.sha256()
        size = 0
        with open(local, "rb") as src, _temp_beside(dest) as (f, tmp):
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        self._publish(tmp, key, if_absent=False)
        return FileEntry(_check_key(key), size, h.hexdigest())

    def get_file(self, key: str, local: Path, *, sha256: str | None = None) -> None:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(f"{self.url(key)} does not exist")
        local = Path(local)
        h = hashlib.sha256()
        with open(src, "rb") as s, _temp_beside(local) as (f, tmp):
            while chunk := s.read(_CHUNK):
                h.update(chunk)
                f.write(chunk)
            f.close()
            _check_hash(h.hexdigest(), sha256, self.url(key))  # on mismatch the temp file is removed
        os.replace(tmp, local)

    def list(self, prefix: str = "") -> list[FileEntry]:
        prefix = _check_key(prefix, allow_empty=True)
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for root, _dirs, names in os.walk(base):
            for name in names:
                if _TMP_MARK in name:
                    continue
                p = Path(root) / name
                out.append(FileEntry(p.relative_to(self.root).as_posix(), p.stat().st_size, ""))
        return sorted(out, key=lambda e: e.path)

    def sha256(self, key: str) -> str:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.url(key)} does not exist")
        return sha256_file(path)

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def delete_prefix(self, prefix: str) -> int:
        prefix = _check_key(prefix, allow_empty=True)
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return 0
        n = sum(len(names) for _r, _d, names in os.walk(base))
        shutil.rmtree(base)
        return n


# --- S3 -------------------------------------------------------------------------------------------

def _make_s3_client(
    *,
    endpoint: str | None,
    region: str | None,
    access_key: str | None,
    secret_key: str | None,
    max_attempts: int | None,
    retry_mode: str | None,
    read_timeout: float | None,
    connect_timeout: float | None,
):
    """A boto3 S3 client; retries, checksums and multipart are boto3's own machinery."""
    endpoint = endpoint or os.environ.get("RLP_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None
    if (access_key is None) != (secret_key is None):
        raise StoreError("give both access_key and secret_key, or neither (to use the environment)")
    retries = {
        "mode": retry_mode or os.environ.get("AWS_RETRY_MODE") or "standard",
        # Total attempts per request, first one included (botocore's "max_attempts" counts retries only).
        "total_max_attempts": max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS") or 3),
    }
    options: dict = {"retries": retries}
    if endpoint:
        # Self-hosted servers (versitygw, Ceph RGW, SeaweedFS) rarely have wildcard DNS for buckets.
        options["s3"] = {"addressing_style": "path"}
    if connect_timeout is not None:
        options["connect_timeout"] = connect_timeout
    if read_timeout is not None:
        options["read_timeout"] = read_timeout
    session = boto3.session.Session(
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )
    return session.client("s3", endpoint_url=endpoint, config=Config(**options))


def _default_transfer_config() -> TransferConfig:
    # Classic (Python) transfer client: same behaviour whether or not awscrt happens to be installed.
    return TransferConfig(preferred_transfer_client="classic")


class S3Store(Store):
    """``s3://bucket/prefix`` through boto3. Objects are uploaded with SHA256 checksums, which the
    server verifies on receipt; our own sha256 (in manifests) covers the whole object end to end."""

    def __init__(self, bucket: str, prefix: str, client, transfer_config: TransferConfig | None = None,
                 retry_seconds: float = DEFAULT_RETRY_SECONDS):
        self.bucket = bucket
        self.prefix = _check_key(prefix, allow_empty=True)
        self.client = client
        self.transfer_config = transfer_config or _default_transfer_config()
        self.retry_seconds = retry_seconds
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def child(self, *parts: str) -> S3Store:
        return S3Store(
            self.bucket, _join(self.prefix, *(_check_key(p) for p in parts)), self.client, self.transfer_config,
            self.retry_seconds,
        )

    def _key(self, key: str) -> str:
        return _join(self.prefix, _check_key(key))

    def _call(self, key: str, action: str, fn: Callable[[], T]) -> T:
        """``fn()`` with boto3's errors translated (see ``_errors``); tried again with exponential backoff
        while the server is unavailable, for up to ``retry_seconds`` in all."""
        deadline = time.monotonic() + self.retry_seconds
        delay = _BACKOFF_FIRST
        while True:
            try:
                with self._errors(key, action):
                    return fn()
            except StoreUnavailable as err:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(
                        f"{err} (gave up after retrying for {self.retry_seconds:g} s: storage.retrySeconds)"
                    ) from err.__cause__
                log.warning("S3 unavailable, retrying in %.1f s: %s", min(delay, left), err)
                time.sleep(min(delay, left))
                delay = min(delay * 2, _BACKOFF_MAX)

    @contextlib.contextmanager
    def _errors(self, key: str, action: str) -> Iterator[None]:
        """Translate boto3 failures into FileNotFoundError/FileExistsError/StoreError naming the URI."""
        url = self.url(key)
        try:
            yield
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"{url} does not exist") from None
            if code in ("412", "PreconditionFailed", "409", "ConditionalRequestConflict"):
                raise FileExistsError(f"{url} already exists (conditional write refused)") from None
            if code == "NoSuchBucket":
                raise StoreError(
                    f"cannot {action} {url}: bucket {self.bucket!r} does not exist; create it first"
                ) from e
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreError(
                    f"cannot {action} {url}: access denied ({code}); check the credentials "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the run's storage secretRef) and the bucket policy"
                ) from e
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"):
                raise StoreUnavailable(f"cannot {action} {url}: {code} {err.get('Message', e)}") from e
            raise StoreError(f"cannot {action} {url}: {code} {err.get('Message', e)}") from e
        except NoCredentialsError as e:
            raise StoreError(
                f"cannot {action} {url}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from e
        except (BotoCoreError, Boto3Error) as e:
            meta = self.client.meta
            attempts = meta.config.retries["total_max_attempts"]
            raise StoreUnavailable(
                f"cannot {action} {url} (endpoint {meta.endpoint_url}, up to {attempts} attempts per request): {e}. "
                "Check that the S3 endpoint is reachable (RLP_S3_ENDPOINT / storage.endpoint)"
            ) from e

    def exists(self, key: str) -> bool:
        try:
            self._call(key, "check", lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
            return True
        except FileNotFoundError:
            return False

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        self._call(key, "write", lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, ChecksumAlgorithm="SHA256", **extra))

    def get_bytes(self, key: str) -> bytes:
        return self._call(key, "read", lambda: self.client.get_object(
            Bucket=self.bucket, Key=self._key(key))["Body"].read())

    def get_head(self, key: str, size: int) -> bytes:
        with self._errors(key, "read"):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes=0-{size - 1}")["Body"].read()

    def put_file(self, local: Path, key: str) -> FileEntry:
        local = Path(local)
        digest = sha256_file(local)
        size = local.stat().st_size
        self._call(key, "upload to", lambda: self.client.upload_file(
            str(local), self.bucket, self._key(key), ExtraArgs={"ChecksumAlgorithm": "SHA256"},
            Config=self.transfer_config))
        return FileEntry(_check_key(key), size, digest)

    def get_file(self, key: str, local: Path, *, sha256: str | None = None) -> None:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            self._call(key, "download", lambda: self.client.download_file(
                self.bucket, self._key(key), str(tmp), Config=self.transfer_config))
            if sha256 is not None:
                _check_hash(sha256_file(tmp), sha256, self.url(key))
            os.replace(tmp, local)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _objects(self, prefix: str) -> list[dict]:
        prefix = _check_key(prefix, allow_empty=True)
        full = _join(self.prefix, prefix)

        def listing() -> list[dict]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{full}/" if full else "")
            # skip "directory marker" objects
            return [o for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]

        return self._call(prefix, "list", listing)

    def list(self, prefix: str = "") -> list[FileEntry]:
        cut = len(self.prefix) + 1 if self.prefix else 0
        out = [FileEntry(o["Key"][cut:], o["Size"], "") for o in self._objects(prefix)]
        return sorted(out, key=lambda e: e.path)

    def sha256(self, key: str) -> str:
        def digest() -> str:
            h = hashlib.sha256()
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            for chunk in body.iter_chunks(_CHUNK):
                h.update(chunk)
            return h.hexdigest()

        return self._call(key, "read", digest)

    def delete(self, key: str) -> bool:
        existed = self.exists(key)
        self._call(key, "delete", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))
        return existed

    def delete_prefix(self, prefix: str) -> int:
        keys = [o["Key"] for o in self._objects(prefix)]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys per call
            batch = keys[i : i + 1000]
            resp = self._call(prefix, "delete", lambda batch=batch: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}))
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StoreError(
                    f"cannot delete under {self.url(prefix)}: {len(resp['Errors'])} keys failed, "
                    f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )
        return len(keys)
