"""What a phase sees of its run: the `PhaseContext`, output names, errors, and the RM training that
the pipeline's `reward` phase and the reward-learning strategies (rlp_core.uml, .spg, .ser) share.

It sits below `rlp_core.pipeline` and the strategies, so neither imports the other's module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlp_core import gym_tasks
from rlp_core.data import DataError, PreferencePair, Record, Sample, load_records, split_held_out
from rlp_core.hub import HF_SCHEME, PACKAGED_SCHEME, ModelSourceError, check_model_dir, fetch_hf
from rlp_core.judges import programmatic_judge
from rlp_core.manifest import Manifest
from rlp_core.memory import DecoderShape, budget_bytes, rows_that_fit
from rlp_core.models import default_device, load_reward_model, load_tokenizer, render_prompt, with_lora
from rlp_core.pretrained import ModelSetupError, fetch_model
from rlp_core.provenance import POLICY_PRODUCERS, RM_PRODUCERS, Provenance, latest_producer, output_key
from rlp_core.spec import RLPRun, Storage
from rlp_core.store import IntegrityError, Store, sha256_file
from rlp_core.supervised import fit, minibatches, preference_accuracy, reward_loss, weighted_pairs
from rlp_core.telemetry import PhaseTelemetry

POLICY_DIR, RM_DIR, SAMPLES_FILE, HISTORY_FILE = "policy", "reward_model", "samples.jsonl", "history.jsonl"


def read_uri(storage: Storage, uri: str) -> bytes:
    """The bytes of one object named by a full URI (a data file given in the spec)."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    return storage.open(parent).get_bytes(name)


# (trainer, step stats) -> None: an observer of the optimize phase's steps
StepCallback = Callable[[Any, dict[str, float]], None]


class PhaseError(RuntimeError):
    """A phase cannot run (missing input, bad data); the message says what to fix."""


def prompt_token_lengths(tokenizer, prompts: list[str]) -> list[int]:
    """Tokens of each prompt as the policy reads it: rendered (chat template, system prompt), as encode_prompts does."""
    return [len(ids) for ids in tokenizer([render_prompt(tokenizer, p) for p in prompts],
                                          add_special_tokens=False)["input_ids"]]


def check_prompts_fit(lengths: list[int], max_prompt_tokens: int, source: str) -> None:
    """PhaseError naming the longest prompt when any is over `max_prompt_tokens`: a longer prompt would push
    sequences past the length every phase plans for, so it is rejected rather than truncated."""
    if not lengths or max(lengths) <= max_prompt_tokens:
        return
    longest = max(lengths)
    index, over = lengths.index(longest), sum(n > max_prompt_tokens for n in lengths)
    raise PhaseError(f"{source}: prompt {index} renders to {longest} tokens, more than spec.policy.maxPromptTokens "
                     f"({max_prompt_tokens}); {over} of {len(lengths)} prompts are over. Raise policy.maxPromptTokens "
                     f"to at least {longest}, shorten the prompts, or set policy.systemPrompt: \"\" to drop the chat "
                     "template's default system message")


