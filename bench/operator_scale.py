"""Operator scale benchmark: N concurrent RLPRuns on kwok nodes, from apply to Succeeded.

    uv run python bench/operator_scale.py --runs 10 100 [--phases 5] [--out docs/bench/operator-scale.md]

It starts the project's test control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok; see
tests/infra) and versitygw, adds fake nodes, installs the CRD, and runs the operator as a subprocess
(`python -m rlp_operator`). For each N it applies N RLPRuns at once and simulates every phase's work like
the tests do: each phase pod is created held (`rlp.dev/kwok-hold`), and as soon as it runs a driver
writes the phase's output and manifest to S3 and lets kwok finish the pod. It records:

* apply → Succeeded per run (client clock: create call returned → the Succeeded status seen on a watch);
* phase transition latency: pod finish requested → next phase's Job seen (kwok, Job controller, operator);
* operator reaction: the Job's SuccessCriteriaMet/Complete condition seen → the next Job seen (the operator's share);
* operator CPU seconds and peak RSS (from /proc of the operator process).

Everything shares the machine's cores: the numbers are for the whole stack on this machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from infra.controlplane import ControlPlane  # noqa: E402
from infra.s3server import S3Server  # noqa: E402
from operator_fixtures import OperatorProcess, install_crd, raw  # noqa: E402

from rlp_core.manifest import Manifest, ManifestFile, phase_prefix, write_manifest  # noqa: E402
from rlp_core.store import Store  # noqa: E402

PHASE_SETS = {
    3: {"strategy": "none", "phases": ["generate", "optimize", "evaluate"]},
    4: {"strategy": "rlp-spg", "phases": ["generate", "synthesize", "optimize", "evaluate"]},
    5: {"strategy": "rlp", "phases": ["generate", "refine", "synthesize", "optimize", "evaluate"]},
}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Watch(threading.Thread):
    """A raw watch stream (list + watch) calling `handle(type, obj)` per event; reconnects until stopped."""

    def __init__(self, api, path: str, query: str, handle):
        super().__init__(daemon=True)
        self.api, self.path, self.query, self.handle = api, path, query, handle
        self.stop_flag = threading.Event()
        self.synced = threading.Event()

    def run(self) -> None:
        rv = None
        while not self.stop_flag.is_set():
            try:
                if rv is None:
                    status, lst = raw(self.api, "GET", self.path, query=self.query)
                    for obj in lst["items"]:
                        self.handle("ADDED", obj)
                    rv = lst["metadata"]["resourceVersion"]
                    self.synced.set()
                _, url, headers, _, _ = self.api.param_serialize(
                    method="GET", resource_path=self.path, header_params={"Accept": "application/json"},
                    auth_settings=["BearerToken"],
                )  # fmt: skip
                url += f"?{self.query}&watch=1&allowWatchBookmarks=true&resourceVersion={rv}&timeoutSeconds=60"
                resp = self.api.rest_client.pool_manager.request(
                    "GET", url, headers=headers, preload_content=False, timeout=None
                )
                buf = b""
                for chunk in resp.stream(65536):
                    if self.stop_flag.is_set():
                        break
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if not line.strip():
                            continue
                        ev = json.loads(line)
                        if ev["type"] == "ERROR":
                            rv = None
                            break
                        rv = ev["object"]["metadata"].get("resourceVersion", rv)
                        if ev["type"] != "BOOKMARK":
                            self.handle(ev["type"], ev["object"])
                resp.release_conn()
            except Exception as e:  # reconnect
                if not self.stop_flag.is_set():
                    print(f"watch {self.path}: {e}; reconnecting", file=sys.stderr)
                    time.sleep(0.5)


class ProcSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop_flag = threading.Event()
        self.peak_rss = 0
        self.tick = os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def run(self) -> None:
        while not self.stop_flag.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self.rss())
            except OSError:
                return
            time.sleep(self.interval)


class Bench:
    def __init__(self, cp: ControlPlane, s3: S3Server, bucket: str, ns: str, phases: int, workers: int):
        self.cp, self.s3, self.bucket, self.ns = cp, s3, bucket, ns
        self.api = cp.api_client()
        self.plan = PHASE_SETS[phases]
        self.store = Store.from_uri(f"s3://{bucket}/runs", endpoint=s3.endpoint_url,
                                    access_key=s3.access_key, secret_key=s3.secret_key)  # fmt: skip
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.created: dict[str, float] = {}
        self.succeeded: dict[str, float] = {}
        self.failed: set[str] = set()
        self.finish_requested: dict[str, float] = {}  # job -> time the pod finish was requested
        self.job_complete: dict[str, float] = {}  # job -> time SuccessCriteriaMet or Complete was seen
        self.job_seen: dict[str, float] = {}  # job -> time first seen
        self.pod_succeeded: dict[str, float] = {}  # job -> time its pod was seen Succeeded
        self.handled_pods: set[str] = set()
        self.job_meta: dict[str, tuple[str, int, str]] = {}  # job -> (run, round, phase)

    # -- event handlers
    def on_pod(self, type_: str, pod: dict) -> None:
        phase = (pod.get("status") or {}).get("phase")
        if type_ != "DELETED" and phase == "Succeeded":
            job = pod["metadata"]["labels"].get("batch.kubernetes.io/job-name")
            with self.lock:
                self.pod_succeeded.setdefault(job, time.monotonic())
            return
        if type_ == "DELETED" or phase != "Running":
            return
        name = pod["metadata"]["name"]
        with self.lock:
            if name in self.handled_pods:
                return
            self.handled_pods.add(name)
        self.pool.submit(self.finish, pod)

    def finish(self, pod: dict) -> None:
        labels = pod["metadata"]["labels"]
        run, round_, phase = labels["rlp.dev/run"], int(labels["rlp.dev/round"]), labels["rlp.dev/phase"]
        job = labels["batch.kubernetes.io/job-name"]
        try:
            s = self.store.child(phase_prefix(self.ns, run, round_, phase))
            data = f"{run} {phase}".encode()
            s.put_bytes("out.txt", data)
            write_manifest(s, Manifest(phase=phase, round=round_, spec_hash="bench", code_version="bench",
                                       files=[ManifestFile(path="out.txt", size=len(data),
                                                           sha256=hashlib.sha256(data).hexdigest())],
                                       metrics={"bench": 1}))  # fmt: skip
        except FileExistsError:
            pass
        with self.lock:
            self.finish_requested.setdefault(job, time.monotonic())
        status, obj = raw(self.api, "PATCH", f"/api/v1/namespaces/{self.ns}/pods/{pod['metadata']['name']}",
                          {"metadata": {"annotations": {"rlp.dev/kwok-exit-code": "0", "rlp.dev/kwok-hold": None}}},
                          content_type="application/merge-patch+json")  # fmt: skip
        if status != 200:
            print(f"patch pod: {status} {obj}", file=sys.stderr)

    def on_job(self, type_: str, job: dict) -> None:
        name = job["metadata"]["name"]
        now = time.monotonic()
        labels = job["metadata"]["labels"]
        with self.lock:
            self.job_seen.setdefault(name, now)
            self.job_meta[name] = (labels["rlp.dev/run"], int(labels["rlp.dev/round"]), labels["rlp.dev/phase"])
            for c in (job.get("status") or {}).get("conditions") or []:
                if c["type"] in ("Complete", "SuccessCriteriaMet") and c["status"] == "True":
                    self.job_complete.setdefault(name, now)

    def on_run(self, type_: str, run: dict) -> None:
        name = run["metadata"]["name"]
        phase = (run.get("status") or {}).get("phase")
        with self.lock:
            if phase == "Succeeded":
                self.succeeded.setdefault(name, time.monotonic())
            elif phase == "Failed":
                self.failed.add(name)

    # -- one measurement
    def run_batch(self, n: int, operator: OperatorProcess, timeout: float) -> dict:
        self.reset()
        prefix = f"b{n}-"
        spec = {
            "policy": {"model": "s3://models/sft/"},
            "rewardModel": {"model": "s3://models/rm/"},
            "rewardLearning": {"strategy": self.plan["strategy"]},
            "storage": {"uri": f"s3://{self.bucket}/runs", "endpoint": self.s3.endpoint_url,
                        "secretRef": {"name": "s3-creds"}},
            "resources": {"gpusPerPod": 0, "cpu": "10m", "memory": "16Mi"},
        }  # fmt: skip
        ann = {"rlp.dev/pod-annotations": json.dumps({"rlp.dev/kwok-hold": "true"})}
        sampler = ProcSampler(operator.proc.pid)
        cpu0 = sampler.cpu_seconds()
        sampler.start()
        t0 = time.monotonic()
        for i in range(n):
            name = f"{prefix}{i:04d}"
            body = {"apiVersion": "rlp.dev/v1alpha1", "kind": "RLPRun",
                    "metadata": {"name": name, "annotations": ann}, "spec": spec}  # fmt: skip
            status, obj = raw(self.api, "POST", f"/apis/rlp.dev/v1alpha1/namespaces/{self.ns}/rlpruns", body)
            assert status == 201, obj
            with self.lock:
                self.created[name] = time.monotonic()
        applied = time.monotonic() - t0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                done = sum(1 for k in self.created if k in self.succeeded or k in self.failed)
            if done >= n:
                break
            time.sleep(0.2)
        wall = time.monotonic() - t0
        sampler.stop_flag.set()
        cpu = sampler.cpu_seconds() - cpu0
        sampler.join()
        with self.lock:
            names = [k for k in self.created if k.startswith(prefix)]
            to_success = [self.succeeded[k] - self.created[k] for k in names if k in self.succeeded]
            order = {p: i for i, p in enumerate(self.plan["phases"])}
            by_run: dict[str, dict[str, str]] = {}
            for job, (run, _round, phase) in self.job_meta.items():
                if run.startswith(prefix):
                    by_run.setdefault(run, {})[phase] = job
            transition, reaction, kwok, jobctl = [], [], [], []
            for jobs in by_run.values():
                for phase, job in jobs.items():
                    i = order[phase]
                    if i + 1 >= len(self.plan["phases"]):
                        continue
                    nxt = jobs.get(self.plan["phases"][i + 1])
                    if nxt is None or nxt not in self.job_seen:
                        continue
                    if job in self.finish_requested:
                        transition.append(self.job_seen[nxt] - self.finish_requested[job])
                    if job in self.job_complete:
                        reaction.append(self.job_seen[nxt] - self.job_complete[job])
                    if job in self.pod_succeeded and job in self.finish_requested:
                        kwok.append(self.pod_succeeded[job] - self.finish_requested[job])
                        if job in self.job_complete:
                            jobctl.append(self.job_complete[job] - self.pod_succeeded[job])
        m = operator.metrics()
        errors = sum(v for (name, _), v in m.items() if name == "rlp_reconcile_errors_total")
        retries = sum(v for (name, _), v in m.items() if name == "rlp_phase_retries_total")
        return {
            "n": n,
            "phases": len(self.plan["phases"]),
            "succeeded": len(to_success),
            "failed": len([k for k in names if k in self.failed]),
            "apply_s": applied,
            "wall_s": wall,
            "p50_s": pct(to_success, 0.5),
            "p99_s": pct(to_success, 0.99),
            "max_s": max(to_success) if to_success else float("nan"),
            "trans_p50": pct(transition, 0.5),
            "trans_p99": pct(transition, 0.99),
            "react_p50": pct(reaction, 0.5),
            "react_p99": pct(reaction, 0.99),
            "kwok_p50": pct(kwok, 0.5),
            "kwok_p99": pct(kwok, 0.99),
            "jobctl_p50": pct(jobctl, 0.5),
            "jobctl_p99": pct(jobctl, 0.99),
            "transitions": len(transition),
            "cpu_s": cpu,
            "cpu_pct": 100 * cpu / wall if wall else 0,
            "rss_mb": sampler.peak_rss / 2**20,
            "errors": errors,
            "retries": retries,
        }


def table(results: list[dict]) -> str:
    head = ("| N runs | phases/run | succeeded | apply (s) | all Succeeded (s) | apply→Succeeded p50 / p99 / max (s) "
            "| phase transition p50 / p99 (s) | of which kwok | of which Job controller "
            "| operator reaction p50 / p99 (s) | operator CPU (s) | CPU % | "
            "peak RSS (MiB) | reconcile errors |")  # fmt: skip
    sep = "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"
    rows = [head, sep]
    for r in results:
        rows.append(
            f"| {r['n']} | {r['phases']} | {r['succeeded']}/{r['n']} | {r['apply_s']:.1f} | {r['wall_s']:.1f} | "
            f"{r['p50_s']:.1f} / {r['p99_s']:.1f} / {r['max_s']:.1f} | {r['trans_p50']:.2f} / {r['trans_p99']:.2f} | "
            f"{r['kwok_p50']:.2f} / {r['kwok_p99']:.2f} | {r['jobctl_p50']:.2f} / {r['jobctl_p99']:.2f} | "
            f"{r['react_p50']:.2f} / {r['react_p99']:.2f} | {r['cpu_s']:.1f} | {r['cpu_pct']:.0f} | "
            f"{r['rss_mb']:.0f} | {int(r['errors'])} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, nargs="+", default=[10, 100])
    p.add_argument("--phases", type=int, choices=sorted(PHASE_SETS), default=5)
    p.add_argument("--nodes", type=int, default=10, help="kwok nodes (110 pods each)")
    p.add_argument("--workers", type=int, default=8, help="operator --workers")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default=None, help="write the markdown report here")
    args = p.parse_args(argv)

    cp = ControlPlane(gpu_nodes=args.nodes)
    s3 = S3Server()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cp.start()
        s3.start()
        operator = None
        watches: list[Watch] = []
        try:
            api = cp.api_client()
            install_crd(api)
            ns = "bench"
            raw(api, "POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
            raw(api, "POST", f"/api/v1/namespaces/{ns}/secrets",
                {"metadata": {"name": "s3-creds"}, "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key,
                                                                   "AWS_SECRET_ACCESS_KEY": s3.secret_key}})  # fmt: skip
            bucket = "bench"
            s3.client().create_bucket(Bucket=bucket)
            bench = Bench(cp, s3, bucket, ns, args.phases, workers=16)
            for path, query, handler in (
                (f"/api/v1/namespaces/{ns}/pods", "labelSelector=rlp.dev/run", bench.on_pod),
                (f"/apis/batch/v1/namespaces/{ns}/jobs", "labelSelector=rlp.dev/run", bench.on_job),
                (f"/apis/rlp.dev/v1alpha1/namespaces/{ns}/rlpruns", "", bench.on_run),
            ):
                w = Watch(cp.api_client(), path, query, handler)
                w.start()
                w.synced.wait(30)
                watches.append(w)
            operator = OperatorProcess(cp.kubeconfig, namespaces=[ns], log_path=Path(tmp) / "operator.log",
                                       backoff_base=1.0, workers=args.workers)  # fmt: skip
            operator.start()
            for n in args.runs:
                print(f"N={n} ...", file=sys.stderr, flush=True)
                r = bench.run_batch(n, operator, args.timeout)
                print(json.dumps(r), file=sys.stderr, flush=True)
                results.append(r)
        finally:
            for w in watches:
                w.stop_flag.set()
            if operator:
                operator.kill()
            s3.teardown()
            cp.stop()

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    report = f"""# Operator scale benchmark

