"""The phases of an RLPRun and the one-process runner behind `rlp run`.

A phase is a function `(PhaseContext) -> metrics` that reads its inputs through the context (earlier
phases' outputs, fetched and sha256-verified from the store) and writes its outputs into
`ctx.out_dir`. `execute_phase` uploads them and writes the manifest last; a phase whose manifest
already verifies is not run again. `rlp run` (all phases here, in order) and `rlp phase` (one phase in
a job pod) both go through `execute_phase`, so they behave the same.

Which model a phase starts from is read off the plan: the policy of round K is the output of the latest
enabled `optimize` before it (else `sft`, else `spec.policy.model`); the reward model likewise from
`synthesize`, `refine`, `reward` or `spec.rewardModel.model`. The reference policy for the KL penalty
and the evaluation baseline is always the starting (SFT) policy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlp_core import ser, spg, uml
from rlp_core.apa import APATrainer
from rlp_core.checkpoint import CHECKPOINT_DIR, StoreCheckpointer
from rlp_core.context import (
    HISTORY_FILE, POLICY_DIR, RM_DIR, SAMPLES_FILE, PhaseContext, PhaseError, StepCallback, read_uri,
    train_reward_model,
)
from rlp_core.data import (
    DataError, Demonstration, Prompt, Sample, load_records, spec_sources, write_records,
)
from rlp_core.evaluate import paired_change, win_rate
from rlp_core.grpo import GRPOTrainer
from rlp_core.manifest import MANIFEST_NAME, Manifest, code_version, publish_phase_output, utc_now
from rlp_core.memory import DecoderShape, chunks
from rlp_core.models import (
    SharedBackboneCritic, build_tiny_policy, enable_gradient_checkpointing, encode_pairs, freeze_backbone, frozen_dtype,
    load_policy, load_reward_model, load_value_model, reward_scores, save_model, train_tokenizer, with_lora,
)
from rlp_core.ppo import PPOTrainer
from rlp_core.provenance import Provenance, output_key, upstream
from rlp_core.reward_functions import user_reward
from rlp_core.rloo import RLOOTrainer
from rlp_core.sampling import decode_responses, sample_responses
from rlp_core.spec import RLPRun
from rlp_core.store import Store
from rlp_core.supervised import fit, minibatches, sft_loss
from rlp_core.judges import is_programmatic, programmatic_judge
from rlp_core.telemetry import PhaseTelemetry, peak_memory_mb, reset_peak_memory

__all__ = ["HISTORY_FILE", "POLICY_DIR", "RM_DIR", "SAMPLES_FILE", "PhaseContext", "PhaseError", "execute_phase"]


# --- phases --------------------------------------------------------------------------------------------
def run_sft(ctx: PhaseContext) -> dict[str, Any]:
    cfg = ctx.spec.policy.sft
    demos = ctx.records(cfg.demonstrations, Demonstration)
    texts = [d.prompt for d in demos] + [d.response for d in demos]
    tokenizer = train_tokenizer(texts, cfg.tiny.vocab_size)
    model = build_tiny_policy(tokenizer, cfg.tiny, ctx.spec.seed).to(ctx.device)
    batches = minibatches(demos, cfg.training.batch_size, cfg.training.epochs, ctx.spec.seed)
    history = fit(list(model.parameters()), batches, sft_loss(model, tokenizer, ctx.max_length), cfg.training,
                  ctx.telemetry, "sft")
    save_model(model, tokenizer, ctx.out_dir / POLICY_DIR)
    return {"demonstrations": len(demos), "steps": len(history), "final_sft_loss": history[-1]["sft_loss"],
            "vocab_size": len(tokenizer)}


def run_reward(ctx: PhaseContext) -> dict[str, Any]:
    train, held_out = ctx.human_pairs()
    model, tokenizer, metrics = train_reward_model(ctx, ctx.start_policy_dir(), train, ctx.spec.reward_model.training, "reward")
    save_model(model, tokenizer, ctx.out_dir / RM_DIR)
    return {**metrics, "held_out_pairs": len(held_out)}


def run_generate(ctx: PhaseContext) -> dict[str, Any]:
    gen = ctx.spec.generation
    prompts = ctx.records(ctx.spec.prompts, Prompt)[: gen.max_prompts]
    policy_dir = ctx.policy_dir()
    tokenizer = ctx.tokenizer(policy_dir)
    ctx.check_fits(tokenizer, [p.prompt for p in prompts], gen.max_new_tokens, "generation.maxNewTokens",
                   "spec.prompts")
    model = load_policy(policy_dir).to(ctx.device)
    torch.manual_seed(ctx.spec.seed * 1000 + ctx.round)
    jobs = [(i, p, k) for i, p in enumerate(prompts) for k in range(gen.samples_per_prompt)]
    batches = chunks(jobs, ctx.rows_that_fit(model, DecoderShape.generation_row, gen.batch_size))
    ctx.telemetry.total_steps = len(batches)
    samples: list[Sample] = []
    gold = ctx.gold()
    tokens = 0
    for chunk in batches:
        rollout = sample_responses(model, tokenizer, [p.prompt for _, p, _ in chunk], max_new_tokens=gen.max_new_tokens,
                                   temperature=gen.temperature, top_p=gen.top_p)
        texts = decode_responses(tokenizer, rollout)
        lengths = rollout.response_mask.sum(1).tolist()
        for (i, p, k), text, lp, n, fin in zip(chunk, texts, rollout.logprobs.sum(1).tolist(), lengths, rollout.finished.tolist()):
            samples.append(Sample(prompt_id=p.id or str(i), prompt=p.prompt, response=text, sample_index=k,
                                  logprob=lp, num_tokens=int(n), finished=bool(fin)))
        tokens += int(sum(lengths))
        ctx.telemetry.step(tokens=int(sum(lengths)))
    write_records(ctx.out_dir / SAMPLES_FILE, samples)
    metrics = {"prompts": len(prompts), "samples": len(samples), "samples_per_prompt": gen.samples_per_prompt,
               "chunk_rows": len(batches[0]),
               "eos_fraction": sum(s.finished for s in samples) / len(samples),
               "mean_response_tokens": tokens / len(samples)}
    if gold is not None:
        metrics["gold_score_mean"] = sum(gold(s.prompt, s.response) for s in samples) / len(samples)
    return metrics


def run_synthesize(ctx: PhaseContext) -> dict[str, Any]:
    if ctx.spec.reward_learning.strategy == "ser":
        return ser.run_ser(ctx)
    return spg.run_synthesize(ctx)


def rm_score_fn(model, device: torch.device, rows: int):
    """Reward-model scores of a rollout's sequences, `rows` of them per forward."""

    @torch.no_grad()
    def score(prompts, responses, rollout) -> torch.Tensor:
        model.eval()
        return torch.cat([reward_scores(model, ids.to(device), mask.to(device))
                          for ids, mask in zip(rollout.sequences.split(rows), rollout.attention_mask.split(rows))])

    return score