def cached_copy_is_intact(local: Path, manifest: Manifest) -> bool:
    """Every file of the manifest is in `local` with its size and sha256."""
    for f in manifest.files:
        path = local / f.path
        if not path.is_file() or path.stat().st_size != f.size or sha256_file(path) != f.sha256:
            return False
    return True


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
    provenance: Provenance | None = None
    out_store: Store | None = None  # where this phase's output goes (its checkpoints too)
    model_revisions: dict[str, str] = field(default_factory=dict)  # hf:// URI -> commit, for the manifest
    _verified: set[Path] = field(default_factory=set, init=False, repr=False)  # cache entries checked by this phase

    def __post_init__(self) -> None:
        self.provenance = self.provenance or Provenance(self.run, self.root)
        self.out_store = self.out_store or self.provenance.canonical(self.round, self.phase)

    @property
    def spec(self):
        return self.run.spec

    @property
    def max_length(self) -> int:
        """Longest prompt+response: the tiny model's positions, or the run's own length settings."""
        spec = self.spec
        if spec.policy.model is None:
            return spec.policy.sft.tiny.max_positions
        return spec.policy.max_prompt_tokens + max(
            spec.generation.max_new_tokens, spec.optimization.max_new_tokens, spec.evaluation.max_new_tokens)

    def rows_that_fit(self, model: torch.nn.Module, row_bytes: Callable[[DecoderShape, int], int], most: int) -> int:
        """How many rows of at most `max_length` tokens, each costing `row_bytes(shape, tokens)`, one chunk of
        `model`'s forward may hold within spec.batchMemory (rlp_core.memory), at most `most`."""
        budget = budget_bytes(self.spec.batch_memory, self.device)
        return rows_that_fit(budget, row_bytes(DecoderShape.of(model), self.max_length), most)

    def scoring_rows(self, model: torch.nn.Module, most: int = 128) -> int:
        """Preference pairs (two sequences each) the RM scores at once."""
        return self.rows_that_fit(model, lambda shape, tokens: 2 * shape.inference_row(tokens), most)

    def tokenizer(self, path: Path):
        """The tokenizer of a model directory, with the run's chat-template and system-prompt settings."""
        try:
            return load_tokenizer(path, self.spec.policy.chat_template, self.spec.policy.system_prompt)
        except (FileNotFoundError, OSError, ValueError) as err:
            raise PhaseError(f"spec.policy.model / spec.rewardModel.model: {err}") from None

    def check_fits(self, tokenizer, prompts: list[str], max_new_tokens: int, field: str, source: str) -> None:
        """PhaseError when a rendered prompt is longer than spec.policy.maxPromptTokens (pretrained policy) or,
        with `max_new_tokens`, than the tiny model's positions: such sequences are never cut silently."""
        if not prompts:
            return
        lengths = prompt_token_lengths(tokenizer, prompts)
        if self.spec.policy.model is not None:
            check_prompts_fit(lengths, self.spec.policy.max_prompt_tokens, source)
            return
        longest = max(lengths)
        if longest + max_new_tokens > self.max_length:
            raise PhaseError(f"the longest prompt has {longest} tokens and spec.{field} is {max_new_tokens}: more than "
                             f"spec.policy.sft.tiny.maxPositions ({self.max_length}); raise maxPositions to at least "
                             f"{longest + max_new_tokens} or lower {field}")

    def fetch(self, round: int, phase: str) -> Path:
        """Local copy of the complete output of (round, phase) for this spec, sha256-verified.

        The cache is keyed by the output's store URI and its manifest's digest, and checked against the
        manifest on every use, so another run's, another store's or a damaged copy is never used.
        """
        loc = self.provenance.locate(round, phase)
        if loc.manifest is None:
            problem = loc.problem or ("made under a different spec or from other inputs: " + loc.changes()
                                      if loc.conflict else "not there yet")
            raise PhaseError(f"input {output_key(round, phase)} of {output_key(self.round, self.phase)} is not "
                             f"usable ({problem}); run (or redo) phase {phase} of round {round} first")
        store_key = hashlib.sha256(loc.store.url().encode()).hexdigest()[:16]
        local = self.cache_dir / "outputs" / f"{store_key}-{loc.manifest.digest[:16]}"
        if local not in self._verified and not cached_copy_is_intact(local, loc.manifest):
            try:
                loc.store.download_dir("", local, loc.manifest.entries())
            except IntegrityError as err:
                raise PhaseError(f"{err} Find every damaged output with `rlp verify`; redo this one with "
                                 f"`rlp run SPEC --redo {output_key(round, phase)}`") from None
        self._verified.add(local)
        return local

    def fetch_uri(self, uri: str, field: str = "spec.policy.model") -> Path:
        """A user-given model directory, checked to load: a local path as is, a store URI downloaded into the
        cache, hf:// through huggingface_hub (its commit recorded in `model_revisions`), packaged:// converted
        once from the package's weights.

        A store URI's cache key is the URI and its file listing, so a model uploaded (or replaced) there
        later is fetched again; an empty prefix is an error, never an empty cached model.
        """
        try:
            if "://" not in uri or uri.startswith("file://"):
                local = Path(uri.removeprefix("file://")).expanduser()
            elif uri.startswith(HF_SCHEME):
                local, self.model_revisions[uri] = fetch_hf(uri, field, self.cache_dir / "huggingface",
                                                            self.spec.hub.endpoint)
            elif uri.startswith(PACKAGED_SCHEME):
                local = fetch_model(uri.removeprefix(PACKAGED_SCHEME))
            else:
                store = self.spec.storage.open(uri)
                files = store.list()
                if not any(f.path == "config.json" for f in files):
                    found = f"{len(files)} files, none named config.json" if files else "nothing there"
                    raise PhaseError(f"{field}: {uri}: not a model directory ({found}); upload a save_pretrained "
                                     "directory (config.json, model.safetensors, tokenizer files) to that prefix")
                listing = json.dumps([(f.path, f.size) for f in files])
                local = self.cache_dir / "models" / hashlib.sha256(f"{uri}\n{listing}".encode()).hexdigest()[:24]
                if not local.is_dir():
                    store.download_dir("", local, files)  # lands complete or not at all
            return check_model_dir(local, field, uri)
        except (ModelSourceError, ModelSetupError) as err:
            raise PhaseError(str(err)) from None

    def records(self, uri: str, record: type[Record]) -> list:
        try:
            return load_records(uri, record, lambda u: read_uri(self.spec.storage, u))
        except DataError as err:
            raise PhaseError(str(err)) from None

    # --- which model a phase starts from ----------------------------------------------------------
    def _latest(self, producers: tuple[str, ...]) -> tuple[int, str] | None:
        return latest_producer(self.spec, self.round, self.phase, producers)

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
            return self.fetch_uri(self.spec.reward_model.model, "spec.rewardModel.model")
        return self.fetch(*latest) / RM_DIR

    def samples(self) -> list[Sample]:
        return load_records(str(self.fetch(self.round, "generate") / SAMPLES_FILE), Sample)

    def human_pairs(self) -> tuple[list[PreferencePair], list[PreferencePair]]:
        """(train, held-out) human preference pairs; the split is fixed by the spec's seed."""
        pairs = self.records(self.spec.reward_model.human_preferences, PreferencePair)
        return split_held_out(pairs, self.spec.reward_model.held_out_fraction, self.spec.seed)

    def gold(self) -> Callable[[str, str], float] | None:
        spec = self.spec
        if spec.evaluation.judge.startswith(gym_tasks.SCHEME):  # its judge reads the entries the data sources make
            for uri in (spec.prompts, spec.evaluation.prompts, spec.reward_model.human_preferences):
                if uri.startswith(gym_tasks.SCHEME):
                    gym_tasks.records(uri)
        return programmatic_judge(spec.evaluation.judge)


