"""Kubernetes objects of one run, rendered as plain dicts (pure functions, no API calls).

Names are deterministic, so an operator restarted at any moment finds what it already created instead
of creating it again: the Job of attempt N of phase P in round K is `<run>-r<K>-<phase>-a<N>`
(shortened with a hash when it would be too long).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from rlp_core.spec import API_GROUP, API_VERSION, KIND, PhaseOverride, Resources, RLPRun, SecretRef

LABEL_RUN = "rlp.dev/run"
LABEL_PHASE = "rlp.dev/phase"
LABEL_ROUND = "rlp.dev/round"
LABEL_ATTEMPT = "rlp.dev/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "rlp-operator"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
FINALIZER = "rlp.dev/cleanup"
ANNOTATION_DELETE_CHECKPOINTS = "rlp.dev/delete-checkpoints"
# Redo these phase outputs (comma-separated: PHASE or round-K/PHASE) and every phase that reads them;
# each new value is acted on once (status.redo), like `rlp run --redo`.
ANNOTATION_REDO = "rlp.dev/redo"
# A JSON object of annotations put on every phase pod (e.g. sidecar opt-outs, autoscaler hints).
ANNOTATION_POD_ANNOTATIONS = "rlp.dev/pod-annotations"

SPEC_MOUNT = "/etc/rlp"
SPEC_FILE = "spec.json"
CACHE_DIR = "/var/cache/rlp"
METRICS_PORT = 9090
RENDEZVOUS_PORT = 29500
CONTAINER = "phase"
# Job names stay at most this long so that indexed pods' hostnames (`<job>-<index>`) fit in 63 characters.
MAX_JOB_NAME = 52
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@dataclasses.dataclass(frozen=True)
class JobDefaults:
    """Install-wide defaults (the operator's environment) for runs that leave these fields unset.

    `RLP_DEFAULT_JOB_IMAGE` replaces the model's default image; for `s3://` storage without them,
    `RLP_S3_ENDPOINT`, `AWS_DEFAULT_REGION` and `RLP_DEFAULT_STORAGE_SECRET` (a Secret's name, looked up
    in the run's namespace) fill `storage.endpoint`, `.region` and `.secretRef`. They are applied before
    anything is rendered, so the ConfigMap the pods read, the pods' env and the operator's own manifest
    checks all see the same storage. A field the run sets itself always wins.
    """

    image: str | None = None
    s3_endpoint: str | None = None
    region: str | None = None
    storage_secret: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JobDefaults:
        env = os.environ if env is None else env
        return cls(
            image=env.get("RLP_DEFAULT_JOB_IMAGE") or None,
            s3_endpoint=env.get("RLP_S3_ENDPOINT") or None,
            region=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or None,
            storage_secret=env.get("RLP_DEFAULT_STORAGE_SECRET") or None,
        )

    def apply(self, run: RLPRun) -> RLPRun:
        spec = run.spec
        storage, resources = spec.storage, spec.resources
        st: dict[str, Any] = {}
        if storage.uri.startswith("s3://"):
            if storage.endpoint is None and self.s3_endpoint:
                st["endpoint"] = self.s3_endpoint
            if storage.region is None and self.region:
                st["region"] = self.region
            if storage.secret_ref is None and self.storage_secret:
                st["secret_ref"] = SecretRef(name=self.storage_secret)
        res: dict[str, Any] = {}
        if self.image and resources.image == Resources.model_fields["image"].default:
            res["image"] = self.image
        if not st and not res:
            return run
        new_spec = spec.model_copy(
            update={"storage": storage.model_copy(update=st), "resources": resources.model_copy(update=res)}
        )
        return run.model_copy(update={"spec": new_spec})


def needs_finalizer(run_body: dict[str, Any]) -> bool:
    """Only a run whose stored outputs are to be deleted with it holds a finalizer (`FINALIZER`).

    Its Jobs, Services and ConfigMap carry an owner reference to it, so Kubernetes' garbage collector
    deletes them with the run, operator or not: an uninstalled or stopped operator cannot hold up
    `kubectl delete` or a namespace's deletion, except for runs that ask for their checkpoints to be
    deleted (docs/operator.md says how to release those by hand).
    """
    annotations = run_body.get("metadata", {}).get("annotations") or {}
    return annotations.get(ANNOTATION_DELETE_CHECKPOINTS, "").lower() == "true"


def _short_hash(text: str, n: int = 6) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def job_name(run: str, round_: int, phase: str, attempt: int) -> str:
    """`<run>-r<K>-<phase>-a<N>`, at most MAX_JOB_NAME characters, stable for the same inputs."""
    suffix = f"-r{round_}-{phase}-a{attempt}"
    name = run + suffix
    if len(name) <= MAX_JOB_NAME:
        return name
    digest = _short_hash(name)
    keep = MAX_JOB_NAME - len(suffix) - len(digest) - 1
    return f"{run[:keep].rstrip('-')}-{digest}{suffix}"


def service_name(job: str) -> str:
    """Headless Service of a multi-pod Job (a DNS-1035 label: must start with a letter)."""
    return job if job[0].isalpha() else f"s{job}"[:63]


def configmap_name(run: str) -> str:
    return f"{run}-spec"


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def run_labels(run: str) -> dict[str, str]:
    return {LABEL_RUN: run, LABEL_MANAGED_BY: MANAGED_BY}


def spec_document(run: RLPRun) -> str:
    """The full RLPRun as JSON: what `rlp phase --spec` reads. Holds no secret values (only a Secret's name)."""
    return json.dumps(run.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2, sort_keys=True)


def render_configmap(run: RLPRun, owner: dict[str, Any]) -> dict[str, Any]:
    name = run.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(name),
            "namespace": run.metadata.namespace,
            "labels": run_labels(name),
            "ownerReferences": [owner],
        },
        "data": {SPEC_FILE: spec_document(run)},
    }


def phase_resources(run: RLPRun, phase: str) -> dict[str, Any]:
    """`spec.resources` with the phase's overrides applied."""
    res = run.spec.resources
    override = run.spec.phases.get(phase) or PhaseOverride()  # type: ignore[call-overload]
    return {
        "image": override.image or res.image,
        "gpus": res.gpus_per_pod if override.gpus_per_pod is None else override.gpus_per_pod,
        "nodes": override.nodes or res.nodes,
        "cpu": override.cpu or res.cpu,
        "memory": override.memory or res.memory,
        "active_deadline_seconds": override.active_deadline_seconds,
    }


def render_service(run: RLPRun, job: str, owner: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(job),
            "namespace": run.metadata.namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rendezvous happens before pods are ready
            "selector": {"batch.kubernetes.io/job-name": job},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def pod_annotations(run_body: dict[str, Any]) -> dict[str, str]:
    """The run's `rlp.dev/pod-annotations` (a JSON object of strings); ValueError when malformed."""
    raw = (run_body.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_POD_ANNOTATIONS)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"annotation {ANNOTATION_POD_ANNOTATIONS} is not valid JSON: {e}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"annotation {ANNOTATION_POD_ANNOTATIONS} must be a JSON object of string values")
    return value


def render_job(
    run: RLPRun,
    round_: int,
    phase: str,
    attempt: int,
    owner: dict[str, Any],
    annotations: dict[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The Job of one phase attempt, and its headless Service when the phase spans several pods."""
    spec = run.spec
    name = run.metadata.name
    namespace = run.metadata.namespace
    job = job_name(name, round_, phase, attempt)
    r = phase_resources(run, phase)
    nodes = r["nodes"]
    labels = {
        **run_labels(name),
        LABEL_PHASE: phase,
        LABEL_ROUND: str(round_),
        LABEL_ATTEMPT: str(attempt),
        "app.kubernetes.io/name": "rlp-phase",
    }
    if spec.resources.queue:
        labels[KUEUE_QUEUE_LABEL] = spec.resources.queue

    env: list[dict[str, Any]] = [
        {"name": "RLP_RUN_NAME", "value": name},
        {"name": "RLP_NAMESPACE", "value": namespace},
        {"name": "RLP_PHASE", "value": phase},
        {"name": "RLP_ROUND", "value": str(round_)},
        {"name": "RLP_ATTEMPT", "value": str(attempt)},
        {"name": "RLP_METRICS_PORT", "value": str(METRICS_PORT)},
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
    ]
    storage = spec.storage
    if storage.endpoint:
        env.append({"name": "RLP_S3_ENDPOINT", "value": storage.endpoint})
    if storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": storage.region})
    if storage.secret_ref:
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": storage.secret_ref.name, "key": key}}}
            for key in SECRET_KEYS
        ]
    hub = spec.hub  # hf:// models are fetched in the pod with these
    if hub.endpoint:
        env.append({"name": "HF_ENDPOINT", "value": hub.endpoint})
    if hub.secret_ref:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": hub.secret_ref.name,
                                                                        "key": hub.secret_ref.key}}})
    token = spec.optimization.reward_function and spec.optimization.reward_function.token_secret_ref
    if token:  # the user reward endpoint's bearer token (rlp_core.reward_functions)
        env.append({"name": "RLP_REWARD_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    service = None
    if nodes > 1:
        svc = service_name(job)
        nproc = max(r["gpus"], 1)
        env += [
            {"name": "MASTER_ADDR", "value": f"{job}-0.{svc}"},
            {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
            {"name": "NNODES", "value": str(nodes)},
            {"name": "NPROC_PER_NODE", "value": str(nproc)},
            {"name": "WORLD_SIZE", "value": str(nodes * nproc)},
            {
                "name": "NODE_RANK",
                "valueFrom": {
                    "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
                },
            },
        ]
        service = render_service(run, job, owner, labels)

    requests: dict[str, Any] = {"cpu": r["cpu"], "memory": r["memory"]}
    limits: dict[str, Any] = {}
    if r["gpus"]:
        requests["nvidia.com/gpu"] = r["gpus"]
        limits["nvidia.com/gpu"] = r["gpus"]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": r["image"],
        "command": ["rlp", "phase", phase, "--spec", f"{SPEC_MOUNT}/{SPEC_FILE}", "--round", str(round_)],
        "env": env,
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}]
        + ([{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}] if nodes > 1 else []),
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,  # the user of jobs/Dockerfile
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "spec", "configMap": {"name": configmap_name(name)}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in spec.resources.tolerations
        ]
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name
    if spec.resources.service_account_name:
        pod_spec["serviceAccountName"] = spec.resources.service_account_name
    if service is not None:
        pod_spec["subdomain"] = service["metadata"]["name"]

    job_spec: dict[str, Any] = {
        "backoffLimit": 0,  # the operator owns retries (it counts them in status)
        "completions": nodes,
        "parallelism": nodes,
        "completionMode": "Indexed",
        "template": {
            "metadata": {"labels": labels, **({"annotations": dict(annotations)} if annotations else {})},
            "spec": pod_spec,
        },
    }
    if r["active_deadline_seconds"]:
        job_spec["activeDeadlineSeconds"] = r["active_deadline_seconds"]
    if spec.resources.queue:
        job_spec["suspend"] = True  # Kueue admits (unsuspends) the Job when its queue has quota
    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job,
            "namespace": namespace,
            "labels": labels,
            "annotations": {"rlp.dev/spec-hash": spec.hash()},
            "ownerReferences": [owner],
        },
        "spec": job_spec,
    }
    return body, service
