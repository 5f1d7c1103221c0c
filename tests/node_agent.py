"""A test-only node agent: a tiny kubelet that runs pods as local processes (tests only, never shipped).

kwok fakes pod lifecycles; the end-to-end test needs the phase pods' commands to *really* run. This agent
registers one Node of its own (no kwok annotation, so kwok leaves it alone), keeps it Ready (Lease renewals
and the Ready condition's heartbeat), and for every pod the real scheduler binds to that node:

1. resolves the container's environment the way the kubelet does: ``env`` values (with ``$(VAR)``
   references), ``secretKeyRef``, ``configMapKeyRef``, ``fieldRef`` (metadata.name/namespace/uid/labels/
   annotations, spec.nodeName, spec.serviceAccountName, status.podIP/hostIP) and ``envFrom``, read from
   the API; a missing Secret or ConfigMap keeps the pod Pending (``CreateContainerConfigError``) and is
   retried, like the kubelet does;
2. materialises its volumes in a per-pod directory: configMap, secret, downwardAPI and projected
   volumes are written out as files (a projected serviceAccountToken through the TokenRequest API),
   emptyDir is an empty directory;
3. runs ``command + args`` as a local process (own session, output in a log file, cwd = the container's
   workingDir or a fresh directory). A process cannot see a mount, so every ``mountPath`` in the
   command, args, literal env values and workingDir is rewritten to the directory that stands in for it
   (``/etc/rlp/spec.json`` becomes ``<pod dir>/volumes/spec/spec.json``; one pass, longest mount path
   first, only at path boundaries). Rewriting beats alternatives such as a private mount namespace
   because it needs no privileges; the phase entrypoint needs no test-only switch either way;
4. reports the pod Running (conditions, podIP 127.0.0.1, a running containerStatus), then Succeeded or
   Failed with the process's real exit code (128+N for a signal, as the kubelet reports it) through the
   status subresource, with the log tail as the termination message under FallbackToLogsOnError;
5. on a pod's deletion sends SIGTERM to its process group, SIGKILL after the grace period (at most 10 s),
   reports the terminal status and removes the pod (grace period 0), as the kubelet does.

Container mode (``NodeAgent(..., podman=infra.images.Podman())``): step 3 is ``podman run`` of the pod's
image instead (``--pull never``: the image must have been built on this machine, e.g. by
scripts/build-images.sh), with the pod's command as the entrypoint and its args, its resolved env, each
volume bind-mounted at its ``mountPath`` (no rewriting; emptyDirs world-writable as the kubelet makes
them, ``readOnly`` mounts read-only), the host network (the loopback test servers are reachable, the pod
IP stays 127.0.0.1), and the security context applied: ``runAsUser``/``runAsGroup``/``fsGroup``,
``readOnlyRootFilesystem`` (nothing but the pod's volumes writable), ``capabilities.drop``,
``allowPrivilegeEscalation: false``. Killing and deleting a pod go through ``podman kill``/``podman stop``.

Not supported (the pod fails with a message saying so): more than one container, init containers,
hostPath/PVC and other volume types, resourceFieldRef. restartPolicy is treated as Never. In process
mode containers run with the agent's Python environment on PATH (the image is not used), so ``rlp`` and
``python`` are the repository's. ``stop()`` kills every process group (and container) it started (the
processes also die with the test process: PR_SET_PDEATHSIG) and deletes the Node and its Lease.

    agent = NodeAgent(api_client, "rlp-agent", labels={...}, taints=[...]).start()
    ...                                    # pods with nodeSelector/tolerations for it run for real
    agent.log("ns", "pod-name")            # a container's output
    agent.kill("ns", "pod-name")           # SIGKILL its process group: the pod fails with exit code 137
    agent.stop()

Also runnable by hand against a kubeconfig: ``python tests/node_agent.py --kubeconfig FILE --node NAME``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infra._process import Workdir, _child_setup, _kill_group, register_for_cleanup, unregister  # noqa: E402
from infra.images import Podman  # noqa: E402

log = logging.getLogger("rlp.test.node_agent")

NODE_LABEL = "rlp.dev/node-agent"
LEASE_NAMESPACE = "kube-node-lease"
POD_IP = "127.0.0.1"
MAX_GRACE = 10.0
TERMINATION_MESSAGE_BYTES, TERMINATION_MESSAGE_LINES = 2048, 80  # the kubelet's log fallback limits


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(RuntimeError):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status


class _Retry(Exception):
    """The pod cannot start yet (e.g. its Secret does not exist): stays Pending, tried again later."""


class _Unsupported(Exception):
    """The pod asks for something this agent does not do: it fails with this message."""


class Api:
    """Raw JSON calls to the apiserver with the credentials of a kubernetes.client.ApiClient (thread-safe)."""

    def __init__(self, api_client):
        cfg = api_client.configuration
        self.host = cfg.host.rstrip("/")
        self.auth = cfg.get_api_key_with_prefix("authorization")
        self.ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert else ssl.create_default_context()
        if not cfg.verify_ssl:
            self.ctx.check_hostname, self.ctx.verify_mode = False, ssl.CERT_NONE
        if cfg.cert_file:
            self.ctx.load_cert_chain(cfg.cert_file, cfg.key_file)

    def call(self, method: str, path: str, body: Any = None, *, query: dict[str, str] | None = None,
             content_type: str = "application/json") -> Any:  # fmt: skip
        url = self.host + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Accept": "application/json"}
        if self.auth:
            headers["Authorization"] = self.auth
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), content_type
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=30) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as err:
            raise ApiError(err.code, err.read().decode(errors="replace")) from None
        return json.loads(text) if text else None

    def get(self, path: str, **kw) -> Any | None:
        try:
            return self.call("GET", path, **kw)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def merge_patch(self, path: str, body: dict) -> Any:
        return self.call("PATCH", path, body, content_type="application/merge-patch+json")


@dataclass
class _PodRun:
    namespace: str
    name: str
    uid: str
    container: str
    image: str
    dir: Path
    log_path: Path
    fallback_to_logs: bool
    container_name: str | None = None  # container mode: the podman container running it
    popen: subprocess.Popen | None = None
    started_at: str = ""
    exit_code: int | None = None
    terminating: bool = False
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"


class NodeAgent:
    def __init__(
        self,
        api_client,
        node_name: str = "rlp-node-agent",
        *,
        labels: dict[str, str] | None = None,
        taints: list[dict[str, str]] | None = None,
        capacity: dict[str, str] | None = None,
        extra_env: dict[str, str] | None = None,
        podman: Podman | None = None,
        poll_seconds: float = 0.25,
        heartbeat_seconds: float = 5.0,
    ):
        self.api = Api(api_client)
        self.node_name = node_name
        self.labels = {NODE_LABEL: "true", **(labels or {})}
        self.taints = list(taints or [])
        self.capacity = capacity or {"cpu": "16", "memory": "64Gi", "pods": "32", "ephemeral-storage": "100Gi"}
        self.extra_env = dict(extra_env or {})  # set in every pod, over what the pod itself says
        self.podman = podman
        self.poll_seconds = poll_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.runs: dict[str, _PodRun] = {}  # by pod uid
        self._deleted: set[str] = set()
        self._waiting: dict[str, str] = {}  # uid -> last reported waiting message
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wd: Workdir | None = None
        self.errors: list[str] = []  # unexpected errors of the loops, for the tests to check

    # ------------------------------------------------------------------------------------------
    # lifecycle

    def start(self) -> NodeAgent:
        self._wd = Workdir("node-agent")
        register_for_cleanup(self)
        self._register_node()
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._pod_loop, "pods")):
            thread = threading.Thread(target=target, name=f"node-agent-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Kill every pod process, stop the loops, delete the Node and its Lease. Idempotent."""
        self._stop.set()
        for run in list(self.runs.values()):
            if run.popen is not None and run.popen.poll() is None:
                self._signal(run, signal.SIGKILL)
                try:
                    run.popen.wait(10)
                except subprocess.TimeoutExpired:  # pragma: no cover
                    pass
        for thread in self._threads:
            thread.join(15)
        self._threads.clear()
        for path in (f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{self.node_name}",
                     f"/api/v1/nodes/{self.node_name}"):  # fmt: skip
            try:
                self.api.call("DELETE", path)
            except (ApiError, OSError):
                pass
        if self._wd is not None:
            self._wd.remove()
            self._wd = None
        unregister(self)

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self, namespace: str, pod: str, sig: int = signal.SIGKILL) -> bool:
        """Signal a running pod's process group or container (an OOM kill, a crash); False when it is not
        running."""
        for run in list(self.runs.values()):
            if run.namespace == namespace and run.name == pod and run.popen is not None and run.popen.poll() is None:
                return self._signal(run, sig)
        return False

    def _signal(self, run: _PodRun, sig: int) -> bool:
        """Send ``sig`` to a run's container (container mode) or process group."""
        if run.container_name:
            return self.podman.run("kill", "--signal", str(int(sig)), run.container_name, timeout=60).returncode == 0
        return _kill_group(run.popen.pid, sig)

    def running(self, namespace: str) -> list[str]:
        """Names of the pods of ``namespace`` whose process is running now."""
        return [r.name for r in list(self.runs.values())
                if r.namespace == namespace and r.popen is not None and r.popen.poll() is None]  # fmt: skip

    def log(self, namespace: str, pod: str) -> str:
        """The output of a pod's container (all of its runs on this node)."""
        return "".join(r.log_path.read_text(errors="replace") for r in list(self.runs.values())
                       if r.namespace == namespace and r.name == pod and r.log_path.exists())  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # the node

    def _conditions(self) -> list[dict[str, str]]:
        now = _now()

        def cond(type_: str, status: str, reason: str, message: str) -> dict[str, str]:
            return {"type": type_, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": now, "lastTransitionTime": self._since}  # fmt: skip

        return [
            cond("Ready", "True", "KubeletReady", "the rlp test node agent is running pods as local processes"),
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
        ]

    def _register_node(self) -> None:
        self._since = _now()
        status = {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": self._conditions(),
            "addresses": [{"type": "InternalIP", "address": POD_IP}, {"type": "Hostname", "address": self.node_name}],
            "nodeInfo": {"kubeletVersion": "v0.0.0-rlp-node-agent", "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "rlp-node-agent://0", "kernelVersion": "",
                         "osImage": "", "machineID": "", "systemUUID": "", "bootID": ""},
        }  # fmt: skip
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": {
                "kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                **self.labels}},
            "spec": {"taints": self.taints},
            "status": status,
        }  # fmt: skip
        try:
            node = self.api.call("POST", "/api/v1/nodes", body)
        except ApiError as err:
            if err.status != 409:
                raise
            self.api.call("DELETE", f"/api/v1/nodes/{self.node_name}")  # a leftover of an earlier run
            node = self.api.call("POST", "/api/v1/nodes", body)
        self.api.merge_patch(f"/api/v1/nodes/{self.node_name}/status", {"status": status})
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.node_name, "namespace": LEASE_NAMESPACE, "ownerReferences": [
                {"apiVersion": "v1", "kind": "Node", "name": self.node_name, "uid": node["metadata"]["uid"]}]},
            "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": _micro_now()},
        }  # fmt: skip
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
        try:
            self.api.call("POST", path, lease)
        except ApiError as err:
            if err.status != 409:
                raise
            self.api.merge_patch(f"{path}/{self.node_name}", {"spec": lease["spec"]})

    def _heartbeat_loop(self) -> None:
        lease = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{self.node_name}"
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self.api.merge_patch(lease, {"spec": {"renewTime": _micro_now()}})
                self.api.merge_patch(f"/api/v1/nodes/{self.node_name}/status", {"status": {"conditions": self._conditions()}})
            except (ApiError, OSError) as err:
                log.warning("node heartbeat failed: %s", err)

    # ------------------------------------------------------------------------------------------
    # pods

    def _pod_loop(self) -> None:
        selector = {"fieldSelector": f"spec.nodeName={self.node_name}"}
        while not self._stop.is_set():
            try:
                pods = self.api.call("GET", "/api/v1/pods", query=selector)["items"]
                seen = set()
                for pod in pods:
                    seen.add(pod["metadata"]["uid"])
                    self._sync(pod)
                for uid, run in list(self.runs.items()):  # gone from the API (force-deleted): stop it
                    if uid not in seen and run.popen is not None and run.popen.poll() is None:
                        self._signal(run, signal.SIGKILL)
            except (ApiError, OSError) as err:
                log.warning("pod sync failed: %s", err)
            except Exception as err:  # noqa: BLE001 - keep the node alive; the test sees it in .errors
                log.exception("pod sync crashed")
                self.errors.append(repr(err))
            self._stop.wait(self.poll_seconds)

    def _sync(self, pod: dict[str, Any]) -> None:
        meta, status = pod["metadata"], pod.get("status") or {}
        uid = meta["uid"]
        run = self.runs.get(uid)
        if meta.get("deletionTimestamp"):
            if run is not None and run.popen is not None and not run.finished.is_set():
                if not run.terminating:
                    run.terminating = True
                    grace = min(float(meta.get("deletionGracePeriodSeconds") or 0), MAX_GRACE)
                    threading.Thread(target=self._terminate, args=(run, grace), daemon=True).start()
            elif uid not in self._deleted:
                self._force_delete(meta["namespace"], meta["name"], uid)
            return
        if run is not None or status.get("phase") in ("Succeeded", "Failed"):
            return
        try:
            self._start(pod)
        except _Retry as err:
            if self._waiting.get(uid) != str(err):
                self._waiting[uid] = str(err)
                self._report_waiting(pod, "CreateContainerConfigError", str(err))
        except _Unsupported as err:
            self._report_unsupported(pod, str(err))

    # -- starting

    def _start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        if spec.get("initContainers"):
            raise _Unsupported("init containers are not supported by the test node agent")
        if len(spec["containers"]) != 1:
            raise _Unsupported("the test node agent runs pods with exactly one container")
        container = spec["containers"][0]
        pod_dir = self._wd.path / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        env = self._env(pod, container)
        mounts = self._volumes(pod, container, pod_dir / "volumes")
        if self.podman is not None:
            self._start_container(pod, container, pod_dir, env, mounts)
            return
        rewrite = _path_rewriter(mounts)
        for var in container.get("env") or []:  # literal values may name mounted paths
            if "value" in var and var["name"] in env:
                env[var["name"]] = rewrite(env[var["name"]])
        argv = [rewrite(_expand(a, env)) for a in (container.get("command") or []) + (container.get("args") or [])]
        if not argv:
            raise _Unsupported("the container has no command: the agent does not know the image's entrypoint")
        base_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        full_env = {"PATH": base_path, "HOSTNAME": meta["name"], "HOME": str(pod_dir / "home"), **env, **self.extra_env}
        exe = shutil.which(argv[0], path=full_env["PATH"])
        if exe is None:
            raise _Unsupported(f"executable {argv[0]!r} not found on PATH {full_env['PATH']}")
        cwd = Path(rewrite(container["workingDir"])) if container.get("workingDir") else pod_dir / "work"
        for d in (cwd, pod_dir / "home"):
            d.mkdir(parents=True, exist_ok=True)
        run = self._new_run(pod, container, pod_dir)
        self._launch(pod, run, [exe, *argv[1:]], cwd, full_env, shown=argv)

    def _start_container(self, pod: dict[str, Any], container: dict[str, Any], pod_dir: Path, env: dict[str, str],
                         mounts: dict[str, str]) -> None:  # fmt: skip
        """``podman run`` of the pod's image with its command, env, volumes and security context."""
        meta = pod["metadata"]
        security = {**(pod["spec"].get("securityContext") or {}), **(container.get("securityContext") or {})}
        run = self._new_run(pod, container, pod_dir)
        run.container_name = f"{self.node_name}-{meta['uid'][:18]}"
        args = ["run", "--rm", "--name", run.container_name, "--pull", "never", "--network", "host"]
        if "runAsUser" in security:
            args += ["--user", f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"]
        if "fsGroup" in security:
            args += ["--group-add", str(security["fsGroup"])]
        if security.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]
        for cap in (security.get("capabilities") or {}).get("drop") or []:
            args += ["--cap-drop", cap]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        read_only = {m["mountPath"].rstrip("/") or "/" for m in container.get("volumeMounts") or [] if m.get("readOnly")}
        for mount_path, local in mounts.items():
            args += ["--volume", f"{local}:{mount_path}" + (":ro" if mount_path in read_only else "")]
        shown = list(args)
        for name, value in sorted({**env, **self.extra_env}.items()):
            args += ["--env", f"{name}={value}"]
            shown += ["--env", name]  # values stay out of the log: some are Secrets'
        rest = []
        if container.get("workingDir"):
            rest += ["--workdir", container["workingDir"]]
        if container.get("command"):
            rest += ["--entrypoint", json.dumps([_expand(a, env) for a in container["command"]])]
        rest += [container["image"], *(_expand(a, env) for a in container.get("args") or [])]
        self._launch(pod, run, self.podman.argv(*args, *rest), pod_dir, self.podman.env, shown=[*shown, *rest])

    def _new_run(self, pod: dict[str, Any], container: dict[str, Any], pod_dir: Path) -> _PodRun:
        meta = pod["metadata"]
        return _PodRun(meta["namespace"], meta["name"], meta["uid"], container["name"], container.get("image", ""),
                       pod_dir, pod_dir / f"{container['name']}.log",
                       container.get("terminationMessagePolicy") == "FallbackToLogsOnError")  # fmt: skip

    def _launch(self, pod: dict[str, Any], run: _PodRun, argv: list[str], cwd: Path, env: dict[str, str], *,
                shown: list[str]) -> None:  # fmt: skip
        """Start ``argv`` for ``run``, report the pod Running and watch for its exit."""
        run.dir.mkdir(parents=True, exist_ok=True)
        with open(run.log_path, "ab") as out:
            out.write(f"--- node agent: {' '.join(shown)}\n".encode())
            out.flush()
            run.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=_child_setup, close_fds=True)  # noqa: PLW1509
        self._wd.record(run.popen.pid)
        run.started_at = _now()
        self.runs[run.uid] = run
        self._waiting.pop(run.uid, None)
        log.info("started %s/%s (pid %d): %s", run.namespace, run.name, run.popen.pid, shown)
        try:
            self._patch_status(run, self._running_status(pod, run))
        except (ApiError, OSError) as err:  # the pod is in self.runs now: whatever happens, start its _wait
            log.warning("could not report %s/%s Running: %s", run.namespace, run.name, err)
        threading.Thread(target=self._wait, args=(run,), name=f"pod-{run.name}", daemon=True).start()

    def _env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref, data = source["configMapRef"], self._configmap(ns, source["configMapRef"]["name"])
            else:
                ref, data = source["secretRef"], self._secret(ns, source["secretRef"]["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise _Retry(f"{'configmap' if 'configMapRef' in source else 'secret'} {ref['name']!r} not found")
            env.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = _expand(var.get("value", ""), env)
                continue
            src = var["valueFrom"]
            if "fieldRef" in src:
                env[name] = _field(pod, src["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in src or "configMapKeyRef" in src:
                kind = "secret" if "secretKeyRef" in src else "configmap"
                ref = src.get("secretKeyRef") or src["configMapKeyRef"]
                data = (self._secret if kind == "secret" else self._configmap)(ns, ref["name"])
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    what = f"{kind} {ref['name']!r}" if data is None else f"key {ref['key']!r} in {kind} {ref['name']!r}"
                    raise _Retry(f"couldn't find {what} for env {name}")
                env[name] = data[ref["key"]]
            else:
                raise _Unsupported(f"env {name}: only value, fieldRef, secretKeyRef and configMapKeyRef are supported")
        return env

    def _configmap(self, ns: str, name: str) -> dict[str, str] | None:
        obj = self.api.get(f"/api/v1/namespaces/{ns}/configmaps/{name}")
        if obj is None:
            return None
        binary = {k: base64.b64decode(v).decode("latin-1") for k, v in (obj.get("binaryData") or {}).items()}
        return {**(obj.get("data") or {}), **binary}

    def _secret(self, ns: str, name: str) -> dict[str, str] | None:
        obj = self.api.get(f"/api/v1/namespaces/{ns}/secrets/{name}")
        if obj is None:
            return None
        return {k: base64.b64decode(v).decode("latin-1") for k, v in (obj.get("data") or {}).items()}

    def _volumes(self, pod: dict[str, Any], container: dict[str, Any], root: Path) -> dict[str, str]:
        """Materialise the pod's volumes under ``root``; returns {mountPath: local directory or file}."""
        ns = pod["metadata"]["namespace"]
        dirs: dict[str, Path] = {}
        for vol in pod["spec"].get("volumes") or []:
            path = root / vol["name"]
            path.mkdir(parents=True, exist_ok=True)
            dirs[vol["name"]] = path
            if "emptyDir" in vol:
                path.chmod(0o777)  # as the kubelet makes it: writable by the container's user
                continue
            if "configMap" in vol or "secret" in vol:
                self._write_source(ns, vol, path)
            elif "downwardAPI" in vol:
                self._write_downward(pod, vol["downwardAPI"].get("items") or [], path)
            elif "projected" in vol:
                for src in vol["projected"].get("sources") or []:
                    if "serviceAccountToken" in src:
                        self._write_token(pod, src["serviceAccountToken"], path)
                    elif "downwardAPI" in src:
                        self._write_downward(pod, src["downwardAPI"].get("items") or [], path)
                    else:
                        self._write_source(ns, src, path)
            else:
                kind = next((k for k in vol if k != "name"), "?")
                raise _Unsupported(f"volume {vol['name']!r}: {kind} volumes are not supported by the test node agent")
        mounts = {}
        for m in container.get("volumeMounts") or []:
            if m["name"] not in dirs:
                raise _Unsupported(f"volumeMount of unknown volume {m['name']!r}")
            local = dirs[m["name"]] / m["subPath"] if m.get("subPath") else dirs[m["name"]]
            mounts[m["mountPath"].rstrip("/") or "/"] = str(local)
        return mounts

    def _write_source(self, ns: str, src: dict[str, Any], path: Path) -> None:
        if "configMap" in src:
            ref, data, kind = src["configMap"], self._configmap(ns, src["configMap"]["name"]), "configmap"
        else:
            ref = src["secret"]
            name = ref.get("secretName") or ref.get("name")
            data, kind = self._secret(ns, name), "secret"
            ref = {**ref, "name": name}
        if data is None:
            if ref.get("optional"):
                return
            raise _Retry(f"{kind} {ref['name']!r} not found (volume)")
        items = ref.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                raise _Retry(f"key {item['key']!r} not in {kind} {ref['name']!r}")
            target = path / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[item["key"]].encode("latin-1") if kind == "secret" else data[item["key"]].encode())

    def _write_downward(self, pod: dict[str, Any], items: list[dict[str, Any]], path: Path) -> None:
        for item in items:
            if "fieldRef" not in item:
                raise _Unsupported("downwardAPI items other than fieldRef are not supported")
            target = path / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_field(pod, item["fieldRef"]["fieldPath"]))

    def _write_token(self, pod: dict[str, Any], src: dict[str, Any], path: Path) -> None:
        meta = pod["metadata"]
        sa = pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [src["audience"]] if src.get("audience") else [],
            "expirationSeconds": int(src.get("expirationSeconds") or 3600),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}}}  # fmt: skip
        try:
            token = self.api.call("POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token", body)
        except ApiError as err:
            raise _Retry(f"token for service account {sa!r}: {err}") from None
        (path / src["path"]).write_text(token["status"]["token"])

    # -- status

    def _patch_status(self, run: _PodRun, status: dict[str, Any]) -> None:
        self.api.merge_patch(run.path + "/status", {"status": status})

    def _conditions_for(self, pod: dict[str, Any], ready: bool, reason: str | None = None) -> list[dict[str, Any]]:
        now = _now()
        scheduled = next((c for c in (pod.get("status") or {}).get("conditions") or [] if c["type"] == "PodScheduled"),
                         {"type": "PodScheduled", "status": "True", "lastTransitionTime": now})  # fmt: skip

        def cond(type_: str, value: bool) -> dict[str, Any]:
            c = {"type": type_, "status": "True" if value else "False", "lastTransitionTime": now}
            if not value and reason:
                c["reason"] = reason
            return c

        return [cond("PodReadyToStartContainers", True), cond("Initialized", True), cond("Ready", ready),
                cond("ContainersReady", ready), scheduled]  # fmt: skip

    def _container_status(self, run: _PodRun, state: dict[str, Any], ready: bool) -> dict[str, Any]:
        return {"name": run.container, "image": run.image, "imageID": "", "ready": ready, "started": ready,
                "restartCount": 0, "state": state, "containerID": f"rlp-node-agent://{run.popen.pid}"}  # fmt: skip

    def _running_status(self, pod: dict[str, Any], run: _PodRun) -> dict[str, Any]:
        return {
            "phase": "Running",
            "hostIP": POD_IP, "hostIPs": [{"ip": POD_IP}], "podIP": POD_IP, "podIPs": [{"ip": POD_IP}],
            "startTime": run.started_at,
            "conditions": self._conditions_for(pod, True),
            "containerStatuses": [self._container_status(run, {"running": {"startedAt": run.started_at}}, True)],
        }  # fmt: skip

    def _wait(self, run: _PodRun) -> None:
        rc = run.popen.wait()
        if self._wd is not None:
            self._wd.forget(run.popen.pid)
        _kill_group(run.popen.pid, signal.SIGKILL)  # whatever it left behind in its session
        run.exit_code = rc if rc >= 0 else 128 - rc
        finished = _now()
        log.info("%s/%s exited with %d", run.namespace, run.name, run.exit_code)
        terminated = {"exitCode": run.exit_code, "reason": "Completed" if run.exit_code == 0 else "Error",
                      "startedAt": run.started_at, "finishedAt": finished,
                      "containerID": f"rlp-node-agent://{run.popen.pid}"}  # fmt: skip
        if run.exit_code != 0 and run.fallback_to_logs:
            terminated["message"] = _log_tail(run.log_path)
        try:
            # Nothing reports this pod's end but this thread: an apiserver hiccup (a 5xx, a reset or timed-out
            # connection on a loaded machine) is retried, or the pod would stay Running forever.
            for attempt in range(5):
                try:
                    self._report_finished(run, terminated)
                    break
                except (ApiError, OSError) as err:
                    log.warning("could not report %s/%s finished (try %d): %s", run.namespace, run.name, attempt + 1,
                                err)
                    if self._stop.wait(0.5 * 2**attempt):
                        break
        finally:
            run.finished.set()

    def _report_finished(self, run: _PodRun, terminated: dict[str, Any]) -> None:
        pod = self.api.get(run.path) if not self._stop.is_set() else None
        if pod is not None and pod["metadata"]["uid"] == run.uid:
            status = {
                "phase": "Succeeded" if run.exit_code == 0 else "Failed",
                "conditions": self._conditions_for(pod, False, "PodCompleted" if run.exit_code == 0 else "PodFailed"),
                "containerStatuses": [self._container_status(run, {"terminated": terminated}, False)],
            }
            self._patch_status(run, status)
            if run.terminating or pod["metadata"].get("deletionTimestamp"):
                self._force_delete(run.namespace, run.name, run.uid)

    def _terminate(self, run: _PodRun, grace: float) -> None:
        self._signal(run, signal.SIGTERM)
        try:
            run.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal(run, signal.SIGKILL)

    def _force_delete(self, ns: str, name: str, uid: str) -> None:
        self._deleted.add(uid)
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            self.api.call("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", body)
        except ApiError as err:
            if err.status not in (404, 409):
                log.warning("could not delete pod %s/%s: %s", ns, name, err)

    def _report_waiting(self, pod: dict[str, Any], reason: str, message: str) -> None:
        meta = pod["metadata"]
        container = pod["spec"]["containers"][0]
        status = {"phase": "Pending", "containerStatuses": [
            {"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": False,
             "started": False, "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}}]}  # fmt: skip
        log.info("%s/%s waits: %s", meta["namespace"], meta["name"], message)
        try:
            self.api.merge_patch(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", {"status": status})
        except ApiError as err:
            log.warning("could not report %s/%s waiting: %s", meta["namespace"], meta["name"], err)

    def _report_unsupported(self, pod: dict[str, Any], message: str) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if uid in self._deleted or self._waiting.get(uid) == "unsupported":
            return
        self._waiting[uid] = "unsupported"
        log.warning("%s/%s fails: %s", meta["namespace"], meta["name"], message)
        status = {"phase": "Failed", "reason": "UnsupportedByNodeAgent", "message": message}
        try:
            self.api.merge_patch(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", {"status": status})
        except ApiError as err:
            log.warning("could not fail %s/%s: %s", meta["namespace"], meta["name"], err)


# --------------------------------------------------------------------------------------------------
# for tests: an agent whose node takes only the pods that ask for it

AGENT_TAINT = {"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}
AGENT_NODE_LABEL = "rlp.dev/agent-node"


@contextlib.contextmanager
def running_agent(control_plane, *, podman: Podman | None = None) -> Iterator[NodeAgent]:
    """A started agent on a fresh node, tainted so that only pods placed with ``on_agent`` land there;
    stopped after, and its loops must have run without unexpected errors."""
    name = f"rlp-agent-{uuid.uuid4().hex[:6]}"
    # Phase pods get the suite's thread pin (tests/conftest.py; the agent builds their env from scratch) and no
    # /metrics: the operator's RLP_METRICS_PORT=9090 would be a fixed port on this host, and no test scrapes it.
    agent = NodeAgent(control_plane.api_client(), name, labels={AGENT_NODE_LABEL: name}, taints=[AGENT_TAINT],
                      extra_env={"OMP_NUM_THREADS": "2", "RLP_METRICS_PORT": "0"}, podman=podman).start()  # fmt: skip
    try:
        yield agent
    finally:
        agent.stop()
    assert not agent.errors, agent.errors


def on_agent(agent: NodeAgent) -> dict:
    """Pod spec fields (also RLPRun spec.resources fields) that put a pod on the agent's node and only there."""
    return {"nodeSelector": {AGENT_NODE_LABEL: agent.node_name},
            "tolerations": [{"key": AGENT_TAINT["key"], "operator": "Equal", "value": "true", "effect": "NoSchedule"}]}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# helpers


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables are replaced, unknown ones kept, $$ escapes."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, text)


def _path_rewriter(mounts: dict[str, str]):
    """Replace each mountPath at a path boundary with its local stand-in, in one pass (longest first)."""
    if not mounts:
        return lambda text: text
    alternatives = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.\-/])({alternatives})(?=$|/|[^\w.\-])")
    return lambda text: pattern.sub(lambda m: mounts[m.group(1)], text)


_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def _field(pod: dict[str, Any], path: str) -> str:
    meta = pod["metadata"]
    m = _FIELD.match(path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": POD_IP, "status.podIPs": POD_IP, "status.hostIP": POD_IP, "status.hostIPs": POD_IP,
    }  # fmt: skip
    if path not in simple:
        raise _Unsupported(f"fieldRef {path!r} is not supported by the test node agent")
    return simple[path]


def _log_tail(path: Path) -> str:
    try:
        data = path.read_bytes()[-TERMINATION_MESSAGE_BYTES:]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-TERMINATION_MESSAGE_LINES:])


def main(argv: list[str] | None = None) -> int:
    import argparse

    from kubernetes import config

    parser = argparse.ArgumentParser(description="Run pods bound to one node as local processes (tests only).")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node", default="rlp-node-agent")
    parser.add_argument("--label", action="append", default=[], help="KEY=VALUE node label")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    labels = dict(item.split("=", 1) for item in args.label)
    agent = NodeAgent(config.new_client_from_config(config_file=args.kubeconfig), args.node, labels=labels).start()
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