def batch_judge(gold: Callable[[str, str], float]) -> Callable[[list[str], list[str]], list[float]]:
    """A per-response gold judge applied to a batch of (prompt, response) pairs."""
    return lambda prompts, responses: [gold(p, r) for p, r in zip(prompts, responses)]


TRAINERS: dict[str, type[PPOTrainer]] = {"ppo": PPOTrainer, "apa": APATrainer, "grpo": GRPOTrainer,
                                         "rloo": RLOOTrainer}


def trainable_models(ctx: PhaseContext, policy_dir: Path, start_dir: Path, value_dir: Path | None):
    """(policy, reference or None, critic or None) of the optimize phase. With `optimization.lora` the policy
    is a peft model and, while it starts from the reference's weights, the reference is the policy with its
    adapters disabled (None): one copy of the backbone instead of two; likewise a head-only critic started from
    the policy is a head on that backbone (`SharedBackboneCritic`). No `value_dir`: no critic (grpo, rloo)."""
    opt = ctx.spec.optimization
    policy = load_policy(policy_dir)
    shared_critic = value_dir == policy_dir and opt.critic_training == "head" and opt.lora is not None
    if shared_critic:  # the head on the LoRA policy's adapters-disabled backbone: one copy of it, not two
        value_model = SharedBackboneCritic(policy.config.hidden_size, policy.config.initializer_range)
    else:
        value_model = None if value_dir is None else load_value_model(value_dir)
    if opt.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
        if value_model is not None and not shared_critic:
            enable_gradient_checkpointing(value_model)
    reference = None
    if opt.lora is None or policy_dir != start_dir:
        reference = load_policy(start_dir, frozen_dtype()).to(ctx.device)
    if opt.lora is not None:
        policy = with_lora(policy, opt.lora, "CAUSAL_LM")
    if value_model is None:
        return policy.to(ctx.device), reference, None
    if shared_critic:
        return policy.to(ctx.device), reference, value_model.attach(policy).to(ctx.device)
    if opt.critic_training == "lora":
        value_model = with_lora(value_model, opt.lora, "TOKEN_CLS")
    elif opt.critic_training == "head":
        freeze_backbone(value_model)
    return policy.to(ctx.device), reference, value_model.to(ctx.device)


