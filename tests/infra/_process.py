"""Process, port, workdir and build helpers shared by the test servers.

Every server process is started in its own session (process group), with its output in a log file
inside a private work directory, and is asked to die with the test process (PR_SET_PDEATHSIG). Each
work directory records the process groups it started, so a later run can reap what an earlier run
left behind when it was killed outright (SIGKILL leaves no chance to clean up).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-test-servers.sh"
WORKDIR_PREFIX = "rlp-test-"
_STATE_FILE = "rlp-test-state.json"

_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


class ServerError(RuntimeError):
    """A test server failed to build, start or become ready."""


# --------------------------------------------------------------------------------------------------
# binaries


_bin_dir: Path | None = None
_bin_lock = threading.Lock()


def ensure_test_binaries() -> Path:
    """Run scripts/build-test-servers.sh (a no-op when its cache is complete) and return the bin dir.

    Never skips: a missing toolchain or a failed build is an error, not a reason to skip tests.
    """
    global _bin_dir
    with _bin_lock:
        if _bin_dir is not None:
            return _bin_dir
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            cwd=REPO_ROOT,
            env={**os.environ, "RLP_BUILD_QUIET": "1"},  # silent unless something must be built
            stdout=subprocess.PIPE,
            stderr=None,  # build progress goes to the terminal
            text=True,
            check=False,
        )
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode != 0 or not lines:
            raise ServerError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}")
        bin_dir = Path(lines[-1].strip())
        if not bin_dir.is_dir():
            raise ServerError(f"{BUILD_SCRIPT} printed {bin_dir}, which is not a directory")
        _bin_dir = bin_dir
        return bin_dir


# --------------------------------------------------------------------------------------------------
# ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and stays free until the caller (often a subprocess, seconds
    later) binds it: drawn below the kernel's ephemeral range, from which every `bind(0)` and outgoing connection
    of the machine takes its port, so only a listener on a fixed port could take it meanwhile. Callers still
    retry a start that finds it taken. Where the ephemeral range leaves too little room below it, bind(0)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    draw = random.Random()  # seeded from the OS: two test sessions on one machine draw differently
    for _ in range(100) if low - 1024 >= 2000 else ():
        port = draw.randrange(max(1025, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.1,
    alive: Callable[[], None] | None = None,
) -> None:
    """Poll ``check`` until it returns true; ``alive`` raises when a process died meanwhile."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        if alive is not None:
            alive()
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - readiness probes fail in many ways while starting
            last_exc = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise ServerError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------------
# work directories and leftovers


