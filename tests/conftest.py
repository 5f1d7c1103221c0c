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
- ``tiny_sft_dir`` (session): Path of a tiny SFT policy on builtin://arith (competent but imperfect, mean
  gold score ~0.6-0.8), trained once for every test that optimises one
"""

import sys
from pathlib import Path

import pytest

# tests/ on sys.path, whatever pytest's import mode: the helpers are importable as `infra`.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

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


@pytest.fixture(scope="session")
def tiny_sft_dir(tmp_path_factory):
    import torch

    from rlp_core.pipeline import POLICY_DIR, execute_phase
    from rlp_core.spec import parse_run
    from rlp_core.store import Store

    tmp = tmp_path_factory.mktemp("sft")
    run = parse_run({"metadata": {"name": "toy"}, "spec": {
        "policy": {"sft": {"tiny": {"maxPositions": 32}, "training": {"epochs": 6, "batchSize": 64, "learningRate": 0.003}}},
    }})
    torch.set_num_threads(2)
    execute_phase(run, Store.from_uri(f"file://{tmp}/store"), 0, "sft", cache_dir=tmp / "cache")
    return next((tmp / "store").rglob("_MANIFEST.json")).parent / POLICY_DIR
