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
"""

import sys
from pathlib import Path

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
