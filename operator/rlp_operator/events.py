"""Events about a run: core/v1 Events posted by the operator, one per transition."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from typing import Any

from rlp_core.spec import API_GROUP, API_VERSION, KIND
from rlp_operator.kube import EVENTS, Kube
from rlp_operator.status import fmt_time, trim, utcnow

log = logging.getLogger("rlp_operator.reconciler")  # the logger name the operator's run records have always had


class EventRecorder:
    """Posts core/v1 Events about a run (one per transition). Failures are logged, never raised.

    With `background=True` events are posted in order by one background thread, so a reconcile never
    waits on them (they are informative; at most `max_pending` wait, then new ones are dropped and logged).
    """

    def __init__(self, kube: Kube, component: str = "rlp-operator", *, background: bool = False,
                 max_pending: int = 10000):  # fmt: skip
        self.kube = kube
        self.component = component
        self.instance = os.environ.get("POD_NAME") or socket.gethostname()
        self._queue: queue.Queue | None = None
        if background:
            self._queue = queue.Queue(max_pending)
            threading.Thread(target=self._drain, name="rlp-events", daemon=True).start()

    def _drain(self) -> None:
        assert self._queue is not None
        while True:
            args = self._queue.get()
            self._post(*args)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (briefly) until queued events are posted."""
        deadline = time.monotonic() + timeout
        while self._queue is not None and self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def post(self, run_body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        if self._queue is None:
            self._post(run_body, type_, reason, message)
            return
        try:
            self._queue.put_nowait((run_body, type_, reason, message))
        except queue.Full:
            log.warning("event queue full; dropped event %s", reason, extra={"run": run_body["metadata"]["name"]})

    def _post(self, run_body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            self._create(run_body, type_, reason, message)
        finally:
            if self._queue is not None:
                self._queue.task_done()

    def _create(self, run_body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = run_body["metadata"]
        now = fmt_time(utcnow())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": trim(message),
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.kube.create(EVENTS, meta["namespace"], event)
        except Exception as e:  # an event is informative; never fail a reconcile for it
            log.warning("could not post event %s: %s", reason, e, extra={"run": meta["name"]})

