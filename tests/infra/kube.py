"""Small helpers for tests that talk to the test control plane."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

KWOK_EXIT_CODE = "rlp.dev/kwok-exit-code"
KWOK_HOLD = "rlp.dev/kwok-hold"
KWOK_DELAY = "rlp.dev/kwok-delay"

# How long a test waits for the cluster to reach a state. Every wait polls, so a generous deadline costs nothing
# when things work; on a loaded 2-core CI machine one reconcile step (operator, apiserver, Job controller,
# scheduler, kwok sharing the cores) can take seconds, and garbage collection and discovery run on 30 s cycles.
WAIT = 120.0


def transient(exc: BaseException) -> bool:
    """An error worth asking again after: the apiserver overloaded or timing out under load (429, 5xx such as
    "etcdserver: request timed out"), or the connection failing."""
    import urllib3
    from kubernetes.client.rest import ApiException

    if isinstance(exc, ApiException):
        return exc.status is not None and (exc.status == 429 or exc.status >= 500)
    return isinstance(exc, (OSError, urllib3.exceptions.HTTPError))


def wait_until(check: Callable[[], T], timeout: float = WAIT, what: str = "condition", interval: float = 0.1) -> T:
    """Call ``check`` until it returns something truthy and return that; AssertionError on timeout. A transient
    error (see ``transient``) is polled through, and named in the timeout's message; any other is raised."""
    deadline = time.monotonic() + timeout
    last = error = None
    while True:
        try:
            last = check()
        except Exception as exc:
            if not transient(exc):
                raise
            error = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            detail = f", last error: {type(error).__name__}: {error}" if error is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last value: {last!r}{detail})")
        time.sleep(interval)


def kwok_annotations(exit_code: int | None = None, *, hold: bool = False, delay: str | None = None) -> dict[str, str]:
    """Pod annotations that tell kwok how the pod ends (see tests/infra/README.md)."""
    annotations: dict[str, str] = {}
    if exit_code is not None:
        annotations[KWOK_EXIT_CODE] = str(int(exit_code))
    if hold:
        annotations[KWOK_HOLD] = "true"
    if delay is not None:
        annotations[KWOK_DELAY] = delay
    return annotations


def finish_pod(api_client, namespace: str, name: str, exit_code: int = 0) -> None:
    """Make a running kwok pod (e.g. one held with ``rlp.dev/kwok-hold``) terminate with ``exit_code``."""
    from kubernetes import client

    client.CoreV1Api(api_client).patch_namespaced_pod(
        name, namespace, {"metadata": {"annotations": {KWOK_EXIT_CODE: str(int(exit_code)), KWOK_HOLD: None}}}
    )


def wait_for_pod_phase(api_client, namespace: str, name: str, phases: Iterable[str] | str, timeout: float = 60.0):
    """Wait until the pod's phase is one of ``phases``; returns the pod."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    wanted = {phases} if isinstance(phases, str) else set(phases)

    def check():
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase in wanted else None

    return wait_until(check, timeout, f"pod {namespace}/{name} to reach {sorted(wanted)}")


def events_for(api_client, namespace: str, name: str, kind: str | None = None) -> list:
    """Core v1 Events whose involvedObject is ``name`` (and ``kind`` when given), oldest first."""
    from kubernetes import client

    selector = f"involvedObject.name={name}" + (f",involvedObject.kind={kind}" if kind else "")
    items = client.CoreV1Api(api_client).list_namespaced_event(namespace, field_selector=selector).items
    return sorted(items, key=lambda e: (e.last_timestamp or e.event_time or e.metadata.creation_timestamp))
