"""A real S3 server for the tests: versitygw (Apache-2.0) with its posix backend, on a free loopback port.

    s3 = S3Server().start()
    s3.endpoint_url, s3.access_key, s3.secret_key, s3.region
    s3.client()       # a boto3 S3 client for it
    s3.stop()         # the server goes away (the data directory stays until teardown())
    s3.start()        # ... and comes back on the same port with the same data (or s3.restart())
    s3.teardown()     # stop and remove the work directory

versitygw runs as ``versitygw --port 127.0.0.1:PORT --access KEY --secret SECRET posix DIR``.
"""

from __future__ import annotations

import secrets
import urllib.error
import urllib.request
from pathlib import Path

from . import _process
from ._process import Process, ServerError, Workdir, free_port, port_open, wait_for


class S3Server:
    def __init__(self, bin_dir: Path | None = None, *, region: str = "us-east-1", start_timeout: float = 60.0):
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.region = region
        self.start_timeout = start_timeout
        self.access_key = "rlp" + secrets.token_hex(6)
        self.secret_key = secrets.token_hex(20)
        self.port: int | None = None
        self.workdir: Path | None = None
        self.data_dir: Path | None = None
        self._wd: Workdir | None = None
        self._proc: Process | None = None

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise RuntimeError("S3 server was never started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running()

    def start(self) -> "S3Server":
        """Start the server; after ``stop()`` it comes back on the same port with the same data."""
        if self.running:
            return self
        if self.bin_dir is None:
            self.bin_dir = _process.ensure_test_binaries()
        if self._wd is None:
            _process.reap_leftovers()
            self._wd = Workdir("s3")
            self.workdir = self._wd.path
            self.data_dir = self.workdir / "data"
            self.data_dir.mkdir()
            _process.register_for_cleanup(self)
        keep_port = self.port is not None
        for attempt in range(3):
            if not keep_port:
                self.port = free_port()
            self._proc = Process(
                "versitygw",
                [
                    self.bin_dir / "versitygw",
                    "--port", f"127.0.0.1:{self.port}",
                    "--access", self.access_key,
                    "--secret", self.secret_key,
                    "--region", self.region,
                    "posix", self.data_dir,
                ],
                self._wd,
            ).start()
            try:
                wait_for(self._answers, self.start_timeout, "versitygw to answer", alive=self._proc.check_alive)
                return self
            except ServerError:
                tail = self._proc.log_tail()
                self._proc.stop()
                self._proc = None
                # A restart must keep its port (clients hold the endpoint): wait for it to be free.
                if attempt < 2 and "address already in use" in tail:
                    if keep_port:
                        wait_for(lambda: not port_open(self.port), 30, f"port {self.port} to be released")
                    continue
                self.teardown()
                raise
        raise AssertionError("unreachable")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # 403 for an unsigned request: it is serving
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server process (SIGTERM, then SIGKILL); keeps the data and the port for ``start()``."""
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), as a crash would."""
        if self._proc is not None:
            self._proc.stop(timeout=0)
            self._proc = None

    def restart(self) -> "S3Server":
        self.stop()
        return self.start()

    def teardown(self) -> None:
        """Stop the server and remove its work directory (data included). Idempotent."""
        self.stop()
        if self._wd is not None:
            self._wd.remove()
            self._wd = None
        _process.unregister(self)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def client_kwargs(self) -> dict:
        """Keyword arguments for ``boto3.client("s3", **kwargs)`` (path-style addressing)."""
        from botocore.config import Config

        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"}),
        }

    def store(self, uri: str, **options):
        """An rlp_core Store on this server (``uri`` is ``s3://bucket/prefix``); options go to Store.from_uri."""
        from rlp_core.store import Store

        return Store.from_uri(uri, endpoint=self.endpoint_url, region=self.region, access_key=self.access_key,
                              secret_key=self.secret_key, **options)

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.session.Session().client("s3", **self.client_kwargs())

    def env(self) -> dict[str, str]:
        """AWS_* environment variables for subprocesses that should use this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def __repr__(self) -> str:
        return f"S3Server(endpoint_url={self.endpoint_url if self.port else None!r}, workdir={str(self.workdir)!r})"