def _pid_namespace() -> str:
    """Identifies this PID namespace on this boot: owner pids are only meaningful within it."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return "unknown"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None when it is gone.
    A pid and its start time name one process: a recycled pid has a later start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])  # fields 3.. follow the parenthesised command name


def _kill_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def reap_leftovers(base: Path | None = None) -> None:
    """Kill process groups and remove work dirs left by test runs whose owner process is gone."""
    base = Path(base or tempfile.gettempdir())
    for workdir in base.glob(WORKDIR_PREFIX + "*"):
        state_file = workdir / _STATE_FILE
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            # No state (yet): only remove it when it is old, it may be a run that is starting now.
            try:
                if time.time() - workdir.stat().st_mtime > 3600:
                    shutil.rmtree(workdir, ignore_errors=True)
            except OSError:
                pass
            continue
        if state.get("pid_namespace") != _pid_namespace():
            # Another container or an earlier boot: its pids mean nothing here. Only remove it when stale.
            try:
                if time.time() - (workdir / _STATE_FILE).stat().st_mtime > 86400:
                    shutil.rmtree(workdir, ignore_errors=True)
            except OSError:
                pass
            continue
        owner = int(state.get("owner_pid", 0))
        if owner and _pid_alive(owner):
            continue
        for pgid, started in state.get("groups", []):
            if _start_time(pgid) == started:  # still the leader we started, not a process that got its pid since
                _kill_group(pgid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)


class Workdir:
    """A private temporary directory that records the process groups started in it (each leader's pid with
    its start time)."""

    def __init__(self, kind: str):
        self.path = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{kind}-{os.getpid()}-"))
        self._groups: dict[int, int] = {}  # pgid -> start time of its leader
        self._save()

    def _save(self) -> None:
        tmp = self.path / (_STATE_FILE + ".tmp")
        state = {"owner_pid": os.getpid(), "pid_namespace": _pid_namespace(), "groups": list(self._groups.items())}
        tmp.write_text(json.dumps(state))
        tmp.replace(self.path / _STATE_FILE)

    def record(self, pgid: int) -> None:
        started = _start_time(pgid)
        if started is not None:  # None: it is gone already, nothing to reap
            self._groups[pgid] = started
            self._save()

    def forget(self, pgid: int) -> None:
        if self._groups.pop(pgid, None) is not None:
            self._save()

    def remove(self) -> None:
        if os.environ.get("RLP_TEST_KEEP_WORKDIR"):
            print(f"[rlp tests] keeping {self.path} (RLP_TEST_KEEP_WORKDIR is set)", file=sys.stderr)
            return
        shutil.rmtree(self.path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# processes


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# Servers get this much of the test process's environment, not all of it: etcd exits when an ETCD_* variable
# shadows one of its flags, versitygw opens extra ports for VGW_* variables, and a proxy variable would catch
# their calls to each other on 127.0.0.1 (NO_PROXY keeps those direct should a proxy be configured another way).
_SERVER_ENV = ("PATH", "HOME", "TMPDIR", "LANG")
LOOPBACK_NO_PROXY = "127.0.0.1,localhost,::1"  # also appended to the test process's own no_proxy (tests/conftest.py)


class Process:
    """One server process, in its own process group, logging to a file."""

    def __init__(self, name: str, args: Sequence[str], workdir: Workdir, env: dict[str, str] | None = None):
        self.name = name
        self.args = [str(a) for a in args]
        self.workdir = workdir
        self.log_path = workdir.path / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> "Process":
        env = {name: os.environ[name] for name in _SERVER_ENV if name in os.environ}
        env.update(NO_PROXY=LOOPBACK_NO_PROXY, no_proxy=LOOPBACK_NO_PROXY)
        if self._env:
            env.update(self._env)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start: {' '.join(self.args)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir.path,
                env=env,
                preexec_fn=_child_setup,  # noqa: PLW1509 - setsid + pdeathsig, no threads touched
                close_fds=True,
            )
        self.workdir.record(self.popen.pid)
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise ServerError(
                f"{self.name} exited with code {self.popen.returncode}; last log lines "
                f"({self.log_path}):\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it after ``timeout`` seconds."""
        if self.popen is None:
            return
        pgid = self.popen.pid
        if self.popen.poll() is None:
            _kill_group(pgid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # Children of the server (if any) share its group: make sure none survives.
        _kill_group(pgid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable process
            pass
        self.workdir.forget(pgid)
        self.popen = None


# --------------------------------------------------------------------------------------------------
# cleanup on exit, even when a run is interrupted


_live: set[object] = set()  # strong references: a forgotten server is still torn down at exit
_hooks_installed = False


def register_for_cleanup(server: object) -> None:
    """Tear ``server`` down at interpreter exit and on SIGTERM/SIGHUP: its ``teardown()`` if it has
    one, else its ``stop()``."""
    global _hooks_installed
    _live.add(server)
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_stop_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _exit_on_signal)


def unregister(server: object) -> None:
    _live.discard(server)


def _exit_on_signal(signum: int, _frame: object) -> None:
    # Tear the servers down, then die of the same signal as we would have without this handler.
    _stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _stop_all() -> None:
    for server in list(_live):
        try:
            (getattr(server, "teardown", None) or server.stop)()  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - best effort at exit
            print(f"[rlp tests] failed to stop {server!r}: {exc}", file=sys.stderr)
