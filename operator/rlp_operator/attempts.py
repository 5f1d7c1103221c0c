"""A phase's attempts, one Job each: started, watched while it starts, verified in the store when it ends,
retried with backoff or interrupted by suspend (the `Reconciler`'s methods for a Pending or Running phase).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from rlp_core.manifest import Manifest
from rlp_core.spec import RLPRun
from rlp_operator import workload as wl
from rlp_operator.jobs import create_or_get, job_outcome, owned_by
from rlp_operator.kube import CONFIGMAPS, EVENTS, JOBS, PODS, SERVICES, KubeError
from rlp_operator.settings import Settings
from rlp_operator.status import PhaseRecord, fmt_time, parse_time
from rlp_operator.status_writer import StatusWriter, Step
from rlp_operator.storage import Stores

log = logging.getLogger("rlp_operator.reconciler")  # the logger name the operator's run records have always had

REJECTED = (400, 413, 422)  # the apiserver refuses the object itself: retrying the same request cannot help


class PhaseAttempts(StatusWriter):
    """The `Reconciler`'s methods that run a phase's attempts as Jobs."""

    # set by Reconciler.__init__
    stores: Stores
    settings: Settings
    _configmaps: dict[tuple[str, str], str]

    def _check_running(self, step: Step, run: RLPRun, rec: PhaseRecord) -> bool:
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

    def _watch_start(self, step: Step, run: RLPRun, job: dict[str, Any]) -> None:
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
        step: Step,
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
        step: Step,
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

    def _interrupt(self, step: Step, run: RLPRun, rec: PhaseRecord, message: str) -> None:
        """Suspend: put the running phase back to Pending; delete its Job once that is stored."""
        job = rec.job
        self._transition(step, rec, "Pending", "Suspended", f"interrupted by suspend: {message}")
        ns = run.metadata.namespace
        if job:
            step.after.append(lambda: self._delete_job(ns, job))
        step.event(self, "Normal", "PhaseInterrupted", f"{rec.name} (round {rec.round}): suspended; {message}")

    def _delete_job(self, ns: str, job: str) -> None:
        self.kube.delete(JOBS, ns, job, propagation="Background")

    def _start_or_wait(self, step: Step, run: RLPRun, rec: PhaseRecord) -> bool:
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

    def _create_attempt(self, step: Step, run: RLPRun, rec: PhaseRecord) -> bool:
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


def _small_metrics(metrics: dict[str, Any], limit: int = 8192) -> dict[str, Any] | None:
    """The manifest's metrics for status, kept small (status lives in etcd with the object)."""
    if not metrics:
        return None
    if len(json.dumps(metrics)) <= limit:
        return metrics
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    return dict(list(scalars.items())[:100]) or None
