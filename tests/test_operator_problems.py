"""Every accepted RLPRun runs or says why, and nothing is left running when runs or the operator go.

One operator process, namespace and bucket for the whole module (the cases are independent runs), against
the real control plane (kwok pods) and versitygw. Malformed specs are refused at apply (tests/test_crd.py);
here are the problems only the cluster or the store can show: missing data, models, buckets, Secrets, a
ServiceAccount or PriorityClass that does not exist, a Kueue queue nobody serves, GPUs that never free up, a
Job the apiserver refuses. Each must be on the run (condition, reason, message, Event) within a bounded
time, before any Job starts where the store can tell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from operator_fixtures import REPO, ClusterRig, OperatorProcess

from infra.kube import WAIT, wait_until

pytestmark = pytest.mark.cluster

SOON = WAIT  # seconds within which a problem must show on the run (polled: a loaded machine may need many)


@pytest.fixture(scope="module")
def rig(control_plane, kube_api, s3_server, tmp_path_factory):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(kube_api)
    ns = f"t-problems-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns, "labels": {"rlp.dev/test": "true"}}})
    wait_until(lambda: core.list_namespaced_service_account(ns).items, timeout=60, what="default ServiceAccount")
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3_server.start()
    s3_server.client().create_bucket(Bucket=bucket)
    log_dir = tmp_path_factory.mktemp("problems")
    r = ClusterRig(control_plane, kube_api, ns, s3_server, bucket, log_dir)
    r.operator = OperatorProcess(control_plane.kubeconfig, namespaces=[ns], log_path=log_dir / "operator.log",
                                 backoff_base=0.3, extra_env={"RLP_OPERATOR_UNSCHEDULABLE_GRACE_SECONDS": "1"})  # fmt: skip
    r.operator.start()
    try:
        yield r
    finally:
        r.operator.kill()
        try:
            core.delete_namespace(ns, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:  # the last test deletes it itself
                raise


def _cond(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions", []) if c["type"] == type_), {})


def _wait_reason(rig, name: str, type_: str, status: str, reason: str) -> dict:
    return rig.wait_run(name, lambda s: (_cond(s, type_).get("status"), _cond(s, type_).get("reason")) == (status, reason),
                        timeout=SOON, what=f"{type_}={status} ({reason})")  # fmt: skip


def _put(rig, key: str, body: bytes) -> str:
    rig.s3.client().put_object(Bucket=rig.bucket, Key=key, Body=body)
    return f"s3://{rig.bucket}/{key}"


def test_missing_or_malformed_inputs_fail_the_run_before_any_job(rig):
    prefs = _put(rig, "data/prefs.jsonl", b'{"prompt": "1+1=", "chosen": "2"}\n{"prompt": "2+2="}\n')
    good = _put(rig, "data/prompts.jsonl", b'\n{"prompt": "1+1="}\n' + b'{"prompt": "x"}\n' * 1000)
    cases = {
        "no-prompts": (rig.spec(prompts=f"s3://{rig.bucket}/data/missing.jsonl"), "InputNotFound", "spec.prompts"),
        "bad-prefs": (rig.spec(prompts=good, rewardModel={"model": f"s3://{rig.bucket}/models/rm/",
                                                          "humanPreferences": prefs}),
                      "InvalidInput", "spec.rewardModel.humanPreferences"),
        "no-policy": (rig.spec(policy={"model": f"s3://{rig.bucket}/models/none/"}), "InputNotFound",
                      "spec.policy.model"),
    }  # fmt: skip
    for name, (spec, _, _) in cases.items():
        rig.create_run(name, spec)
    for name, (_, reason, field) in cases.items():
        st = _wait_reason(rig, name, "Failed", "True", reason)
        assert st["phase"] == "Failed" and field in _cond(st, "Failed")["message"], st
        assert _cond(st, "Validated")["status"] == "False"
        assert len(st["message"]) <= 120
        assert rig.jobs(name) == []  # nothing started
        wait_until(lambda n=name: "Failed" in rig.event_reasons(n), timeout=SOON, what=f"{name}: Failed event")
    # only the first record is read: line 1 lacks `rejected` (line 2 would lack `chosen` too)
    assert "prefs.jsonl:1: rejected: Field required" in _cond(rig.status("bad-prefs"), "Failed")["message"]


def test_storage_problems_wait_with_the_fix_and_the_run_goes_on_once_fixed(rig):
    missing = f"t-missing-{uuid.uuid4().hex[:8]}"
    rig.create_run("no-bucket", rig.spec(storage={**rig.spec()["storage"], "uri": f"s3://{missing}/runs"}))
    rig.create_run("no-secret", rig.spec(storage={**rig.spec()["storage"], "secretRef": {"name": "nope"}}))
    rig.core.create_namespaced_secret(rig.ns, {"metadata": {"name": "wrong"}, "stringData": {
        "AWS_ACCESS_KEY_ID": "AKIAWRONG", "AWS_SECRET_ACCESS_KEY": "wrong"}})  # fmt: skip
    rig.create_run("bad-keys", rig.spec(storage={**rig.spec()["storage"], "secretRef": {"name": "wrong"}}))
    for name, words in (("no-bucket", f"bucket '{missing}' does not exist; create it first"),
                        ("no-secret", f"Secret {rig.ns}/nope not found"),
                        ("bad-keys", "access key")):  # versitygw: "No user exists with the provided access key ID"  # fmt: skip
        st = _wait_reason(rig, name, "Ready", "False", "StorageUnavailable")
        assert words in _cond(st, "Ready")["message"], st
        assert st["phase"] == "Pending" and rig.jobs(name) == []
        assert rig.s3.secret_key not in json.dumps(st)
    # the user creates the bucket; any change to the run (or the next retry) lets it go on
    rig.s3.client().create_bucket(Bucket=missing)
    try:
        rig.patch_run("no-bucket", {"metadata": {"annotations": {"example.com/fixed": "bucket"}}})
        rig.wait_phase_running("no-bucket", "generate", timeout=SOON)
        assert _cond(rig.status("no-bucket"), "Validated")["status"] == "True"
    finally:
        rig.custom.delete_namespaced_custom_object("rlp.dev", "v1alpha1", rig.ns, "rlpruns", "no-bucket")
        wait_until(lambda: rig.get_run("no-bucket") is None, timeout=SOON, what="no-bucket deleted")
        s3 = rig.s3.client()
        for obj in s3.list_objects_v2(Bucket=missing).get("Contents", []):
            s3.delete_object(Bucket=missing, Key=obj["Key"])
        s3.delete_bucket(Bucket=missing)


def test_jobs_that_cannot_start_are_reflected_on_the_run(rig):
    from kubernetes import client

    pc = f"missing-pc-{rig.ns}"
    cases = {
        "no-pc": ({"priorityClassName": pc}, "FailedCreate", pc),
        "no-queue": ({"queue": "no-such-queue"}, "WaitingForAdmission", "no-such-queue"),
        "too-big": ({"gpusPerPod": 64}, "Unschedulable", "nvidia.com/gpu"),
    }
    for name, (resources, _, _) in cases.items():
        rig.create_run(name, rig.spec(resources={**rig.spec()["resources"], **resources}))
    for name, (_, reason, words) in cases.items():
        st = _wait_reason(rig, name, "Ready", "False", reason)
        assert st["phase"] == "Running" and words in _cond(st, "Ready")["message"], st
        assert len(st["message"]) <= 120
        wait_until(lambda n=name, r=reason: r in rig.event_reasons(n), timeout=SOON, what=f"{name}: {reason} event")
    # the user creates what was missing: the Job's pods start and the run says so
    scheduling = client.SchedulingV1Api(rig.api)
    scheduling.create_priority_class({"metadata": {"name": pc}, "value": 1000})
    try:
        job = rig.wait_phase_running("no-pc", "generate")
        rig.wait_pod_running(job, timeout=60)  # the Job controller retries pod creation with its own backoff
        st = rig.wait_run("no-pc", lambda s: _cond(s, "Ready").get("reason") == "Progressing", timeout=SOON,
                          what="Ready back to Progressing")  # fmt: skip
        assert st["message"] == f"generate (round 1) attempt 1: Job {job}"
    finally:
        scheduling.delete_priority_class(pc)


def test_a_job_the_apiserver_refuses_is_shown_and_the_run_continues_once_fixed(rig):
    rig.create_run("refused", annotations={"rlp.dev/pod-annotations": json.dumps({"not a valid key!": "x"})},
                   hold=False)  # fmt: skip
    st = _wait_reason(rig, "refused", "Ready", "False", "JobRejected")
    assert "annotations" in _cond(st, "Ready")["message"] and rig.jobs("refused") == []
    # a mid-run patch to a bad quantity is refused at apply, naming the field
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException) as err:
        rig.custom.patch_namespaced_custom_object("rlp.dev", "v1alpha1", rig.ns, "rlpruns", "refused",
                                                  {"spec": {"resources": {"memory": "lots"}}})  # fmt: skip
    assert err.value.status == 422 and "spec.resources.memory" in err.value.body
    rig.patch_run("refused", {"metadata": {"annotations": {"rlp.dev/pod-annotations": json.dumps(
        {"rlp.dev/kwok-hold": "true"})}}})  # fmt: skip
    rig.wait_phase_running("refused", "generate", timeout=SOON)


def test_every_run_is_counted_and_the_operator_stays_healthy(rig):
    rig.create_run("counted")
    runs = rig.custom.list_namespaced_custom_object("rlp.dev", "v1alpha1", rig.ns, "rlpruns")["items"]
    assert runs

    def counted():
        m = rig.operator.metrics()
        total = sum(v for (name, _), v in m.items() if name == "rlp_runs")
        return total == len(runs) and m

    m = wait_until(counted, timeout=SOON, what="rlp_runs counting every run")
    assert ("rlp_runs", (("state", "New"),)) in m  # the state of runs without a status yet
    status, body = rig.operator.get("/readyz")
    assert status == 200 and json.loads(body)["runs"] == len(runs)
    assert rig.operator.get("/healthz")[0] == 200
    assert not [r for r in rig.operator.log_records() if r["level"] == "error"], rig.operator.tail(40)


def test_without_the_operator_deletion_and_uninstall_leave_nothing_running(rig):
    """Runs (one asking to delete its checkpoints, so holding the finalizer) with running pods; the operator
    goes away; `rlp operator uninstall` (the chart's pre-delete hook) still leaves no run, Job or pod."""
    rig.create_run("plain")
    rig.create_run("wipe", annotations={"rlp.dev/delete-checkpoints": "true"})
    for name in ("plain", "wipe"):
        rig.wait_pod_running(rig.wait_phase_running(name, "generate", timeout=SOON), timeout=SOON)
    wait_until(lambda: rig.get_run("wipe")["metadata"].get("finalizers"), timeout=SOON, what="wipe's finalizer")
    assert not rig.get_run("plain")["metadata"].get("finalizers")
    rig.operator.kill()
    # a plain run is deleted at once, operator or not; its Jobs and pods follow (garbage collector)
    rig.custom.delete_namespaced_custom_object("rlp.dev", "v1alpha1", rig.ns, "rlpruns", "plain")
    wait_until(lambda: rig.get_run("plain") is None, timeout=SOON, what="plain deleted without the operator")
    env = {**os.environ, "KUBECONFIG": str(rig.cp.kubeconfig)}
    proc = subprocess.run([sys.executable, "-m", "rlp_operator", "uninstall", "--namespace", rig.ns, "--timeout", "20"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "removed the rlp.dev/cleanup finalizer" in proc.stderr  # no operator finalized `wipe`
    assert rig.custom.list_namespaced_custom_object("rlp.dev", "v1alpha1", rig.ns, "rlpruns")["items"] == []
    assert rig.jobs() == []
    wait_until(lambda: not [p for p in rig.core.list_namespaced_pod(rig.ns).items
                            if p.metadata.labels and "rlp.dev/run" in p.metadata.labels], timeout=SOON,
               what="no phase pod left")  # fmt: skip
    # and the namespace goes away without anyone's help
    rig.core.delete_namespace(rig.ns, propagation_policy="Background")

    def gone() -> bool:
        try:
            rig.core.read_namespace(rig.ns)
            return False
        except Exception as e:  # ApiException 404
            return getattr(e, "status", None) == 404

    wait_until(gone, timeout=60, what=f"namespace {rig.ns} deleted")
