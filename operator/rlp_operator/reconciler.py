"""The RLPRun state machine: one idempotent `reconcile(namespace, name)` step.

Level-triggered: every call reads the run (fresh from the apiserver), the Job of the current attempt (by
its deterministic name) and, when it matters, the phase's manifest in the store, and moves the run as far
as it can. All state lives in `status`; nothing is remembered between calls except metrics, so an
operator killed at any moment and restarted continues every run where the cluster and the store say it
is.

Ordering rules that make a restart safe:
* a Job is created *before* the status that names it is written; a restart that lost the status write
  creates the same name again, gets 409 AlreadyExists and adopts the Job: never two Jobs for one attempt;
* a phase is marked Succeeded only after its manifest verifies in the store, and before an attempt is
  started the store is checked first: a complete phase is never run again;
* deleting workloads (suspend) happens *after* the status that records it is written, and a recorded Job
  that is still active is deleted before any new attempt starts: never two attempts running at once;
* Events, metrics and deletions are emitted only after the status write succeeded (`Step.after`).

This module holds the entry point (`Reconciler.reconcile`), the plan, redo, preflight and the finalizer.
`Reconciler` builds on two mixins: `attempts.PhaseAttempts` (a phase's attempts, one Job each) on top of
`status_writer.StatusWriter` (the run's status, set on a `Step` and written by `_commit`). Imports go one
way: reconciler → attempts → status_writer → events, status; jobs.py (Job bookkeeping), storage.py (the
run's store) and settings.py (the timings) import none of these three.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from rlp_core.manifest import MANIFEST_NAME
from rlp_core.provenance import downstream, parse_phase_refs
from rlp_core.spec import RLPRun, SpecError, parse_run
from rlp_core.store import StoreError
from rlp_operator import preflight
from rlp_operator import workload as wl
from rlp_operator.attempts import PhaseAttempts
from rlp_operator.crd import LOCKED_FIELDS
from rlp_operator.events import EventRecorder
from rlp_operator.jobs import owned_by
from rlp_operator.kube import CONFIGMAPS, JOBS, RUNS, SERVICES, Kube, KubeError
from rlp_operator.metrics import OperatorMetrics
from rlp_operator.settings import Settings
from rlp_operator.status import (
    DONE_PHASE_STATES,
    TERMINAL_RUN_STATES,
    PhaseRecord,
    RLPRunStatus,
    fmt_time,
    trim,
    utcnow,
)
from rlp_operator.status_writer import Step
from rlp_operator.storage import StorageCredentialsError, Stores

log = logging.getLogger("rlp_operator.reconciler")


def locked_hash(run: RLPRun) -> str:
    """Hash of the spec fields that may not change while the run exists (see crd.LOCKED_FIELDS)."""
    spec = run.spec.model_dump(mode="json", by_alias=True)
    locked = {k: spec.get(k) for k in LOCKED_FIELDS}
    return hashlib.sha256(json.dumps(locked, sort_keys=True).encode()).hexdigest()[:16]


class Reconciler(PhaseAttempts):
    """One idempotent step per run (`reconcile`), safe to repeat and to interrupt (see the module docstring)."""

    def __init__(
        self,
        kube: Kube,
        *,
        stores: Stores | None = None,
        metrics: OperatorMetrics | None = None,
        events: EventRecorder | None = None,
        settings: Settings | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        defaults: wl.JobDefaults | None = None,
    ):
        self.kube = kube
        self.defaults = defaults or wl.JobDefaults()
        self.settings = settings or Settings()
        self.stores = stores or Stores(kube, self.settings.store_cache_seconds)
        self.metrics = metrics or OperatorMetrics()
        self.events = events or EventRecorder(kube)
        self.clock = clock
        self.own_writes: dict[tuple[str, str], str] = {}  # resourceVersion of our last status write
        self._errors: dict[tuple[str, str], int] = {}  # consecutive unexpected errors per run (retry backoff)
        self._configmaps: dict[tuple[str, str], str] = {}  # (uid, generation) -> namespace/name ensured

    # ---- entry point ------------------------------------------------------------------------------
    def reconcile(self, namespace: str, name: str) -> float | None:
        """One step for one run; returns seconds after which to look again (None: wait for an event)."""
        body = self.kube.get(RUNS, namespace, name)
        if body is None:
            self.metrics.forget_run(namespace, name)
            self.own_writes.pop((namespace, name), None)
            self._errors.pop((namespace, name), None)
            return None
        if body["metadata"].get("deletionTimestamp"):
            return self._finalize(body)
        if (wl.FINALIZER in (body["metadata"].get("finalizers") or [])) != wl.needs_finalizer(body):
            body = self._set_finalizer(body, wl.needs_finalizer(body))
        step = Step(body=body, status=RLPRunStatus.from_body(body), now=self.clock())
        try:
            run = parse_run(
                {
                    "apiVersion": body.get("apiVersion"),
                    "kind": body.get("kind"),
                    "metadata": {"name": name, "namespace": namespace},
                    "spec": body.get("spec") or {},
                },
                f"RLPRun {namespace}/{name}",
            )
        except SpecError as e:
            self._fail_run(step, "InvalidSpec", str(e))
            return self._commit(step, None)
        spec_hash = locked_hash(run)  # of the run as written, not of the install's defaults
        run = self.defaults.apply(run)
        key = (namespace, name)
        # Errors leave the decisions taken before them in this step (they are real) and are shown on the
        # run: never a run with an empty or stale status while the operator log has the reason.
        try:
            self._advance(step, run, spec_hash)
            self._errors.pop(key, None)
        except (StorageCredentialsError, StoreError) as e:
            # The store is unreachable, the bucket or Secret missing, the credentials wrong: the user can
            # fix it; say so on the run and look again later.
            self.metrics.error("store")
            self._not_ready(step, "StorageUnavailable", f"storage: {e}", self.settings.storage_retry)
        except Exception as e:  # a bug or an apiserver hiccup: retried with backoff, and said so on the run
            n = self._errors[key] = self._errors.get(key, 0) + 1
            base, cap = self.settings.error_backoff
            delay = min(base * 2 ** (n - 1), cap)
            self.metrics.error("reconcile")
            log.error("reconcile failed (retry in %gs): %s: %s", delay, type(e).__name__, e,
                      extra={"namespace": namespace, "run": name}, exc_info=not isinstance(e, (OSError, KubeError)))  # fmt: skip
            self._not_ready(step, "ReconcileError", f"{type(e).__name__}: {e} (retry {n} in {delay:g}s)", delay)
        return self._commit(step, run)

    # ---- the state machine ------------------------------------------------------------------------
    def _advance(self, step: Step, run: RLPRun, spec_hash: str) -> None:
        st = step.status
        gen = step.body["metadata"].get("generation")
        self._redo(step, run)
        if st.phase in TERMINAL_RUN_STATES:
            self._after_finished(step, run)
            return
        if not st.phases:
            self._init_plan(step, run, spec_hash)
        elif st.spec_hash and st.spec_hash != spec_hash:
            # The CRD makes these fields immutable; this guards a cluster running an older CRD.
            self._fail_run(
                step,
                "ImmutableFieldChanged",
                f"fields that define what is trained ({', '.join(LOCKED_FIELDS)}) changed mid-run; "
                "create a new RLPRun instead",
            )
            return
        if st.observed_generation is not None and gen != st.observed_generation:
            step.event(
                self,
                "Normal",
                "SpecUpdated",
                f"generation {gen}: changes to resources, phases and backoffLimit apply to attempts started "
                "from now on; running Jobs are left as they are",
            )
        if st.observed_generation != gen:
            st.observed_generation = gen
            step.changed = True
        if not self._preflight(step, run):
            return

        was = st.phase
        for _ in range(len(st.phases) + 2):
            rec = next((r for r in st.phases if r.state not in DONE_PHASE_STATES), None)
            if rec is None or rec.state == "Failed":
                break
            if rec.state == "Running":
                if not self._check_running(step, run, rec):
                    break
                continue
            # Pending
            if not self._start_or_wait(step, run, rec):
                break
        self._summarize(step, run, was)

    def _redo(self, step: Step, run: RLPRun) -> None:
        """Act once on a new `rlp.dev/redo` value: delete the named outputs and those of every phase that
        reads them, and plan those phases again (what `rlp run --redo` does locally)."""
        st = step.status
        value = ((step.body["metadata"].get("annotations") or {}).get(wl.ANNOTATION_REDO) or "").strip()
        if not value or value == st.redo or not st.phases:
            return
        refs = [ref.strip() for ref in value.split(",") if ref.strip()]
        try:
            targets = downstream(run.spec, parse_phase_refs(run.spec, refs))
        except ValueError as e:
            st.redo, step.changed = value, True
            step.event(self, "Warning", "RedoRejected", f"{wl.ANNOTATION_REDO}: {e}")
            return
        records = [r for r in st.phases if r.key in targets and run.spec.phase_enabled(r.name)]
        running = [f"{r.name}@{r.round}" for r in records if r.state == "Running"]
        if running:
            st.redo, step.changed = value, True
            step.event(self, "Warning", "RedoRejected", f"{wl.ANNOTATION_REDO}={value}: {', '.join(running)} "
                       "still running; set the annotation again (another value) once it has finished")
            return
        for rec in records:  # outputs first: a store error leaves status.redo unset, so this is tried again
            store = self.stores.phase(run, rec.round, rec.name)
            store.delete(MANIFEST_NAME)
            store.delete_prefix("")
        for rec in records:
            rec.failures = 0
            rec.finished_at = rec.next_attempt_at = rec.output = rec.metrics = None
            self._transition(step, rec, "Pending", "Redo", f"{wl.ANNOTATION_REDO}={value}")
        if st.phase in TERMINAL_RUN_STATES:
            st.phase, st.finished_at = "Pending", None
        st.redo = value
        step.event(self, "Normal", "Redo", "redoing " + ", ".join(f"{r.name}@{r.round}" for r in records))

    def _preflight(self, step: Step, run: RLPRun) -> bool:
        """Before the run's first Job: storage, data and models checked (`preflight.check_run`), once.

        False when the run failed it. Storage errors propagate: the run waits (StorageUnavailable) and the
        check is done again, since a user can create a bucket or a Secret and the run should then go on.
        """
        st = step.status
        done = st.condition(preflight.CONDITION)
        if (done is not None and done.status == "True") or run.spec.suspend or any(r.attempts for r in st.phases):
            return True
        now, gen = fmt_time(step.now), step.body["metadata"].get("generation")
        try:
            summary = preflight.check_run(run, lambda uri=None: self.stores.open(run, uri))
        except preflight.PreflightFailed as e:
            st.set_condition(preflight.CONDITION, "False", e.reason, trim(str(e)), now, gen)
            self._fail_run(step, e.reason, str(e))
            return False
        st.set_condition(preflight.CONDITION, "True", "PreflightPassed", summary, now, gen)
        step.changed = True
        step.event(self, "Normal", "Validated", summary)
        return True

    def _init_plan(self, step: Step, run: RLPRun, spec_hash: str) -> None:
        st = step.status
        now = fmt_time(step.now)
        st.spec_hash = spec_hash
        st.started_at = st.started_at or now
        st.phase = st.phase or "Pending"
        strategy = run.spec.reward_learning.strategy
        for round_, phase in run.spec.phase_plan():
            rec = PhaseRecord(name=phase, round=round_)
            st.phases.append(rec)
            if run.spec.phase_enabled(phase):
                self._transition(step, rec, "Pending", "Planned", "")
            else:
                rec.finished_at = now
                self._transition(
                    step, rec, "Skipped", "Disabled", f"rewardLearning.strategy={strategy} does not use {phase}"
                )
                step.event(self, "Normal", "PhaseSkipped", f"{phase} (round {round_}) skipped: {rec.message}")
        step.event(
            self,
            "Normal",
            "Accepted",
            "plan: " + ", ".join(f"{r.name}@{r.round}" for r in st.phases if r.state != "Skipped"),
        )
        step.changed = True

    # ---- the run's finalizer ----------------------------------------------------------------------
    def _set_finalizer(self, body: dict[str, Any], present: bool) -> dict[str, Any]:
        """Add or remove `rlp.dev/cleanup` (see `workload.needs_finalizer`); runs of older operators had it
        whether or not they needed it."""
        meta = body["metadata"]
        finalizers = [f for f in meta.get("finalizers") or [] if f != wl.FINALIZER] + ([wl.FINALIZER] if present else [])
        return self.kube.merge_patch(
            RUNS,
            meta["namespace"],
            meta["name"],
            {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}},
        )

    def _finalize(self, body: dict[str, Any]) -> float | None:
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        finalizers = meta.get("finalizers") or []
        if wl.FINALIZER not in finalizers:
            return None
        labels = {wl.LABEL_RUN: name}
        removed = 0
        for collection in (JOBS, SERVICES, CONFIGMAPS):
            for obj in self.kube.list(collection, ns, labels=labels):
                if owned_by(obj, meta["uid"]) and self.kube.delete(
                    collection, ns, obj["metadata"]["name"], propagation="Background"
                ):
                    removed += 1
        message = f"deleted {removed} workload object(s)"
        if wl.needs_finalizer(body):
            try:
                run = parse_run({"metadata": {"name": name, "namespace": ns}, "spec": body.get("spec") or {}})
                count = self.stores.delete_run_outputs(self.defaults.apply(run))
                message += f"; deleted {count} stored file(s) under the run's prefix ({wl.ANNOTATION_DELETE_CHECKPOINTS})"
            except Exception as e:
                self.events.post(body, "Warning", "CheckpointsNotDeleted", f"could not delete stored outputs: {e}")
        else:
            message += "; checkpoints kept in storage"
        self.events.post(body, "Normal", "CleanedUp", message)
        log.info(message, extra={"namespace": ns, "run": name, "event": "CleanedUp"})
        index = finalizers.index(wl.FINALIZER)
        try:
            self.kube.json_patch(
                RUNS,
                ns,
                name,
                [
                    {"op": "test", "path": f"/metadata/finalizers/{index}", "value": wl.FINALIZER},
                    {"op": "remove", "path": f"/metadata/finalizers/{index}"},
                ],
            )
        except KubeError as e:
            if e.not_found:
                return None
            if e.status in (409, 422):  # the list changed under us: read again
                return 0.05
            raise
        self.metrics.forget_run(ns, name)
        return None
