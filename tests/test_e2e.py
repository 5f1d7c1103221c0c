"""End to end on a real control plane: the operator, versitygw S3, and phase pods that really run.

The control plane is the suite's own (etcd, kube-apiserver, kube-controller-manager, kube-scheduler; kwok
stays for the other tests and does not touch the node used here). Phase pods are scheduled by the real
scheduler onto a node registered by tests/node_agent.py, which runs each pod's command with the pod's
environment (Secret and ConfigMap references resolved from the API, the spec ConfigMap materialised as
files) and reports its real exit status back to the apiserver. The quickstart runs twice: with each pod
as a local process, and with each pod as a real container of the built job image (podman, the pod's
security context: uid 10001, read-only root filesystem, emptyDirs), the image set where a user sets it
(the operator's RLP_DEFAULT_JOB_IMAGE, the chart's jobDefaults.image).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from infra.kube import wait_until
from node_agent import NodeAgent, on_agent, running_agent


@pytest.fixture(scope="module")
def node_agent(control_plane):
    with running_agent(control_plane) as agent:
        yield agent


@pytest.fixture(scope="module")
def phase_agent(request, control_plane):
    """The agent that runs the quickstart's phase pods: as processes, or as containers of the job image."""
    if request.param == "processes":
        yield request.getfixturevalue("node_agent")
        return
    with running_agent(control_plane, podman=request.getfixturevalue("container_images").podman) as agent:
        yield agent


def job(name: str, container: dict, agent: NodeAgent, **pod_spec) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "main", "image": "test.invalid/none:0", **container}],
            **on_agent(agent), **pod_spec}}},
    }  # fmt: skip


def job_pod(core, ns: str, job_name: str) -> dict:
    pods = core.list_namespaced_pod(ns, label_selector=f"batch.kubernetes.io/job-name={job_name}").items
    return core.api_client.sanitize_for_serialization(pods[0]) if pods else None


def job_condition(batch, ns: str, name: str) -> str | None:
    conds = batch.read_namespaced_job(name, ns).status.conditions or []
    return next((c.type for c in conds if c.type in ("Complete", "Failed") and c.status == "True"), None)


# --------------------------------------------------------------------------------------------------
# the node agent on plain Jobs


def test_node_agent_runs_job_pods_as_processes_with_their_real_exit_codes(kube_api, namespace, node_agent):
    from kubernetes import client

    core, batch = client.CoreV1Api(kube_api), client.BatchV1Api(kube_api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"TOKEN": "s3cr3t"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"},
                                                  "data": {"spec.json": '{"answer": 42}', "MODE": "fast"}})  # fmt: skip
    fails = job("fails", {"command": ["python", "-c", "import sys; print('about to fail'); sys.exit(3)"]}, node_agent)
    reads = job("reads", {
        "command": ["python", "-c"],
        "args": ["import json, os, sys; spec = json.load(open(sys.argv[1])); "
                 "print(spec['answer'], os.environ['TOKEN'], os.environ['MODE'], os.environ['WHO'], os.environ['GREETING']); "
                 "open(os.environ['HOME'] + '/x', 'w').write('ok')",
                 "/etc/cfg/spec.json"],
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "TOKEN"}}},
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "MODE"}}},
                {"name": "WHO", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "GREETING", "value": "hello-$(WHO)"},
                {"name": "HOME", "value": "/scratch"}],
        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True},
                         {"name": "scratch", "mountPath": "/scratch"}],
    }, node_agent, volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "scratch", "emptyDir": {}}])  # fmt: skip
    for body in (fails, reads):
        batch.create_namespaced_job(namespace, body)

    assert wait_until(lambda: job_condition(batch, namespace, "fails"), 60, "Job fails to finish") == "Failed"
    pod = job_pod(core, namespace, "fails")
    assert pod["spec"]["nodeName"] == node_agent.node_name
    assert pod["status"]["phase"] == "Failed"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"

    assert wait_until(lambda: job_condition(batch, namespace, "reads"), 60, "Job reads to finish") == "Complete", \
        node_agent.log(namespace, job_pod(core, namespace, "reads")["metadata"]["name"])
    pod = job_pod(core, namespace, "reads")
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert f"42 s3cr3t fast {namespace} hello-{namespace}" in node_agent.log(namespace, pod["metadata"]["name"])


