"""The two container images, built from the committed Dockerfiles (scripts/build-images.sh) and run with podman.

- the operator image holds the operator's packages and nothing of the training stack, within its size budget;
- each entrypoint answers --help;
- the operator image, as uid 10001 on a read-only root filesystem, starts against the test apiserver,
  reports ready and reconciles an RLPRun (its first phase Job appears);
- the job image runs a phase on CPU against versitygw: the Job the operator renders, run by the test node
  agent as a container (the pod's command, env from its Secret, the spec ConfigMap mounted read-only,
  emptyDirs for /tmp and /var/cache/rlp, uid 10001, read-only root filesystem), writing a verified
  manifest to S3.
"""

from __future__ import annotations

import base64
import json
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from infra._process import free_port
from infra.images import IMAGE_UID
from infra.kube import wait_until
from node_agent import NodeAgent, on_agent, running_agent
from operator_fixtures import install_crd, rlprun
from test_operator_image import OPERATOR_DEPS, TRAINING_STACK, operator_packages

# What the operator image adds to its base (python:3.11-slim-bookworm, about 125 MB): the venv with the
# operator's packages. docs/install.md states the budget: the whole image under 300 MB.
OPERATOR_LAYERS_BUDGET = 160 * 10**6
LIST_DISTRIBUTIONS = ("import importlib.metadata as m, json; "
                      "print(json.dumps(sorted({d.metadata['Name'].lower().replace('_', '-') for d in m.distributions()})))")  # fmt: skip


def test_operator_image_holds_the_operators_packages_only_within_its_size_budget(container_images):
    podman, image = container_images.podman, container_images.operator
    res = podman.run("run", "--rm", "--entrypoint", "python", image, "-c", LIST_DISTRIBUTIONS, check=True)
    installed = set(json.loads(res.stdout))
    assert installed == operator_packages() | {"rlp"}  # exactly the lock's operator group, and the project
    assert set(OPERATOR_DEPS) <= installed
    assert not installed & TRAINING_STACK
    assert not {p for p in installed if p.startswith(("nvidia-", "cuda-"))}
    res = podman.run("run", "--rm", "--entrypoint", "python", image, "-c", "import torch", timeout=120)
    assert res.returncode != 0 and "No module named 'torch'" in res.stderr

    size = container_images.size(image)
    base = container_images.size("python:3.11.14-slim-bookworm")
    stand_in = container_images.label("python:3.11.14-slim-bookworm", "dev.rlp.stand-in")
    print(f"operator image {size / 1e6:.0f} MB: base {base / 1e6:.0f} MB"
          f"{' (stand-in: ' + stand_in + ')' if stand_in else ''} + {(size - base) / 1e6:.0f} MB of its own")  # fmt: skip
    assert size - base < OPERATOR_LAYERS_BUDGET


def test_entrypoints_answer_help(container_images):
    podman = container_images.podman
    res = podman.run("run", "--rm", container_images.operator, "--help", check=True)
    assert "usage: rlp operator" in res.stdout
    res = podman.run("run", "--rm", container_images.job, timeout=300)  # the image's CMD is --help
    assert res.returncode == 0 and "usage: rlp phase" in res.stdout, res.stderr


