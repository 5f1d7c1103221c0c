"""charts/rlp-operator without a cluster: helm lint and template (default and full values), the CRD copy,
the values schema, the operator Deployment's flags (parsed by the operator's own argument parser), pod
security, the RBAC shapes of each watch scope, and the examples/ RLPRuns.

The same rendered manifests go to the real apiserver in tests/test_chart_cluster.py.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from infra.tools import helm_bin

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "rlp-operator"
FULL_VALUES = REPO / "tests" / "fixtures" / "values-full.yaml"
EXAMPLES = REPO / "examples"
# helm's home and caches: private to this test session (a fixed /tmp path is shared with other users and sessions,
# whose leftovers can deny us access), kept for the whole session and removed at its end.
HELM_HOME = Path(tempfile.mkdtemp(prefix="rlp-helm-"))
atexit.register(shutil.rmtree, HELM_HOME, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# helpers (also used by test_chart_cluster.py)


def helm(*args: str, check: bool = True, kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
    """The cached helm, isolated from the user's helm settings (and cluster, unless kubeconfig is given)."""
    env = {"HOME": str(HELM_HOME), "PATH": "/usr/bin:/bin", "HELM_CACHE_HOME": str(HELM_HOME / "cache"),
           "HELM_CONFIG_HOME": str(HELM_HOME / "config"), "HELM_DATA_HOME": str(HELM_HOME / "data"),
           "KUBECONFIG": str(kubeconfig) if kubeconfig else "/nonexistent"}  # fmt: skip
    proc = subprocess.run([str(helm_bin()), *args], capture_output=True, text=True, check=False, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(*values_files: Path, release: str = "rlp", namespace: str = "rlp-system",
           set_: dict[str, str] | None = None, crds: bool = False) -> list[dict]:  # fmt: skip
    """`helm template` → the list of rendered objects (empty documents dropped)."""
    args = ["template", release, str(CHART), "--namespace", namespace]
    for f in values_files:
        args += ["-f", str(f)]
    for key, value in (set_ or {}).items():
        args += ["--set", f"{key}={value}"]
    if crds:
        args.append("--include-crds")
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def rules_of(role: dict) -> set[tuple[str, str, str]]:
    """{(apiGroup, resource, verb)} granted by a Role/ClusterRole."""
    out = set()
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


def operator_container(objects: list[dict]) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


# What the operator calls (operator/rlp_operator/kube.py users and kopf's watches), per namespace.
OPERATOR_NEEDS = {
    ("rlp.dev", "rlpruns", "get"), ("rlp.dev", "rlpruns", "list"), ("rlp.dev", "rlpruns", "watch"),
    ("rlp.dev", "rlpruns", "patch"), ("rlp.dev", "rlpruns", "delete"),
    ("rlp.dev", "rlpruns/status", "patch"),
    ("rlp.dev", "rlpruns/finalizers", "update"),
    ("batch", "jobs", "get"), ("batch", "jobs", "list"), ("batch", "jobs", "watch"),
    ("batch", "jobs", "create"), ("batch", "jobs", "delete"),
    ("", "pods", "list"),
    ("", "services", "list"), ("", "services", "create"), ("", "services", "delete"),
    ("", "configmaps", "get"), ("", "configmaps", "list"), ("", "configmaps", "create"),
    ("", "configmaps", "update"), ("", "configmaps", "delete"),
    ("", "events", "create"), ("", "events", "list"),
    ("", "secrets", "get"),
}  # fmt: skip
CRD_OBSERVER = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
NAMESPACE_OBSERVER = {("", "namespaces", v) for v in ("list", "watch")}  # kopf, when not watching all namespaces


# --------------------------------------------------------------------------------------------------
# lint, template, CRDs, schema


def test_crd_in_the_chart_is_the_generated_crd():
    """The chart ships crds/rlp.dev_rlpruns.yaml unchanged (`cp crds/rlp.dev_rlpruns.yaml charts/rlp-operator/crds/`)."""
    assert (CHART / "crds" / "rlp.dev_rlpruns.yaml").read_bytes() == (REPO / "crds" / "rlp.dev_rlpruns.yaml").read_bytes()


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["default", "full"])
def test_helm_lint_strict(values):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    out = helm(*args).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def test_default_values_render_the_operator_without_prometheus_operator_objects():
    objs = render(crds=True)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(["CustomResourceDefinition"] * 3 + ["ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                                                "Deployment", "Service", "ConfigMap", "Job"])  # fmt: skip
    assert {o["metadata"]["name"] for o in by_kind(objs, "CustomResourceDefinition")} == {
        "rlpruns.rlp.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}  # fmt: skip
    for o in objs:
        if o["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == "rlp-system", o["kind"]
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["rlp.json"] == (CHART / "files" / "dashboard.json").read_text().rstrip("\n")


def test_full_values_render_every_optional_object():
    objs = render(FULL_VALUES)
    kinds = {o["kind"] for o in objs}
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "KopfPeering", "PodDisruptionBudget", "Role",
            "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ConfigMap"} <= kinds  # fmt: skip
    sm = one(objs, "ServiceMonitor")
    svc = one(objs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert svc["metadata"]["labels"]["app.kubernetes.io/name"] == "rlp-operator"  # → job="rlp-operator"
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True  # keep the runs' own `namespace` label
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pm = one(objs, "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["ml-team-a", "ml-team-b"]}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_uninstall_hook_deletes_the_watched_runs_with_the_operators_rights():
    """The pre-delete hook Job runs `rlp operator uninstall` (its flags parsed by its own parser) as the
    operator's ServiceAccount, over the watched namespaces, and is not mistaken for the operator."""
    from rlp_operator.uninstall import build_parser

    objs = render(FULL_VALUES)
    hook = next(o for o in by_kind(objs, "Job") if o["metadata"]["name"] == "rlp-uninstall")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    pod = hook["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["rlp", "operator", "uninstall"]
    args = build_parser().parse_args(container["args"])
    assert args.namespace == ["ml-team-a", "ml-team-b"] and args.timeout == 600
    assert hook["spec"]["activeDeadlineSeconds"] > args.timeout
    assert pod["spec"]["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    selector = one(objs, "Service")["spec"]["selector"]
    assert not selector.items() <= pod["metadata"]["labels"].items()  # not one of the operator's pods
    assert container["securityContext"] == operator_container(objs)["securityContext"]
    assert not [o for o in render(set_={"uninstall.deleteRuns": "false"}) if o["kind"] == "Job"]


def test_pod_monitor_selects_the_operators_phase_pods():
    """PodMonitor selector and port against the pod template the operator really renders."""
    from rlp_core.spec import parse_run
    from rlp_operator import workload as wl

    run = parse_run({"metadata": {"name": "r", "namespace": "ml"}, "spec": {}})
    owner = {"apiVersion": "rlp.dev/v1alpha1", "kind": "RLPRun", "name": "r", "uid": "u"}
    job, _ = wl.render_job(run, 1, "generate", 1, owner)
    pod = job["spec"]["template"]
    pm = one(render(set_={"metrics.podMonitor.enabled": "true"}), "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert ports[pm["spec"]["podMetricsEndpoints"][0]["port"]] == wl.METRICS_PORT
    # job="rlp-phase" (the alerts' and dashboard's convention) comes from this pod label
    assert pod["metadata"]["labels"][pm["spec"]["jobLabel"]] == "rlp-phase"


def test_prometheus_rule_ships_files_alerts_yaml_unchanged():
    objs = render(FULL_VALUES)
    groups = one(objs, "PrometheusRule")["spec"]["groups"]
    shipped = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]
    assert groups[0] == {
        "name": "rlp-configured",
        "rules": [
            {"record": "rlp:phase_expected_seconds:configured", "expr": "vector(7200)", "labels": {"phase": "evaluate"}},
            {"record": "rlp:phase_expected_seconds:configured", "expr": "vector(172800)", "labels": {"phase": "optimize"}},
        ],
    }
    assert groups[1:] == shipped
    # without phaseExpectedSeconds: exactly the file
    default = one(render(set_={"prometheusRule.enabled": "true"}), "PrometheusRule")
    assert default["spec"]["groups"] == shipped


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"logLevel": "verbose"}, "logLevel"),
        ({"replicaCount": "0"}, "replicaCount"),
        ({"watchNamespaces[0]": "Not_A_Namespace"}, "watchNamespaces"),
        ({"ports.metrics": "70000"}, "ports"),
        ({"prometheusRule.phaseExpectedSeconds.training": "10"}, "'training'"),
        ({"metrics.serviceMonitor.interval": "soon"}, "interval"),
        ({"image.digest": "latest"}, "digest"),
        ({"jobDefaults.storage.endpoint": "s3.example.com"}, "endpoint"),
        ({"unknownKey": "1"}, "unknownKey"),
    ],
)
def test_values_schema_rejects_bad_values(setting, message):
    args = ["template", "rlp", str(CHART)]
    for key, value in setting.items():
        args += ["--set", f"{key}={value}"]
    proc = helm(*args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------------
# the operator Deployment


def _parse_operator_args(container: dict):
    from rlp_operator.main import build_parser

    assert container["command"] == ["rlp", "operator"]
    return build_parser().parse_args(container["args"])  # SystemExit on any flag the operator lacks


def test_operator_flags_are_the_operators_own():
    objs = render()
    c = operator_container(objs)
    args = _parse_operator_args(c)
    assert args.standalone and args.peering is None
    assert args.namespace == [] and args.log_level == "info"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": args.metrics_port, "health": args.health_port} == {"metrics": 8080, "health": 8081}
    assert one(objs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}

    full = render(FULL_VALUES)
    args = _parse_operator_args(operator_container(full))
    assert args.peering == "rlp-peering" and not args.standalone
    assert args.namespace == ["ml-team-a", "ml-team-b"]
    assert (args.log_level, args.workers, args.resync_seconds) == ("debug", 16, 120.0)
    assert (args.backoff_base, args.backoff_max, args.unschedulable_grace_seconds) == (5.0, 600.0, 900.0)
    assert one(full, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e for e in operator_container(full)["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # kopf's peer identity
    assert env["RLP_S3_ENDPOINT"]["value"] == "https://s3.example.com"  # rlp_core.store's fallback endpoint
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "rlp-operator-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert operator_container(full)["image"].endswith("@sha256:" + "0123456789abcdef" * 4)


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["default", "full"])
def test_operator_pod_is_locked_down(values):
    objs = render(*([values] if values else []))
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    psc, sc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001  # operator/Dockerfile's user
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["privileged"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    assert pod["enableServiceLinks"] is False


def test_probe_paths_exist_on_the_operators_health_server():
    from rlp_operator.runtime import HealthServer

    app = HealthServer._app(HealthServer.__new__(HealthServer))
    paths = {r.resource.canonical for r in app.router.routes()}
    assert {"/healthz", "/readyz", "/metrics"} <= paths


def test_replicas_above_one_need_exact_namespaces_or_none():
    proc = helm("template", "rlp", str(CHART), "--set", "replicaCount=2", "--set", "watchNamespaces[0]=team-*",
                check=False)  # fmt: skip
    assert proc.returncode != 0 and "replicaCount > 1" in proc.stderr
    objs = render(set_={"replicaCount": "2"})
    assert one(objs, "ClusterKopfPeering")["metadata"]["name"] == "rlp-operator"
    assert ("kopf.dev", "clusterkopfpeerings", "patch") in rules_of(one(objs, "ClusterRole"))
    assert one(objs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


# --------------------------------------------------------------------------------------------------
# RBAC shapes


def test_cluster_scope_grants_exactly_what_the_operator_calls():
    objs = render()
    role = one(objs, "ClusterRole")
    assert rules_of(role) == OPERATOR_NEEDS | CRD_OBSERVER
    binding = one(objs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = one(objs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "rlp-system"}]
    assert not by_kind(objs, "Role")


def test_namespaced_scope_has_a_role_per_namespace_and_reads_only_crds_and_namespaces_cluster_wide():
    objs = render(set_={"watchNamespaces[0]": "team-a", "watchNamespaces[1]": "team-b"})
    roles = by_kind(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert rules_of(role) == OPERATOR_NEEDS
    bindings = by_kind(objs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["subjects"][0]["namespace"] == "rlp-system"
    (cluster_role,) = by_kind(objs, "ClusterRole")
    assert rules_of(cluster_role) == CRD_OBSERVER | NAMESPACE_OBSERVER


def test_namespace_patterns_need_cluster_scope_and_namespace_watch():
    objs = render(set_={"watchNamespaces[0]": "team-*"})
    assert not by_kind(objs, "Role")
    assert rules_of(one(objs, "ClusterRole")) == OPERATOR_NEEDS | CRD_OBSERVER | NAMESPACE_OBSERVER


def test_rbac_can_be_left_to_the_cluster_admin():
    objs = render(set_={"rbac.create": "false", "serviceAccount.create": "false", "serviceAccount.name": "ops"})
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"} & {o["kind"] for o in objs}
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def test_notes_tell_the_next_commands():
    out = helm("install", "rlp", str(CHART), "--namespace", "rlp-system", "--dry-run=client").stdout
    notes = out[out.index("NOTES:"):]
    assert "kubectl -n rlp-system rollout status deployment/rlp-operator" in notes
    assert "examples/s3-secret.yaml -f examples/gpu-small.yaml" in notes
    assert "kubectl apply --server-side --force-conflicts -f" in notes


# --------------------------------------------------------------------------------------------------
# examples/


def test_examples_are_valid_rlpruns_using_the_example_secret():
    from rlp_core.spec import load_run
    from rlp_operator import workload as wl

    secret = yaml.safe_load((EXAMPLES / "s3-secret.yaml").read_text())
    assert secret["kind"] == "Secret" and sorted(secret["stringData"]) == sorted(wl.SECRET_KEYS)

    small = load_run(EXAMPLES / "gpu-small.yaml")
    assert small.spec.storage.uri.startswith("s3://")
    assert small.spec.storage.secret_ref.name == secret["metadata"]["name"]
    assert small.spec.resources.gpus_per_pod == 1 and small.spec.resources.nodes == 1

    multi = load_run(EXAMPLES / "multinode-optimize.yaml")
    assert multi.spec.storage.secret_ref.name == secret["metadata"]["name"]
    run_ns = multi.model_copy(update={"metadata": multi.metadata.model_copy(update={"namespace": "ml"})})
    owner = {"apiVersion": "rlp.dev/v1alpha1", "kind": "RLPRun", "name": "multinode-optimize", "uid": "u"}
    job, service = wl.render_job(run_ns, 1, "optimize", 1, owner)
    assert job["spec"]["completions"] == 2 and service is not None  # two pods with a rendezvous Service
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}
    other, no_service = wl.render_job(run_ns, 1, "generate", 1, owner)
    assert other["spec"]["completions"] == 1 and no_service is None
    # its pod annotations are well-formed (the operator fails the run otherwise)
    assert wl.pod_annotations(yaml.safe_load((EXAMPLES / "multinode-optimize.yaml").read_text()))


def test_chart_grants_nothing_beyond_the_operators_documented_rbac():
    """operator/rbac.yaml (operator/RBAC.md) is the operator's own statement of what it may need: whatever
    the scope, the chart's roles stay within it. (The chart leaves out what the code never calls: `get` on
    services and rlpruns/status; namespaces and peering only where kopf uses them.)"""
    documented = rules_of(yaml.safe_load((REPO / "operator" / "rbac.yaml").read_text()))
    scopes = [
        {},
        {"watchNamespaces[0]": "team-a"},
        {"watchNamespaces[0]": "team-*"},
        {"replicaCount": "2"},
        {"replicaCount": "2", "watchNamespaces[0]": "team-a"},
    ]
    for settings in scopes:
        objs = render(set_=settings)
        for role in by_kind(objs, "ClusterRole") + by_kind(objs, "Role"):
            extra = rules_of(role) - documented
            assert not extra, f"{settings}: {role['kind']} {role['metadata']['name']} grants {sorted(extra)}"
