"""What a phase output was made from, and whether it may be reused for the spec at hand.

Every manifest records the spec fields that affect its phase (`PHASE_FIELDS`) and its inputs: the
digest (sha256 of the manifest file) of each upstream phase output it reads, and the file listing of
each model URI it starts from. Their hash is the phase's *fingerprint*. A phase output is reused only
when its fingerprint equals the one the current spec and the current upstream outputs give; so a
changed seed, a changed `optimization.steps` or a redone upstream phase never yields "Cached" with old
results. When they differ, the run stops naming the changed fields, or (asked to) runs the phase again
under a new output path `round-K/{phase}~{fingerprint[:12]}` beside the old one.

This module imports neither torch nor Kubernetes: `rlp verify` and the operator can use it cheaply.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from rlp_core.hub import HF_SCHEME, PACKAGED_SCHEME
from rlp_core.manifest import Manifest, inspect_output, phase_prefix
from rlp_core.pretrained import packaged_version
from rlp_core.spec import RLPRun, RLPRunSpec
from rlp_core.store import S3Store, Store

POLICY_PRODUCERS = ("optimize", "sft")
RM_PRODUCERS = ("synthesize", "refine", "reward")
SPEC_DIR = "_specs"
MAX_LENGTH = "policy.sft.tiny.maxPositions"
# how every phase renders and bounds its inputs (rlp_core.models.render_prompt, PhaseContext.max_length)
INPUT_FORMAT = (MAX_LENGTH, "policy.chatTemplate", "policy.systemPrompt", "policy.maxPromptTokens")

# Spec fields (camelCase paths) that change what a phase produces; its inputs cover the rest.
PHASE_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("seed", "policy"),
    "reward": ("seed", "rewardModel", *INPUT_FORMAT),
    "generate": ("seed", "prompts", "generation", "evaluation.judge", *INPUT_FORMAT),
    "refine": ("seed", "rewardModel", "rewardLearning.strategy", "rewardLearning.uml", "generation", *INPUT_FORMAT),
    "synthesize": ("seed", "rewardModel", "rewardLearning", "generation", *INPUT_FORMAT),
    "optimize": ("seed", "prompts", "optimization", "evaluation.judge", *INPUT_FORMAT),
    "evaluate": ("seed", "evaluation", "rewardModel.model", *INPUT_FORMAT),
}


_DEFAULT = object()  # a field left at its default (absent from the sparse dump)


def _get(doc: Any, path: str) -> Any:
    for part in path.split("."):
        doc = doc.get(part, _DEFAULT) if isinstance(doc, dict) else _DEFAULT
    return doc


def phase_fields(spec: RLPRunSpec, phase: str) -> dict[str, Any]:
    """The fields of PHASE_FIELDS[phase] that differ from their defaults (so a field added to the spec
    later, at a default that keeps the old behaviour, leaves earlier outputs reusable)."""
    doc = spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    fields = {path: value for path in PHASE_FIELDS[phase] if (value := _get(doc, path)) is not _DEFAULT}
    fields["enabled"] = spec.phase_enabled(phase)
    return fields


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Leaf paths whose values differ, e.g. ['optimization.steps (40 -> 20)', 'seed (default -> 7)']."""
    out: list[str] = []

    def show(value: Any) -> str:
        return "default" if value is _DEFAULT else json.dumps(value)

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, _DEFAULT), b.get(k, _DEFAULT), f"{path}.{k}" if path else k)
        elif isinstance(a, dict) and b is _DEFAULT or a is _DEFAULT and isinstance(b, dict):
            walk(a if a is not _DEFAULT else {}, b if b is not _DEFAULT else {}, path)
        elif a != b:
            out.append(f"{path} ({show(a)} -> {show(b)})")

    walk(old, new, "")
    return out


def latest_producer(spec: RLPRunSpec, round: int, phase: str, producers: tuple[str, ...]) -> tuple[int, str] | None:
    """The latest enabled phase among `producers` before (round, phase) in the plan."""
    plan = spec.phase_plan()
    here = plan.index((round, phase))
    for r, p in reversed(plan[:here]):
        if p in producers and spec.phase_enabled(p):
            return r, p
    return None


