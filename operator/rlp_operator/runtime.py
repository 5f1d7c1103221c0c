"""Wiring: kopf watches → a de-duplicating work queue → `Reconciler.reconcile` in a thread pool.

kopf does the watching (RLPRuns, and batch/v1 Jobs labelled `rlp.dev/run`), peering and signal handling;
its handlers only put the run's key on the queue. The queue runs at most one reconcile per run at a time,
folds bursts of events into one reconcile, and re-adds a run after the delay the reconcile asked for
(retry backoff, TTL). Nothing here is persistent: on start kopf lists every object, which queues every
run, and the reconciler reads the rest back from the cluster and the store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from typing import Any

import kopf
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rlp_core.spec import API_GROUP, API_VERSION
from rlp_operator import workload as wl
from rlp_operator.metrics import OperatorMetrics
from rlp_operator.reconciler import Reconciler
from rlp_operator.status import RLPRunStatus

log = logging.getLogger("rlp_operator.runtime")

Key = tuple[str, str]


class WorkQueue:
    """client-go style: a key is queued at most once and processed by one worker at a time."""

    def __init__(
        self,
        process: Callable[[str, str], float | None],
        *,
        workers: int,
        executor: concurrent.futures.Executor,
        metrics: OperatorMetrics,
        error_backoff: tuple[float, float] = (0.5, 60.0),
    ):
        self.process = process
        self.workers = workers
        self.executor = executor
        self.metrics = metrics
        self.error_backoff = error_backoff
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._processing: set[Key] = set()
        self._dirty: set[Key] = set()
        self._timers: dict[Key, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[Key, int] = {}
        self._tasks: list[asyncio.Task] = []
        self.known: set[Key] = set()
        self.processed = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(), name=f"rlp-worker-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, handle in self._timers.values():
            handle.cancel()

    @property
    def alive(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def add(self, key: Key, delay: float = 0.0) -> None:
        if delay > 0:
            loop = asyncio.get_running_loop()
            when = loop.time() + delay
            current = self._timers.get(key)
            if current is not None:
                if current[0] <= when:
                    return
                current[1].cancel()
            self._timers[key] = (when, loop.call_at(when, self._fire, key))
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.put_nowait(key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: Key) -> None:
        self.known.discard(key)
        timer = self._timers.pop(key, None)
        if timer:
            timer[1].cancel()
        self._failures.pop(key, None)

    def depth(self) -> int:
        return len(self._queued)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._processing.add(key)
            requeue: float | None
            try:
                requeue = await loop.run_in_executor(self.executor, self.process, *key)
                self._failures.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                n = self._failures[key] = self._failures.get(key, 0) + 1
                base, cap = self.error_backoff
                requeue = min(base * 2 ** (n - 1), cap)
                self.metrics.error("reconcile")
                log.error(
                    "reconcile failed (retry in %.1fs): %s: %s",
                    requeue,
                    type(e).__name__,
                    e,
                    extra={"namespace": key[0], "run": key[1]},
                    exc_info=not isinstance(e, OSError),
                )
            finally:
                self._processing.discard(key)
                self.processed += 1
            if key in self._dirty:
                self._dirty.discard(key)
                self.add(key)
            if requeue is not None:
                self.add(key, requeue)


def _job_finished(body: Any) -> bool:
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "SuccessCriteriaMet", "Failed") and cond.get("status") == "True":
            return True
    return False


def build_registry(queue: WorkQueue, reconciler: Reconciler, metrics: OperatorMetrics) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # the operator posts its own Events, one per transition
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.networking.request_timeout = 60
        settings.batching.batch_window = 0.05

    @kopf.on.event(API_GROUP, API_VERSION, "rlpruns", registry=registry)
    async def run_event(event: dict[str, Any], body: Any, namespace: str, name: str, **_: Any) -> None:
        key = (namespace, name)
        try:
            if event.get("type") == "DELETED":
                queue.forget(key)
                reconciler.metrics.forget_run(namespace, name)
                reconciler.own_writes.pop(key, None)
                return
            queue.known.add(key)
            metrics.observe_new_run(namespace, name, RLPRunStatus.from_body(body))
            rv = body.get("metadata", {}).get("resourceVersion")
            if rv is not None and reconciler.own_writes.get(key) == rv:
                return  # the echo of our own status write
            queue.add(key)
        except Exception:
            metrics.error("event:rlpruns")
            raise

    finished: set[str] = set()  # uids of Jobs whose end was already passed on (one reconcile per end)

    @kopf.on.event("batch", "v1", "jobs", labels={wl.LABEL_RUN: kopf.PRESENT}, registry=registry)
    async def job_event(event: dict[str, Any], body: Any, namespace: str, labels: Any, **_: Any) -> None:
        try:
            # Only a Job's end (or deletion) can move a run: pod progress and the status updates that
            # follow the end are ignored. After a restart every finished Job is passed on once more.
            uid = body.get("metadata", {}).get("uid", "")
            if event.get("type") == "DELETED":
                finished.discard(uid)
            elif not _job_finished(body) or uid in finished:
                return
            else:
                if len(finished) > 200_000:
                    finished.clear()
                finished.add(uid)
            queue.add((namespace, labels[wl.LABEL_RUN]))
        except Exception:
            metrics.error("event:jobs")
            raise

    return registry


class HealthServer:
    """`/metrics`, `/healthz` (liveness: the event loop answers and the workers run), `/readyz`."""

    def __init__(self, metrics: OperatorMetrics, queue: WorkQueue, ready: asyncio.Event):
        self.metrics = metrics
        self.queue = queue
        self.ready = ready
        self.started = time.time()
        self._runners: list[web.AppRunner] = []

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/healthz", self.handle_healthz)
        app.router.add_get("/livez", self.handle_healthz)
        app.router.add_get("/readyz", self.handle_readyz)
        return app

    async def start(self, host: str, ports: list[int]) -> None:
        for port in dict.fromkeys(p for p in ports if p):
            runner = web.AppRunner(self._app(), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            self._runners.append(runner)
            log.info("serving /metrics, /healthz, /readyz on %s:%d", host, port)

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    async def handle_metrics(self, _request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(None, generate_latest, self.metrics.registry)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_healthz(self, _request: web.Request) -> web.Response:
        if not self.queue.alive:
            return web.json_response({"status": "workers stopped"}, status=500)
        return web.json_response({"status": "ok", "uptime": round(time.time() - self.started, 1)})

    async def handle_readyz(self, _request: web.Request) -> web.Response:
        if not self.ready.is_set() or not self.queue.alive:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ready", "runs": len(self.queue.known), "queued": self.queue.depth()})
