"""Helpers for the operator's tests.

* `FakeKube`: an in-memory stand-in for `rlp_operator.kube.Kube` with the apiserver semantics the
  reconciler relies on (409 on create of an existing name, resourceVersion preconditions, the status
  subresource, generation bumps on spec changes, finalizers holding a deletion). Unit tests only.
* `OperatorProcess`: the operator as a real subprocess (`python -m rlp_operator`) against the test
  control plane, so it can be SIGKILLed and restarted; plus small helpers for cluster tests.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra._process import free_port
from infra.kube import WAIT, wait_until
from rlp_operator.kube import KubeError

REPO = Path(__file__).resolve().parents[1]


class FakeKube:
    """Objects by (collection template, namespace, name); collections are the kube.py path templates.

    Timestamps come from ``clock``, the reconciler's own (fake) clock: the ages and durations it computes
    from them then do not depend on today's date."""

    def __init__(self, clock: Callable[[], dt.datetime]) -> None:
        self.clock = clock
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._rv = itertools.count(1)
        self.calls: list[tuple[str, str, str]] = []
        self.creates: dict[str, int] = {}
        self.fail_next: dict[tuple[str, str], Exception] = {}  # (verb, collection) -> exception, once

    # -- helpers for tests
    def _maybe_fail(self, verb: str, collection: str) -> None:
        exc = self.fail_next.pop((verb, collection), None)
        if exc is not None:
            raise exc

    def _now(self) -> str:
        return self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")

    def _stamp(self, obj: dict[str, Any]) -> None:
        obj["metadata"]["resourceVersion"] = str(next(self._rv))

    def put(self, collection: str, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create without the create() bookkeeping (test setup)."""
        return self.create(collection, ns, body, _count=False)

    def all(self, collection: str, ns: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (c, n, _), o in sorted(self.objects.items()) if c == collection and n == ns]

    # -- Kube interface
    def get(self, collection: str, ns: str, name: str, sub: str = "") -> dict[str, Any] | None:
        self.calls.append(("get", collection, name))
        self._maybe_fail("get", collection)
        obj = self.objects.get((collection, ns, name))
        return copy.deepcopy(obj) if obj is not None else None

    def create(self, collection: str, ns: str, body: dict[str, Any], _count: bool = True) -> dict[str, Any]:
        self.calls.append(("create", collection, body["metadata"].get("name", "")))
        self._maybe_fail("create", collection)
        body = copy.deepcopy(body)
        meta = body["metadata"]
        if not meta.get("name"):
            meta["name"] = meta.get("generateName", "x-") + uuid.uuid4().hex[:5]
        key = (collection, ns, meta["name"])
        if key in self.objects:
            raise KubeError(409, "AlreadyExists", f"{meta['name']} already exists")
        meta.setdefault("namespace", ns)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = self._now()
        meta.setdefault("generation", 1)
        self._stamp(body)
        self.objects[key] = body
        if _count:
            self.creates[meta["name"]] = self.creates.get(meta["name"], 0) + 1
        return copy.deepcopy(body)

    def _check_rv(self, obj: dict[str, Any], rv: str | None) -> None:
        if rv is not None and rv != obj["metadata"]["resourceVersion"]:
            raise KubeError(409, "Conflict", "the object has been modified")

    def merge_patch(self, collection: str, ns: str, name: str, patch: dict[str, Any], sub: str = "") -> dict[str, Any]:
        self.calls.append(("patch" + sub, collection, name))
        self._maybe_fail("patch" + sub, collection)
        obj = self.objects.get((collection, ns, name))
        if obj is None:
            raise KubeError(404, "NotFound", name)
        patch = copy.deepcopy(patch)
        self._check_rv(obj, patch.get("metadata", {}).pop("resourceVersion", None))
        if sub == "/status":
            obj["status"] = _merge(obj.get("status") or {}, patch.get("status") or {})
        else:
            old_spec = copy.deepcopy(obj.get("spec"))
            patch.pop("status", None)
            merged = _merge(obj, patch)
            obj.clear()
            obj.update(merged)
            if obj.get("spec") != old_spec:
                obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
        self._stamp(obj)
        self._gc(collection, ns, name)
        return copy.deepcopy(obj)

    def json_patch(self, collection: str, ns: str, name: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls.append(("jsonpatch", collection, name))
        obj = self.objects.get((collection, ns, name))
        if obj is None:
            raise KubeError(404, "NotFound", name)
        for op in ops:
            parts = op["path"].strip("/").split("/")
            target = obj
            for p in parts[:-1]:
                target = target[int(p)] if isinstance(target, list) else target[p]
            last = parts[-1]
            idx = int(last) if isinstance(target, list) else last
            if op["op"] == "test":
                if target[idx] != op["value"]:
                    raise KubeError(422, "Invalid", "test failed")
            elif op["op"] == "remove":
                del target[idx]
        self._stamp(obj)
        self._gc(collection, ns, name)
        return copy.deepcopy(obj)

    def replace(self, collection: str, ns: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("replace", collection, name))
        obj = self.objects.get((collection, ns, name))
        if obj is None:
            raise KubeError(404, "NotFound", name)
        self._check_rv(obj, body["metadata"].get("resourceVersion"))
        body = copy.deepcopy(body)
        for k in ("uid", "creationTimestamp"):
            body["metadata"][k] = obj["metadata"][k]
        self.objects[(collection, ns, name)] = body
        self._stamp(body)
        return copy.deepcopy(body)

    def delete(self, collection: str, ns: str, name: str, *, propagation: str = "Background", uid: str | None = None) -> bool:
        self.calls.append(("delete", collection, name))
        obj = self.objects.get((collection, ns, name))
        if obj is None:
            return False
        if uid and obj["metadata"]["uid"] != uid:
            raise KubeError(409, "Conflict", "uid precondition failed")
        if obj["metadata"].get("finalizers"):
            obj["metadata"].setdefault("deletionTimestamp", self._now())
            self._stamp(obj)
            return True
        del self.objects[(collection, ns, name)]
        return True

    def _gc(self, collection: str, ns: str, name: str) -> None:
        obj = self.objects.get((collection, ns, name))
        if obj and obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers"):
            del self.objects[(collection, ns, name)]

    def list(self, collection: str, ns: str, *, labels: dict[str, str] | None = None,
             fields: dict[str, str] | None = None) -> list[dict[str, Any]]:  # fmt: skip
        self.calls.append(("list", collection, ""))
        out = []
        for obj in self.all(collection, ns):
            have = obj["metadata"].get("labels") or {}
            if all(have.get(k) == v for k, v in (labels or {}).items()) and all(
                _field(obj, path) == v for path, v in (fields or {}).items()
            ):
                out.append(obj)
        return out


def _field(obj: dict[str, Any], path: str) -> Any:
    """A field selector's value: `involvedObject.uid` -> obj["involvedObject"]["uid"]."""
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _merge(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base) if isinstance(base, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


# --------------------------------------------------------------------------------------------------
# The operator as a subprocess


class OperatorProcess:
    """`python -m rlp_operator` against a kubeconfig; kill() is SIGKILL, stop() is SIGTERM."""

    def __init__(self, kubeconfig: str | Path, *, namespaces: list[str] | None = None, log_path: Path,
                 backoff_base: float = 0.5, extra_env: dict[str, str] | None = None, workers: int = 8):  # fmt: skip
        self.kubeconfig = str(kubeconfig)
        self.namespaces = namespaces or []
        self.log_path = Path(log_path)
        self.backoff_base = backoff_base
        self.extra_env = extra_env or {}
        self.workers = workers
        self.metrics_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, wait_ready: bool = True) -> OperatorProcess:
        for _ in range(3):
            self._spawn()
            if not wait_ready:
                return self
            try:
                self.wait_ready()
                return self
            except AssertionError:
                if self.proc.poll() is None or "address already in use" not in self.tail(20).lower():
                    raise
                self.metrics_port = free_port()  # taken since it was drawn: draw another, as the infra servers do
        raise AssertionError(f"operator found its metrics port taken 3 times; log:\n{self.tail()}")

    def _spawn(self) -> None:
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, **self.extra_env}
        env.pop("AWS_ACCESS_KEY_ID", None)
        env.pop("AWS_SECRET_ACCESS_KEY", None)
        args = [sys.executable, "-m", "rlp_operator", "--standalone", "--log-level", os.environ.get("RLP_TEST_OPERATOR_LOG_LEVEL", "info"), "--metrics-port", str(self.metrics_port),
                "--health-port", "0", "--bind", "127.0.0.1", "--backoff-base", str(self.backoff_base),
                "--backoff-max", "5", "--workers", str(self.workers)]  # fmt: skip
        for ns in self.namespaces:
            args += ["--namespace", ns]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(f"\n===== start #{self.starts + 1} {time.strftime('%H:%M:%S')} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        log.close()
        self.starts += 1

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"operator exited with {self.proc.returncode}; log:\n{self.tail()}")
            try:
                if self.get("/readyz", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"operator not ready after {timeout}s; log:\n{self.tail()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape /metrics over HTTP: {(name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        status, text = self.get("/metrics")
        assert status == 200, text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass
        return records


# --------------------------------------------------------------------------------------------------
# Cluster helpers (used with the control_plane / kube_api fixtures of tests/infra)

RUNS_PATH = "/apis/rlp.dev/v1alpha1/namespaces/{ns}/rlpruns"


def install_crd(api_client, timeout: float = WAIT) -> None:
    """Create or update the RLPRun CRD from `render_crd()` and wait until it is Established and served."""
    import yaml
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    from rlp_operator.crd import CRD_NAME, render_crd

    body = yaml.safe_load(render_crd())
    ext = client.ApiextensionsV1Api(api_client)
    try:
        current = ext.read_custom_resource_definition(CRD_NAME)
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(CRD_NAME, body)
    except ApiException as e:
        if e.status != 404:
            raise
        ext.create_custom_resource_definition(body)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        crd = ext.read_custom_resource_definition(CRD_NAME)
        conds = {c.type: c.status for c in (crd.status.conditions or [])}
        if conds.get("Established") == "True":
            # the new schema is served once discovery and the handler caught up; probe a list
            try:
                client.CustomObjectsApi(api_client).list_cluster_custom_object("rlp.dev", "v1alpha1", "rlpruns")
                return
            except ApiException:
                pass
        time.sleep(0.1)
    raise AssertionError(f"CRD {CRD_NAME} not established after {timeout}s")


def raw(api_client, method: str, path: str, body: Any = None, *, query: str = "",
        content_type: str = "application/json", accept: str = "application/json") -> tuple[int, Any]:  # fmt: skip
    """One raw API call with the test's admin client: (status, parsed JSON body). A 429 or 5xx is raised as the
    ApiException the typed API calls raise, so that waits poll through it as a transient error."""
    from kubernetes.client.rest import ApiException

    headers = {"Accept": accept}
    if body is not None:
        headers["Content-Type"] = content_type
    _, url, headers, _, _ = api_client.param_serialize(method=method, resource_path=path, header_params=headers,
                                                       auth_settings=["BearerToken"])  # fmt: skip
    if query:
        url += "?" + query
    resp = api_client.call_api(method, url, header_params=headers, body=body)
    data = resp.read()
    text = data.decode() if isinstance(data, bytes) else data
    if resp.status == 429 or resp.status >= 500:
        raise ApiException(http_resp=resp)
    try:
        return resp.status, json.loads(text) if text else None
    except ValueError:
        return resp.status, text


def rlprun(name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "rlp.dev/v1alpha1",
        "kind": "RLPRun",
        "metadata": {"name": name, **({"annotations": annotations} if annotations else {})},
        "spec": spec,
    }


class ClusterRig:
    """One test's view: the control plane, a namespace, an S3 bucket with a Secret, the operator process."""

    SECRET = "s3-creds"

    def __init__(self, control_plane, api_client, namespace: str, s3_server, bucket: str, log_dir: Path):
        from kubernetes import client

        self.cp = control_plane
        self.api = api_client
        self.ns = namespace
        self.s3 = s3_server
        self.bucket = bucket
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.operator = OperatorProcess(control_plane.kubeconfig, namespaces=[namespace],
                                        log_path=log_dir / "operator.log", backoff_base=0.3)  # fmt: skip
        install_crd(api_client)
        self.core.create_namespaced_secret(
            namespace,
            {"metadata": {"name": self.SECRET},
             "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}},
        )  # fmt: skip
        s3 = s3_server.client()
        for model in ("sft", "rm"):  # the starting models spec() names, as the operator's preflight finds them
            s3.put_object(Bucket=bucket, Key=f"models/{model}/config.json", Body=b"{}")

    # -- runs
    def spec(self, **overrides: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "policy": {"model": f"s3://{self.bucket}/models/sft/"},
            "rewardModel": {"model": f"s3://{self.bucket}/models/rm/"},
            "rewardLearning": {"strategy": "rlp"},
            "storage": {"uri": f"s3://{self.bucket}/runs", "endpoint": self.s3.endpoint_url,
                        "secretRef": {"name": self.SECRET}},
            "resources": {"gpusPerPod": 1, "cpu": "1", "memory": "1Gi"},
            "backoffLimit": 3,
        }  # fmt: skip
        spec.update(overrides)
        return spec

    def create_run(self, name: str, spec: dict[str, Any] | None = None, *, hold: bool = True,
                   annotations: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
        ann = dict(annotations or {})
        if hold:  # phase pods keep running until the test lets them finish
            ann["rlp.dev/pod-annotations"] = json.dumps({"rlp.dev/kwok-hold": "true"})
        return self.custom.create_namespaced_custom_object(
            "rlp.dev", "v1alpha1", self.ns, "rlpruns", rlprun(name, spec or self.spec(), ann)
        )

    def get_run(self, name: str) -> dict[str, Any] | None:
        status, obj = raw(self.api, "GET", RUNS_PATH.format(ns=self.ns) + f"/{name}")
        return obj if status == 200 else None

    def patch_run(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        status, obj = raw(self.api, "PATCH", RUNS_PATH.format(ns=self.ns) + f"/{name}", patch,
                          content_type="application/merge-patch+json")  # fmt: skip
        assert status == 200, obj
        return obj

    def status(self, name: str) -> dict[str, Any]:
        run = self.get_run(name)
        return (run or {}).get("status") or {}

    def wait_run(self, name: str, check, timeout: float = WAIT, what: str = "run state") -> dict[str, Any]:
        last: dict[str, Any] = {}

        def reached() -> bool:
            nonlocal last
            last = self.status(name)
            return bool(check(last))

        try:
            wait_until(reached, timeout, f"{name}: {what}", interval=0.05)
        except AssertionError as err:
            raise AssertionError(f"{err}; status: {json.dumps(last, indent=1)[:3000]}\n"
                                 f"operator log:\n{self.operator.tail(40)}") from None  # fmt: skip
        return last

    def wait_phase_running(self, name: str, phase: str, round_: int = 1, attempt: int | None = None,
                           timeout: float = WAIT) -> str:  # fmt: skip
        """Wait until (round, phase) is Running (its attempt N when given); returns the Job name."""

        def check(st):
            for rec in st.get("phases", []):
                if rec["name"] == phase and rec["round"] == round_ and rec["state"] == "Running":
                    return attempt is None or rec.get("attempts") == attempt
            return False

        st = self.wait_run(name, check, timeout, f"{phase} (round {round_}) running")
        return next(r["job"] for r in st["phases"] if r["name"] == phase and r["round"] == round_)

    # -- workloads
    def jobs(self, run: str | None = None) -> list[dict[str, Any]]:
        sel = f"rlp.dev/run={run}" if run else "rlp.dev/run"
        status, obj = raw(self.api, "GET", f"/apis/batch/v1/namespaces/{self.ns}/jobs", query=f"labelSelector={sel}")
        return obj["items"]

    def job_names(self, run: str | None = None) -> list[str]:
        return sorted(j["metadata"]["name"] for j in self.jobs(run))

    def pods_of(self, job: str) -> list[dict[str, Any]]:
        status, obj = raw(self.api, "GET", f"/api/v1/namespaces/{self.ns}/pods",
                          query=f"labelSelector=batch.kubernetes.io/job-name={job}")  # fmt: skip
        return obj["items"]

    def wait_pod_running(self, job: str, timeout: float = WAIT) -> str:
        def running() -> str | None:
            return next((pod["metadata"]["name"] for pod in self.pods_of(job)
                         if (pod.get("status") or {}).get("phase") == "Running"
                         and not pod["metadata"].get("deletionTimestamp")), None)  # fmt: skip

        try:
            return wait_until(running, timeout, f"a running pod of Job {job}", interval=0.05)
        except AssertionError as err:
            raise AssertionError(f"{err}: {self.pods_of(job)}") from None

    def finish_pod(self, pod: str, exit_code: int = 0) -> None:
        self.core.patch_namespaced_pod(
            pod, self.ns, {"metadata": {"annotations": {"rlp.dev/kwok-exit-code": str(exit_code),
                                                        "rlp.dev/kwok-hold": None}}}  # fmt: skip
        )

    def write_manifest(self, run: str, phase: str, round_: int = 1, metrics: dict | None = None) -> None:
        """Simulate a phase's work: its output and then its manifest, in S3."""
        import hashlib

        from rlp_core.manifest import Manifest, ManifestFile, phase_prefix, write_manifest
        from rlp_core.store import Store

        store = Store.from_uri(f"s3://{self.bucket}/runs", endpoint=self.s3.endpoint_url,
                               access_key=self.s3.access_key, secret_key=self.s3.secret_key)  # fmt: skip
        store = store.child(phase_prefix(self.ns, run, round_, phase))
        data = f"{run} {phase} {round_}".encode()
        store.put_bytes("result.jsonl", data)
        files = [ManifestFile(path="result.jsonl", size=len(data), sha256=hashlib.sha256(data).hexdigest())]
        manifest = Manifest(phase=phase, round=round_, files=files, spec_hash="test", code_version="test",
                            metrics=metrics if metrics is not None else {"score": 0.75, "phase": phase})  # fmt: skip
        write_manifest(store, manifest)

    def s3_keys(self, prefix: str = "") -> list[str]:
        s3 = self.s3.client()
        out = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def run_phase(self, run: str, phase: str, round_: int = 1, exit_code: int = 0, attempt: int | None = None) -> str:
        """Wait for the phase's pod, do its 'work' (manifest when it succeeds), let kwok end it."""
        job = self.wait_phase_running(run, phase, round_, attempt)
        pod = self.wait_pod_running(job)
        if exit_code == 0:
            self.write_manifest(run, phase, round_)
        self.finish_pod(pod, exit_code)
        return job

    def events(self, run: str) -> list[dict[str, Any]]:
        status, obj = raw(self.api, "GET", f"/api/v1/namespaces/{self.ns}/events",
                          query=f"fieldSelector=involvedObject.name={run}")  # fmt: skip
        return sorted(obj["items"], key=lambda e: int(e["metadata"]["resourceVersion"]))  # = posting order

    def event_reasons(self, run: str) -> list[str]:
        return [e["reason"] for e in self.events(run)]

    def event_reasons_through(self, run: str, last: str, timeout: float = WAIT) -> list[str]:
        """The run's event reasons once `last` is among them: the operator posts events in the background, in
        order, so a status it has written may still be on its way as an event."""
        return wait_until(lambda: (reasons := self.event_reasons(run)) and last in reasons and reasons,
                          timeout=timeout, what=f"{run}'s {last} event")

    def close(self) -> None:
        self.operator.stop()