def _kubeconfig_for_container(control_plane, path: Path) -> Path:
    """The test kubeconfig with its CA inline (the container sees no host files but its mounts)."""
    cfg = yaml.safe_load(Path(control_plane.kubeconfig).read_text())
    for cluster in cfg["clusters"]:
        ca = Path(cluster["cluster"].pop("certificate-authority"))
        cluster["cluster"]["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
    path.mkdir(mode=0o755)
    (path / "kubeconfig").write_text(json.dumps(cfg))
    (path / "kubeconfig").chmod(0o644)
    return path


def test_operator_image_starts_reports_ready_and_reconciles_a_run(
    container_images, control_plane, kube_api, namespace, s3_server, s3_bucket, tmp_path
):
    from kubernetes import client

    install_crd(kube_api)
    client.CoreV1Api(kube_api).create_namespaced_secret(namespace, {"metadata": {"name": "s3-creds"}, "stringData": {
        "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})  # fmt: skip
    kube_dir = _kubeconfig_for_container(control_plane, tmp_path / "kube")
    scratch = tmp_path / "tmp"  # the chart's Deployment mounts an emptyDir at /tmp, its HOME
    scratch.mkdir(mode=0o777)
    scratch.chmod(0o777)
    podman, port = container_images.podman, free_port()
    name = f"rlp-operator-test-{uuid.uuid4().hex[:8]}"
    podman.run("run", "--detach", "--name", name, "--network", "host", "--user", f"{IMAGE_UID}:{IMAGE_UID}",
               "--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "--volume", f"{scratch}:/tmp", "--env", "HOME=/tmp",
               "--volume", f"{kube_dir}:/etc/rlp-test:ro", "--env", "KUBECONFIG=/etc/rlp-test/kubeconfig",
               container_images.operator, "--standalone", "--namespace", namespace, "--bind", "127.0.0.1",
               "--metrics-port", str(port), "--health-port", "0", check=True)  # fmt: skip
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_until(ready, 120, "the operator container to report ready")
        spec = {"storage": {"uri": f"s3://{s3_bucket}/runs", "endpoint": s3_server.endpoint_url,
                            "secretRef": {"name": "s3-creds"}},
                "resources": {"gpusPerPod": 0, "cpu": "1", "memory": "1Gi"}}  # fmt: skip
        client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
            "rlp.dev", "v1alpha1", namespace, "rlpruns", rlprun("in-a-container", spec))
        batch = client.BatchV1Api(kube_api)
        jobs = wait_until(lambda: batch.list_namespaced_job(namespace).items, 120, "the run's first phase Job")
        assert jobs[0].metadata.labels["rlp.dev/phase"] == "sft"
        assert jobs[0].spec.template.spec.containers[0].command[:2] == ["rlp", "phase"]
    except AssertionError as err:
        logs = podman.run("logs", name)
        raise AssertionError(f"{err}\noperator container log:\n{(logs.stdout + logs.stderr)[-4000:]}") from None
    finally:
        podman.run("rm", "--force", "--time", "5", name)


@pytest.fixture(scope="module")
def container_agent(control_plane, container_images):
    with running_agent(control_plane, podman=container_images.podman) as agent:
        yield agent


def test_job_image_runs_a_phase_on_cpu_against_s3_as_the_operator_renders_it(
    container_images, kube_api, namespace, s3_server, s3_bucket, container_agent: NodeAgent
):
    from kubernetes import client

    from rlp_core.manifest import verify_manifest
    from rlp_core.spec import RLPRun
    from rlp_core.store import Store
    from rlp_operator import workload

    core, batch = client.CoreV1Api(kube_api), client.BatchV1Api(kube_api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "s3-creds"}, "stringData": {
        "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})  # fmt: skip
    body = rlprun("tiny", {
        "storage": {"uri": f"s3://{s3_bucket}/runs", "endpoint": s3_server.endpoint_url,
                    "secretRef": {"name": "s3-creds"}},
        "policy": {"sft": {"tiny": {"hiddenSize": 32, "numLayers": 1, "numHeads": 2, "intermediateSize": 64,
                                    "maxPositions": 32}, "training": {"epochs": 0.2, "batchSize": 64}}},
        "resources": {"gpusPerPod": 0, "cpu": "1", "memory": "1Gi", "image": container_images.job,
                      **on_agent(container_agent)},
    })  # fmt: skip
    body["metadata"]["namespace"] = namespace
    run = RLPRun.model_validate(body)
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "unused", "uid": "unused"}
    configmap = workload.render_configmap(run, owner)
    job, _ = workload.render_job(run, 0, "sft", 1, owner)
    for body in (configmap, job):
        body["metadata"].pop("ownerReferences")  # no owner object here: the garbage collector would delete them
    core.create_namespaced_config_map(namespace, configmap)
    batch.create_namespaced_job(namespace, job)

    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True

    def finished() -> str | None:
        conds = batch.read_namespaced_job(job["metadata"]["name"], namespace).status.conditions or []
        return next((c.type for c in conds if c.type in ("Complete", "Failed") and c.status == "True"), None)

    name = job["metadata"]["name"]
    result = wait_until(finished, 600, f"Job {name} to finish")
    pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={name}").items
    log = container_agent.log(namespace, pods[0].metadata.name)
    assert result == "Complete", log[-4000:]
    assert "phase sft round 0: Succeeded" in log
    shown = log.splitlines()[0]  # the agent's podman command line
    assert f"--user {IMAGE_UID}:{IMAGE_UID}" in shown and "--read-only " in shown and ":/etc/rlp:ro" in shown
    assert container_images.job in shown
    root = Store.from_uri(f"s3://{s3_bucket}/runs/{namespace}/tiny", endpoint=s3_server.endpoint_url,
                          access_key=s3_server.access_key, secret_key=s3_server.secret_key)  # fmt: skip
    manifest = verify_manifest(root.child("round-0", "sft"), deep=True)
    assert manifest is not None
    assert "policy/model.safetensors" in {f.path for f in manifest.files}
