"""The operator's state machine and workload rendering, against an in-memory apiserver (no cluster)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pytest
from operator_fixtures import FakeKube

from rlp_core.manifest import Manifest, ManifestFile, phase_prefix, write_manifest
from rlp_core.spec import RLPRun
from rlp_core.store import Store
from rlp_operator import workload as wl
from rlp_operator.jobs import job_outcome
from rlp_operator.kube import CONFIGMAPS, JOBS, PODS, RUNS, SERVICES, KubeError
from rlp_operator.metrics import OperatorMetrics
from rlp_operator.reconciler import Reconciler
from rlp_operator.settings import Settings
from rlp_operator.status import RLPRunStatus

FULL = ["generate", "refine", "synthesize", "optimize", "evaluate"]


class Clock:
    def __init__(self) -> None:
        self.t = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += dt.timedelta(seconds=seconds)


class Events:
    def __init__(self) -> None:
        self.posted: list[tuple[str, str, str]] = []

    def post(self, body, type_, reason, message) -> None:
        self.posted.append((type_, reason, message))

    def reasons(self) -> list[str]:
        return [r for _, r, _ in self.posted]


def base_spec(tmp_path, **overrides) -> dict:
    spec = {
        "policy": {"model": f"file://{tmp_path}/models/sft/"},
        "rewardModel": {"model": f"file://{tmp_path}/models/rm/"},
        "rewardLearning": {"strategy": "rlp"},
        "storage": {"uri": f"file://{tmp_path}/store"},
        "backoffLimit": 3,
    }
    spec.update(overrides)
    return spec


class Harness:
    def __init__(self, tmp_path, spec: dict | None = None, name: str = "demo", ns: str = "team", annotations=None):
        self.tmp_path = tmp_path
        for model in ("sft", "rm"):  # what the preflight looks for in base_spec's model directories
            (tmp_path / "models" / model).mkdir(parents=True, exist_ok=True)
            (tmp_path / "models" / model / "config.json").write_text("{}")
        self.clock = Clock()
        self.kube = FakeKube(self.clock)
        self.metrics = OperatorMetrics(process=False)
        self.events = Events()
        self.ns, self.name = ns, name
        self.reconciler = self.new_reconciler()
        body = {
            "apiVersion": "rlp.dev/v1alpha1",
            "kind": "RLPRun",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations or {}},
            "spec": spec if spec is not None else base_spec(tmp_path),
        }
        self.kube.put(RUNS, ns, body)

    def new_reconciler(self) -> Reconciler:
        """A fresh reconciler (what a restarted operator has): shares only the cluster and the store."""
        return Reconciler(
            self.kube,  # type: ignore[arg-type]
            metrics=self.metrics,
            events=self.events,  # type: ignore[arg-type]
            settings=Settings(backoff_base=10, backoff_max=60),
            clock=self.clock,
        )

    def reconcile(self):
        return self.reconciler.reconcile(self.ns, self.name)

    def body(self) -> dict:
        return self.kube.get(RUNS, self.ns, self.name)

    def status(self) -> RLPRunStatus:
        return RLPRunStatus.from_body(self.body())

    def record(self, phase: str, round_: int = 1):
        return next(r for r in self.status().phases if r.name == phase and r.round == round_)

    def jobs(self) -> list[str]:
        return [j["metadata"]["name"] for j in self.kube.all(JOBS, self.ns)]

    def store(self) -> Store:
        return Store.from_uri(f"file://{self.tmp_path}/store")

    def write_manifest(self, phase: str, round_: int = 1, metrics: dict | None = None) -> None:
        s = self.store().child(phase_prefix(self.ns, self.name, round_, phase))
        data = f"{phase} output".encode()
        s.put_bytes("out.txt", data)
        files = [ManifestFile(path="out.txt", size=len(data), sha256=hashlib.sha256(data).hexdigest())]
        write_manifest(
            s,
            Manifest(phase=phase, round=round_, files=files, metrics=metrics or {"loss": 0.5},
                     spec_hash="x", code_version="test"),  # fmt: skip
        )

    def finish_job(self, name: str, ok: bool = True, exit_code: int = 3) -> None:
        job = self.kube.objects[(JOBS, self.ns, name)]
        now = self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        cond = {"type": "Complete" if ok else "Failed", "status": "True", "lastTransitionTime": now}
        if not ok:
            cond["reason"] = "BackoffLimitExceeded"
            cond["message"] = "Job has reached the specified backoff limit"
            self.kube.put(
                PODS,
                self.ns,
                {
                    "metadata": {"name": f"{name}-0-abcde", "labels": {"batch.kubernetes.io/job-name": name}},
                    "status": {
                        "phase": "Failed",
                        "containerStatuses": [
                            {"name": "phase", "state": {"terminated": {"exitCode": exit_code, "reason": "Error",
                                                                       "message": "CUDA out of memory"}}}  # fmt: skip
                        ],
                    },
                },
            )
        job["status"] = {"conditions": [cond], **({"completionTime": now} if ok else {})}

    def complete_phase(self, phase: str, round_: int = 1) -> None:
        rec = self.record(phase, round_)
        assert rec.state == "Running", rec
        self.clock.advance(5)
        self.write_manifest(phase, round_)
        self.finish_job(rec.job)
        self.reconcile()

    def metric(self, name: str, **labels) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


# ---- naming and rendering ------------------------------------------------------------------------


def test_job_names_are_deterministic_short_and_dns_safe():
    assert wl.job_name("demo", 1, "generate", 1) == "demo-r1-generate-a1"
    long_run = "a" * 50
    n1 = wl.job_name(long_run, 12, "synthesize", 7)
    assert n1 == wl.job_name(long_run, 12, "synthesize", 7)
    assert len(n1) <= wl.MAX_JOB_NAME and n1.endswith("-r12-synthesize-a7")
    assert n1 != wl.job_name("a" * 49 + "b", 12, "synthesize", 7)
    assert len(f"{n1}-1023") <= 63  # indexed pod hostnames
    assert wl.service_name("1run-r1-optimize-a1")[0].isalpha()
    assert wl.service_name("run-r1-optimize-a1") == "run-r1-optimize-a1"


def _run(tmp_path, **spec) -> RLPRun:
    return RLPRun.model_validate(
        {"metadata": {"name": "demo", "namespace": "team"}, "spec": base_spec(tmp_path, **spec)}
    )


OWNER = {"apiVersion": "rlp.dev/v1alpha1", "kind": "RLPRun", "name": "demo", "uid": "u1", "controller": True}


def test_render_job_single_pod(tmp_path):
    run = _run(
        tmp_path,
        storage={"uri": "s3://bucket/p", "endpoint": "http://s3:7070", "secretRef": {"name": "s3-creds"}},
        resources={"gpusPerPod": 2, "nodeSelector": {"pool": "a100"}, "priorityClassName": "high",
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   "serviceAccountName": "trainer"},  # fmt: skip
        phases={"evaluate": {"gpusPerPod": 0, "activeDeadlineSeconds": 600}},
    )
    job, svc = wl.render_job(run, 1, "optimize", 2, OWNER, {"sidecar.istio.io/inject": "false"})
    assert svc is None
    assert job["metadata"]["name"] == "demo-r1-optimize-a2"
    assert job["metadata"]["ownerReferences"] == [OWNER]
    assert job["metadata"]["labels"][wl.LABEL_RUN] == "demo"
    spec = job["spec"]
    assert spec["backoffLimit"] == 0 and spec["completions"] == 1 and spec["completionMode"] == "Indexed"
    assert "suspend" not in spec
    pod = spec["template"]["spec"]
    assert spec["template"]["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["nodeSelector"] == {"pool": "a100"} and pod["priorityClassName"] == "high"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["serviceAccountName"] == "trainer"
    (c,) = pod["containers"]
    assert c["command"] == ["rlp", "phase", "optimize", "--spec", "/etc/rlp/spec.json", "--round", "1"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 2}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/etc/rlp", "/tmp", wl.CACHE_DIR} <= mounts
    env = {e["name"]: e for e in c["env"]}
    assert env["RLP_RUN_NAME"]["value"] == "demo" and env["RLP_NAMESPACE"]["value"] == "team"
    assert env["RLP_METRICS_PORT"]["value"] == "9090" and env["RLP_S3_ENDPOINT"]["value"] == "http://s3:7070"
    for key in wl.SECRET_KEYS:
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": key}}
    assert "MASTER_ADDR" not in env
    # per-phase overrides
    ev, _ = wl.render_job(run, 1, "evaluate", 1, OWNER)
    assert "limits" not in ev["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert ev["spec"]["activeDeadlineSeconds"] == 600


def test_render_job_multi_node_and_kueue(tmp_path):
    run = _run(tmp_path, resources={"nodes": 3, "gpusPerPod": 4, "queue": "team-a"})
    job, svc = wl.render_job(run, 2, "optimize", 1, OWNER)
    name = job["metadata"]["name"]
    assert job["spec"]["completions"] == 3 and job["spec"]["parallelism"] == 3
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][wl.KUEUE_QUEUE_LABEL] == "team-a"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MASTER_ADDR"]["value"] == f"{name}-0.{svc['metadata']['name']}"
    assert env["MASTER_PORT"]["value"] == "29500"
    assert env["NNODES"]["value"] == "3" and env["WORLD_SIZE"]["value"] == "12"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]


def test_hf_token_and_endpoint_reach_the_pod_from_spec_hub(tmp_path):
    run = _run(tmp_path, hub={"endpoint": "http://hub-mirror:8080", "secretRef": {"name": "hf", "key": "token"}})
    job, _ = wl.render_job(run, 1, "optimize", 1, OWNER)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_ENDPOINT"]["value"] == "http://hub-mirror:8080"
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    plain, _ = wl.render_job(_run(tmp_path), 1, "optimize", 1, OWNER)
    assert not {"HF_TOKEN", "HF_ENDPOINT"} & {e["name"] for e in plain["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_reward_endpoint_token_reaches_the_pod_only_by_reference(tmp_path):
    reward = {"uri": "https://rewards.team.svc/score", "tokenSecretRef": {"name": "reward-token"}}
    run = _run(tmp_path, optimization={"reward": "function", "rewardFunction": reward})
    job, _ = wl.render_job(run, 1, "optimize", 1, OWNER)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RLP_REWARD_TOKEN"] == {"name": "RLP_REWARD_TOKEN",
                                       "valueFrom": {"secretKeyRef": {"name": "reward-token", "key": "token"}}}


def test_configmap_holds_the_spec_without_secret_values(tmp_path):
    run = _run(tmp_path, storage={"uri": "s3://bkt/p", "secretRef": {"name": "creds"}})
    cm = wl.render_configmap(run, OWNER)
    doc = json.loads(cm["data"]["spec.json"])
    assert doc["kind"] == "RLPRun" and doc["metadata"]["name"] == "demo"
    assert doc["spec"]["storage"]["secretRef"] == {"name": "creds"}
    assert RLPRun.model_validate(doc).spec == run.spec


def test_pod_annotations_must_be_a_json_object_of_strings():
    assert wl.pod_annotations({"metadata": {"annotations": {wl.ANNOTATION_POD_ANNOTATIONS: '{"a": "b"}'}}}) == {
        "a": "b"
    }
    for bad in ("[1]", "{", '{"a": 1}'):
        with pytest.raises(ValueError, match=wl.ANNOTATION_POD_ANNOTATIONS):
            wl.pod_annotations({"metadata": {"annotations": {wl.ANNOTATION_POD_ANNOTATIONS: bad}}})


def test_job_outcome():
    assert job_outcome({"status": {"active": 1}})[0] == "active"
    assert job_outcome({"status": {"conditions": [{"type": "Complete", "status": "True"}]}})[0] == "succeeded"
    failed = {"status": {"conditions": [{"type": "FailureTarget", "status": "True"},
                                        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}}  # fmt: skip
    assert job_outcome(failed)[:2] == ("failed", "DeadlineExceeded")
    assert job_outcome({"status": {"conditions": [{"type": "Complete", "status": "False"}]}})[0] == "active"
    # success as soon as the criteria are met; failure only once the pods are gone (Failed)
    assert job_outcome({"status": {"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]}})[0] == "succeeded"
    assert job_outcome({"status": {"conditions": [{"type": "FailureTarget", "status": "True"}]}})[0] == "active"


# ---- the state machine ---------------------------------------------------------------------------


def test_happy_path_through_all_phases(tmp_path):
    h = Harness(tmp_path)
    assert h.reconcile() == h.reconciler.settings.workload_check  # look again: is the new Job starting?
    body = h.body()
    assert not body["metadata"].get("finalizers")  # the garbage collector deletes its workloads (owner references)
    st = h.status()
    assert [(r.name, r.round) for r in st.phases] == [(p, 1) for p in FULL]
    assert st.phase == "Running" and st.current_phase == "generate" and st.round == 1
    assert h.jobs() == ["demo-r1-generate-a1"]
    assert h.kube.get(CONFIGMAPS, "team", "demo-spec") is not None
    cond = {c.type: c for c in st.conditions}
    assert cond["Running"].status == "True" and cond["Ready"].status == "Unknown"
    for phase in FULL:
        h.complete_phase(phase)
    st = h.status()
    assert st.phase == "Succeeded" and st.finished_at and st.message == "all 5 phases succeeded"
    assert [r.state for r in st.phases] == ["Succeeded"] * 5
    assert all(r.attempts == 1 and r.failures == 0 for r in st.phases)
    assert st.phases[0].metrics == {"loss": 0.5}
    assert st.phases[0].output.endswith("/team/demo/round-1/generate/")
    cond = {c.type: c for c in st.conditions}
    assert (cond["Succeeded"].status, cond["Ready"].status, cond["Running"].status) == ("True", "True", "False")
    assert st.observed_generation == 1
    assert h.jobs() == [f"demo-r1-{p}-a1" for p in sorted(FULL)]
    assert all(n == 1 for n in h.kube.creates.values())
    reasons = h.events.reasons()
    assert reasons[:4] == ["Accepted", "Validated", "PhaseStarted", "Started"]
    assert reasons.count("PhaseStarted") == 5 and reasons.count("PhaseSucceeded") == 5
    assert reasons[-1] == "Succeeded"
    for phase in FULL:
        assert h.metric("rlp_phase_transitions_total", phase=phase, state="Running") == 1
        assert h.metric("rlp_phase_transitions_total", phase=phase, state="Succeeded") == 1
        assert h.metric("rlp_phase_duration_seconds_count", phase=phase, result="succeeded") == 1
    assert h.metric("rlp_runs", state="Succeeded") == 1
    # Nothing more to do: another reconcile writes nothing.
    writes = [c for c in h.kube.calls if c[0].startswith("patch")]
    h.reconcile()
    assert [c for c in h.kube.calls if c[0].startswith("patch")] == writes


def test_skipped_phases_are_recorded_without_a_job(tmp_path):
    h = Harness(tmp_path, base_spec(tmp_path, rewardLearning={"strategy": "rlp-spg"}, policy={}, rewardModel={}, rounds=2))
    h.reconcile()
    st = h.status()
    plan = [(r.name, r.round, r.state) for r in st.phases]
    assert plan[:2] == [("sft", 0, "Running"), ("reward", 0, "Pending")]
    assert ("refine", 1, "Skipped") in plan and ("refine", 2, "Skipped") in plan
    assert plan[-1] == ("evaluate", 2, "Pending")
    assert h.events.reasons().count("PhaseSkipped") == 2
    assert h.metric("rlp_phase_transitions_total", phase="refine", state="Skipped") == 2
    h.complete_phase("sft", 0)
    h.complete_phase("reward", 0)
    h.complete_phase("generate", 1)
    assert h.record("synthesize").state == "Running"  # refine skipped, no Job
    assert not any("refine" in j for j in h.jobs())


def test_retry_with_backoff_then_success(tmp_path):
    h = Harness(tmp_path)
    h.reconcile()
    h.complete_phase("generate")
    for attempt, wait in ((1, 10), (2, 20)):
        rec = h.record("refine")
        assert rec.job == f"demo-r1-refine-a{attempt}"
        h.finish_job(rec.job, ok=False, exit_code=3)
        requeue = h.reconcile()
        rec = h.record("refine")
        assert rec.state == "Pending" and rec.failures == attempt and rec.reason == "BackoffLimitExceeded"
        assert "exited with code 3" in rec.message and "CUDA out of memory" in rec.message
        assert requeue == pytest.approx(wait)
        h.clock.advance(wait - 1)
        assert h.reconcile() == pytest.approx(1)
        assert h.record("refine").state == "Pending"  # still backing off
        h.clock.advance(1)
        h.reconcile()
    rec = h.record("refine")
    assert rec.state == "Running" and rec.attempts == 3 and rec.job == "demo-r1-refine-a3"
    h.complete_phase("refine")
    rec = h.record("refine")
    assert rec.state == "Succeeded" and rec.attempts == 3 and rec.failures == 2
    assert h.metric("rlp_phase_retries_total", phase="refine") == 2
    assert h.metric("rlp_phase_duration_seconds_count", phase="refine", result="failed") == 2
    assert h.events.reasons().count("AttemptFailed") == 2 and h.events.reasons().count("PhaseRetried") == 2
    for phase in FULL[2:]:
        h.complete_phase(phase)
    assert h.status().phase == "Succeeded"


def test_phase_that_always_fails_fails_the_run_after_backoff_limit_attempts(tmp_path):
    h = Harness(tmp_path, base_spec(tmp_path, backoffLimit=2))
    h.reconcile()
    for _ in range(2):
        rec = h.record("generate")
        h.finish_job(rec.job, ok=False, exit_code=7)
        h.reconcile()
        h.clock.advance(60)
        h.reconcile()
    st = h.status()
    rec = st.phases[0]
    assert rec.state == "Failed" and rec.attempts == 2 and rec.failures == 2
    assert st.phase == "Failed" and st.current_phase == "generate"
    failed = st.condition("Failed").message  # the full text; status.message is the short MESSAGE column
    assert "exited with code 7" in failed and "2 of backoffLimit 2" in failed and "CUDA out of memory" in failed
    assert len(st.message) <= 120 and st.message.startswith("generate (round 1): Job demo-r1-generate-a2 failed")
    failed = st.condition("Failed")
    assert failed.status == "True" and failed.reason == "BackoffLimitExceeded"
    assert h.jobs() == ["demo-r1-generate-a1", "demo-r1-generate-a2"]
    assert h.events.reasons()[-2:] == ["PhaseFailed", "Failed"]
    assert h.reconcile() is None and h.jobs() == ["demo-r1-generate-a1", "demo-r1-generate-a2"]


def test_success_without_manifest_is_a_failed_attempt(tmp_path):
    h = Harness(tmp_path)
    h.reconcile()
    h.finish_job("demo-r1-generate-a1", ok=True)
    h.reconcile()
    rec = h.record("generate")
    assert rec.state == "Pending" and rec.reason == "ManifestMissing" and "_MANIFEST.json" in rec.message


def test_crash_between_job_create_and_status_write(tmp_path):
    h = Harness(tmp_path)
    h.reconcile()
    rec = h.record("generate")
    h.write_manifest("generate")
    h.finish_job(rec.job)
    # Next reconcile: generate succeeds, refine's Job is created, then the status write fails (crash).
    h.kube.fail_next[("patch/status", RUNS)] = OSError("operator killed")
    with pytest.raises(OSError):
        h.reconcile()
    assert "demo-r1-refine-a1" in h.jobs()
    assert h.record("generate").state == "Running"  # status never stored
    # A new operator process: no duplicate Job, refine adopted, generate not rerun.
    h.reconciler = h.new_reconciler()
    h.reconcile()
    assert h.kube.creates["demo-r1-refine-a1"] == 1
    assert h.kube.creates["demo-r1-generate-a1"] == 1
    assert h.record("generate").state == "Succeeded"
    rec = h.record("refine")
    assert rec.state == "Running" and rec.attempts == 1 and "adopted" in rec.message


def test_restart_finds_complete_phases_in_the_store(tmp_path):
    h = Harness(tmp_path)
    for phase in ("generate", "refine"):
        h.write_manifest(phase)
    h.reconcile()
    st = h.status()
    assert [r.state for r in st.phases[:3]] == ["Succeeded", "Succeeded", "Running"]
    assert st.phases[0].reason == "AlreadyComplete"
    assert h.jobs() == ["demo-r1-synthesize-a1"]


def test_suspend_deletes_the_running_job_and_resume_continues(tmp_path):
    h = Harness(tmp_path)
    h.reconcile()
    h.complete_phase("generate")
    assert h.jobs()[-1] == "demo-r1-refine-a1"
    h.kube.merge_patch(RUNS, "team", "demo", {"spec": {"suspend": True}})
    h.reconcile()
    st = h.status()
    assert st.phase == "Suspended" and st.condition("Suspended").status == "True"
    assert "demo-r1-refine-a1" not in h.jobs()
    rec = h.record("refine")
    assert rec.state == "Pending" and rec.reason == "Suspended" and rec.failures == 0
    assert h.reconcile() is None and "demo-r1-refine-a2" not in h.jobs()  # stays suspended
    h.kube.merge_patch(RUNS, "team", "demo", {"spec": {"suspend": False}})
    h.reconcile()
    st = h.status()
    assert st.phase == "Running" and st.condition("Suspended").status == "False"
    rec = h.record("refine")
    assert rec.state == "Running" and rec.job == "demo-r1-refine-a2" and rec.failures == 0
    assert h.record("generate").attempts == 1  # complete phases are not redone
    assert {"Suspended", "PhaseInterrupted", "Resumed", "SpecUpdated"} <= set(h.events.reasons())


def test_suspend_status_written_but_job_not_yet_deleted(tmp_path):
    h = Harness(tmp_path)
    h.reconcile()
    h.kube.merge_patch(RUNS, "team", "demo", {"spec": {"suspend": True}})
    h.kube.fail_next[("delete", JOBS)] = OSError("operator killed")  # dies right after the status write
    original = h.kube.delete

    def delete(*a, **kw):
        exc = h.kube.fail_next.pop(("delete", a[0]), None)
        if exc:
            raise exc
        return original(*a, **kw)

    h.kube.delete = delete  # type: ignore[method-assign]
    with pytest.raises(OSError):
        h.reconcile()
    assert h.status().phase == "Suspended" and "demo-r1-generate-a1" in h.jobs()
    h.kube.merge_patch(RUNS, "team", "demo", {"spec": {"suspend": False}})  # resumed before the restart
    h.reconciler = h.new_reconciler()
    h.reconcile()
    # The stale attempt is deleted first; the next attempt starts only once it is gone.
    assert "demo-r1-generate-a1" not in h.jobs() and "demo-r1-generate-a2" not in h.jobs()
    h.reconcile()
    assert h.jobs() == ["demo-r1-generate-a2"]


def test_only_runs_deleting_their_checkpoints_hold_a_finalizer(tmp_path):
    """An operator that is gone cannot hold up `kubectl delete` or a namespace's deletion: a plain run has no
    finalizer (its Jobs, Services and ConfigMap are owned by it, so the garbage collector deletes them), and
    one left by an older operator is removed."""
    h = Harness(tmp_path)
    h.reconcile()
    for kind in (JOBS, CONFIGMAPS):
        for obj in h.kube.all(kind, "team"):
            assert obj["metadata"]["ownerReferences"][0]["uid"] == h.body()["metadata"]["uid"]
    h.kube.merge_patch(RUNS, "team", "demo", {"metadata": {"finalizers": [wl.FINALIZER]}})
    h.reconcile()
    assert not h.body()["metadata"].get("finalizers")
    h.kube.merge_patch(RUNS, "team", "demo", {"metadata": {"annotations": {wl.ANNOTATION_DELETE_CHECKPOINTS: "true"}}})
    h.reconcile()
    assert h.body()["metadata"]["finalizers"] == [wl.FINALIZER]


def test_delete_cleans_up_workloads_and_keeps_checkpoints(tmp_path):
    """A run that still holds the finalizer (an older operator's) is cleaned up by the operator itself."""
    h = Harness(tmp_path)
    h.reconcile()
    h.complete_phase("generate")
    h.kube.merge_patch(RUNS, "team", "demo", {"metadata": {"finalizers": [wl.FINALIZER]}})
    h.kube.delete(RUNS, "team", "demo")
    assert h.body()["metadata"]["deletionTimestamp"]
    h.reconcile()
    assert h.body() is None
    assert h.kube.all(JOBS, "team") == [] and h.kube.all(CONFIGMAPS, "team") == []
    assert h.store().child("team/demo/round-1/generate").exists("_MANIFEST.json")
    assert "CleanedUp" in h.events.reasons()


def test_delete_with_annotation_deletes_checkpoints(tmp_path):
    h = Harness(tmp_path, annotations={wl.ANNOTATION_DELETE_CHECKPOINTS: "true"})
    h.reconcile()
    h.complete_phase("generate")
    h.kube.delete(RUNS, "team", "demo")
    h.reconcile()
    assert h.body() is None
    assert h.store().list("team/demo") == []


def test_ttl_after_finished_deletes_the_run(tmp_path):
    h = Harness(tmp_path, base_spec(tmp_path, ttlSecondsAfterFinished=30))
    h.reconcile()
    for phase in FULL[:-1]:
        h.complete_phase(phase)
    rec = h.record("evaluate")
    h.clock.advance(5)
    h.write_manifest("evaluate")
    h.finish_job(rec.job)
    assert h.reconcile() == pytest.approx(30)
    h.clock.advance(29)
    assert h.reconcile() == pytest.approx(1)
    h.clock.advance(1)
    h.reconcile()
    assert h.body() is None
    assert "Expired" in h.events.reasons()


def test_mutable_spec_change_applies_to_the_next_attempt(tmp_path):
    h = Harness(tmp_path)
    h.reconcile()
    h.kube.merge_patch(RUNS, "team", "demo", {"spec": {"resources": {"image": "rlp-job:2"}}})
    h.complete_phase("generate")
    st = h.status()
    assert st.observed_generation == 2
    refine = h.kube.get(JOBS, "team", "demo-r1-refine-a1")
    assert refine["spec"]["template"]["spec"]["containers"][0]["image"] == "rlp-job:2"
    cm = json.loads(h.kube.get(CONFIGMAPS, "team", "demo-spec")["data"]["spec.json"])
    assert cm["spec"]["resources"]["image"] == "rlp-job:2"
    assert "SpecUpdated" in h.events.reasons()


def test_locked_field_change_fails_the_run(tmp_path):
    h = Harness(tmp_path)
    h.reconcile()
    h.kube.merge_patch(RUNS, "team", "demo", {"spec": {"rounds": 2}})
    h.reconcile()
    st = h.status()
    assert st.phase == "Failed" and st.condition("Failed").reason == "ImmutableFieldChanged"


def test_invalid_spec_fails_with_the_field_named(tmp_path):
    h = Harness(tmp_path, base_spec(tmp_path, optimization={"miniBatchSize": 64, "rolloutBatchSize": 8}))
    h.reconcile()
    st = h.status()
    assert st.phase == "Failed" and st.condition("Failed").reason == "InvalidSpec"
    assert "miniBatchSize" in st.message
    assert h.jobs() == []


def test_metrics_gauges_follow_the_status(tmp_path):
    h = Harness(tmp_path)
    h.reconcile()
    assert h.metric("rlp_runs", state="Running") == 1
    assert h.metric("rlp_run_info", namespace="team", run="demo", state="Running", current_phase="generate",
                    round="1") == 1  # fmt: skip
    start = h.metric("rlp_phase_start_timestamp_seconds", namespace="team", run="demo", phase="generate", round="1")
    assert start == h.clock().timestamp()
    h.complete_phase("generate")
    assert h.metric("rlp_phase_start_timestamp_seconds", namespace="team", run="demo", phase="generate",
                    round="1") == 0  # fmt: skip
    h.kube.delete(RUNS, "team", "demo")
    h.reconcile()
    h.reconcile()
    assert h.metric("rlp_runs", state="Running") == 0


def test_conflicting_status_write_is_retried_not_duplicated(tmp_path):
    h = Harness(tmp_path)
    h.kube.fail_next[("patch/status", RUNS)] = KubeError(409, "Conflict", "modified")
    assert h.reconcile() == pytest.approx(0.05)
    h.reconcile()
    assert h.kube.creates["demo-r1-generate-a1"] == 1
    assert h.record("generate").state == "Running"


def test_multi_node_phase_creates_headless_service(tmp_path):
    h = Harness(tmp_path, base_spec(tmp_path, phases={"generate": {"nodes": 2}}))
    h.reconcile()
    assert [s["metadata"]["name"] for s in h.kube.all(SERVICES, "team")] == ["demo-r1-generate-a1"]


def test_missing_storage_secret_is_reported_on_the_run_and_retried(tmp_path):
    from rlp_operator.kube import SECRETS

    spec = base_spec(tmp_path, storage={"uri": "s3://bucket/p", "endpoint": "http://127.0.0.1:9",
                                        "secretRef": {"name": "nope"}})  # fmt: skip
    h = Harness(tmp_path, spec)
    assert h.reconcile() == pytest.approx(15)
    st = h.status()
    ready = st.condition("Ready")
    assert ready.status == "False" and ready.reason == "StorageUnavailable"
    assert "Secret team/nope not found" in st.message
    assert h.jobs() == [] and h.events.reasons().count("StorageUnavailable") == 1
    h.reconcile()
    assert h.events.reasons().count("StorageUnavailable") == 1  # not repeated while unchanged
    assert h.metric("rlp_reconcile_errors_total", handler="store") == 2
    h.kube.put(SECRETS, "team", {"metadata": {"name": "nope"}, "data": {}})
    h.reconciler = h.new_reconciler()
    h.reconcile()
    assert "lacks key(s) AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in h.status().message


def test_install_wide_job_defaults_fill_only_unset_fields(tmp_path):
    d = wl.JobDefaults.from_env({"RLP_DEFAULT_JOB_IMAGE": "reg/rlp-job:9", "RLP_S3_ENDPOINT": "http://s3:1",
                                 "AWS_DEFAULT_REGION": "eu-1", "RLP_DEFAULT_STORAGE_SECRET": "team-s3"})  # fmt: skip
    run = d.apply(_run(tmp_path, storage={"uri": "s3://bkt/p"}))
    assert run.spec.resources.image == "reg/rlp-job:9"
    assert (run.spec.storage.endpoint, run.spec.storage.region) == ("http://s3:1", "eu-1")
    assert run.spec.storage.secret_ref.name == "team-s3"
    job, _ = wl.render_job(run, 1, "generate", 1, OWNER)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RLP_S3_ENDPOINT"]["value"] == "http://s3:1"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "team-s3"
    own = d.apply(_run(tmp_path, storage={"uri": "s3://bkt/p", "endpoint": "http://mine", "secretRef": {"name": "mine"}},
                       resources={"image": "mine:1"}))  # fmt: skip
    assert (own.spec.storage.endpoint, own.spec.storage.secret_ref.name, own.spec.resources.image) == (
        "http://mine", "mine", "mine:1")  # fmt: skip
    local = d.apply(_run(tmp_path))  # file:// storage: no S3 defaults
    assert local.spec.storage.endpoint is None and local.spec.storage.secret_ref is None


def test_defaults_do_not_count_as_a_spec_change(tmp_path):
    h = Harness(tmp_path, base_spec(tmp_path, storage={"uri": f"file://{tmp_path}/store"}))
    h.reconcile()
    h.reconciler = h.new_reconciler()
    h.reconciler.defaults = wl.JobDefaults(image="other:2")
    h.complete_phase("generate")
    assert h.status().phase == "Running"
    refine = h.kube.get(JOBS, "team", "demo-r1-refine-a1")
    assert refine["spec"]["template"]["spec"]["containers"][0]["image"] == "other:2"


# ---- problems a run must show (issue #13) ---------------------------------------------------------


def test_preflight_fails_the_run_before_any_job_when_an_input_is_missing(tmp_path):
    h = Harness(tmp_path, base_spec(tmp_path, policy={"model": f"file://{tmp_path}/models/nothing/"}))
    (tmp_path / "models" / "nothing").mkdir()
    h.reconcile()
    st = h.status()
    assert st.phase == "Failed" and h.jobs() == []
    failed = st.condition("Failed")
    assert failed.reason == "InputNotFound" and "spec.policy.model" in failed.message
    assert st.condition("Validated").status == "False"
    assert h.events.reasons()[-1] == "Failed"
    # a local data path (admitted by an older CRD) is refused: the pods could not read it
    h2 = Harness(tmp_path, base_spec(tmp_path, prompts=str(tmp_path / "prompts.jsonl")), name="local")
    h2.reconciler.reconcile("team", "local")
    st = RLPRunStatus.from_body(h2.kube.get(RUNS, "team", "local"))
    assert st.condition("Failed").reason == "InvalidInput" and "spec.prompts" in st.condition("Failed").message


def test_preflight_runs_once_and_not_for_runs_that_already_started(tmp_path):
    h = Harness(tmp_path)
    h.reconcile()
    assert h.status().condition("Validated").status == "True"
    (tmp_path / "models" / "sft" / "config.json").unlink()  # gone after the check: not looked for again
    h.complete_phase("generate")
    assert h.status().phase == "Running" and h.events.reasons().count("Validated") == 1


def test_a_rejected_job_is_shown_and_retried_only_when_the_run_changes(tmp_path):
    h = Harness(tmp_path)
    h.kube.fail_next[("create", JOBS)] = KubeError(422, "Invalid", 'Job.batch "x" is invalid: spec.template...')
    assert h.reconcile() is None  # no blind retry: a change to the run reconciles it again
    st = h.status()
    ready = st.condition("Ready")
    assert (ready.status, ready.reason) == ("False", "JobRejected") and "is invalid" in ready.message
    assert st.phase == "Pending" and h.record("generate").state == "Pending" and h.jobs() == []
    assert h.events.reasons().count("JobRejected") == 1
    h.reconcile()  # the same problem again: no second Event
    assert h.events.reasons().count("JobRejected") == 1
    h.kube.merge_patch(RUNS, "team", "demo", {"spec": {"resources": {"memory": "16Gi"}}})
    h.reconcile()
    assert h.jobs() == ["demo-r1-generate-a1"] and h.status().condition("Ready").reason == "Progressing"


def test_a_spec_too_large_for_its_configmap_fails_the_run(tmp_path):
    h = Harness(tmp_path)
    h.kube.fail_next[("create", CONFIGMAPS)] = KubeError(422, "Invalid", "ConfigMap is invalid: []: Too long: must "
                                                         "have at most 1048576 bytes")  # fmt: skip
    h.reconcile()
    st = h.status()
    assert st.phase == "Failed" and st.condition("Failed").reason == "SpecTooLarge" and h.jobs() == []


def test_an_unexpected_error_is_shown_on_the_run_with_its_retry(tmp_path):
    h = Harness(tmp_path)
    h.kube.fail_next[("create", JOBS)] = KubeError(500, "InternalError", "etcdserver: request timed out")
    assert h.reconcile() == 1.0  # settings.error_backoff: 1 s, doubling
    st = h.status()
    ready = st.condition("Ready")
    assert (ready.status, ready.reason) == ("False", "ReconcileError")
    assert "etcdserver: request timed out" in ready.message and "retry 1 in 1s" in ready.message
    assert st.message and len(st.message) <= 120
    h.kube.fail_next[("create", JOBS)] = KubeError(500, "InternalError", "etcdserver: request timed out")
    assert h.reconcile() == 2.0
    h.reconcile()  # the apiserver is back
    assert h.jobs() == ["demo-r1-generate-a1"] and h.status().condition("Ready").reason == "Progressing"


def test_runs_without_status_are_counted_as_new(tmp_path):
    m = OperatorMetrics(process=False)
    m.observe_new_run("team", "fresh", RLPRunStatus())
    m.observe_new_run("team", "old", RLPRunStatus(phase="Running"))
    m.observe_run("team", "old", RLPRunStatus(phase="Succeeded"))
    m.observe_new_run("team", "old", RLPRunStatus(phase="Running"))  # an older view does not win
    assert m.registry.get_sample_value("rlp_runs", {"state": "New"}) == 1
    assert m.registry.get_sample_value("rlp_runs", {"state": "Succeeded"}) == 1
    assert m.registry.get_sample_value("rlp_runs", {"state": "Running"}) == 0


def test_redo_annotation_redoes_a_phase_and_what_reads_it(tmp_path):
    h = Harness(tmp_path)
    h.reconcile()
    for phase in FULL:
        h.complete_phase(phase)
    assert h.status().phase == "Succeeded"
    h.kube.objects[(RUNS, h.ns, h.name)]["metadata"]["annotations"][wl.ANNOTATION_REDO] = "round-1/synthesize"
    h.reconcile()
    st = h.status()
    assert {r.name: r.state for r in st.phases} == {"generate": "Succeeded", "refine": "Succeeded",
                                                    "synthesize": "Running", "optimize": "Pending",
                                                    "evaluate": "Pending"}  # fmt: skip
    assert st.phase == "Running" and st.redo == "round-1/synthesize" and "Redo" in h.events.reasons()
    assert "demo-r1-synthesize-a2" in h.jobs()  # a new attempt, not the finished Job of the first one
    assert not h.store().child(phase_prefix("team", "demo", 1, "optimize")).list()  # its output is gone
    for phase in ("synthesize", "optimize", "evaluate"):
        h.complete_phase(phase)
    assert h.status().phase == "Succeeded"
    h.reconcile()  # the same value is not acted on twice
    assert h.status().phase == "Succeeded"

    h.kube.objects[(RUNS, h.ns, h.name)]["metadata"]["annotations"][wl.ANNOTATION_REDO] = "train"
    h.reconcile()
    assert h.status().phase == "Succeeded" and h.events.posted[-1][1] == "RedoRejected"
    assert "--redo train: no such phase" in h.events.posted[-1][2]
