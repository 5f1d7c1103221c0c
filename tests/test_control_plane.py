"""Acceptance tests of the test control plane itself: the real scheduler, Job controller, garbage
collector and apiserver validation, with kwok simulating GPU nodes and pod lifecycles."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
from infra import WAIT, ControlPlane, finish_pod, kwok_annotations, wait_for_pod_phase, wait_until
from infra.kube import events_for
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.cluster

GPU = "nvidia.com/gpu"


def gpu_pod(name: str, gpus: int, annotations: dict[str, str] | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "rlp-test/noop:0",
                    "resources": {"limits": {GPU: str(gpus), "cpu": "1", "memory": "1Gi"}},
                }
            ],
        },
    }


def test_gpu_pod_is_scheduled_on_a_kwok_gpu_node_runs_and_succeeds(control_plane, kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    # Held Running until the test finishes it: a 2 s kwok delay instead made the check race a loaded machine
    # (a poll stalled past the window saw Succeeded first).
    core.create_namespaced_pod(namespace, gpu_pod("gpu-1", 1, kwok_annotations(0, hold=True)))

    running = wait_for_pod_phase(kube_api, namespace, "gpu-1", ["Running", "Succeeded"], timeout=60)
    assert running.status.phase == "Running"
    assert running.spec.node_name in control_plane.fake_nodes
    node = core.read_node(running.spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert node.status.allocatable[GPU] == "8"
    scheduled = {c.type: c for c in running.status.conditions}["PodScheduled"]
    assert scheduled.status == "True"
    assert any(
        e.reason == "Scheduled" and (e.source.component == "default-scheduler" or e.reporting_component == "default-scheduler")
        for e in events_for(kube_api, namespace, "gpu-1", "Pod")
    )

    finish_pod(kube_api, namespace, "gpu-1", 0)
    done = wait_for_pod_phase(kube_api, namespace, "gpu-1", ["Succeeded", "Failed"], timeout=60)
    assert done.status.phase == "Succeeded"
    (status,) = done.status.container_statuses
    assert status.state.terminated.exit_code == 0
    assert status.state.terminated.reason == "Completed"


def test_kwok_delay_keeps_a_pod_running_at_least_that_long(kube_api, namespace):
    """`rlp.dev/kwok-delay` (tests/infra/README.md): the pod ends on its own, no sooner than the delay. A lower
    bound on the time to Succeeded, which a slow machine cannot fail."""
    start = time.monotonic()
    client.CoreV1Api(kube_api).create_namespaced_pod(namespace, gpu_pod("delayed", 1, kwok_annotations(0, delay="2s")))
    done = wait_for_pod_phase(kube_api, namespace, "delayed", ["Succeeded", "Failed"], timeout=60)
    assert done.status.phase == "Succeeded"
    assert time.monotonic() - start >= 2.0


def test_pod_asking_for_more_gpus_than_any_node_has_stays_pending(kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_pod(namespace, gpu_pod("too-big", 9, kwok_annotations(0)))

    def unschedulable():
        pod = core.read_namespaced_pod("too-big", namespace)
        for cond in pod.status.conditions or []:
            if cond.type == "PodScheduled" and cond.status == "False":
                return pod, cond
        return None

    pod, cond = wait_until(unschedulable, timeout=60, what="PodScheduled=False")
    assert cond.reason == "Unschedulable"
    assert f"Insufficient {GPU}" in cond.message
    event = wait_until(
        lambda: [e for e in events_for(kube_api, namespace, "too-big", "Pod") if e.reason == "FailedScheduling"],
        timeout=30,
        what="a FailedScheduling event",
    )[0]
    assert f"Insufficient {GPU}" in event.message
    # The scheduler has placed a pod that came after it (it is at work), and too-big is still not placed.
    core.create_namespaced_pod(namespace, gpu_pod("fits", 1, kwok_annotations(0)))
    wait_until(lambda: core.read_namespaced_pod("fits", namespace).spec.node_name, timeout=60, what="fits scheduled")
    pod = core.read_namespaced_pod("too-big", namespace)
    assert pod.status.phase == "Pending"
    assert not pod.spec.node_name


def test_job_runs_to_completion_and_deleting_it_collects_its_pods(kube_api, namespace):
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "train"},
        "spec": {
            "completions": 3,
            "parallelism": 3,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "main", "image": "rlp-test/noop:0", "resources": {"limits": {GPU: "1"}}}
                    ],
                }
            },
        },
    }
    batch.create_namespaced_job(namespace, job)

    def complete():
        j = batch.read_namespaced_job("train", namespace)
        conds = {c.type: c.status for c in j.status.conditions or []}
        assert conds.get("Failed") != "True", j.status
        return j if conds.get("Complete") == "True" else None

    done = wait_until(complete, timeout=90, what="Job Complete")
    assert done.status.succeeded == 3
    pods = core.list_namespaced_pod(namespace, label_selector="batch.kubernetes.io/job-name=train").items
    assert len(pods) == 3
    assert {p.status.phase for p in pods} == {"Succeeded"}
    assert all(p.metadata.owner_references[0].kind == "Job" for p in pods)

    batch.delete_namespaced_job("train", namespace, propagation_policy="Background")
    wait_until(
        lambda: not core.list_namespaced_pod(namespace, label_selector="batch.kubernetes.io/job-name=train").items,
        timeout=60,
        what="the garbage collector to delete the Job's pods",
    )
    with pytest.raises(ApiException) as err:
        batch.read_namespaced_job("train", namespace)
    assert err.value.status == 404


def test_kwok_contract_job_pods_fail_with_the_annotated_exit_code(kube_api, namespace):
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "crash"},
        "spec": {
            "backoffLimit": 1,
            "template": {
                "metadata": {"annotations": kwok_annotations(3)},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "rlp-test/noop:0"}]},
            },
        },
    }
    batch.create_namespaced_job(namespace, job)

    def failed():
        j = batch.read_namespaced_job("crash", namespace)
        return j if any(c.type == "Failed" and c.status == "True" for c in j.status.conditions or []) else None

    j = wait_until(failed, timeout=90, what="Job Failed")
    assert j.status.failed == 2  # the first try and one retry (backoffLimit 1)
    pods = core.list_namespaced_pod(namespace, label_selector="batch.kubernetes.io/job-name=crash").items
    assert len(pods) == 2
    for pod in pods:
        assert pod.status.phase == "Failed"
        terminated = pod.status.container_statuses[0].state.terminated
        assert (terminated.exit_code, terminated.reason) == (3, "Error")


def test_kwok_contract_held_pod_runs_until_finished(kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_pod(namespace, gpu_pod("held", 1, kwok_annotations(0, hold=True)))
    wait_for_pod_phase(kube_api, namespace, "held", "Running", timeout=60)
    # kwok has since run and ended a pod that differs only in not being held; the held one still runs.
    core.create_namespaced_pod(namespace, gpu_pod("not-held", 1, kwok_annotations(0)))
    wait_for_pod_phase(kube_api, namespace, "not-held", ["Succeeded", "Failed"], timeout=60)
    assert core.read_namespaced_pod("held", namespace).status.phase == "Running"
    finish_pod(kube_api, namespace, "held", exit_code=7)
    pod = wait_for_pod_phase(kube_api, namespace, "held", ["Succeeded", "Failed"], timeout=60)
    assert pod.status.phase == "Failed"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 7


WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.rlp.dev"},
    "spec": {
        "group": "test.rlp.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1, "maximum": 8},
                                    "color": {"type": "string", "enum": ["red", "blue"]},
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {"ready": {"type": "boolean"}, "message": {"type": "string"}},
                            },
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture
def widget_crd(kube_api):
    ext = client.ApiextensionsV1Api(kube_api)
    ext.create_custom_resource_definition(WIDGET_CRD)
    try:
        yield WIDGET_CRD
    finally:
        ext.delete_custom_resource_definition(WIDGET_CRD["metadata"]["name"])
        wait_until(
            lambda: not [c for c in ext.list_custom_resource_definition().items if c.metadata.name == "widgets.test.rlp.dev"],
            timeout=60,
            what="the Widget CRD to be deleted",
        )


def test_crd_is_established_validates_and_honours_the_status_subresource(kube_api, namespace, widget_crd):
    ext, custom = client.ApiextensionsV1Api(kube_api), client.CustomObjectsApi(kube_api)

    def established():
        crd = ext.read_custom_resource_definition("widgets.test.rlp.dev")
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait_until(established, timeout=60, what="the CRD to be Established")
    args = ("test.rlp.dev", "v1", namespace, "widgets")

    # The apiserver's own schema validation rejects a bad object and names the field.
    bad = {"apiVersion": "test.rlp.dev/v1", "kind": "Widget", "metadata": {"name": "bad"}, "spec": {"size": 99}}
    # Discovery of a new CRD can lag Established by a moment: retry 404s only.
    def create(obj):
        deadline = time.monotonic() + WAIT
        while True:
            try:
                return custom.create_namespaced_custom_object(*args, obj)
            except ApiException as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def rejection(obj) -> str:
        with pytest.raises(ApiException) as err:
            create(obj)
        assert err.value.status == 422
        status = json.loads(err.value.body)
        assert status["reason"] == "Invalid"
        return status["message"]

    message = rejection(bad)
    assert message.startswith('Widget.test.rlp.dev "bad" is invalid: ')
    assert "spec.size: Invalid value: 99: spec.size in body should be less than or equal to 8" in message
    message = rejection({**bad, "spec": {"size": 2, "color": "green"}})
    assert 'spec.color: Unsupported value: "green": supported values: "red", "blue"' in message
    message = rejection({**bad, "spec": {"color": "red"}})
    assert "spec.size: Required value" in message

    # Status written with the main resource is dropped (on create and on update) ...
    good = {
        "apiVersion": "test.rlp.dev/v1",
        "kind": "Widget",
        "metadata": {"name": "good"},
        "spec": {"size": 2, "color": "red"},
        "status": {"ready": True, "message": "set on create"},
    }
    created = create(good)
    assert "status" not in created or not created["status"]
    generation = created["metadata"]["generation"]
    patched = custom.patch_namespaced_custom_object(*args, "good", {"status": {"ready": True, "message": "via main"}})
    assert not patched.get("status")
    assert patched["metadata"]["generation"] == generation
    # ... and sticks through /status, without bumping the generation.
    patched = custom.patch_namespaced_custom_object_status(*args, "good", {"status": {"ready": True, "message": "via status"}})
    assert patched["status"] == {"ready": True, "message": "via status"}
    assert patched["metadata"]["generation"] == generation
    # A spec change through /status is ignored too.
    patched = custom.patch_namespaced_custom_object_status(*args, "good", {"spec": {"size": 5}})
    assert patched["spec"]["size"] == 2
    fetched = custom.get_namespaced_custom_object(*args, "good")
    assert fetched["status"] == {"ready": True, "message": "via status"}
    assert fetched["spec"]["size"] == 2


def test_more_fake_nodes_can_be_added(control_plane, kube_api):
    names = control_plane.add_fake_nodes(2, prefix=f"extra-{uuid.uuid4().hex[:4]}-", gpus=4)
    core = client.CoreV1Api(kube_api)
    try:
        for name in names:
            node = core.read_node(name)
            assert node.status.allocatable[GPU] == "4"
            assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
    finally:
        control_plane.delete_fake_nodes(names)
    assert not set(names) & set(control_plane.fake_nodes)


def test_a_second_control_plane_starts_and_leaves_nothing_behind(control_plane):
    cp = ControlPlane(gpu_nodes=1)
    try:
        cp.start()
        assert cp.server != control_plane.server
        status, body = cp.get("/readyz")
        assert status == 200, body
        pids = [p.pid for p in cp._procs.values()]
        workdir = cp.workdir
        assert workdir.is_dir()
    finally:
        cp.stop()
    assert not workdir.exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # The session's own cluster is unaffected.
    assert control_plane.get("/readyz")[0] == 200
