"""A run's status: what one reconcile step decided (`Step`), and the reconciler's methods that write it.

A phase record changes state through `_transition`; the run's phase, message and conditions follow from
the records (`_summarize`, `_fail_run`, `_not_ready`); a finished run is deleted once its
`ttlSecondsAfterFinished` has passed; `_commit` writes the status and only then runs the step's effects
(Events, metrics, deletions).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from rlp_core.spec import RLPRun
from rlp_operator.events import EventRecorder
from rlp_operator.kube import RUNS, Kube, KubeError
from rlp_operator.metrics import OperatorMetrics
from rlp_operator.status import DONE_PHASE_STATES, PhaseRecord, RLPRunStatus, fmt_time, parse_time, trim

log = logging.getLogger("rlp_operator.reconciler")  # the logger name the operator's run records have always had

SHORT_MESSAGE = 120  # status.message: the MESSAGE column of `kubectl get rlp` (the full text is in conditions)


@dataclasses.dataclass
class Step:
    """What one reconcile decided: the new status plus effects to run once it is stored."""

    body: dict[str, Any]
    status: RLPRunStatus
    now: dt.datetime
    changed: bool = False
    requeue: float | None = None
    after: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    # (reason, message) of what keeps the run from going on (Ready=False), e.g. a Job the apiserver refused
    problem: tuple[str, str] | None = None

    def event(self, rec: StatusWriter, type_: str, reason: str, message: str) -> None:
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


class StatusWriter:
    """The `Reconciler`'s methods that set a run's status on a `Step`, and the write of it."""

    # set by Reconciler.__init__
    kube: Kube
    metrics: OperatorMetrics
    events: EventRecorder
    own_writes: dict[tuple[str, str], str]

    def _not_ready(self, step: Step, reason: str, text: str, retry: float | None) -> None:
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

    def _transition(self, step: Step, rec: PhaseRecord, state: str, reason: str, message: str) -> None:
        changed = rec.state != state
        rec.state = state  # type: ignore[assignment]
        rec.reason = reason
        rec.message = trim(message) if message else None
        step.changed = True
        if changed or (state == "Pending" and reason == "Planned"):  # a new record counts as entering Pending
            phase = rec.name
            step.after.append(lambda: self.metrics.transition(phase, state))

    # ---- run-level state --------------------------------------------------------------------------
    def _summarize(self, step: Step, run: RLPRun, was: str | None) -> None:
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

    def _conditions(self, step: Step, text: str, **conds: tuple[str, str]) -> None:
        """Set the run's message (short: a printer column) and conditions (with the full `text`)."""
        st = step.status
        now = fmt_time(step.now)
        gen = step.body["metadata"].get("generation")
        st.message = trim(text, SHORT_MESSAGE)
        message = trim(text)
        for key, (status, reason) in conds.items():
            if st.set_condition(key.capitalize(), status, reason, message, now, gen):
                step.changed = True

    def _fail_run(self, step: Step, reason: str, message: str) -> None:
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

    def _after_finished(self, step: Step, run: RLPRun) -> None:
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
    def _commit(self, step: Step, run: RLPRun | None) -> float | None:
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
