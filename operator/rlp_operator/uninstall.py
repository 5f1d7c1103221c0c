"""`rlp operator uninstall`: delete every RLPRun the operator watches and wait until their workloads are gone.

The Helm chart runs it as a pre-delete hook, while the operator is still installed: CRDs (and so RLPRuns)
outlive `helm uninstall`, and without this every run's Jobs and pods, holding GPUs, would keep running
with nobody to manage them. Deleting a run deletes its Jobs, Services and ConfigMap through their owner
references (Kubernetes' garbage collector); the operator finalizes runs that asked for their checkpoints
to be deleted (`rlp.dev/delete-checkpoints`). Checkpoints of other runs stay in the store, so a run
created again with the same name resumes from its last complete phase.

If runs still hold the finalizer when the timeout is near (no operator running), it is removed so that
nothing hangs; their checkpoints are then kept, and the output says so.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import time
from typing import Any

from rlp_operator import workload as wl
from rlp_operator.kube import ALL_RUNS, JOBS, RUNS, Kube, KubeError
from rlp_operator.logs import setup_logging

log = logging.getLogger("rlp_operator.uninstall")

ALL_JOBS = "/apis/batch/v1/jobs"
MANAGED = {wl.LABEL_MANAGED_BY: wl.MANAGED_BY}


def _in(namespaces: list[str], objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Objects in the watched namespaces (exact names or glob patterns, as `rlp operator --namespace`)."""
    return [o for o in objs if not namespaces or any(fnmatch.fnmatchcase(o["metadata"]["namespace"], p) for p in namespaces)]


def _listed(kube: Kube, namespaces: list[str], every: str, one: str, labels: dict[str, str] | None = None):
    if not namespaces or any(set(p) & set("*?[") for p in namespaces):
        return _in(namespaces, kube.list(every, "", labels=labels))  # patterns: the chart grants cluster-wide list
    return [obj for ns in namespaces for obj in kube.list(one, ns, labels=labels)]


def _runs(kube: Kube, namespaces: list[str]) -> list[dict[str, Any]]:
    return _listed(kube, namespaces, ALL_RUNS, RUNS)


def _jobs(kube: Kube, namespaces: list[str]) -> list[dict[str, Any]]:
    return _listed(kube, namespaces, ALL_JOBS, JOBS, MANAGED)


def _names(objs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in objs[:10])


def uninstall(kube: Kube, namespaces: list[str], timeout: float, poll: float = 1.0) -> bool:
    """Delete the runs and wait for them and their Jobs to be gone; True when nothing is left."""
    runs = _runs(kube, namespaces)
    for run in runs:
        meta = run["metadata"]
        kube.delete(RUNS, meta["namespace"], meta["name"], uid=meta["uid"])
    log.info("deleted %d RLPRun(s)%s", len(runs), f": {_names(runs)}" if runs else "")
    deadline = time.monotonic() + timeout
    while True:
        runs, jobs = _runs(kube, namespaces), _jobs(kube, namespaces)
        if not runs and not jobs:
            log.info("no RLPRun and no phase Job left")
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            log.error("still there after %gs: RLPRuns %s; Jobs %s", timeout, _names(runs), _names(jobs))
            return False
        if left < timeout / 2:  # the operator should have finalized these by now: it is not running
            for run in runs:
                _release(kube, run)
        _delete_orphans(kube, runs, jobs)
        time.sleep(poll)


def _delete_orphans(kube: Kube, runs: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> None:
    """Delete the Jobs whose run is gone. The garbage collector would too, but it learns of a newly
    installed CRD's objects only at its next discovery (about 30 s), and the hook should not wait on it."""
    alive = {run["metadata"]["uid"] for run in runs}
    for job in jobs:
        meta = job["metadata"]
        owners = {ref.get("uid") for ref in meta.get("ownerReferences") or [] if ref.get("kind") == "RLPRun"}
        if owners and not owners & alive and not meta.get("deletionTimestamp"):
            kube.delete(JOBS, meta["namespace"], meta["name"], propagation="Background")


def _release(kube: Kube, run: dict[str, Any]) -> None:
    meta = run["metadata"]
    finalizers = meta.get("finalizers") or []
    if wl.FINALIZER not in finalizers:
        return
    index = finalizers.index(wl.FINALIZER)
    try:
        kube.json_patch(RUNS, meta["namespace"], meta["name"], [
            {"op": "test", "path": f"/metadata/finalizers/{index}", "value": wl.FINALIZER},
            {"op": "remove", "path": f"/metadata/finalizers/{index}"},
        ])  # fmt: skip
    except KubeError as e:
        if e.status not in (404, 409, 422):  # gone, or its finalizers changed meanwhile: look again next round
            raise
        return
    log.warning("removed the %s finalizer of %s/%s (no operator finalized it): its checkpoints are kept",
                wl.FINALIZER, meta["namespace"], meta["name"])  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlp operator uninstall", description=__doc__.split("\n\n")[0])
    p.add_argument("--namespace", "-n", action="append", default=[],
                   help="namespace (or glob pattern) whose runs to delete (repeatable); all namespaces when unset")  # fmt: skip
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the runs and Jobs to be gone")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    kube = Kube()
    try:
        return 0 if uninstall(kube, args.namespace, args.timeout) else 1
    finally:
        kube.close()
