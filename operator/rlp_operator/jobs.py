"""Job bookkeeping: the outcome a phase's Job reports, whose Job it is, and idempotent creates."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rlp_operator.kube import Kube, KubeError
from rlp_operator.status import parse_time


def job_outcome(job: dict[str, Any]) -> tuple[str, str, str, dt.datetime | None]:
    """('active'|'succeeded'|'failed', reason, message, finished time) of a Job.

    Success is taken from `SuccessCriteriaMet` already (every index succeeded; the Job controller adds
    `Complete` later, once it has cleaned up, which lags by seconds to minutes on a busy controller).
    Failure only from `Failed`: after `FailureTarget` pods may still be terminating, and the next attempt
    must not overlap them.
    """
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        when = parse_time(cond.get("lastTransitionTime"))
        if cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "succeeded", "Complete", cond.get("message", ""), parse_time(status.get("completionTime")) or when
        if cond.get("type") == "Failed":
            return "failed", cond.get("reason") or "Failed", cond.get("message") or "", when
    return "active", "", "", None


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    """Whether `obj` has an owner reference to the object with this `uid` (a run of the same name that was
    deleted and created again has another uid)."""
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def create_or_get(kube: Kube, collection: str, ns: str, body: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """Create `body`; on AlreadyExists read the existing object instead (creates stay idempotent across
    operator restarts). Returns (created, existing); existing is None when created, or when it vanished."""
    try:
        kube.create(collection, ns, body)
        return True, None
    except KubeError as e:
        if not e.conflict:
            raise
    return False, kube.get(collection, ns, body["metadata"]["name"])