def load_trainable_reward_model(ctx: PhaseContext, init_dir: Path) -> Any:
    """The RM at `init_dir` on the phase's device, ready to train: with LoRA adapters (and a trainable score
    head) when spec.rewardModel.lora is set, so every phase that trains the RM honours that setting alike."""
    model = load_reward_model(init_dir)
    if ctx.spec.reward_model.lora is not None:
        model = with_lora(model, ctx.spec.reward_model.lora, "SEQ_CLS")
    return model.to(ctx.device)


def train_reward_model(
    ctx: PhaseContext, init_dir: Path, pairs: list[PreferencePair], training, description: str,
) -> tuple[Any, Any, dict[str, float]]:
    """Continue training the RM at `init_dir` on `pairs`; report held-out human accuracy before/after."""
    tokenizer, model = ctx.tokenizer(init_dir), load_trainable_reward_model(ctx, init_dir)
    _, held_out = ctx.human_pairs()
    before = preference_accuracy(model, tokenizer, held_out, ctx.max_length, ctx.scoring_rows(model))
    batches = minibatches(pairs, training.batch_size, training.epochs, ctx.spec.seed + ctx.round)
    trainable = [p for p in model.parameters() if p.requires_grad]
    micro = ctx.rows_that_fit(model, lambda shape, tokens: 2 * shape.training_row(tokens), training.batch_size)
    history = fit(trainable, batches, reward_loss(model, tokenizer, ctx.max_length), training, ctx.telemetry, description,
                  weighted_pairs(micro))
    after = preference_accuracy(model, tokenizer, held_out, ctx.max_length, ctx.scoring_rows(model))
    ctx.telemetry.set_accuracy("held_out", after)
    return model, tokenizer, {"pairs": len(pairs), "steps": len(history), "micro_batch_pairs": micro,
                              "final_reward_loss": history[-1]["reward_loss"],
                              "rm_accuracy_held_out_before": before, "rm_accuracy_held_out": after}