def upstream(spec: RLPRunSpec, round: int, phase: str) -> tuple[list[tuple[int, str]], list[str]]:
    """(upstream phase outputs, model URIs) that (round, phase) reads."""
    if phase == "sft":
        return [], []
    phases: list[tuple[int, str] | None] = []
    uris: list[str | None] = []
    start = (0, "sft") if spec.policy.model is None else None
    if start is None:
        uris.append(spec.policy.model)
    if phase == "reward":
        return [p for p in [start] if p], [u for u in uris if u]
    policy = latest_producer(spec, round, phase, POLICY_PRODUCERS) or start
    rm = latest_producer(spec, round, phase, RM_PRODUCERS)
    if rm is None and not (phase == "optimize" and spec.optimization.reward == "judge"):
        uris.append(spec.reward_model.model)
    if phase == "generate":
        phases = [policy]
    elif phase in ("refine", "synthesize"):
        phases = [(round, "generate"), rm]
    elif phase == "optimize":  # the RM scores rollouts and starts the critic, unless the judge is the reward
        phases = [policy, start, rm if spec.optimization.reward == "reward-model" else None]
    else:  # evaluate
        phases = [policy, start, rm]
    unique = list(dict.fromkeys(p for p in phases if p is not None))
    return unique, [u for u in dict.fromkeys(uris) if u]


def output_key(round: int, phase: str) -> str:
    return f"round-{round}/{phase}"


@dataclass
class Location:
    """Where (round, phase) lives for the current spec, and what is there."""

    round: int
    phase: str
    store: Store  # where the output for this fingerprint is, or would be written
    fingerprint: str | None  # None while an upstream output is missing
    fields: dict[str, Any]
    inputs: dict[str, str]
    manifest: Manifest | None = None  # a complete output made for this fingerprint
    conflict: Manifest | None = None  # a complete output at the canonical path made for another one
    problem: str | None = None  # the canonical output is damaged (see manifest.inspect_output)
    variant: Store | None = None  # the new output path used when asked to rerun a changed phase

    def changes(self) -> str:
        """The differences between `conflict` and the current spec and inputs, for messages."""
        old = self.conflict
        if old is None:
            return ""
        if old.fingerprint is None:
            return "it was made by an rlp without provenance records (no fingerprint in its manifest)"
        diffs = changed_fields(old.spec_fields, self.fields)
        diffs += [f"input {k} ({'redone' if k in self.inputs else 'no longer read'})"
                  for k in sorted(old.inputs) if old.inputs.get(k) != self.inputs.get(k)]
        diffs += [f"input {k} (new)" for k in sorted(set(self.inputs) - set(old.inputs))]
        return "changed: " + ", ".join(diffs or ["its inputs"])


