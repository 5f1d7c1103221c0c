"""What a phase sees of its run: the `PhaseContext`, output names, errors, and the RM training that
the pipeline's `reward` phase and the reward-learning strategies (rlp_core.uml, .spg, .ser) share.

It sits below `rlp_core.pipeline` and the strategies, so neither imports the other's module.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlp_core.data import DataError, PreferencePair, Record, Sample, load_records, split_held_out
from rlp_core.manifest import fetch_phase_output, phase_prefix
from rlp_core.models import default_device, load_reward_model, load_tokenizer
from rlp_core.spec import RLPRun, Storage
from rlp_core.store import Store
from rlp_core.supervised import fit, minibatches, preference_accuracy, reward_loss
from rlp_core.tasks import gold_judge
from rlp_core.telemetry import PhaseTelemetry

POLICY_DIR, RM_DIR, SAMPLES_FILE, HISTORY_FILE = "policy", "reward_model", "samples.jsonl", "history.jsonl"
POLICY_PRODUCERS = ("optimize", "sft")
RM_PRODUCERS = ("synthesize", "refine", "reward")


def store_for_uri(storage: Storage, uri: str) -> Store:
    """A store rooted at a user-given URI, with the run's endpoint and region."""
    return Store.from_uri(uri, endpoint=storage.endpoint, region=storage.region)


def read_uri(storage: Storage, uri: str) -> bytes:
    """The bytes of one object named by a full URI (a data file given in the spec)."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    return store_for_uri(storage, parent).get_bytes(name)


# (trainer, step stats) -> None: an observer of the optimize phase's steps
StepCallback = Callable[[Any, dict[str, float]], None]


class PhaseError(RuntimeError):
    """A phase cannot run (missing input, bad data); the message says what to fix."""


@dataclass
class PhaseContext:
    run: RLPRun
    round: int
    phase: str
    root: Store
    cache_dir: Path
    out_dir: Path
    telemetry: PhaseTelemetry
    device: torch.device = field(default_factory=default_device)
    step_callback: StepCallback | None = None  # called by optimize after each step (benchmarks, probes)

    @property
    def spec(self):
        return self.run.spec

    @property
    def max_length(self) -> int:
        return self.spec.policy.sft.tiny.max_positions

    def store_of(self, round: int, phase: str) -> Store:
        return self.root.child(phase_prefix(self.run.metadata.namespace, self.run.metadata.name, round, phase))

    def fetch(self, round: int, phase: str) -> Path:
        """Local, verified copy of a complete phase output (downloaded once per cache)."""
        local = self.cache_dir / self.run.metadata.namespace / self.run.metadata.name / f"round-{round}" / phase
        marker = local / ".complete"
        if not marker.exists():
            if local.exists():
                shutil.rmtree(local)
            fetch_phase_output(self.store_of(round, phase), local)
            marker.touch()
        return local

    def fetch_uri(self, uri: str) -> Path:
        """A user-given model directory: a local path as is, a store URI downloaded into the cache."""
        if "://" not in uri or uri.startswith("file://"):
            path = Path(uri.removeprefix("file://"))
            if not (path / "config.json").exists():
                raise PhaseError(f"{uri}: not a model directory (no config.json); give a save_pretrained directory")
            return path
        store = self.store_for_uri(uri)
        local = self.cache_dir / "models" / uri.replace("://", "/").strip("/")
        if not (local / ".complete").exists():
            store.download_dir("", local, store.list())
            (local / ".complete").touch()
        return local

    def store_for_uri(self, uri: str) -> Store:
        return store_for_uri(self.spec.storage, uri)

    def records(self, uri: str, record: type[Record]) -> list:
        try:
            return load_records(uri, record, lambda u: read_uri(self.spec.storage, u))
        except DataError as err:
            raise PhaseError(str(err)) from None

    # --- which model a phase starts from ----------------------------------------------------------
    def _latest(self, producers: tuple[str, ...]) -> tuple[int, str] | None:
        plan = self.spec.phase_plan()
        here = plan.index((self.round, self.phase))
        for round, phase in reversed(plan[:here]):
            if phase in producers and self.spec.phase_enabled(phase):
                return round, phase
        return None

    def start_policy_dir(self) -> Path:
        if self.spec.policy.model is not None:
            return self.fetch_uri(self.spec.policy.model)
        return self.fetch(0, "sft") / POLICY_DIR

    def policy_dir(self) -> Path:
        latest = self._latest(POLICY_PRODUCERS)
        return self.start_policy_dir() if latest is None else self.fetch(*latest) / POLICY_DIR

    def reward_model_dir(self) -> Path:
        latest = self._latest(RM_PRODUCERS)
        if latest is None:
            if self.spec.reward_model.model is None:
                raise PhaseError("no reward model: set spec.rewardModel.model or let the reward phase run")
            return self.fetch_uri(self.spec.reward_model.model)
        return self.fetch(*latest) / RM_DIR

    def samples(self) -> list[Sample]:
        return load_records(str(self.fetch(self.round, "generate") / SAMPLES_FILE), Sample)

    def human_pairs(self) -> tuple[list[PreferencePair], list[PreferencePair]]:
        """(train, held-out) human preference pairs; the split is fixed by the spec's seed."""
        pairs = self.records(self.spec.reward_model.human_preferences, PreferencePair)
        return split_held_out(pairs, self.spec.reward_model.held_out_fraction, self.spec.seed)

    def gold(self) -> Callable[[str, str], float] | None:
        judge = self.spec.evaluation.judge
        return gold_judge(judge) if judge.startswith("builtin://") else None



def train_reward_model(
    ctx: PhaseContext, init_dir: Path, pairs: list[PreferencePair], training, description: str,
) -> tuple[Any, Any, dict[str, float]]:
    """Continue training the RM at `init_dir` on `pairs`; report held-out human accuracy before/after."""
    tokenizer = load_tokenizer(init_dir)
    model = load_reward_model(init_dir).to(ctx.device)
    _, held_out = ctx.human_pairs()
    before = preference_accuracy(model, tokenizer, held_out, ctx.max_length)
    batches = minibatches(pairs, training.batch_size, training.epochs, ctx.spec.seed + ctx.round)
    history = fit(list(model.parameters()), batches, reward_loss(model, tokenizer, ctx.max_length), training,
                  ctx.telemetry, description)
    after = preference_accuracy(model, tokenizer, held_out, ctx.max_length)
    ctx.telemetry.set_accuracy("held_out", after)
    return model, tokenizer, {"pairs": len(pairs), "steps": len(history), "final_reward_loss": history[-1]["reward_loss"],
                              "rm_accuracy_held_out_before": before, "rm_accuracy_held_out": after}


