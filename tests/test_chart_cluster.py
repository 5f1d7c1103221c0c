"""charts/rlp-operator against the real test apiserver.

- The rendered manifests (default and full values; the Prometheus Operator's real CRDs installed for the
  monitors) are applied with server-side apply, and the examples/ pass the CRD schema (dry-run apply).
- The operator ServiceAccount's rights, as the chart grants them, are checked verb by verb with
  SubjectAccessReviews and impersonated calls: what the operator calls is allowed, the rest is forbidden.
- A full RLPRun (a failed and retried attempt, a multi-node phase, deletion with cleanup) is driven by the
  real operator process authenticated as the chart's ServiceAccount (a TokenRequest token), and its
  /metrics are scraped to cross-check the dashboard's and the alerts' metric names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_fixtures import REPO, ClusterRig, OperatorProcess, raw

from infra.kube import wait_until
from infra.tools import prometheus_operator_crds
from test_chart import CHART, CRD_OBSERVER, EXAMPLES, FULL_VALUES, OPERATOR_NEEDS, by_kind, helm, one, render
from test_dashboard import (
    ALERTS,
    check_names_exported,
    dashboard,
    dashboard_queries,
    exported_names,
    phase_metrics_endpoint,
    scrape,
)

pytestmark = pytest.mark.cluster

FIELD_MANAGER = "rlp-chart-test"

# kind -> (API path prefix, plural, namespaced)
RESOURCES = {
    "CustomResourceDefinition": ("/apis/apiextensions.k8s.io/v1", "customresourcedefinitions", False),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Service": ("/api/v1", "services", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Secret": ("/api/v1", "secrets", True),
    "Namespace": ("/api/v1", "namespaces", False),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "ServiceMonitor": ("/apis/monitoring.coreos.com/v1", "servicemonitors", True),
    "PodMonitor": ("/apis/monitoring.coreos.com/v1", "podmonitors", True),
    "PrometheusRule": ("/apis/monitoring.coreos.com/v1", "prometheusrules", True),
    "KopfPeering": ("/apis/kopf.dev/v1", "kopfpeerings", True),
    "ClusterKopfPeering": ("/apis/kopf.dev/v1", "clusterkopfpeerings", False),
    "RLPRun": ("/apis/rlp.dev/v1alpha1", "rlpruns", True),
}


def object_path(obj: dict[str, Any], namespace: str | None = None) -> str:
    prefix, plural, namespaced = RESOURCES[obj["kind"]]
    name = obj["metadata"]["name"]
    if namespaced:
        ns = obj["metadata"].get("namespace") or namespace
        assert ns, f"{obj['kind']}/{name} has no namespace"
        return f"{prefix}/namespaces/{ns}/{plural}/{name}"
    return f"{prefix}/{plural}/{name}"


def apply(api, obj: dict[str, Any], *, namespace: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Server-side apply (PATCH application/apply-patch+yaml, force) as the test admin."""
    query = f"fieldManager={FIELD_MANAGER}&force=true" + ("&dryRun=All" if dry_run else "")
    status, body = raw(api, "PATCH", object_path(obj, namespace), json.dumps(obj), query=query,
                       content_type="application/apply-patch+yaml")  # fmt: skip
    assert status in (200, 201), f"apply {obj['kind']}/{obj['metadata']['name']}: {status} {body}"
    return body


def apply_warnings(api, obj: dict[str, Any], namespace: str) -> list[str]:
    """Server-side apply that returns the apiserver's Warning headers (e.g. Pod Security warnings)."""
    headers = {"Accept": "application/json", "Content-Type": "application/apply-patch+yaml"}
    _, url, headers, _, _ = api.param_serialize(method="PATCH", resource_path=object_path(obj, namespace),
                                                header_params=headers, auth_settings=["BearerToken"])  # fmt: skip
    resp = api.call_api("PATCH", url + f"?fieldManager={FIELD_MANAGER}&force=true", header_params=headers,
                        body=json.dumps(obj))  # fmt: skip
    body = resp.read()
    assert resp.status in (200, 201), f"apply {obj['kind']}/{obj['metadata']['name']}: {resp.status} {body!r}"
    return list(resp.response.headers.get_all("Warning") or [])