`uv run python bench/operator_scale.py --runs {' '.join(map(str, args.runs))} --phases {args.phases}`
on {os.cpu_count()} cores ({cpu}), {time.strftime('%Y-%m-%d')}. The whole stack shares these cores: etcd,
kube-apiserver, controller-manager (Job controller), scheduler, kwok ({args.nodes} fake nodes), versitygw,
the driver that simulates the phase pods, and the operator (`--workers {args.workers}`).

Each run has {args.phases} phases ({', '.join(PHASE_SETS[args.phases]['phases'])}), one Job each; all N runs
are applied at once (batches run one after the other against the same operator process). A phase's
"work" is the driver writing its output and manifest to S3 as soon as its pod runs, then letting kwok
end the pod.

{table(results)}

- *apply→Succeeded*: from the create call returning to the run's Succeeded status seen on a watch.
- *phase transition*: from the driver asking kwok to end a phase's pod to the next phase's Job appearing
  (kwok, the Job controller and the operator together).
- *of which kwok*: finish requested → the pod seen Succeeded; *of which Job controller*: pod Succeeded →
  the Job's `SuccessCriteriaMet` (or `Complete`) condition seen (kube-controller-manager batches pod
  updates, about 1 s, and serialises its Job syncs).
- *operator reaction*: from the Job's `SuccessCriteriaMet`/`Complete` condition appearing to the next phase's Job appearing:
  the operator's own share (watch event, reconcile with S3 manifest check, status write, Job create).
- *operator CPU / peak RSS*: user+system CPU seconds of the operator process over the batch (CPU % = of
  one core over the batch's wall time) and its largest resident set, from `/proc`.
"""
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