@dataclass
class Provenance:
    """Resolves each phase of a run to its output for the current spec (memoised, in plan order)."""

    run: RLPRun
    root: Store
    _memo: dict[tuple[int, str], Location] = field(default_factory=dict)

    def canonical(self, round: int, phase: str, suffix: str = "") -> Store:
        md = self.run.metadata
        return self.root.child(phase_prefix(md.namespace, md.name, round, phase + suffix))

    def locate(self, round: int, phase: str) -> Location:
        key = (round, phase)
        if key not in self._memo:
            self._memo[key] = self._resolve(round, phase)
        return self._memo[key]

    def forget(self, round: int, phase: str) -> None:
        """Drop what is known of (round, phase) and of every later phase (after it was (re)written)."""
        plan = self.run.spec.phase_plan()
        here = plan.index((round, phase))
        self._memo = {k: v for k, v in self._memo.items() if plan.index(k) < here}

    def inputs(self, round: int, phase: str) -> dict[str, str] | None:
        phases, uris = upstream(self.run.spec, round, phase)
        inputs: dict[str, str] = {}
        for r, p in phases:
            loc = self.locate(r, p)
            if loc.manifest is None:
                return None
            inputs[output_key(r, p)] = loc.manifest.digest
        for uri in uris:
            inputs[uri] = self.listing_digest(uri)
        return inputs

    def listing_digest(self, uri: str) -> str:
        """A model URI's identity as an input: its files' names and sizes in a store; for a Hub model the
        URI itself (`@revision` pins it; the commit a phase used is in its manifest's `model_revisions`);
        for a packaged model the URI and the installed package's version."""
        if uri.startswith(HF_SCHEME):
            identity: Any = uri
        elif uri.startswith(PACKAGED_SCHEME):
            identity = [uri, packaged_version(uri.removeprefix(PACKAGED_SCHEME))]
        else:
            identity = [(e.path, e.size) for e in self._open(uri).list()]
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()

    def _open(self, uri: str) -> Store:
        """`uri` through the root's S3 client when both are S3 (the run's credentials, as the operator
        holds them), else with the spec's storage settings."""
        if isinstance(self.root, S3Store) and uri.startswith("s3://"):
            bucket, _, prefix = uri.removeprefix("s3://").partition("/")
            return S3Store(bucket, prefix, self.root.client, self.root.transfer_config, self.root.retry_seconds)
        return self.run.spec.storage.open(uri)

    def _resolve(self, round: int, phase: str) -> Location:
        fields = phase_fields(self.run.spec, phase)
        inputs = self.inputs(round, phase)
        canonical = self.canonical(round, phase)
        if inputs is None:
            return Location(round, phase, canonical, None, fields, {})
        fingerprint = hashlib.sha256(json.dumps({"fields": fields, "inputs": inputs}, sort_keys=True).encode()).hexdigest()
        loc = Location(round, phase, canonical, fingerprint, fields, inputs,
                       variant=self.canonical(round, phase, f"~{fingerprint[:12]}"))
        manifest, problem = inspect_output(canonical)
        if manifest is not None and manifest.fingerprint == fingerprint:
            loc.manifest = manifest
            return loc
        loc.problem = problem
        if loc.problem is None:
            loc.conflict = manifest
        there, _ = inspect_output(loc.variant)
        if there is not None and there.fingerprint == fingerprint:
            loc.store, loc.manifest = loc.variant, there
        return loc

    def save_spec(self) -> str:
        """Store the spec beside the run's outputs (once per spec hash); returns that hash."""
        md, spec_hash = self.run.metadata, self.run.spec.hash()
        doc = json.dumps(self.run.spec.model_dump(mode="json", by_alias=True), indent=1, sort_keys=True).encode()
        try:
            self.root.child(md.namespace, md.name, SPEC_DIR).put_bytes(f"{spec_hash}.json", doc, if_absent=True)
        except FileExistsError:
            pass
        return spec_hash


def downstream(spec: RLPRunSpec, targets: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """`targets` and every phase of the plan that reads one of them, directly or not."""
    out = set(targets)
    for round, phase in spec.phase_plan():
        if any(dep in out for dep in upstream(spec, round, phase)[0]):
            out.add((round, phase))
    return out


def parse_phase_refs(spec: RLPRunSpec, refs: list[str]) -> set[tuple[int, str]]:
    """`sft` (every round of it) or `round-K/phase` -> plan entries; ValueError naming a bad one."""
    plan = spec.phase_plan()
    out: set[tuple[int, str]] = set()
    for ref in refs:
        if "/" in ref:
            head, _, phase = ref.partition("/")
            try:
                entry = (int(head.removeprefix("round-")), phase)
            except ValueError:
                entry = (-1, phase)
            if entry not in plan:
                raise ValueError(f"--redo {ref}: not in this run's plan; use a phase name or round-K/PHASE "
                                 f"from {[output_key(*e) for e in plan]}")
            out.add(entry)
        else:
            hits = {e for e in plan if e[1] == ref}
            if not hits:
                raise ValueError(f"--redo {ref}: no such phase in this run's plan; use one of "
                                 f"{sorted({p for _, p in plan})} or round-K/PHASE")
            out |= hits
    return out


def verify_run(run: RLPRun, root: Store) -> list[tuple[str, str, str]]:
    """(round-K/phase, state, detail) for every phase of the plan, every listed file re-hashed.

    state: ok (complete for this spec, content matches), missing (not run yet), changed (made under
    another spec or from other inputs), damaged (content does not match its manifest: redo it).
    """
    provenance = Provenance(run, root)
    rows = []
    for round, phase in run.spec.phase_plan():
        loc = provenance.locate(round, phase)
        key = output_key(round, phase)
        if loc.manifest is not None:
            _, problem = inspect_output(loc.store, deep=True)
            rows.append((key, "damaged", problem) if problem else (key, "ok", loc.store.url()))
        elif loc.problem is not None:
            rows.append((key, "damaged", loc.problem))
        elif loc.conflict is not None:
            rows.append((key, "changed", loc.changes()))
        else:
            rows.append((key, "missing", "not run yet" if loc.fingerprint else "waits for its inputs"))
    return rows