def delete(api, obj: dict[str, Any], namespace: str | None = None) -> None:
    status, body = raw(api, "DELETE", object_path(obj, namespace))
    assert status in (200, 202, 404), f"delete {obj['kind']}/{obj['metadata']['name']}: {status} {body}"


def wait_established(api, names: list[str]) -> None:
    def established() -> bool:
        for name in names:
            status, crd = raw(api, "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conds = {c["type"]: c["status"] for c in (crd.get("status") or {}).get("conditions", [])}
            if conds.get("Established") != "True":
                return False
        return True

    wait_until(established, what=f"CRDs {names} established")


@pytest.fixture(scope="module")
def chart_crds(kube_api):
    """The chart's CRDs (crds/) and the Prometheus Operator's ServiceMonitor/PodMonitor/PrometheusRule CRDs,
    server-side applied to the session's apiserver (left installed: cluster-wide, shared, harmless)."""
    crds = by_kind(render(crds=True), "CustomResourceDefinition")
    for path in prometheus_operator_crds():
        crds.append(yaml.safe_load(path.read_text()))
    for crd in crds:
        apply(kube_api, crd)
    wait_established(kube_api, [c["metadata"]["name"] for c in crds])
    # the new kinds are served once discovery caught up
    for prefix, plural in (("/apis/monitoring.coreos.com/v1", "servicemonitors"), ("/apis/kopf.dev/v1", "kopfpeerings"),
                           ("/apis/rlp.dev/v1alpha1", "rlpruns")):  # fmt: skip
        wait_until(lambda: raw(kube_api, "GET", f"{prefix}/{plural}")[0] == 200, what=f"{plural} served")
    return crds


class Release:
    """A chart release applied object by object with server-side apply; removed on exit (cluster-scoped
    objects explicitly, namespaced ones with their namespaces)."""

    def __init__(self, api, namespace: str, *values: dict[str, Any] | Path, tmp_path: Path):
        self.api = api
        self.namespace = namespace
        self.name = f"rlp-{uuid.uuid4().hex[:6]}"
        files = []
        for i, v in enumerate(values):
            if isinstance(v, dict):
                path = tmp_path / f"values-{self.name}-{i}.yaml"
                path.write_text(yaml.safe_dump(v))
                v = path
            files.append(v)
        override = tmp_path / f"values-{self.name}-name.yaml"
        override.write_text(yaml.safe_dump({"fullnameOverride": self.name}))
        # what `helm install` creates: hooks (the pre-delete Job) run only at their event
        self.objects = [o for o in render(*files, override, release=self.name, namespace=namespace)
                        if "helm.sh/hook" not in (o["metadata"].get("annotations") or {})]  # fmt: skip
        self.applied: list[dict[str, Any]] = []

    def __enter__(self) -> Release:
        try:
            for obj in self.objects:
                self.applied.append(apply(self.api, obj, namespace=self.namespace))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for obj in self.objects:
            if not RESOURCES[obj["kind"]][2]:
                delete(self.api, obj)

    @property
    def service_account(self) -> str:
        return one(self.objects, "ServiceAccount")["metadata"]["name"]

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


@pytest.fixture
def extra_namespace(kube_api):
    """A second fresh namespace (the operator's own, or one it must not touch); deleted after."""
    names = []

    def make(prefix: str = "t-rlp-x") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        apply(kube_api, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"rlp.dev/test": "true"}}})
        names.append(name)
        return name

    yield make
    for name in names:
        raw(kube_api, "DELETE", f"/api/v1/namespaces/{name}")


# --------------------------------------------------------------------------------------------------
# access reviews


