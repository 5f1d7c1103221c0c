"""The operator as a real process against the real test control plane (kwok drives the pods) and versitygw.

The phase pods' work is simulated: pods are created held (`rlp.dev/kwok-hold`, through the run's
`rlp.dev/pod-annotations`), the test writes the phase's output and manifest to S3 and then lets kwok end
the pod with the exit code it wants.
"""

from __future__ import annotations

import json
import time

import pytest
from infra.kube import WAIT, wait_until
from operator_fixtures import RUNS_PATH, ClusterRig, raw

pytestmark = pytest.mark.cluster

FULL = ["generate", "refine", "synthesize", "optimize", "evaluate"]


@pytest.fixture
def rig(control_plane, kube_api, namespace, s3_server, s3_bucket, tmp_path):
    r = ClusterRig(control_plane, kube_api, namespace, s3_server, s3_bucket, tmp_path)
    r.operator.start()
    try:
        yield r
    finally:
        r.operator.kill()  # no state to flush; a graceful stop is tested on its own


def _phase_records(st):
    return {(p["name"], p["round"]): p for p in st.get("phases", [])}


def test_one_round_run_goes_through_every_phase_to_succeeded(rig):
    rig.create_run("happy")
    for phase in FULL:
        rig.run_phase("happy", phase)
    st = rig.wait_run("happy", lambda s: s.get("phase") == "Succeeded", what="Succeeded")

    # status: records, metrics from the manifests, conditions
    recs = _phase_records(st)
    assert [p["name"] for p in st["phases"]] == FULL
    for phase in FULL:
        rec = recs[(phase, 1)]
        assert rec["state"] == "Succeeded" and rec["attempts"] == 1 and rec["failures"] == 0
        assert rec["job"] == f"happy-r1-{phase}-a1"
        assert rec["output"] == f"s3://{rig.bucket}/runs/{rig.ns}/happy/round-1/{phase}/"
        assert rec["metrics"] == {"score": 0.75, "phase": phase}
        assert rec["startedAt"] and rec["finishedAt"]
    cond = {c["type"]: c for c in st["conditions"]}
    assert cond["Succeeded"]["status"] == "True" and cond["Ready"]["status"] == "True"
    assert cond["Running"]["status"] == "False" and cond["Failed"]["status"] == "False"
    assert st["observedGeneration"] == 1 and st["message"] == "all 5 phases succeeded"

    # the Jobs: one per phase, owned by the run, indexed, no retries of their own, GPU requests
    jobs = {j["metadata"]["name"]: j for j in rig.jobs("happy")}
    assert sorted(jobs) == sorted(f"happy-r1-{p}-a1" for p in FULL)
    run_uid = rig.get_run("happy")["metadata"]["uid"]
    for job in jobs.values():
        assert job["metadata"]["ownerReferences"][0]["uid"] == run_uid
        assert job["spec"]["backoffLimit"] == 0 and job["spec"]["completionMode"] == "Indexed"
        pod = job["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
        assert pod["automountServiceAccountToken"] is False
        ended = {c["type"] for c in job["status"]["conditions"] if c["status"] == "True"}
        assert ended & {"SuccessCriteriaMet", "Complete"}, job["status"]

    # Events for every transition, in order
    reasons = rig.event_reasons_through("happy", "Succeeded")
    assert reasons[0] == "Accepted" and reasons[-1] == "Succeeded"
    assert reasons.count("PhaseStarted") == 5 and reasons.count("PhaseSucceeded") == 5
    started = [json.loads(json.dumps(e))["message"].split(" ")[0] for e in rig.events("happy")
               if e["reason"] == "PhaseStarted"]  # fmt: skip
    assert started == FULL

    # printer columns
    status, table = raw(rig.api, "GET", RUNS_PATH.format(ns=rig.ns) + "/happy",
                        accept="application/json;as=Table;v=v1;g=meta.k8s.io")  # fmt: skip
    assert status == 200
    cells = dict(zip([c["name"] for c in table["columnDefinitions"]], table["rows"][0]["cells"], strict=True))
    assert cells["Phase"] == "Succeeded" and cells["Message"] == "all 5 phases succeeded"

    # the spec reached the pods through a ConfigMap; no secret value anywhere the operator writes
    cm = rig.core.read_namespaced_config_map("happy-spec", rig.ns)
    spec_doc = json.loads(cm.data["spec.json"])
    assert spec_doc["spec"]["storage"]["secretRef"] == {"name": rig.SECRET}
    written = json.dumps([cm.data, st, [e["message"] for e in rig.events("happy")]])
    assert rig.s3.secret_key not in written and rig.s3.access_key not in written
    assert rig.s3.secret_key not in rig.operator.log_path.read_text()


def test_retries_backoff_limit_and_metrics(rig):
    """`flaky` fails twice then succeeds; `doomed` always fails (backoffLimit 2). /metrics matches."""
    rig.create_run("flaky", rig.spec(phases={"evaluate": {"gpusPerPod": 0}}))
    rig.create_run("doomed", rig.spec(backoffLimit=2))
    rig.run_phase("flaky", "generate", exit_code=5, attempt=1)
    rig.run_phase("doomed", "generate", exit_code=9, attempt=1)
    rig.run_phase("flaky", "generate", exit_code=5, attempt=2)
    rig.run_phase("doomed", "generate", exit_code=9, attempt=2)
    rig.run_phase("flaky", "generate", attempt=3)
    for phase in FULL[1:]:
        rig.run_phase("flaky", phase)
    st = rig.wait_run("flaky", lambda s: s.get("phase") == "Succeeded", what="flaky Succeeded")
    gen = _phase_records(st)[("generate", 1)]
    assert (gen["attempts"], gen["failures"], gen["state"]) == (3, 2, "Succeeded")
    assert [n for n in rig.job_names("flaky") if "generate" in n] == [f"flaky-r1-generate-a{i}" for i in (1, 2, 3)]
    assert rig.event_reasons_through("flaky", "Succeeded").count("AttemptFailed") == 2

    st = rig.wait_run("doomed", lambda s: s.get("phase") == "Failed", what="doomed Failed")
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"
    assert "generate (round 1)" in failed["message"] and "exited with code 9" in failed["message"]
    assert "2 of backoffLimit 2" in failed["message"] and len(st["message"]) <= 120
    gen = _phase_records(st)[("generate", 1)]
    assert (gen["attempts"], gen["failures"], gen["state"]) == (2, 2, "Failed")
    assert rig.job_names("doomed") == ["doomed-r1-generate-a1", "doomed-r1-generate-a2"]
    time.sleep(1.0)  # well past the backoff: no third attempt
    assert rig.job_names("doomed") == ["doomed-r1-generate-a1", "doomed-r1-generate-a2"]
    assert rig.event_reasons_through("doomed", "Failed")[-2:] == ["PhaseFailed", "Failed"]

    m = rig.operator.metrics()

    def v(name, **labels):
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    assert v("rlp_phase_retries_total", phase="generate") == 3  # flaky: 2, doomed: 1
    assert v("rlp_phase_transitions_total", phase="generate", state="Running") == 5
    assert v("rlp_phase_transitions_total", phase="generate", state="Failed") == 1
    assert v("rlp_phase_transitions_total", phase="generate", state="Succeeded") == 1
    assert v("rlp_phase_transitions_total", phase="generate", state="Pending") == 2 + 3  # planned 2, retries 3
    for phase in FULL[1:]:
        assert v("rlp_phase_transitions_total", phase=phase, state="Succeeded") == 1
        assert v("rlp_phase_transitions_total", phase=phase, state="Running") == 1
    assert v("rlp_phase_duration_seconds_count", phase="generate", result="failed") == 4
    assert v("rlp_phase_duration_seconds_count", phase="generate", result="succeeded") == 1
    assert v("rlp_runs", state="Succeeded") == 1 and v("rlp_runs", state="Failed") == 1
    assert v("rlp_run_info", namespace=rig.ns, run="doomed", state="Failed", current_phase="generate", round="1") == 1
    assert v("rlp_reconcile_errors_total", handler="reconcile") == 0
    assert any(name == "process_resident_memory_bytes" for name, _ in m)
    assert rig.operator.get("/healthz")[0] == 200 and rig.operator.get("/readyz")[0] == 200
    assert rig.operator.stop() == 0  # SIGTERM: a clean exit
    # structured logs: one JSON object per line, with the run named
    records = rig.operator.log_records()
    assert any(r.get("event") == "PhaseFailed" and r.get("run") == "doomed" for r in records)


def test_operator_killed_in_every_phase_neither_duplicates_nor_reruns(rig):
    rig.create_run("crash")
    uids = {}
    for i, phase in enumerate(FULL):
        job = rig.wait_phase_running("crash", phase)
        pod = rig.wait_pod_running(job)
        uids[job] = rig.batch.read_namespaced_job(job, rig.ns).metadata.uid
        rig.operator.kill()
        if i % 2 == 0:
            # the phase finishes while the operator is down
            rig.write_manifest("crash", phase)
            rig.finish_pod(pod)
            rig.operator.start()
        else:
            # the operator comes back while the phase still runs (it has picked the run up in that phase), then
            # dies again right as it ends
            rig.operator.start()
            seen = {("run", "crash"), ("current_phase", phase)}
            wait_until(lambda: any(n == "rlp_run_info" and seen <= set(labels) for n, labels in rig.operator.metrics()),
                       what=f"the restarted operator to pick up crash in {phase}")  # fmt: skip
            rig.write_manifest("crash", phase)
            rig.finish_pod(pod)
            rig.operator.kill()
            rig.operator.start()
    st = rig.wait_run("crash", lambda s: s.get("phase") == "Succeeded", what="Succeeded after kills")
    assert rig.operator.starts == 1 + 5 + 2
    for rec in st["phases"]:
        assert rec["attempts"] == 1 and rec["failures"] == 0, rec
    jobs = rig.jobs("crash")
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(f"crash-r1-{p}-a1" for p in FULL)
    for j in jobs:  # the same Job objects all along: never deleted and created again
        assert j["metadata"]["uid"] == uids[j["metadata"]["name"]]
        assert len(rig.pods_of(j["metadata"]["name"])) == 1
    # never announced twice (an Event queued when SIGKILL hits may be lost: Events are best effort)
    assert rig.event_reasons("crash").count("PhaseStarted") <= 5


def test_suspend_deletes_workloads_and_resume_continues_from_the_last_complete_phase(rig):
    rig.create_run("pause")
    rig.run_phase("pause", "generate")
    job = rig.wait_phase_running("pause", "refine")
    rig.wait_pod_running(job)
    rig.patch_run("pause", {"spec": {"suspend": True}})
    st = rig.wait_run("pause", lambda s: s.get("phase") == "Suspended", what="Suspended")
    assert next(c for c in st["conditions"] if c["type"] == "Suspended")["status"] == "True"
    deadline = time.monotonic() + WAIT
    while (job in rig.job_names("pause") or rig.pods_of(job)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job not in rig.job_names("pause") and not rig.pods_of(job)
    # A spec change makes the operator reconcile the suspended run once more, now that its Job is gone; once it
    # has recorded the new generation, whatever that step would start exists (Jobs come before the status).
    generation = rig.patch_run("pause", {"spec": {"backoffLimit": 4}})["metadata"]["generation"]
    rig.wait_run("pause", lambda s: s.get("observedGeneration") == generation, what="the new generation observed")
    assert rig.job_names("pause") == ["pause-r1-generate-a1"]  # nothing new while suspended
    refine = _phase_records(rig.status("pause"))[("refine", 1)]
    assert refine["state"] == "Pending" and refine["reason"] == "Suspended" and refine["failures"] == 0

    rig.patch_run("pause", {"spec": {"suspend": False}})
    assert rig.run_phase("pause", "refine", attempt=2) == "pause-r1-refine-a2"
    for phase in FULL[2:]:
        rig.run_phase("pause", phase)
    st = rig.wait_run("pause", lambda s: s.get("phase") == "Succeeded", what="Succeeded")
    assert _phase_records(st)[("generate", 1)]["attempts"] == 1  # not redone
    reasons = rig.event_reasons_through("pause", "Succeeded")
    assert reasons.index("Suspended") < reasons.index("Resumed")


def test_delete_cleans_up_workloads_and_keeps_checkpoints_unless_asked(rig):
    rig.create_run("keep")
    rig.create_run("wipe", annotations={"rlp.dev/delete-checkpoints": "true"})
    for run in ("keep", "wipe"):
        rig.run_phase(run, "generate")
        rig.wait_pod_running(rig.wait_phase_running(run, "refine"))
    for run in ("keep", "wipe"):
        rig.custom.delete_namespaced_custom_object("rlp.dev", "v1alpha1", rig.ns, "rlpruns", run)
    deadline = time.monotonic() + WAIT
    while (rig.get_run("keep") or rig.get_run("wipe")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rig.get_run("keep") is None and rig.get_run("wipe") is None
    # `keep` has no finalizer: the garbage collector deletes what it owns (it may take its next discovery,
    # about 30 s, to learn of a just-installed CRD); `wipe` was cleaned up by the operator
    deadline = time.monotonic() + 90
    while (rig.jobs() or rig.core.list_namespaced_config_map(rig.ns, label_selector="rlp.dev/run").items) \
            and time.monotonic() < deadline:  # fmt: skip
        time.sleep(0.1)
    assert rig.jobs("keep") == [] and rig.jobs("wipe") == []
    assert rig.core.list_namespaced_config_map(rig.ns, label_selector="rlp.dev/run").items == []
    deadline = time.monotonic() + WAIT
    while any(rig.pods_of(f"{r}-r1-refine-a1") for r in ("keep", "wipe")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not rig.pods_of("keep-r1-refine-a1")
    assert f"runs/{rig.ns}/keep/round-1/generate/_MANIFEST.json" in rig.s3_keys()
    assert rig.s3_keys(f"runs/{rig.ns}/wipe/") == []


def test_complete_outputs_are_reused_and_ttl_deletes_the_finished_run(rig):
    for phase in FULL:
        rig.write_manifest("reuse", phase)
    rig.create_run("reuse", rig.spec(ttlSecondsAfterFinished=1))
    deadline = time.monotonic() + WAIT
    while rig.get_run("reuse") is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rig.get_run("reuse") is None, rig.status("reuse")
    assert rig.jobs("reuse") == []  # every phase was already complete: no Job at all
    # The Succeeded status lasts only the 1 s TTL, too short to poll for on a loaded machine; the run's
    # events outlive it and are posted in order, so they show it succeeded before it expired.
    # events are posted in the background: wait for both, then check their order
    def both_posted():
        reasons = rig.event_reasons("reuse")
        return reasons if {"Succeeded", "Expired"} <= set(reasons) else None

    reasons = wait_until(both_posted, what="the run's Succeeded and Expired events")
    assert reasons.index("Succeeded") < reasons.index("Expired"), reasons


def test_operator_works_with_exactly_its_rbac(control_plane, kube_api, namespace, s3_server, s3_bucket, tmp_path):
    """operator/rbac.yaml is enough: a run (with a failed attempt), suspend, delete, all without a 403."""
    from pathlib import Path

    import yaml
    from kubernetes import client

    from operator_fixtures import OperatorProcess

    rbac = client.RbacAuthorizationV1Api(kube_api)
    role = yaml.safe_load((Path(__file__).resolve().parents[1] / "operator" / "rbac.yaml").read_text())
    role["metadata"]["name"] = f"rlp-operator-{namespace}"
    rbac.create_cluster_role(role)
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "rlp-operator"}})
    rbac.create_cluster_role_binding({
        "metadata": {"name": f"rlp-operator-{namespace}"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]},
        "subjects": [{"kind": "ServiceAccount", "name": "rlp-operator", "namespace": namespace}],
    })  # fmt: skip
    try:
        status, tr = raw(kube_api, "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/rlp-operator/token",
                         {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                          "spec": {"expirationSeconds": 3600}})  # fmt: skip
        assert status == 201, tr
        cfg = json.loads(Path(control_plane.kubeconfig).read_text())
        cfg["users"] = [{"name": "admin", "user": {"token": tr["status"]["token"]}}]
        kubeconfig = tmp_path / "operator-kubeconfig"
        kubeconfig.write_text(json.dumps(cfg))

        r = ClusterRig(control_plane, kube_api, namespace, s3_server, s3_bucket, tmp_path)
        r.operator = OperatorProcess(kubeconfig, namespaces=[namespace], log_path=tmp_path / "op.log",
                                     backoff_base=0.2)  # fmt: skip
        r.operator.start()
        try:
            spec = r.spec(rewardLearning={"strategy": "none"}, phases={"optimize": {"nodes": 2}})
            r.create_run("least", spec)
            r.run_phase("least", "generate", exit_code=2, attempt=1)
            r.run_phase("least", "generate", attempt=2)
            job = r.wait_phase_running("least", "optimize")
            assert r.core.read_namespaced_service(job, namespace).spec.cluster_ip == "None"
            r.patch_run("least", {"spec": {"suspend": True}})
            r.wait_run("least", lambda s: s.get("phase") == "Suspended")
            r.patch_run("least", {"spec": {"suspend": False}})
            job = r.wait_phase_running("least", "optimize", attempt=2)
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:  # both pods of the 2-node phase run
                pods = [p for p in r.pods_of(job) if (p.get("status") or {}).get("phase") == "Running"]
                if len(pods) == 2:
                    break
                time.sleep(0.05)
            assert len(pods) == 2, r.pods_of(job)
            env = {e["name"]: e.get("value") for e in pods[0]["spec"]["containers"][0]["env"]}
            assert env["MASTER_ADDR"] == f"{job}-0.{job}" and env["NNODES"] == "2"
            r.write_manifest("least", "optimize")
            for pod in pods:
                r.finish_pod(pod["metadata"]["name"])
            r.run_phase("least", "evaluate")
            r.wait_run("least", lambda s: s.get("phase") == "Succeeded")
            r.custom.delete_namespaced_custom_object("rlp.dev", "v1alpha1", namespace, "rlpruns", "least")
            deadline = time.monotonic() + WAIT
            while r.get_run("least") is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert r.get_run("least") is None
            m = r.operator.metrics()
            assert m.get(("rlp_reconcile_errors_total", (("handler", "reconcile"),)), 0) == 0
            assert "forbidden" not in r.operator.log_path.read_text().lower(), r.operator.tail(40)
            assert not [x for x in r.operator.log_records() if x["level"] == "error"], r.operator.tail(40)
        finally:
            r.operator.kill()
    finally:
        rbac.delete_cluster_role_binding(f"rlp-operator-{namespace}")
        rbac.delete_cluster_role(role["metadata"]["name"])
