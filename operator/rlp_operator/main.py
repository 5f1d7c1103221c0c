"""`rlp operator`: run the RLPRun operator against the current kubeconfig (or in-cluster config)."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import logging
import os
import socket
from typing import Any

import kopf

from rlp_operator.events import EventRecorder
from rlp_operator.kube import Kube
from rlp_operator.logs import setup_logging
from rlp_operator.metrics import OperatorMetrics
from rlp_operator.reconciler import Reconciler
from rlp_operator.runtime import HealthServer, WorkQueue, build_registry
from rlp_operator.settings import Settings
from rlp_operator.workload import JobDefaults

log = logging.getLogger("rlp_operator")


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlp operator",
        description="Run the RLPRun operator: one Job per phase, state in each run's status.",
    )
    p.add_argument(
        "--namespace", "-n", action="append", default=[],
        help="watch this namespace (repeatable; glob patterns allowed); all namespaces when unset",
    )  # fmt: skip
    p.add_argument("--metrics-port", type=int, default=8080, help="port of /metrics (and /healthz, /readyz)")
    p.add_argument("--health-port", type=int, default=8081, help="port of /healthz and /readyz (0: metrics port only)")
    p.add_argument("--bind", default=os.environ.get("RLP_OPERATOR_BIND", "0.0.0.0"), help="address to listen on")
    p.add_argument("--log-level", default=os.environ.get("RLP_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])  # fmt: skip
    peering = p.add_mutually_exclusive_group()
    peering.add_argument(
        "--peering", metavar="NAME", default=None,
        help="coordinate with other operator replicas through this KopfPeering object (needs kopf's peering CRDs)",
    )  # fmt: skip
    peering.add_argument("--standalone", action="store_true", help="no peering: assume this is the only operator")
    p.add_argument(
        "--priority", type=int, default=int(os.environ["RLP_OPERATOR_PRIORITY"]) if os.environ.get("RLP_OPERATOR_PRIORITY") else None,
        help="kopf peering priority: the highest works, the others stand by (default with peering: a number "
             "derived from the host name and process id, so that replicas differ)",
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=int(os.environ.get("RLP_OPERATOR_WORKERS", 8)),
                   help="reconciles running at once (threads)")  # fmt: skip
    p.add_argument("--resync-seconds", type=float, default=_env_float("RLP_OPERATOR_RESYNC_SECONDS", 300.0),
                   help="look at every run at least this often, events or not")  # fmt: skip
    p.add_argument("--backoff-base", type=float, default=_env_float("RLP_OPERATOR_BACKOFF_BASE", 10.0),
                   help="seconds before a phase's 2nd attempt; doubles per failure")  # fmt: skip
    p.add_argument("--backoff-max", type=float, default=_env_float("RLP_OPERATOR_BACKOFF_MAX", 300.0),
                   help="cap of the retry backoff in seconds")  # fmt: skip
    p.add_argument("--unschedulable-grace-seconds", type=float,
                   default=_env_float("RLP_OPERATOR_UNSCHEDULABLE_GRACE_SECONDS", 300.0),
                   help="report a phase pod on its run once it has been unschedulable this long")  # fmt: skip
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    return p


def _distinct_priority() -> int:
    """A priority unlikely to be shared by two replicas (kopf: the highest works, equal ones all pause)."""
    seed = f"{socket.gethostname()}-{os.getpid()}".encode()
    return 1 + int.from_bytes(hashlib.sha256(seed).digest()[:3], "big")


async def _resync(queue: WorkQueue, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        for key in list(queue.known):
            queue.add(key)


async def run_operator(args: argparse.Namespace) -> None:
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # kopf's login reads it too
    settings = Settings(backoff_base=args.backoff_base, backoff_max=args.backoff_max,
                        unschedulable_grace=args.unschedulable_grace_seconds)  # fmt: skip
    workers = max(args.workers, 1)
    kube = Kube(pool_size=workers + 4)
    metrics = OperatorMetrics()
    events = EventRecorder(kube, background=True)
    reconciler = Reconciler(kube, metrics=metrics, settings=settings, events=events, defaults=JobDefaults.from_env())
    executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="rlp-reconcile")
    queue = WorkQueue(reconciler.reconcile, workers=workers, executor=executor, metrics=metrics)
    registry = build_registry(queue, reconciler, metrics)
    ready = asyncio.Event()
    stop = asyncio.Event()
    health = HealthServer(metrics, queue, ready)
    queue.start()
    await health.start(args.bind, [args.metrics_port, args.health_port])
    resync = asyncio.create_task(_resync(queue, args.resync_seconds))
    peering: dict[str, Any] = {"standalone": True} if args.standalone else {}
    if args.peering:
        peering = {"peering_name": args.peering, "standalone": False}
    if not args.standalone:
        # kopf pauses every operator when peers share a priority: give each replica its own
        peering["priority"] = args.priority if args.priority is not None else _distinct_priority()
    scope: dict[str, Any] = {"namespaces": args.namespace} if args.namespace else {"clusterwide": True}
    log.info(
        "operator starting",
        extra={"namespaces": ",".join(args.namespace) or "*", "workers": workers,
               "backoff_base": settings.backoff_base, "peering": args.peering or ("none" if args.standalone else "auto"),
               "priority": peering.get("priority")},
    )  # fmt: skip
    try:
        await kopf.operator(registry=registry, ready_flag=ready, stop_flag=stop, **scope, **peering)
    finally:
        resync.cancel()
        await queue.stop()
        events.flush()
        await health.stop()
        executor.shutdown(wait=False, cancel_futures=True)
        kube.close()
        log.info("operator stopped")


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "uninstall":  # `rlp operator uninstall`: the chart's pre-delete hook
        from rlp_operator.uninstall import main as uninstall_main

        return uninstall_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        asyncio.run(run_operator(args))
    except KeyboardInterrupt:
        pass
    return 0
