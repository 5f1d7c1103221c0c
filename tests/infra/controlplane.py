"""A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok (simulated nodes and pod lifecycles), on free loopback ports.

    cp = ControlPlane().start()      # builds nothing: pass bin_dir, or ensure_test_binaries() finds it
    api = cp.api_client()            # kubernetes.client.ApiClient with admin (system:masters) rights
    cp.add_fake_nodes(10)            # more kwok GPU nodes, e.g. for scale tests
    cp.stop()                        # kills every process group and removes the work dir

Everything lives in one temporary work directory (certificates, etcd data, logs, kubeconfig). The
processes are stopped by ``stop()``, at interpreter exit, on SIGTERM/SIGHUP, and die with the test
process even when it is SIGKILLed (PR_SET_PDEATHSIG); a later start reaps what is left.

Pod lifecycles under kwok: see ``kwok-stages.yaml`` and tests/infra/README.md (annotations
``rlp.dev/kwok-exit-code``, ``rlp.dev/kwok-hold``, ``rlp.dev/kwok-delay``).
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

from . import _process
from ._process import Process, ServerError, Workdir, free_port, wait_for
from .certs import Pki, make_pki
from .kube import KWOK_DELAY, KWOK_EXIT_CODE, KWOK_HOLD  # noqa: F401 - the kwok pod contract, re-exported

HERE = Path(__file__).resolve().parent
RLP_STAGES = HERE / "kwok-stages.yaml"
KWOK_STOCK_STAGES = ("node/fast/node-initialize.yaml", "pod/fast/pod-ready.yaml", "pod/fast/pod-delete.yaml")

FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"



def fake_node_manifest(
    name: str,
    *,
    gpus: int = 8,
    cpu: str = "32",
    memory: str = "256Gi",
    pods: int = 110,
    gpu_product: str = DEFAULT_GPU_PRODUCT,
    labels: Mapping[str, str] | None = None,
    taints: Iterable[Mapping[str, str]] = (),
) -> dict:
    """A Node that kwok manages (annotation ``kwok.x-k8s.io/node: fake``), with GPUs as capacity."""
    resources = {"cpu": cpu, "memory": memory, "pods": str(pods), "ephemeral-storage": "1Ti"}
    if gpus:
        resources[GPU_RESOURCE] = str(gpus)
    node_labels = {
        "type": "kwok",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/role": "agent",
        "node-role.kubernetes.io/agent": "",
    }
    if gpus:
        node_labels.update({"nvidia.com/gpu.product": gpu_product, "nvidia.com/gpu.count": str(gpus)})
    node_labels.update(labels or {})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": node_labels, "annotations": {FAKE_NODE_ANNOTATION: "fake"}},
        "spec": {"taints": [dict(t) for t in taints]},
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok.

    Attributes once started: ``server`` (https URL), ``token`` (admin bearer token), ``ca_file``,
    ``kubeconfig`` (path to a kubeconfig file), ``workdir`` (Path), ``bin_dir`` (Path),
    ``fake_nodes`` (names of the kwok nodes registered so far).
    """

    def __init__(
        self,
        bin_dir: Path | None = None,
        *,
        gpu_nodes: int = 2,
        gpus_per_node: int = 8,
        node_prefix: str = "kwok-gpu-",
        start_timeout: float = 180.0,
    ):
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.gpu_nodes = gpu_nodes
        self.gpus_per_node = gpus_per_node
        self.node_prefix = node_prefix
        self.start_timeout = start_timeout
        self.workdir: Path | None = None
        self.server: str | None = None
        self.token: str | None = None
        self.ca_file: Path | None = None
        self.kubeconfig: Path | None = None
        self.fake_nodes: list[str] = []
        self._wd: Workdir | None = None
        self._pki: Pki | None = None
        self._procs: dict[str, Process] = {}
        self._api = None

    # ---------------------------------------------------------------------------------------------
    # lifecycle

    def start(self) -> "ControlPlane":
        if self._wd is not None:
            raise RuntimeError("control plane already started")
        if self.bin_dir is None:
            self.bin_dir = _process.ensure_test_binaries()
        _process.reap_leftovers()
        self._wd = Workdir("k8s")
        self.workdir = self._wd.path
        _process.register_for_cleanup(self)
        try:
            t0 = time.monotonic()
            self._pki = make_pki(self.workdir / "pki")
            self.token = self._pki.admin_token
            self.ca_file = self._pki.ca_cert
            self._start_etcd()
            self._start_apiserver()
            self._write_kubeconfig()
            self._start("kube-controller-manager", self._controller_manager_args())
            self._start("kube-scheduler", self._scheduler_args())
            self._start("kwok", self._kwok_args())
            self._wait_for_defaults()
            if self.gpu_nodes:
                self.add_fake_nodes(self.gpu_nodes, gpus=self.gpus_per_node)
            self.startup_seconds = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process (kwok first, etcd last) and remove the work directory. Idempotent."""
        if self._api is not None:
            try:
                self._api.close()
            except Exception:  # noqa: BLE001
                pass
            self._api = None
        for name in ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                proc.stop()
        if self._wd is not None:
            self._wd.remove()
            self._wd = None
        _process.unregister(self)

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check_alive(self) -> None:
        """Raise ServerError (with the log tail) if any component has exited."""
        for proc in self._procs.values():
            proc.check_alive()

    def log_path(self, component: str) -> Path:
        return self._procs[component].log_path

    # ---------------------------------------------------------------------------------------------
    # clients

    def api_client(self):
        """A new ``kubernetes.client.ApiClient`` authenticated as the admin (system:masters)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.server
        cfg.ssl_ca_cert = str(self.ca_file)
        cfg.verify_ssl = True
        cfg.api_key = {"authorization": self.token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(cfg)

    @property
    def _shared_api(self):
        if self._api is None:
            self._api = self.api_client()
        return self._api

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (helm, the operator, ...) that should talk to this cluster."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET a raw apiserver path with the admin token; returns (status, body)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    # ---------------------------------------------------------------------------------------------
    # fake nodes

    def add_fake_nodes(
        self,
        count: int,
        *,
        prefix: str | None = None,
        gpus: int = 8,
        wait: bool = True,
        timeout: float = 60.0,
        **node_kwargs,
    ) -> list[str]:
        """Register ``count`` more kwok nodes (see ``fake_node_manifest`` for the keyword arguments)
        and, unless ``wait=False``, wait until kwok reports them Ready. Returns their names."""
        from kubernetes import client

        core = client.CoreV1Api(self._shared_api)
        prefix = prefix or self.node_prefix
        start = len([n for n in self.fake_nodes if n.startswith(prefix)])
        names = [f"{prefix}{start + i}" for i in range(count)]
        for name in names:
            core.create_node(fake_node_manifest(name, gpus=gpus, **node_kwargs))
        self.fake_nodes.extend(names)
        if wait:
            self.wait_nodes_ready(names, timeout=timeout)
        return names

    def delete_fake_nodes(self, names: Iterable[str]) -> None:
        """Delete kwok nodes registered with ``add_fake_nodes``."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        core = client.CoreV1Api(self._shared_api)
        for name in list(names):
            try:
                core.delete_node(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
            if name in self.fake_nodes:
                self.fake_nodes.remove(name)

    def wait_nodes_ready(self, names: Iterable[str], timeout: float = 60.0) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self._shared_api)
        pending = set(names)

        def ready() -> bool:
            for node in core.list_node(label_selector="type=kwok").items:
                if node.metadata.name in pending and any(
                    c.type == "Ready" and c.status == "True" for c in (node.status.conditions or [])
                ):
                    pending.discard(node.metadata.name)
            return not pending

        wait_for(ready, timeout, f"kwok nodes Ready: {sorted(pending)}", interval=0.2, alive=self.check_alive)

    # ---------------------------------------------------------------------------------------------
    # components

    def _bin(self, name: str) -> str:
        path = self.bin_dir / name
        if not os.access(path, os.X_OK):
            raise ServerError(f"{path} is missing: run scripts/build-test-servers.sh")
        return str(path)

    def _start(self, name: str, args: list[str]) -> Process:
        proc = Process(name, [self._bin(name), *args], self._wd).start()
        self._procs[name] = proc
        return proc

    def _start_with_ports(self, name: str, make_args, ready, attempts: int = 3) -> None:
        """Start a listening server on fresh free ports, retrying when a port was taken meanwhile."""
        for attempt in range(attempts):
            args, ports = make_args()
            proc = self._start(name, args)
            try:
                wait_for(lambda: ready(ports), self.start_timeout, f"{name} to become ready",
                         alive=proc.check_alive)
                return ports
            except ServerError:
                tail = proc.log_tail()
                proc.stop()
                self._procs.pop(name, None)
                if attempt + 1 < attempts and "address already in use" in tail:
                    continue
                raise

    def _start_etcd(self) -> None:
        data = self.workdir / "etcd"

        def args():
            client_port, peer_port = free_port(), free_port()
            client_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
            return [
                "--name=rlp-test",
                f"--data-dir={data}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=rlp-test={peer_url}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",  # test data: speed over durability
                "--log-level=warn",
                "--quota-backend-bytes=2147483648",
            ], client_url

        def ready(url):
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                return json.loads(resp.read()).get("health") == "true"

        self.etcd_url = self._start_with_ports("etcd", args, ready)

    def _start_apiserver(self) -> None:
        pki = self._pki

        def args():
            port = free_port()
            return [
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                f"--token-auth-file={pki.token_file}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--api-audiences=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                "--profiling=false",
                "--enable-priority-and-fairness=false",
                "--v=1",
            ], f"https://127.0.0.1:{port}"

        def ready(server):
            self.server = server
            status, _ = self.get("/readyz")
            return status == 200

        self.server = self._start_with_ports("kube-apiserver", args, ready)

    def _write_kubeconfig(self) -> None:
        self.kubeconfig = self.workdir / "kubeconfig"
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "rlp-test", "cluster": {"server": self.server,
                                                          "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "rlp-test", "context": {"cluster": "rlp-test", "user": "admin",
                                                          "namespace": "default"}}],
            "current-context": "rlp-test",
        }
        self.kubeconfig.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        self.kubeconfig.chmod(0o600)

    def _controller_manager_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            # nodeipam needs a cluster CIDR and real nodes; serviceaccount-token makes legacy token
            # Secrets (pods get projected tokens from the apiserver without it).
            "--controllers=*,-nodeipam,-serviceaccount-token",
            "--leader-elect=false",
            "--secure-port=0",
            f"--root-ca-file={self._pki.ca_cert}",
            f"--service-account-private-key-file={self._pki.sa_key}",
            "--use-service-account-credentials=false",
            "--concurrent-job-syncs=10",
            "--v=1",
        ]

    def _scheduler_args(self) -> list[str]:
        return [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--secure-port=0", "--v=1"]

    def _kwok_args(self) -> list[str]:
        stages_dir = self.bin_dir.parent / "stages"
        configs = [stages_dir / s for s in KWOK_STOCK_STAGES] + [RLP_STAGES]
        for cfg in configs:
            if not cfg.is_file():
                raise ServerError(f"kwok stage file {cfg} is missing: run scripts/build-test-servers.sh")
        return [
            f"--kubeconfig={self.kubeconfig}",
            *[f"--config={c}" for c in configs],
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
            "--cidr=10.244.0.0/16",
            "--node-ip=10.255.0.1",
        ]

    def _wait_for_defaults(self) -> None:
        """Wait for what tests take for granted: the default namespace and its ServiceAccount (made by
        the controller-manager), which pod admission needs."""
        from kubernetes import client

        core = client.CoreV1Api(self._shared_api)

        def default_sa() -> bool:
            core.read_namespaced_service_account("default", "default")
            return True

        wait_for(default_sa, self.start_timeout, "the default ServiceAccount", interval=0.2,
                 alive=self.check_alive)

    def __repr__(self) -> str:
        return f"ControlPlane(server={self.server!r}, workdir={str(self.workdir)!r})"