def can(api, user: str, verb: str, group: str, resource: str, namespace: str = "") -> bool:
    """SubjectAccessReview: may this ServiceAccount do it?"""
    resource, _, sub = resource.partition("/")
    sa_ns = user.split(":")[2]
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{sa_ns}", "system:authenticated"],
            "resourceAttributes": {"verb": verb, "group": group, "resource": resource, "subresource": sub,
                                   "namespace": namespace},  # fmt: skip
        },
    }
    status, body = raw(api, "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
    assert status == 201, body
    return bool(body["status"].get("allowed"))


def denied(api, user: str, checks: list[tuple[str, str, str, str]]) -> list[tuple]:
    return [c for c in checks if can(api, user, *c)]


# Never the operator's business, wherever it runs.
FORBIDDEN_ANYWHERE = [
    ("list", "", "secrets"), ("watch", "", "secrets"), ("create", "", "secrets"), ("update", "", "secrets"),
    ("delete", "", "secrets"),
    ("create", "", "pods/exec"), ("create", "", "pods/attach"), ("create", "", "pods/portforward"),
    ("create", "", "pods"), ("delete", "", "pods"), ("get", "", "pods/log"),
    ("create", "", "serviceaccounts/token"), ("create", "", "serviceaccounts"),
    ("create", "rbac.authorization.k8s.io", "roles"), ("create", "rbac.authorization.k8s.io", "rolebindings"),
    ("bind", "rbac.authorization.k8s.io", "roles"), ("escalate", "rbac.authorization.k8s.io", "roles"),
    ("create", "apps", "deployments"), ("create", "apps", "daemonsets"), ("patch", "batch", "jobs"),
    ("update", "batch", "jobs"), ("create", "rlp.dev", "rlpruns"), ("update", "rlp.dev", "rlpruns"),
    ("impersonate", "", "serviceaccounts"),
]  # fmt: skip
FORBIDDEN_CLUSTER = [
    ("delete", "", "nodes"), ("patch", "", "nodes"), ("list", "", "secrets"), ("watch", "", "secrets"),
    ("create", "rbac.authorization.k8s.io", "clusterroles"), ("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
    ("escalate", "rbac.authorization.k8s.io", "clusterroles"), ("delete", "", "namespaces"),
    ("create", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("update", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("delete", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("create", "admissionregistration.k8s.io", "mutatingwebhookconfigurations"),
    ("create", "certificates.k8s.io", "certificatesigningrequests"),
    ("impersonate", "", "users"), ("create", "", "persistentvolumes"),
]  # fmt: skip


def _needs() -> list[tuple[str, str, str]]:
    return sorted((verb, group, resource) for group, resource, verb in OPERATOR_NEEDS)


def test_monitoring_without_the_prometheus_operator_crds_fails_with_the_charts_own_message(control_plane, kube_api,
                                                                                         extra_namespace):  # fmt: skip
    """Before `chart_crds` installs them (the first test of this module): Helm alone would only say
    "no matches for kind"."""
    assert raw(kube_api, "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                                "servicemonitors.monitoring.coreos.com")[0] == 404, "precondition: no Prometheus Operator"  # fmt: skip
    release_ns = extra_namespace("t-rlp-nomon")
    proc = helm("install", f"rlp-{uuid.uuid4().hex[:6]}", str(CHART), "--namespace", release_ns,
                "--set", "metrics.serviceMonitor.enabled=true", kubeconfig=control_plane.kubeconfig, check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "ServiceMonitor is enabled but this cluster does not serve monitoring.coreos.com/v1" in proc.stderr, proc.stderr
    assert "docs/install.md#monitoring" in proc.stderr


def test_default_values_cluster_scope_rbac_is_enough_and_no_more(kube_api, chart_crds, namespace, tmp_path):
    with Release(kube_api, namespace, tmp_path=tmp_path) as rel:
        assert by_kind(rel.objects, "ClusterRole") and not by_kind(rel.objects, "Role")
        user = rel.user
        # everything the operator calls, in any namespace (here: the test's)
        missing = [(v, g, r) for v, g, r in _needs() if not can(kube_api, user, v, g, r, namespace)]
        assert not missing, f"operator lacks {missing}"
        missing = [(v, g, r) for g, r, v in sorted(CRD_OBSERVER) if not can(kube_api, user, v, g, r)]
        assert not missing
        # nothing else
        assert not denied(kube_api, user, [(v, g, r, namespace) for v, g, r in FORBIDDEN_ANYWHERE])
        assert not denied(kube_api, user, [(v, g, r, "") for v, g, r in FORBIDDEN_CLUSTER])
        # the Deployment was accepted as rendered
        deploy = next(o for o in rel.applied if o["kind"] == "Deployment")
        assert deploy["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_full_values_apply_and_namespaced_rbac_stays_in_its_namespaces(kube_api, chart_crds, namespace, extra_namespace,
                                                                       tmp_path):  # fmt: skip
    operator_ns = extra_namespace("t-rlp-sys")
    outside = extra_namespace("t-rlp-out")
    with Release(kube_api, operator_ns, FULL_VALUES, {"watchNamespaces": [namespace]}, tmp_path=tmp_path) as rel:
        kinds = {o["kind"] for o in rel.applied}
        # every optional object went through the real schemas (Prometheus Operator CRDs, kopf's, core)
        assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "KopfPeering", "PodDisruptionBudget", "Role",
                "RoleBinding", "ConfigMap", "Deployment", "Service"} <= kinds  # fmt: skip
        rule = next(o for o in rel.applied if o["kind"] == "PrometheusRule")
        assert [g["name"] for g in rule["spec"]["groups"]][0] == "rlp-configured"
        user = rel.user
        missing = [(v, g, r) for v, g, r in _needs() if not can(kube_api, user, v, g, r, namespace)]
        assert not missing, f"operator lacks {missing} in its watched namespace"
        for verb in ("get", "list", "watch", "patch"):
            assert can(kube_api, user, verb, "kopf.dev", "kopfpeerings", namespace)
        # nothing outside the watched namespace: not in another, not in its own, not cluster-wide
        for ns in (outside, operator_ns):
            allowed = [(v, g, r) for v, g, r in _needs() if can(kube_api, user, v, g, r, ns)]
            assert not allowed, f"operator may {allowed} in {ns}"
        assert not denied(kube_api, user, [(v, g, r, namespace) for v, g, r in FORBIDDEN_ANYWHERE])
        cluster_wide = [(v, g, r) for v, g, r in _needs() if can(kube_api, user, v, g, r, "")]
        assert not cluster_wide, f"operator may {cluster_wide} cluster-wide"
        assert not denied(kube_api, user, [(v, g, r, "") for v, g, r in FORBIDDEN_CLUSTER])
        assert not can(kube_api, user, "list", "kopf.dev", "clusterkopfpeerings")
        for verb in ("list", "watch"):  # kopf matches the watched namespaces; nothing else cluster-wide
            assert can(kube_api, user, verb, "", "namespaces")


def test_operator_pod_meets_the_restricted_pod_security_standard(kube_api, extra_namespace):
    """The apiserver's PodSecurity admission (warn=restricted) has nothing to say about the Deployment."""
    ns = extra_namespace("t-rlp-pss")
    raw(kube_api, "PATCH", f"/api/v1/namespaces/{ns}",
        {"metadata": {"labels": {"pod-security.kubernetes.io/warn": "restricted",
                                 "pod-security.kubernetes.io/warn-version": "latest"}}},
        content_type="application/merge-patch+json")  # fmt: skip
    for values in ([], [FULL_VALUES]):
        deploy = one(render(*values, namespace=ns), "Deployment")
        assert apply_warnings(kube_api, deploy, ns) == []
    # the check is live: a pod template without the chart's security settings draws warnings
    bare = one(render(namespace=ns), "Deployment")
    bare["metadata"]["name"] = "bare"
    pod = bare["spec"]["template"]["spec"]
    pod.pop("securityContext")
    pod["containers"][0].pop("securityContext")
    warnings = apply_warnings(kube_api, bare, ns)
    assert any("restricted" in w for w in warnings), warnings


def test_helm_install_upgrade_uninstall(control_plane, kube_api, chart_crds, namespace, extra_namespace, tmp_path):
    """The real `helm install` path with every switch on (the kopf peering object right after crds/),
    then an upgrade and an uninstall that leaves the CRDs."""
    release_ns = extra_namespace("t-rlp-helm")
    name = f"rlp-{uuid.uuid4().hex[:6]}"
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"watchNamespaces": [namespace], "fullnameOverride": name}))
    common = [str(CHART), "--namespace", release_ns, "-f", str(FULL_VALUES), "-f", str(override)]
    kc = control_plane.kubeconfig
    try:
        out = helm("install", name, *common, kubeconfig=kc).stdout
        assert "STATUS: deployed" in out and f"rollout status deployment/{name}" in out
        for path in (f"/apis/apps/v1/namespaces/{release_ns}/deployments/{name}",
                     f"/apis/monitoring.coreos.com/v1/namespaces/{release_ns}/prometheusrules/{name}",
                     f"/apis/monitoring.coreos.com/v1/namespaces/{release_ns}/servicemonitors/{name}",
                     f"/apis/monitoring.coreos.com/v1/namespaces/{release_ns}/podmonitors/{name}-phases",
                     f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/rlp-peering",
                     f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles/{name}",
                     f"/api/v1/namespaces/{release_ns}/configmaps/{name}-dashboard"):  # fmt: skip
            assert raw(kube_api, "GET", path)[0] == 200, path
        helm("upgrade", name, *common, "--set", "logLevel=warning", kubeconfig=kc)
        deploy = raw(kube_api, "GET", f"/apis/apps/v1/namespaces/{release_ns}/deployments/{name}")[1]
        assert "--log-level=warning" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    finally:
        helm("uninstall", name, "--namespace", release_ns, kubeconfig=kc, check=False)
    assert raw(kube_api, "GET", f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{name}-observer")[0] == 404
    assert raw(kube_api, "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/rlpruns.rlp.dev")[0] == 200


def test_examples_pass_the_crd_schema(kube_api, chart_crds, namespace):
    for name in ("s3-secret.yaml", "gpu-small.yaml", "multinode-optimize.yaml"):
        for doc in yaml.safe_load_all((EXAMPLES / name).read_text()):
            out = apply(kube_api, doc, namespace=namespace, dry_run=True)
            assert out["metadata"]["namespace"] == namespace
            if doc["kind"] == "RLPRun":
                # the apiserver's defaults and the pydantic model agree on the example
                from rlp_core.spec import parse_run

                assert parse_run(out).spec == parse_run(doc).spec


# --------------------------------------------------------------------------------------------------
# a full run with the chart's RBAC


def service_account_kubeconfig(api, control_plane, namespace: str, sa: str, path: Path) -> Path:
    status, body = raw(api, "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token",
                       {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                        "spec": {"expirationSeconds": 3600}})  # fmt: skip
    assert status == 201, body
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": control_plane.server,
                                                  "certificate-authority": str(control_plane.ca_file)}}],
        "users": [{"name": sa, "user": {"token": body["status"]["token"]}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": sa, "namespace": namespace}}],
        "current-context": "sa",
    }  # fmt: skip
    path.write_text(json.dumps(cfg))
    path.chmod(0o600)
    return path


def impersonated(control_plane, user: str):
    api = control_plane.api_client()
    api.default_headers["Impersonate-User"] = user
    return api


def finish_all_pods(rig: ClusterRig, run: str, phase: str, exit_code: int = 0, attempt: int | None = None) -> str:
    """Like ClusterRig.run_phase, for phases of several pods: every pod of the Job ends with exit_code."""
    job = rig.wait_phase_running(run, phase, attempt=attempt)
    want = rig.batch.read_namespaced_job(job, rig.ns).spec.completions

    def running():
        pods = [p for p in rig.pods_of(job)
                if (p.get("status") or {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
        return pods if len(pods) >= want else None

    pods = wait_until(running, what=f"{want} running pod(s) of {job}")
    if exit_code == 0:
        rig.write_manifest(run, phase)
    for pod in pods:
        rig.finish_pod(pod["metadata"]["name"], exit_code)
    return job


def test_operator_runs_a_full_rlprun_with_only_the_charts_rbac(control_plane, kube_api, chart_crds, namespace,
                                                               extra_namespace, s3_server, s3_bucket, tmp_path):  # fmt: skip
    operator_ns = extra_namespace("t-rlp-sys")
    with Release(kube_api, operator_ns, {"watchNamespaces": [namespace]}, tmp_path=tmp_path) as rel:
        # impersonated calls as the operator's ServiceAccount: real 403s, not just reviews
        sa_api = impersonated(control_plane, rel.user)
        try:
            assert raw(sa_api, "GET", f"/apis/rlp.dev/v1alpha1/namespaces/{namespace}/rlpruns")[0] == 200
            assert raw(sa_api, "GET", f"/api/v1/namespaces/{namespace}/secrets")[0] == 403
            assert raw(sa_api, "GET", "/api/v1/secrets")[0] == 403
            assert raw(sa_api, "GET", f"/apis/rlp.dev/v1alpha1/namespaces/{operator_ns}/rlpruns")[0] == 403
            assert raw(sa_api, "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")[0] == 200
        finally:
            sa_api.close()

        kubeconfig = service_account_kubeconfig(kube_api, control_plane, operator_ns, rel.service_account,
                                                tmp_path / "operator.kubeconfig")  # fmt: skip
        rig = ClusterRig(control_plane, kube_api, namespace, s3_server, s3_bucket, tmp_path)
        rig.operator = OperatorProcess(kubeconfig, namespaces=[namespace], log_path=tmp_path / "operator-sa.log",
                                       backoff_base=0.3)  # fmt: skip
        rig.operator.start()
        try:
            spec = rig.spec(phases={"optimize": {"nodes": 2, "gpusPerPod": 1}})  # a headless Service too
            rig.create_run("chart-rbac", spec)
            finish_all_pods(rig, "chart-rbac", "generate", exit_code=1, attempt=1)  # fails: pods are read
            for phase in ("generate", "refine", "synthesize", "optimize", "evaluate"):
                finish_all_pods(rig, "chart-rbac", phase, attempt=2 if phase == "generate" else None)
            st = rig.wait_run("chart-rbac", lambda s: s.get("phase") == "Succeeded", timeout=60, what="Succeeded")
            gen = next(p for p in st["phases"] if p["name"] == "generate")
            assert gen["attempts"] == 2 and gen["failures"] == 1
            # Events were posted with the chart's rights (by a background thread: wait for the last one)
            reasons = wait_until(lambda: (r := rig.event_reasons("chart-rbac")) and "Succeeded" in r and r,
                                 what="the Succeeded event")  # fmt: skip
            assert "PhaseRetried" in reasons
            services = raw(kube_api, "GET", f"/api/v1/namespaces/{namespace}/services",
                           query="labelSelector=rlp.dev/run=chart-rbac")[1]["items"]  # fmt: skip
            assert len(services) == 1

            # the real operator's scrape carries every operator metric the dashboard and the alerts name
            operator_names = exported_names(scrape(rig.operator.url("/metrics")))
            with phase_metrics_endpoint() as url:
                phase_names = exported_names(scrape(url))
            exported = operator_names | phase_names
            rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
            queries = dashboard_queries(dashboard()) + [(r.get("alert") or r["record"], r["expr"]) for r in rules]
            problems = check_names_exported(queries, exported)
            assert not problems, "\n".join(problems)
            assert {"rlp_runs", "rlp_run_info", "rlp_phase_duration_seconds_bucket", "rlp_phase_retries_total",
                    "rlp_phase_transitions_total", "rlp_reconcile_errors_total"} <= operator_names  # fmt: skip

            # deleting the run: the garbage collector deletes the Jobs, Services and ConfigMap it owns
            raw(kube_api, "DELETE", f"/apis/rlp.dev/v1alpha1/namespaces/{namespace}/rlpruns/chart-rbac")
            wait_until(lambda: rig.get_run("chart-rbac") is None, what="run deleted")
            wait_until(lambda: not rig.jobs("chart-rbac"), timeout=90, what="the run's Jobs deleted (GC)")

            # the uninstall hook's command, with the same ServiceAccount, while a run's pod holds a GPU
            rig.create_run("hook", annotations={"rlp.dev/delete-checkpoints": "true"})
            rig.wait_pod_running(rig.wait_phase_running("hook", "generate"))
            hook = subprocess.run([sys.executable, "-m", "rlp_operator", "uninstall", f"--namespace={namespace}",
                                   "--timeout=60"], capture_output=True, text=True, timeout=120, cwd=REPO,
                                  env={**os.environ, "KUBECONFIG": str(kubeconfig)})  # fmt: skip
            assert hook.returncode == 0, hook.stderr
            assert "removed the" not in hook.stderr  # the operator finalized the run itself
            assert rig.get_run("hook") is None and not rig.jobs()
            assert "forbidden" not in hook.stderr.lower()
        finally:
            rig.operator.kill()
        log = (tmp_path / "operator-sa.log").read_text(errors="replace")
        # no request of the operator's (or kopf's) was refused
        forbidden = [line for line in log.splitlines()
                     if "403" in line or "forbidden" in line.lower() or "permission" in line.lower()]
        assert not forbidden, "\n".join(forbidden[:20])
