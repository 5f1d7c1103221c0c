"""Shared pytest fixtures. The real test servers' fixtures live in tests/infra/fixtures.py:

- ``control_plane`` (session): infra.ControlPlane — etcd, kube-apiserver, controller-manager, scheduler,
  kwok with two 8-GPU fake nodes
- ``kube_api`` (session): kubernetes.client.ApiClient with admin rights on it
- ``namespace``: str, a fresh namespace per test, deleted after
- ``s3_server`` (session): infra.S3Server — versitygw
- ``s3_client``: a boto3 S3 client for it
- ``s3_bucket``: str, a fresh bucket per test, deleted after
- ``container_images`` (session): infra.images.ContainerImages — the operator and job images, built by
  scripts/build-images.sh (cached by the hash of their inputs) and run with podman
- ``tiny_sft_dir`` (session): Path of a tiny SFT policy on builtin://arith (tests/recipes.py; competent but
  imperfect), trained once for every test that optimises one
"""

import os
import sys
from pathlib import Path

import pytest

# torch in every test and in every process a test starts runs 2 intra-op threads, whatever the machine's core
# count and whichever test ran first: a training outcome depends on the thread count (reductions are split
# differently), and the tests' bounds were measured at 1 and 2 threads (docs/bench/outcome-spread.md).
os.environ["OMP_NUM_THREADS"] = "2"

# Every Python a test starts (rlp, phases, the operator) reads and writes text as UTF-8 whatever the machine's
# locale: under e.g. LANG=en_US.ISO-8859-1 a "—" in a message would fail to encode or turn to mojibake. (This
# process's own mode is fixed at its start: on such a locale run pytest itself with `python -X utf8`.)
os.environ["PYTHONUTF8"] = "1"

# A distributed launcher's variables make `rlp phase` and DeepSpeed act as one rank of a bigger job (a CI runner
# inside a torchrun or Indexed Job pod sets them): no test may inherit them from the machine or from a test that ran
# before it.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                      "NNODES", "NODE_RANK", "NPROC_PER_NODE", "GPUS_PER_NODE", "JOB_COMPLETION_INDEX")


def _drop_launcher_variables() -> None:
    for name in [*LAUNCHER_VARIABLES, *(k for k in os.environ if k.startswith("TORCHELASTIC_"))]:
        os.environ.pop(name, None)


_drop_launcher_variables()

# Hugging Face settings of the machine (offline mode, a token, a mirror) would change what test_hub's local stand-in
# Hub is asked, or stop huggingface_hub asking it at all. Dropped before huggingface_hub reads them at import.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT"):
    os.environ.pop(_name, None)

# tests/ on sys.path, whatever pytest's import mode: the helpers are importable as `infra`.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# Every server a test talks to is on loopback: a proxy set on the machine must not see those calls (Python's urllib,
# requests and boto3 follow http_proxy for 127.0.0.1 unless no_proxy names it; children inherit the setting).
from infra._process import LOOPBACK_NO_PROXY  # noqa: E402

for _name in ("NO_PROXY", "no_proxy"):
    os.environ[_name] = ",".join(filter(None, [os.environ.get(_name, ""), LOOPBACK_NO_PROXY]))

from infra.fixtures import (  # noqa: E402,F401 - fixtures and hooks are registered by name
    container_images,
    control_plane,
    kube_api,
    namespace,
    pytest_collection_finish,
    pytest_collection_modifyitems,
    s3_bucket,
    s3_client,
    s3_server,
)


@pytest.fixture(autouse=True)
def _no_launcher_variables_after_a_test():
    yield
    _drop_launcher_variables()


@pytest.fixture(scope="session")
def tiny_sft_dir(tmp_path_factory):
    from recipes import train_tiny_sft

    return train_tiny_sft(tmp_path_factory.mktemp("sft"))