def run_optimize(ctx: PhaseContext) -> dict[str, Any]:
    opt = ctx.spec.optimization
    policy_dir, start_dir = ctx.policy_dir(), ctx.start_policy_dir()
    tokenizer = ctx.tokenizer(policy_dir)
    gold = ctx.gold()
    judge = None if gold is None else batch_judge(gold)
    if opt.reward == "judge":
        if gold is None:
            raise PhaseError("spec.optimization.reward: judge needs a programmatic spec.evaluation.judge "
                             "(builtin://<task> or reasoning-gym://<task>); use reward-model otherwise")
        rm_dir = None
        score_fn = lambda prompts, responses, rollout: torch.tensor(judge(prompts, responses))  # noqa: E731
    elif opt.reward == "function":
        rm_dir, reward = None, user_reward(opt.reward_function)
        score_fn = lambda prompts, responses, rollout: torch.tensor(reward(prompts, responses))  # noqa: E731
    else:
        rm_dir = ctx.reward_model_dir()
        reward_model = load_reward_model(rm_dir, frozen_dtype()).to(ctx.device).eval().requires_grad_(False)
        score_fn = rm_score_fn(reward_model, ctx.device,
                               ctx.rows_that_fit(reward_model, DecoderShape.inference_row, opt.rollout_batch_size))
    value_dir = policy_dir if opt.value_init == "policy" or rm_dir is None else rm_dir
    if opt.group_size is not None:  # critic-free
        value_dir = None
    prompts = [p.prompt for p in ctx.records(ctx.spec.prompts, Prompt)]
    ctx.check_fits(tokenizer, prompts, opt.max_new_tokens, "optimization.maxNewTokens", "spec.prompts")
    torch.manual_seed(ctx.spec.seed * 1000 + ctx.round)
    policy, reference, value_model = trainable_models(ctx, policy_dir, start_dir, value_dir)
    checkpointer = StoreCheckpointer(ctx.out_store)
    trainer = TRAINERS[opt.algorithm](
        config=opt, policy=policy, reference=reference, value_model=value_model, tokenizer=tokenizer,
        score_fn=score_fn, prompts=prompts, seed=ctx.spec.seed + ctx.round,
        telemetry=ctx.telemetry, checkpointer=checkpointer,
        gold_fn=judge,
        step_callback=ctx.step_callback,
    )
    resumed_from = trainer.start_step
    history = trainer.train()
    checkpointer.wait()
    save_model(trainer.policy, tokenizer, ctx.out_dir / POLICY_DIR)
    with (ctx.out_dir / HISTORY_FILE).open("w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)
    last = history[-min(5, len(history)):]
    metrics = {"algorithm": opt.algorithm, "reward": opt.reward,
               "value_init": opt.value_init if value_dir is not None else None, "steps": len(history),
               "resumed_from_step": resumed_from, "reward_mean_first": history[0]["reward_mean"],
               "kl_first": history[0]["kl"], "reward_mean_last": sum(h["reward_mean"] for h in last) / len(last),
               "kl_last": sum(h["kl"] for h in last) / len(last)}
    if "zero_signal_groups" in history[0]:
        metrics["zero_signal_groups_mean"] = sum(h["zero_signal_groups"] for h in history) / len(history)
    if gold is not None:
        metrics |= {"gold_mean_first": history[0]["gold_mean"],
                    "gold_mean_last": sum(h["gold_mean"] for h in last) / len(last)}
    return metrics


# The most rows one evaluation chunk holds when spec.batchMemory allows more: the size the quickstart's
# evaluation has always used, so its random stream (and win-rate) stays what its tests measured.
EVAL_CHUNK_ROWS = 256


def run_evaluate(ctx: PhaseContext) -> dict[str, Any]:
    ev = ctx.spec.evaluation
    prompts = [p.prompt for p in ctx.records(ev.prompts, Prompt)][: ev.max_prompts]
    gold = ctx.gold()
    if gold is not None:
        judge = batch_judge(gold)
    elif ev.judge == "reward-model":
        rm_dir = ctx.reward_model_dir()
        rm_tok, rm = ctx.tokenizer(rm_dir), load_reward_model(rm_dir).to(ctx.device).eval()
        rows = ctx.rows_that_fit(rm, DecoderShape.inference_row, EVAL_CHUNK_ROWS)

        @torch.no_grad()
        def judge(ps, rs):
            out = []
            for i in range(0, len(ps), rows):
                enc = encode_pairs(rm_tok, ps[i : i + rows], rs[i : i + rows], ctx.max_length)
                out += reward_scores(rm, enc["input_ids"].to(ctx.device), enc["attention_mask"].to(ctx.device)).tolist()
            return out
    else:
        raise PhaseError(f"spec.evaluation.judge: unknown judge {ev.judge!r}; use reward-model, builtin://<task> "
                         "or reasoning-gym://<task>")

    k = ev.samples_per_prompt
    asked = [p for p in prompts for _ in range(k)]  # each prompt k times in a row

    chunk_rows: list[int] = []

    def answers(policy_dir: Path) -> list[str]:
        tok = ctx.tokenizer(policy_dir)
        ctx.check_fits(tok, prompts, ev.max_new_tokens, "evaluation.maxNewTokens", "spec.evaluation.prompts")
        model = load_policy(policy_dir).to(ctx.device)
        torch.manual_seed(ctx.spec.seed)
        out = []
        chunk_rows.append(min(len(asked), ctx.rows_that_fit(model, DecoderShape.generation_row, EVAL_CHUNK_ROWS)))
        for chunk in chunks(asked, chunk_rows[-1]):
            roll = sample_responses(model, tok, chunk, max_new_tokens=ev.max_new_tokens,
                                    temperature=ev.temperature, do_sample=not ev.greedy, logprobs=False)
            out += decode_responses(tok, roll)
        return out

    def per_prompt(values: list[float]) -> list[float]:  # the unit of the intervals is the prompt, not the sample
        return [sum(values[i : i + k]) / k for i in range(0, len(values), k)]

    ctx.telemetry.total_steps = 2
    new, base = answers(ctx.policy_dir()), answers(ctx.start_policy_dir())
    ctx.telemetry.step()
    new_sample_scores, base_sample_scores = judge(asked, new), judge(asked, base)
    ctx.telemetry.step()
    with (ctx.out_dir / "answers.jsonl").open("w") as f:
        for row in zip(asked, new, base, new_sample_scores, base_sample_scores):
            f.write(json.dumps(dict(zip(("prompt", "policy", "baseline", "policy_score", "baseline_score"), row))) + "\n")
    new_scores, base_scores = per_prompt(new_sample_scores), per_prompt(base_sample_scores)
    result = win_rate(new_scores, base_scores, ev.confidence)
    change = paired_change(new_scores, base_scores, ev.confidence)
    metrics = {**result.as_dict(), **change.as_dict("score_"), "judge": ev.judge, "greedy": ev.greedy,
               "samples_per_prompt": k, "chunk_rows": min(chunk_rows),
               "policy_score_mean": sum(new_scores) / len(prompts), "baseline_score_mean": sum(base_scores) / len(prompts)}
    if gold is not None:  # a programmatic judge's full score is a correct answer
        new_exact = per_prompt([float(s == 1.0) for s in new_sample_scores])
        base_exact = per_prompt([float(s == 1.0) for s in base_sample_scores])
        metrics |= {"policy_accuracy": sum(new_exact) / len(prompts), "baseline_accuracy": sum(base_exact) / len(prompts),
                    **paired_change(new_exact, base_exact, ev.confidence).as_dict("accuracy_")}
    return metrics


def validate_inputs(run: RLPRun) -> None:
    """Load every data file the plan reads, so a bad line fails before any training (DataError)."""
    spec = run.spec
    for _, uri, record in spec_sources(spec):
        load_records(uri, record, lambda u: read_uri(spec.storage, u))
    if is_programmatic(spec.evaluation.judge):
        try:
            programmatic_judge(spec.evaluation.judge)
        except ValueError as err:
            raise DataError(f"spec.evaluation.judge: {err}") from None


PHASES: dict[str, Callable[[PhaseContext], dict[str, Any]]] = {
    "sft": run_sft, "reward": run_reward, "generate": run_generate, "refine": uml.run_refine,
    "synthesize": run_synthesize, "optimize": run_optimize, "evaluate": run_evaluate,
}


def remove_orphaned_work_dirs(work: Path) -> None:
    """Delete the output directories of phases whose process is gone (killed before its clean-up)."""
    for path in work.glob("rlp-*-*-*"):
        pid = path.name.split("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def phase_seed(seed: int, round: int, phase: str) -> int:
    """torch's seed at the start of a phase. torch seeds itself at random in every process, so without it a
    phase that draws before seeding its own stream (the reward model's new head) differs from run to run and
    between `rlp run` (one process) and job pods (one each)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{round}/{phase}".encode()).digest()[:8], "little")


class SpecChanged(PhaseError):
    """A phase's output in the store was made under other spec fields or from other inputs."""


@dataclass
class PhaseResult:
    round: int
    phase: str
    state: str  # Succeeded | Skipped | Cached
    manifest: Manifest | None
    seconds: float = 0.0
    output: str = ""  # URI of the output used or written


def execute_phase(run: RLPRun, root: Store, round: int, phase: str, *, cache_dir: Path,
                  telemetry: PhaseTelemetry | None = None, step_callback: StepCallback | None = None,
                  provenance: Provenance | None = None, rerun_changed: bool = False, redo: bool = False) -> PhaseResult:
    """Run one phase unless an output made for this spec and these inputs verifies; publish outputs,
    manifest last.

    An output at the phase's path made under other spec fields or inputs stops the phase (SpecChanged,
    naming the changes) unless `rerun_changed` (run again under a new output path beside it) or `redo`
    (delete it and run again in place). A damaged output (manifest there, files not matching) stops it
    too, unless `redo`.
    """
    if (round, phase) not in run.spec.phase_plan():
        raise PhaseError(f"phase {phase!r} is not in round {round} of this run's plan {run.spec.phase_plan()}")
    provenance = provenance or Provenance(run, root)
    loc = provenance.locate(round, phase)
    where = output_key(round, phase)
    if loc.fingerprint is None:
        missing = [output_key(*e) for e in upstream(run.spec, round, phase)[0]]
        raise PhaseError(f"{where} cannot run yet: its inputs {missing} are not all complete; run them first")
    if redo:
        # in place, unless the path holds the output of other spec fields (kept, as --rerun-changed would)
        kept = loc.manifest is None and loc.conflict is not None and loc.conflict.spec_fields != loc.fields
        target = loc.variant if kept else loc.store
        target.delete(MANIFEST_NAME)  # first: an interrupted redo leaves no manifest, so it reruns
        target.delete_prefix("")
    elif loc.manifest is not None:
        return PhaseResult(round, phase, "Cached", loc.manifest, 0.0, loc.store.url())
    elif loc.problem is not None:
        raise PhaseError(f"{where} is damaged: {loc.problem}. Redo it and what depends on it: "
                         f"`rlp run SPEC --redo {where}`")
    elif loc.conflict is not None:
        if not rerun_changed:
            raise SpecChanged(f"{where} in {loc.store.url()} was made under another spec: {loc.changes()}. "
                              f"Keep it and run the changed phases under new output paths with `rlp run SPEC "
                              f"--rerun-changed`, replace it with `--redo {where}`, or use a new run name")
        target = loc.variant
    else:
        target = loc.store
    started, t0 = utc_now(), time.perf_counter()
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 publishes
    telemetry = telemetry or PhaseTelemetry(run.metadata.name, round, phase)
    work = cache_dir / "work"
    remove_orphaned_work_dirs(work)
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"rlp-{phase}-{os.getpid()}-", dir=work) as tmp:
        out_dir = Path(tmp)
        if run.spec.phase_enabled(phase):
            ctx = PhaseContext(run, round, phase, root, cache_dir, out_dir, telemetry, step_callback=step_callback,
                               provenance=provenance, out_store=target)
            reset_peak_memory()
            torch.manual_seed(phase_seed(run.spec.seed, round, phase))
            metrics, state = PHASES[phase](ctx), "Succeeded"
            metrics |= {f"peak_{memory}_mb": mb for memory, mb in peak_memory_mb().items()}
            if ctx.model_revisions:  # hf:// models: the exact commits this phase used
                metrics["model_revisions"] = ctx.model_revisions
        else:
            metrics, state = {"skipped": True, "reason": f"strategy {run.spec.reward_learning.strategy}"}, "Skipped"
        telemetry.finish()
        if not is_main:
            return PhaseResult(round, phase, state, None, time.perf_counter() - t0, target.url())
        manifest = publish_phase_output(
            target, out_dir, phase=phase, round=round, metrics=metrics, spec_hash=provenance.save_spec(),
            code_version=code_version(), started_at=started,
            provenance={"fingerprint": loc.fingerprint, "spec_fields": loc.fields, "inputs": loc.inputs},
        )
    if not run.spec.storage.keep_checkpoints:
        target.delete_prefix(CHECKPOINT_DIR)
    provenance.forget(round, phase)
    return PhaseResult(round, phase, state, manifest, time.perf_counter() - t0, target.url())
