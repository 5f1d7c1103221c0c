"""pytest fixtures and hooks for the real test servers; tests/conftest.py imports them.

Session-scoped: ``control_plane`` (ControlPlane), ``kube_api`` (kubernetes.client.ApiClient),
``s3_server`` (S3Server), ``container_images`` (images.ContainerImages: the two built images). Per test:
``namespace`` (str), ``s3_client`` (boto3 S3 client), ``s3_bucket`` (str). Tests that use the cluster
fixtures get the ``cluster`` marker, tests that use the S3 fixtures the ``s3`` marker, tests that use
``container_images`` the ``containers`` marker, automatically.
"""

from __future__ import annotations

import re
import uuid

import pytest

from . import _process
from .controlplane import ControlPlane
from .images import ContainerImages, build_images
from .kube import wait_until
from .s3server import S3Server

CLUSTER_FIXTURES = frozenset({"control_plane", "kube_api", "namespace"})
S3_FIXTURES = frozenset({"s3_server", "s3_client", "s3_bucket"})
IMAGE_FIXTURES = frozenset({"container_images"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark tests by the servers they use (before ``-m`` selection runs)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & CLUSTER_FIXTURES:
            item.add_marker(pytest.mark.cluster)
        if names & S3_FIXTURES:
            item.add_marker(pytest.mark.s3)
        if names & IMAGE_FIXTURES:
            item.add_marker(pytest.mark.containers)


def pytest_collection_finish(session):
    """Build (or find in the cache) the server binaries and the container images before any test runs, so
    a cold build is not counted against the first test's timeout. A no-op when no selected test needs
    them."""
    if session.config.option.collectonly:
        return
    if any(item.get_closest_marker("cluster") or item.get_closest_marker("s3") for item in session.items):
        _process.ensure_test_binaries()
    if any(item.get_closest_marker("containers") for item in session.items):
        session.config.stash[_IMAGES] = build_images()


_IMAGES = pytest.StashKey[ContainerImages]()


@pytest.fixture(scope="session")
def container_images(request) -> ContainerImages:
    """The operator and job images built from the committed Dockerfiles (scripts/build-images.sh, podman)."""
    images = request.config.stash.get(_IMAGES, None)
    return images if images is not None else build_images()


@pytest.fixture(scope="session")
def control_plane():
    """The session's ControlPlane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
    kwok with two 8-GPU fake nodes (``control_plane.fake_nodes``)."""
    cp = ControlPlane()
    try:
        cp.start()
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kube_api(control_plane):
    """A ``kubernetes.client.ApiClient`` with admin (system:masters) rights on ``control_plane``."""
    api = control_plane.api_client()
    try:
        yield api
    finally:
        api.close()


def _dns_label(text: str, limit: int) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].strip("-")


@pytest.fixture
def namespace(request, kube_api):
    """A fresh namespace (its name, a str) whose ``default`` ServiceAccount exists; deleted after."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(kube_api)
    name = f"t-{_dns_label(request.node.name, 48)}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"rlp.dev/test": "true"}}})

    def sa_exists() -> bool:
        try:
            core.read_namespaced_service_account("default", name)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    try:
        wait_until(sa_exists, timeout=60, what=f"ServiceAccount default in {name}")
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture(scope="session")
def s3_server():
    """The session's S3Server (versitygw). Tests may stop/kill/restart it; the next test that uses
    ``s3_client`` or ``s3_bucket`` gets it running again."""
    server = S3Server()
    try:
        server.start()
        yield server
    finally:
        server.teardown()


@pytest.fixture
def s3_client(s3_server):
    """A boto3 S3 client for ``s3_server`` (path-style addressing)."""
    s3_server.start()  # no-op when running; revives it after a test that stopped it
    return s3_server.client()


@pytest.fixture
def s3_bucket(s3_server, s3_client):
    """A fresh, empty bucket (its name, a str); emptied and deleted after the test."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    s3_server.start()
    _empty_and_delete_bucket(s3_server.client(), name)


def _empty_and_delete_bucket(s3, bucket: str) -> None:
    for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    s3.delete_bucket(Bucket=bucket)