def test_node_agent_kills_the_process_of_a_deleted_pod(kube_api, namespace, node_agent, tmp_path):
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    marker = tmp_path / "pid"
    pod = {"metadata": {"name": "sleeper"}, "spec": {
        "restartPolicy": "Never", "terminationGracePeriodSeconds": 2, **on_agent(node_agent),
        "containers": [{"name": "main", "image": "test.invalid/none:0", "command": [
            "python", "-c", f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(600)"]}]}}  # fmt: skip
    core.create_namespaced_pod(namespace, pod)
    wait_until(lambda: core.read_namespaced_pod("sleeper", namespace).status.phase == "Running" and marker.exists(),
               60, "sleeper running")  # fmt: skip
    pid = int(marker.read_text())
    core.delete_namespaced_pod("sleeper", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_pod("sleeper", namespace)
            return False
        except client.ApiException as err:
            return err.status == 404

    wait_until(gone, 30, "the deleted pod to go away")

    def dead() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_until(dead, 10, "the pod's process to die")


# --------------------------------------------------------------------------------------------------
# the whole system: RLPRun -> operator -> Jobs -> real `rlp phase` processes -> S3 -> status

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
CHECKPOINTS = {"sft": "policy", "reward": "reward_model", "synthesize": "reward_model", "optimize": "policy"}


def quickstart_spec(rig, agent: NodeAgent) -> dict:
    """examples/quickstart.yaml, smaller, stored in the test bucket, on the agent's node without GPUs."""
    spec = yaml.safe_load(QUICKSTART.read_text())["spec"]
    spec["policy"]["sft"]["training"]["epochs"] = 1
    spec["rewardModel"]["training"]["epochs"] = 2
    spec["generation"].update(samplesPerPrompt=4, maxPrompts=32)
    spec["optimization"].update(steps=12, rolloutBatchSize=16, checkpointEvery=3)
    spec["evaluation"]["maxPrompts"] = 64
    spec["storage"] = {"uri": f"s3://{rig.bucket}/runs", "endpoint": rig.s3.endpoint_url,
                       "secretRef": {"name": rig.SECRET}}  # fmt: skip
    spec["resources"] = {"gpusPerPod": 0, "cpu": "1", "memory": "1Gi", **on_agent(agent)}
    return spec


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the run's own 600 s wait comes after agent, operator (and image) setup: it expires first
@pytest.mark.parametrize("phase_agent", ["processes", pytest.param("containers", marks=pytest.mark.containers)],
                         indirect=True)  # fmt: skip
def test_quickstart_rlprun_goes_from_apply_to_succeeded_with_real_checkpoints_in_s3_through_a_kill(
    request, control_plane, kube_api, namespace, s3_server, s3_bucket, phase_agent, tmp_path
):
    from operator_fixtures import ClusterRig

    from rlp_core.manifest import verify_manifest
    from rlp_core.store import Store

    node_agent = phase_agent
    rig = ClusterRig(control_plane, kube_api, namespace, s3_server, s3_bucket, tmp_path)
    if node_agent.podman is not None:  # the job image, where an installation sets it
        rig.operator.extra_env["RLP_DEFAULT_JOB_IMAGE"] = request.getfixturevalue("container_images").job
    rig.operator.start()
    s3 = s3_server.client()
    checkpoint = f"runs/{namespace}/quickstart/round-1/optimize/_checkpoints/LATEST.json"
    t0 = time.monotonic()
    killed = None
    try:
        rig.create_run("quickstart", quickstart_spec(rig, node_agent), hold=False)
        deadline = time.monotonic() + 600
        while (st := rig.status("quickstart")).get("phase") not in ("Succeeded", "Failed"):
            assert time.monotonic() < deadline, "the run did not finish in 600 s\n" + _diagnostics(rig, node_agent)
            if killed is None:  # SIGKILL the optimize pod's process once it has checkpointed
                pod = next((p for p in node_agent.running(namespace) if "-optimize-a1-" in p), None)
                if pod and s3.list_objects_v2(Bucket=s3_bucket, Prefix=checkpoint).get("KeyCount"):
                    assert node_agent.kill(namespace, pod), "optimize finished before it could be killed"
                    killed = pod
                assert "optimize" not in _succeeded(st), "optimize finished before it could be killed"
            time.sleep(0.1)
        assert st["phase"] == "Succeeded", _diagnostics(rig, node_agent)
    finally:
        rig.close()
    elapsed = time.monotonic() - t0

    records = {p["name"]: p for p in st["phases"]}
    ran = ["sft", "reward", "generate", "synthesize", "optimize", "evaluate"]
    assert [p["name"] for p in st["phases"]] == ["sft", "reward", "generate", "refine", "synthesize", "optimize",
                                                 "evaluate"]  # fmt: skip
    assert records["refine"]["state"] == "Skipped"  # rlp-spg does not use it
    for phase in ran:  # the killed optimize was retried once; nothing else ran twice
        assert records[phase]["state"] == "Succeeded", records[phase]
        assert records[phase]["attempts"] == (2 if phase == "optimize" else 1), records[phase]

    # every phase really ran, as a process (or a container of the job image) on the agent's node, and exited 0
    for phase in ran:
        pods = rig.pods_of(records[phase]["job"])
        assert len(pods) == 1
        pod = pods[0]
        assert pod["spec"]["nodeName"] == node_agent.node_name
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
        round_ = records[phase]["round"]
        log = node_agent.log(namespace, pod["metadata"]["name"])
        assert f"phase {phase} round {round_}: Succeeded" in log
        if node_agent.podman is not None:
            image = request.getfixturevalue("container_images").job
            assert pod["spec"]["containers"][0]["image"] == image
            assert log.startswith("--- node agent: run ") and image in log.splitlines()[0].split()
    # the killed attempt: its pod failed with the SIGKILL exit code the kubelet would report
    first = rig.pods_of(records["optimize"]["job"].replace("-a2", "-a1"))
    assert [p["metadata"]["name"] for p in first] == [killed]
    assert first[0]["status"]["phase"] == "Failed"
    assert first[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137

    # real outputs in S3: manifests that verify (content hashes included), safetensors checkpoints
    root = Store.from_uri(f"s3://{s3_bucket}/runs/{namespace}/quickstart", endpoint=s3_server.endpoint_url,
                          access_key=s3_server.access_key, secret_key=s3_server.secret_key)  # fmt: skip
    spec_hashes = set()
    for phase in ran:
        rec = records[phase]
        assert rec["output"] == f"s3://{s3_bucket}/runs/{namespace}/quickstart/round-{rec['round']}/{phase}/"
        manifest = verify_manifest(root.child(f"round-{rec['round']}", phase), deep=True)
        assert manifest is not None, f"{phase}: no verifying manifest"
        spec_hashes.add(manifest.spec_hash)
        assert rec["metrics"] == json.loads(json.dumps(manifest.metrics)), phase
        paths = {f.path for f in manifest.files}
        if phase in CHECKPOINTS:
            model_dir = CHECKPOINTS[phase]
            assert {f"{model_dir}/model.safetensors", f"{model_dir}/config.json"} <= paths, (phase, paths)
            weights = next(f for f in manifest.files if f.path == f"{model_dir}/model.safetensors")
            assert weights.size > 10_000
    assert len(spec_hashes) == 1  # every pod read the same spec
    # the retry resumed from the killed attempt's checkpoint instead of starting over
    optimize = records["optimize"]["metrics"]
    assert optimize["steps"] == 12 and optimize["resumed_from_step"] >= 3 and optimize["resumed_from_step"] % 3 == 0
    assert not list(root.child("round-1", "refine").list())  # skipped: nothing written

    # the evaluate phase's win-rate is in the run's status
    evaluation = records["evaluate"]["metrics"]
    assert 0 <= evaluation["ci_low"] <= evaluation["win_rate"] <= evaluation["ci_high"] <= 1
    assert evaluation["n"] == 64
    print(f"quickstart RLPRun, pods as {request.node.callspec.params['phase_agent']}: apply -> Succeeded in {elapsed:.0f} s (optimize killed once, resumed from step "
          f"{optimize['resumed_from_step']}); win-rate {evaluation['win_rate']:.3f}")


def _succeeded(status: dict) -> set[str]:
    return {p["name"] for p in status.get("phases", []) if p["state"] == "Succeeded"}


def _diagnostics(rig, agent: NodeAgent) -> str:
    lines = [f"status: {json.dumps(rig.status('quickstart'), indent=1)[:4000]}", "operator log:", rig.operator.tail(40)]
    for run in list(agent.runs.values()):
        lines += [f"--- pod {run.name} (exit {run.exit_code}):", agent.log(run.namespace, run.name)[-3000:]]
    return "\n".join(lines)
