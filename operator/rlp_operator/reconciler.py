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
* Events, metrics and deletions are emitted only after the status write succeeded (`_Step.after`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from rlp_core.manifest import MANIFEST_NAME, Manifest
from rlp_core.provenance import downstream, parse_phase_refs
from rlp_core.spec import RLPRun, SpecError, parse_run
from rlp_core.store import StoreError
from rlp_operator import preflight
from rlp_operator import workload as wl
from rlp_operator.crd import LOCKED_FIELDS
from rlp_operator.events import EventRecorder
from rlp_operator.jobs import create_or_get, job_outcome, owned_by
from rlp_operator.kube import CONFIGMAPS, EVENTS, JOBS, PODS, RUNS, SERVICES, Kube, KubeError
from rlp_operator.metrics import OperatorMetrics
from rlp_operator.settings import Settings
from rlp_operator.status import (
    DONE_PHASE_STATES,
    TERMINAL_RUN_STATES,
    PhaseRecord,
    RLPRunStatus,
    fmt_time,
    parse_time,
    trim,
    utcnow,
)
from rlp_operator.storage import StorageCredentialsError, Stores

log = logging.getLogger("rlp_operator.reconciler")

SHORT_MESSAGE = 120  # status.message: the MESSAGE column of `kubectl get rlp` (the full text is in conditions)
REJECTED = (400, 413, 422)  # the apiserver refuses the object itself: retrying the same request cannot help


def locked_hash(run: RLPRun) -> str:
    """Hash of the spec fields that may not change while the run exists (see crd.LOCKED_FIELDS)."""
    spec = run.spec.model_dump(mode="json", by_alias=True)
    locked = {k: spec.get(k) for k in LOCKED_FIELDS}
    return hashlib.sha256(json.dumps(locked, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Step:
    """What one reconcile decided: the new status plus effects to run once it is stored."""

    body: dict[str, Any]
    status: RLPRunStatus
    now: dt.datetime
    changed: bool = False
    requeue: float | None = None
    after: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    # (reason, message) of what keeps the run from going on (Ready=False), e.g. a Job the apiserver refused
    problem: tuple[str, str] | None = None

    def event(self, rec: Reconciler, type_: str, reason: str, message: str) -> None:
        body = self.body
        self.after.append(lambda: rec.events.post(body, type_, reason, message))
        level = logging.WARNING if type_ == "Warning" else logging.INFO
        self.after.append(
            lambda: log.log(
                level,
                message,
                extra={
                    "event": reason,
                    "namespace": body["metadata"]["namespace"],
                    "run": body["metadata"]["name"],
                },
            )
        )

    def wake(self, seconds: float) -> None:
        seconds = max(seconds, 0.05)
        self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)


class Reconciler:
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
        step = _Step(body=body, status=RLPRunStatus.from_body(body), now=self.clock())
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

    def _not_ready(self, step: _Step, reason: str, text: str, retry: float | None) -> None:
        """Ready=False with `reason`, the text as the run's message, an Event when it is news; look again
        after `retry` seconds (None: when the run changes)."""
        st = step.status
        text = trim(text)
        gen = step.body["metadata"].get("generation")
        ready = st.condition("Ready")
        news = ready is None or (ready.reason, ready.message) != (reason, text)
        if st.set_condition("Ready", "False", reason, text, fmt_time(step.now), gen):
            step.changed = True
        if news:
            step.event(self, "Warning", reason, text)
        short = trim(text, SHORT_MESSAGE)
        if st.message != short:
            st.message = short
            step.changed = True
        if retry is not None:
            step.wake(retry)

    # ---- the state machine ------------------------------------------------------------------------
    def _advance(self, step: _Step, run: RLPRun, spec_hash: str) -> None:
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

    def _redo(self, step: _Step, run: RLPRun) -> None:
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

    def _preflight(self, step: _Step, run: RLPRun) -> bool:
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

    def _init_plan(self, step: _Step, run: RLPRun, spec_hash: str) -> None:
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

    def _transition(self, step: _Step, rec: PhaseRecord, state: str, reason: str, message: str) -> None:
        changed = rec.state != state
        rec.state = state  # type: ignore[assignment]
        rec.reason = reason
        rec.message = trim(message) if message else None
        step.changed = True
        if changed or (state == "Pending" and reason == "Planned"):  # a new record counts as entering Pending
            phase = rec.name
            step.after.append(lambda: self.metrics.transition(phase, state))

    def _check_running(self, step: _Step, run: RLPRun, rec: PhaseRecord) -> bool:
        """Look at the current attempt's Job. True when the record left Running (look again at once)."""
        ns = run.metadata.namespace
        job = self.kube.get(JOBS, ns, rec.job) if rec.job else None
        if job is not None and not owned_by(job, step.body["metadata"]["uid"]):
            job = None  # a Job of an earlier run with the same name, on its way out
        if job is None:
            if run.spec.suspend:
                self._interrupt(step, run, rec, "the Job was deleted while suspending")
                return False
            manifest, uri = self.stores.verify(run, rec.round, rec.name)
            if manifest is not None:
                self._succeed(step, rec, manifest, uri, None, "Succeeded", "the Job is gone; its output verifies")
                return True
            return self._attempt_failed(step, run, rec, "JobLost", f"Job {rec.job} disappeared before it finished")
        outcome, reason, message, finished = job_outcome(job)
        if outcome == "active":
            if run.spec.suspend:
                self._interrupt(step, run, rec, f"Job {rec.job} deleted")
                return False
            self._watch_start(step, run, job)
            return False
        started = parse_time(job["metadata"].get("creationTimestamp"))
        duration = ((finished or step.now) - started).total_seconds() if started else None
        if outcome == "succeeded":
            manifest, uri = self.stores.verify(run, rec.round, rec.name)
            if manifest is None:
                return self._attempt_failed(
                    step,
                    run,
                    rec,
                    "ManifestMissing",
                    f"Job {rec.job} succeeded but {uri}_MANIFEST.json is missing or does not verify",
                    duration,
                )
            self._succeed(step, rec, manifest, uri, duration, "Succeeded", f"Job {rec.job} completed")
            return True
        detail = self._failure_detail(ns, rec.job) or message
        return self._attempt_failed(step, run, rec, reason or "JobFailed", f"Job {rec.job} failed: {detail}", duration)

    def _watch_start(self, step: _Step, run: RLPRun, job: dict[str, Any]) -> None:
        """A Job whose pods do not all run yet: look again soon, and say on the run what holds it back.

        What the Job controller, Kueue and the scheduler know only show on the Job (events, `suspend`) and
        its pods (`PodScheduled`): a missing ServiceAccount or PriorityClass, a queue that does not admit
        it, GPUs that never free up. Nothing is failed here: each can be fixed while the Job waits.
        """
        spec, status = job.get("spec") or {}, job.get("status") or {}
        want = spec.get("parallelism") or 1
        if not spec.get("suspend") and (status.get("ready") or 0) >= want:
            return
        step.wake(self.settings.workload_check)
        ns, name = run.metadata.namespace, job["metadata"]["name"]
        if spec.get("suspend"):
            queue = run.spec.resources.queue
            where = f"LocalQueue {queue!r}: check that it exists in {ns} and its ClusterQueue has quota" if queue else "its queue"
            step.problem = ("WaitingForAdmission", f"Job {name} is suspended until Kueue admits it from {where}")
            return
        pods = [p for p in self.kube.list(PODS, ns, labels={"batch.kubernetes.io/job-name": name})
                if not p["metadata"].get("deletionTimestamp")]  # fmt: skip
        if len(pods) < want:
            events = self.kube.list(EVENTS, ns, fields={"involvedObject.uid": job["metadata"]["uid"], "reason": "FailedCreate"})
            if events:
                last = max(events, key=lambda e: int(e["metadata"].get("resourceVersion") or 0))
                step.problem = ("FailedCreate", f"Job {name} cannot create its pods: {last.get('message', '')}")
                return
        for pod in pods:
            for cond in (pod.get("status") or {}).get("conditions") or []:
                if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                    since = parse_time(cond.get("lastTransitionTime")) or step.now
                    waited = (step.now - since).total_seconds()
                    if waited >= self.settings.unschedulable_grace:
                        step.problem = ("Unschedulable", f"pod {pod['metadata']['name']} of Job {name} unschedulable "
                                                         f"for {waited:.0f}s: {cond.get('message', '')}")  # fmt: skip
                        return

    def _failure_detail(self, ns: str, job: str) -> str:
        """'pod X exited with code N (Reason): message' for the first failed container, if any."""
        try:
            pods = self.kube.list(PODS, ns, labels={"batch.kubernetes.io/job-name": job})
        except KubeError as e:
            log.debug("cannot list pods of %s: %s", job, e)
            return ""
        for pod in pods:
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
                if term and term.get("exitCode", 0) != 0:
                    text = f"pod {pod['metadata']['name']} exited with code {term.get('exitCode')}"
                    if term.get("reason"):
                        text += f" ({term['reason']})"
                    if term.get("message"):
                        text += f": {term['message']}"
                    return text
            if (pod.get("status") or {}).get("phase") == "Failed":
                reason = pod["status"].get("reason") or "Failed"
                return f"pod {pod['metadata']['name']} failed ({reason}): {pod['status'].get('message', '')}"
        return ""

    def _succeed(
        self,
        step: _Step,
        rec: PhaseRecord,
        manifest: Manifest,
        uri: str,
        duration: float | None,
        reason: str,
        message: str,
    ) -> None:
        rec.finished_at = fmt_time(step.now)
        rec.started_at = rec.started_at or rec.finished_at
        rec.output = uri
        rec.metrics = _small_metrics(manifest.metrics)
        rec.next_attempt_at = None
        self._transition(step, rec, "Succeeded", reason, message)
        if duration is not None:
            phase = rec.name
            step.after.append(lambda: self.metrics.phase_duration(phase, "succeeded", duration))
        step.event(self, "Normal", "PhaseSucceeded", f"{rec.name} (round {rec.round}): {message}; output {uri}")

    def _attempt_failed(
        self,
        step: _Step,
        run: RLPRun,
        rec: PhaseRecord,
        reason: str,
        message: str,
        duration: float | None = None,
    ) -> bool:
        rec.failures += 1
        limit = max(run.spec.backoff_limit, 1)
        if duration is not None:
            phase = rec.name
            step.after.append(lambda: self.metrics.phase_duration(phase, "failed", duration))
        if rec.failures >= limit:
            rec.finished_at = fmt_time(step.now)
            rec.next_attempt_at = None
            text = f"{message} (attempt {rec.attempts}; {rec.failures} of backoffLimit {limit} failed attempts)"
            self._transition(step, rec, "Failed", reason, text)
            step.event(self, "Warning", "PhaseFailed", f"{rec.name} (round {rec.round}): {text}")
            return False
        delay = self.settings.backoff(rec.failures)
        rec.next_attempt_at = fmt_time(step.now + dt.timedelta(seconds=delay), precise=True)
        text = f"{message}; retrying in {delay:g}s ({rec.failures} of {limit} failed attempts)"
        self._transition(step, rec, "Pending", reason, text)
        step.event(self, "Warning", "AttemptFailed", f"{rec.name} (round {rec.round}) attempt {rec.attempts}: {text}")
        return True

    def _interrupt(self, step: _Step, run: RLPRun, rec: PhaseRecord, message: str) -> None:
        """Suspend: put the running phase back to Pending; delete its Job once that is stored."""
        job = rec.job
        self._transition(step, rec, "Pending", "Suspended", f"interrupted by suspend: {message}")
        ns = run.metadata.namespace
        if job:
            step.after.append(lambda: self._delete_job(ns, job))
        step.event(self, "Normal", "PhaseInterrupted", f"{rec.name} (round {rec.round}): suspended; {message}")

    def _delete_job(self, ns: str, job: str) -> None:
        self.kube.delete(JOBS, ns, job, propagation="Background")

    def _start_or_wait(self, step: _Step, run: RLPRun, rec: PhaseRecord) -> bool:
        """Pending phase: wait (suspend, backoff), or find it complete, or start its next attempt."""
        ns = run.metadata.namespace
        if rec.job:
            # The previous attempt's Job must be finished before another starts (suspend, crash windows).
            old = self.kube.get(JOBS, ns, rec.job)
            if old is not None and owned_by(old, step.body["metadata"]["uid"]) and job_outcome(old)[0] == "active":
                if not old["metadata"].get("deletionTimestamp"):
                    self._delete_job(ns, rec.job)
                if not run.spec.suspend:
                    step.wake(self.settings.stale_job_requeue)
                return False
        if run.spec.suspend:
            return False
        wait_until = parse_time(rec.next_attempt_at)
        if wait_until and wait_until > step.now:
            step.wake((wait_until - step.now).total_seconds())
            return False
        manifest, uri = self.stores.verify(run, rec.round, rec.name)
        if manifest is not None:
            self._succeed(step, rec, manifest, uri, None, "AlreadyComplete", "output already complete in the store")
            return True
        return self._create_attempt(step, run, rec)

    def _create_attempt(self, step: _Step, run: RLPRun, rec: PhaseRecord) -> bool:
        ns = run.metadata.namespace
        uid = step.body["metadata"]["uid"]
        owner = wl.owner_reference(step.body)
        attempt = rec.attempts + 1
        try:
            annotations = wl.pod_annotations(step.body)
        except ValueError as e:
            self._transition(step, rec, "Failed", "InvalidPodAnnotations", str(e))
            return False
        job_body, service = wl.render_job(run, rec.round, rec.name, attempt, owner, annotations)
        job = job_body["metadata"]["name"]
        try:
            self._ensure_configmap(run, owner, step.body["metadata"].get("generation"))
        except KubeError as e:
            if e.status not in REJECTED:
                raise
            # the spec itself does not fit (a ConfigMap holds at most 1 MiB): no retry can help
            self._transition(step, rec, "Failed", "SpecTooLarge" if e.status == 413 or "Too long" in e.message
                             else "SpecRejected", f"the run's spec ConfigMap was refused by the apiserver: {e.message}")  # fmt: skip
            return False
        try:
            if service is not None:
                create_or_get(self.kube, SERVICES, ns, service)
            created, existing = create_or_get(self.kube, JOBS, ns, job_body)
        except KubeError as e:
            if e.status not in REJECTED:
                raise
            # Rendered from spec.resources, spec.phases and the pod-annotations annotation, which may change
            # mid-run: the run waits for the fix (a change reconciles it again) instead of retrying forever.
            step.problem = ("JobRejected", f"Job {job} was refused by the apiserver: {e.message}; fix "
                            f"spec.resources, spec.phases or {wl.ANNOTATION_POD_ANNOTATIONS} and the run continues")  # fmt: skip
            return False
        if not created and (existing is None or not owned_by(existing, uid)):
            step.wake(self.settings.stale_job_requeue)  # an old run's Job of that name is being deleted
            return False
        adopted = not created
        retry = rec.failures > 0
        rec.attempts = attempt
        rec.job = job
        rec.attempt_started_at = fmt_time(step.now)
        rec.started_at = rec.started_at or rec.attempt_started_at
        rec.next_attempt_at = None
        verb = "adopted existing" if adopted else "created"
        self._transition(step, rec, "Running", "JobCreated", f"attempt {attempt}: {verb} Job {job}")
        step.wake(self.settings.workload_check)  # watch the Job start (`_watch_start`)
        phase, round_ = rec.name, rec.round
        if retry:
            step.after.append(lambda: self.metrics.retry(phase))
        step.event(
            self,
            "Normal",
            "PhaseRetried" if retry else "PhaseStarted",
            f"{phase} (round {round_}) attempt {attempt}: {verb} Job {job}",
        )
        return False

    def _ensure_configmap(self, run: RLPRun, owner: dict[str, Any], generation: int | None) -> None:
        """The run's spec ConfigMap, up to date (checked once per generation per process)."""
        key = (owner["uid"], str(generation))
        if key in self._configmaps:
            return
        cm = wl.render_configmap(run, owner)
        ns, cm_name = run.metadata.namespace, cm["metadata"]["name"]
        created, existing = create_or_get(self.kube, CONFIGMAPS, ns, cm)
        if not created and existing is not None and existing.get("data") != cm["data"]:
            cm["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
            self.kube.replace(CONFIGMAPS, ns, cm_name, cm)
        if len(self._configmaps) > 100_000:
            self._configmaps.clear()
        self._configmaps[key] = f"{ns}/{cm_name}"

    # ---- run-level state --------------------------------------------------------------------------
    def _summarize(self, step: _Step, run: RLPRun, was: str | None) -> None:
        st = step.status
        now = fmt_time(step.now)
        failed = next((r for r in st.phases if r.state == "Failed"), None)
        current = next((r for r in st.phases if r.state not in DONE_PHASE_STATES), None)
        if failed is not None:
            self._fail_run(step, failed.reason or "PhaseFailed", f"{failed.name} (round {failed.round}): {failed.message}")
            return
        if current is None:
            st.phase = "Succeeded"
            st.current_phase = None
            st.finished_at = st.finished_at or now
            done = sum(r.state == "Succeeded" for r in st.phases)
            skipped = sum(r.state == "Skipped" for r in st.phases)
            text = f"all {done} phases succeeded" + (f" ({skipped} skipped)" if skipped else "")
            self._conditions(step, text, ready=("True", "Succeeded"), running=("False", "Succeeded"),
                             succeeded=("True", "Succeeded"), failed=("False", "Succeeded"))  # fmt: skip
            if was != "Succeeded":
                step.event(self, "Normal", "Succeeded", f"run succeeded: {text}")
                self._after_finished(step, run)
            step.changed = True
            return
        st.current_phase = current.name
        st.round = current.round
        if run.spec.suspend:
            st.phase = "Suspended"
            text = f"suspended before {current.name} (round {current.round})"
            self._conditions(step, text, ready=("False", "Suspended"), running=("False", "Suspended"),
                             succeeded=("False", "Suspended"), failed=("False", "Suspended"),
                             suspended=("True", "Suspended"))  # fmt: skip
            if was != "Suspended":
                step.event(self, "Normal", "Suspended", f"run suspended at {current.name} (round {current.round})")
            step.changed = True
            return
        where = f"{current.name} (round {current.round})"
        if current.state == "Running":
            st.phase = "Running"
            text = f"{where} attempt {current.attempts}: Job {current.job}"
        elif current.next_attempt_at:
            st.phase = "Running"
            text = f"{where}: {current.message}"
        else:
            st.phase = st.phase if st.phase in ("Running",) else "Pending"
            text = f"{where} pending"
        ready = ("Unknown", "Progressing")
        if step.problem is not None:
            reason, problem = step.problem
            text, ready = f"{where}: {problem}", ("False", reason)
            last = st.condition("Ready")
            if last is None or (last.reason, last.message) != (reason, trim(text)):
                step.event(self, "Warning", reason, text)
        if was == "Suspended":
            step.event(self, "Normal", "Resumed", f"run resumed at {current.name} (round {current.round})")
        elif was in (None, "Pending") and st.phase == "Running":
            step.event(self, "Normal", "Started", f"run started: {current.name} (round {current.round})")
        reason = "PhaseRunning" if current.state == "Running" else ("BackingOff" if current.next_attempt_at else "Pending")
        self._conditions(step, text, ready=ready, running=("True", reason),
                         succeeded=("False", "Running"), failed=("False", "Running"),
                         suspended=("False", "Resumed" if was == "Suspended" else "NotSuspended"))  # fmt: skip
        step.changed = step.changed or st.phase != was

    def _conditions(self, step: _Step, text: str, **conds: tuple[str, str]) -> None:
        """Set the run's message (short: a printer column) and conditions (with the full `text`)."""
        st = step.status
        now = fmt_time(step.now)
        gen = step.body["metadata"].get("generation")
        st.message = trim(text, SHORT_MESSAGE)
        message = trim(text)
        for key, (status, reason) in conds.items():
            if st.set_condition(key.capitalize(), status, reason, message, now, gen):
                step.changed = True

    def _fail_run(self, step: _Step, reason: str, message: str) -> None:
        st = step.status
        was = st.phase
        st.phase = "Failed"
        st.finished_at = st.finished_at or fmt_time(step.now)
        failed = next((r for r in st.phases if r.state == "Failed"), None)
        if failed:
            st.current_phase, st.round = failed.name, failed.round
        self._conditions(step, message, ready=("False", reason), running=("False", reason),
                         succeeded=("False", reason), failed=("True", reason))  # fmt: skip
        sus = st.condition("Suspended")
        if sus is not None and sus.status == "True":
            st.set_condition("Suspended", "False", reason, trim(message), fmt_time(step.now), sus.observed_generation)
        step.changed = True
        if was != "Failed":
            step.event(self, "Warning", "Failed", f"run failed ({reason}): {message}")

    def _after_finished(self, step: _Step, run: RLPRun) -> None:
        ttl = run.spec.ttl_seconds_after_finished
        finished = parse_time(step.status.finished_at)
        if ttl is None or finished is None:
            return
        expires = finished + dt.timedelta(seconds=ttl)
        if step.now >= expires:
            ns, name = run.metadata.namespace, run.metadata.name
            uid = step.body["metadata"]["uid"]
            step.after.append(lambda: self._delete_run(ns, name, uid))
            step.event(self, "Normal", "Expired", f"ttlSecondsAfterFinished={ttl} passed; deleting the run")
        else:
            step.wake((expires - step.now).total_seconds())

    def _delete_run(self, ns: str, name: str, uid: str) -> None:
        try:
            self.kube.delete(RUNS, ns, name, uid=uid)
        except KubeError as e:
            if e.status != 409:  # 409: a new run of that name, not ours to delete
                raise

    # ---- writes -----------------------------------------------------------------------------------
    def _commit(self, step: _Step, run: RLPRun | None) -> float | None:
        meta = step.body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if step.changed:
            patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": step.status.dump()}
            try:
                updated = self.kube.merge_patch(RUNS, ns, name, patch, sub="/status")
            except KubeError as e:
                if e.conflict:  # someone else wrote the run since we read it: start over
                    return 0.05
                raise
            self.own_writes[(ns, name)] = updated["metadata"]["resourceVersion"]
        for effect in step.after:
            effect()
        self.metrics.observe_run(ns, name, step.status)
        return step.requeue

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


def _small_metrics(metrics: dict[str, Any], limit: int = 8192) -> dict[str, Any] | None:
    """The manifest's metrics for status, kept small (status lives in etcd with the object)."""
    if not metrics:
        return None
    if len(json.dumps(metrics)) <= limit:
        return metrics
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    return dict(list(scalars.items())[:100]) or None
