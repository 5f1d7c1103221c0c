"""The project's real test servers: a Kubernetes control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kwok) and an S3 server (versitygw), built from source by
scripts/build-test-servers.sh. See README.md in this directory."""

from ._process import ServerError, ensure_test_binaries
from .controlplane import ControlPlane, fake_node_manifest
from .kube import WAIT, finish_pod, kwok_annotations, wait_for_pod_phase, wait_until
from .s3server import S3Server

__all__ = [
    "WAIT",
    "ControlPlane",
    "S3Server",
    "ServerError",
    "ensure_test_binaries",
    "fake_node_manifest",
    "finish_pod",
    "kwok_annotations",
    "wait_for_pod_phase",
    "wait_until",
]
