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

import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlp_core import ser, spg, uml
from rlp_core.apa import APATrainer
from rlp_core.context import (
    HISTORY_FILE, POLICY_DIR, RM_DIR, SAMPLES_FILE, PhaseContext, PhaseError, StepCallback, read_uri,
    train_reward_model,
)
from rlp_core.data import (
    DataError, Demonstration, Prompt, Sample, load_records, spec_sources, write_records,
)
from rlp_core.evaluate import win_rate
from rlp_core.manifest import Manifest, code_version, phase_prefix, publish_phase_output, utc_now, verify_manifest
from rlp_core.models import (
    build_tiny_policy, load_policy, load_reward_model, load_tokenizer, load_value_model, reward_scores, save_model,
    train_tokenizer,
)
from rlp_core.ppo import PPOTrainer
from rlp_core.sampling import decode_responses, sample_responses
from rlp_core.spec import RLPRun
from rlp_core.store import Store
from rlp_core.supervised import fit, minibatches, sft_loss
from rlp_core.tasks import gold_judge
from rlp_core.telemetry import PhaseTelemetry

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
    tokenizer, model = load_tokenizer(policy_dir), load_policy(policy_dir).to(ctx.device)
    torch.manual_seed(ctx.spec.seed * 1000 + ctx.round)
    jobs = [(i, p, k) for i, p in enumerate(prompts) for k in range(gen.samples_per_prompt)]
    ctx.telemetry.total_steps = -(-len(jobs) // gen.batch_size)
    samples: list[Sample] = []
    gold = ctx.gold()
    tokens = 0
    for start in range(0, len(jobs), gen.batch_size):
        chunk = jobs[start : start + gen.batch_size]
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
               "eos_fraction": sum(s.finished for s in samples) / len(samples),
               "mean_response_tokens": tokens / len(samples)}
    if gold is not None:
        metrics["gold_score_mean"] = sum(gold(s.prompt, s.response) for s in samples) / len(samples)
    return metrics


def run_synthesize(ctx: PhaseContext) -> dict[str, Any]:
    if ctx.spec.reward_learning.strategy == "ser":
        return ser.run_ser(ctx)
    return spg.run_synthesize(ctx)


class StoreCheckpointer:
    """Resumable training state as one torch file in the phase's own prefix (outside its manifest)."""

    KEY = "_checkpoints/state.pt"

    def __init__(self, store: Store):
        self.store = store

    def save(self, step: int, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        self.store.put_bytes(self.KEY, buf.getvalue())

    def load(self) -> dict[str, Any] | None:
        if not self.store.exists(self.KEY):
            return None
        return torch.load(io.BytesIO(self.store.get_bytes(self.KEY)), weights_only=False)


def rm_score_fn(model, device: torch.device):
    @torch.no_grad()
    def score(prompts, responses, rollout) -> torch.Tensor:
        model.eval()
        return reward_scores(model, rollout.sequences.to(device), rollout.attention_mask.to(device))

    return score


def judge_score_fn(gold: Callable[[str, str], float]):
    def score(prompts, responses, rollout) -> torch.Tensor:
        return torch.tensor([gold(p, r) for p, r in zip(prompts, responses)])

    return score


TRAINERS: dict[str, type[PPOTrainer]] = {"ppo": PPOTrainer, "apa": APATrainer}


def run_optimize(ctx: PhaseContext) -> dict[str, Any]:
    opt = ctx.spec.optimization
    policy_dir, start_dir = ctx.policy_dir(), ctx.start_policy_dir()
    tokenizer = load_tokenizer(policy_dir)
    gold = ctx.gold()
    if opt.reward == "judge":
        if gold is None:
            raise PhaseError("spec.optimization.reward: judge needs a programmatic spec.evaluation.judge "
                             "(builtin://<task>); use reward-model otherwise")
        rm_dir = None
        score_fn = judge_score_fn(gold)
    else:
        rm_dir = ctx.reward_model_dir()
        reward_model = load_reward_model(rm_dir).to(ctx.device).eval().requires_grad_(False)
        score_fn = rm_score_fn(reward_model, ctx.device)
    value_dir = policy_dir if opt.value_init == "policy" or rm_dir is None else rm_dir
    prompts = [p.prompt for p in ctx.records(ctx.spec.prompts, Prompt)]
    torch.manual_seed(ctx.spec.seed * 1000 + ctx.round)
    checkpointer = StoreCheckpointer(ctx.store_of(ctx.round, ctx.phase))
    trainer = TRAINERS[opt.algorithm](
        config=opt, policy=load_policy(policy_dir).to(ctx.device), reference=load_policy(start_dir).to(ctx.device),
        value_model=load_value_model(value_dir).to(ctx.device), tokenizer=tokenizer,
        score_fn=score_fn, prompts=prompts, seed=ctx.spec.seed + ctx.round,
        telemetry=ctx.telemetry, checkpointer=checkpointer,
        gold_fn=None if gold is None else (lambda ps, rs: [gold(p, r) for p, r in zip(ps, rs)]),
        step_callback=ctx.step_callback,
    )
    resumed_from = trainer.start_step
    history = trainer.train()
    save_model(trainer.policy, tokenizer, ctx.out_dir / POLICY_DIR)
    with (ctx.out_dir / HISTORY_FILE).open("w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)
    last = history[-min(5, len(history)):]
    metrics = {"algorithm": opt.algorithm, "reward": opt.reward, "value_init": opt.value_init, "steps": len(history),
               "resumed_from_step": resumed_from, "reward_mean_first": history[0]["reward_mean"],
               "kl_first": history[0]["kl"], "reward_mean_last": sum(h["reward_mean"] for h in last) / len(last),
               "kl_last": sum(h["kl"] for h in last) / len(last)}
    if gold is not None:
        metrics |= {"gold_mean_first": history[0]["gold_mean"],
                    "gold_mean_last": sum(h["gold_mean"] for h in last) / len(last)}
    return metrics


def run_evaluate(ctx: PhaseContext) -> dict[str, Any]:
    ev = ctx.spec.evaluation
    prompts = [p.prompt for p in ctx.records(ev.prompts, Prompt)][: ev.max_prompts]
    gold = ctx.gold()
    if gold is not None:
        def judge(ps, rs):
            return [gold(p, r) for p, r in zip(ps, rs)]
    elif ev.judge == "reward-model":
        rm_dir = ctx.reward_model_dir()
        rm_tok, rm = load_tokenizer(rm_dir), load_reward_model(rm_dir).to(ctx.device).eval()

        def judge(ps, rs):
            from rlp_core.models import encode_pairs

            enc = encode_pairs(rm_tok, ps, rs, ctx.max_length)
            with torch.no_grad():
                return reward_scores(rm, enc["input_ids"].to(ctx.device), enc["attention_mask"].to(ctx.device)).tolist()
    else:
        raise PhaseError(f"spec.evaluation.judge: unknown judge {ev.judge!r}; use reward-model or builtin://<task>")

    def answers(policy_dir: Path) -> list[str]:
        tok, model = load_tokenizer(policy_dir), load_policy(policy_dir).to(ctx.device)
        torch.manual_seed(ctx.spec.seed)
        out = []
        for i in range(0, len(prompts), 256):
            roll = sample_responses(model, tok, prompts[i : i + 256], max_new_tokens=ev.max_new_tokens, temperature=ev.temperature)
            out += decode_responses(tok, roll)
        return out

    ctx.telemetry.total_steps = 2
    new, base = answers(ctx.policy_dir()), answers(ctx.start_policy_dir())
    ctx.telemetry.step()
    new_scores, base_scores = judge(prompts, new), judge(prompts, base)
    ctx.telemetry.step()
    with (ctx.out_dir / "answers.jsonl").open("w") as f:
        for row in zip(prompts, new, base, new_scores, base_scores):
            f.write(json.dumps(dict(zip(("prompt", "policy", "baseline", "policy_score", "baseline_score"), row))) + "\n")
    result = win_rate(new_scores, base_scores, ev.confidence)
    return {**result.as_dict(), "judge": ev.judge, "policy_score_mean": sum(new_scores) / len(prompts),
            "baseline_score_mean": sum(base_scores) / len(prompts)}


def validate_inputs(run: RLPRun) -> None:
    """Load every data file the plan reads, so a bad line fails before any training (DataError)."""
    spec = run.spec
    for _, uri, record in spec_sources(spec):
        load_records(uri, record, lambda u: read_uri(spec.storage, u))
    if spec.evaluation.judge.startswith("builtin://"):
        try:
            gold_judge(spec.evaluation.judge)
        except ValueError as err:
            raise DataError(f"spec.evaluation.judge: {err}") from None


PHASES: dict[str, Callable[[PhaseContext], dict[str, Any]]] = {
    "sft": run_sft, "reward": run_reward, "generate": run_generate, "refine": uml.run_refine,
    "synthesize": run_synthesize, "optimize": run_optimize, "evaluate": run_evaluate,
}


@dataclass
class PhaseResult:
    round: int
    phase: str
    state: str  # Succeeded | Skipped | Cached
    manifest: Manifest | None
    seconds: float = 0.0


def execute_phase(run: RLPRun, root: Store, round: int, phase: str, *, cache_dir: Path,
                  telemetry: PhaseTelemetry | None = None, step_callback: StepCallback | None = None) -> PhaseResult:
    """Run one phase unless its manifest already verifies; publish outputs, manifest last."""
    if (round, phase) not in run.spec.phase_plan():
        raise PhaseError(f"phase {phase!r} is not in round {round} of this run's plan {run.spec.phase_plan()}")
    prefix = root.child(phase_prefix(run.metadata.namespace, run.metadata.name, round, phase))
    done = verify_manifest(prefix)
    if done is not None:
        return PhaseResult(round, phase, "Cached", done)
    started, t0 = utc_now(), time.perf_counter()
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 publishes
    telemetry = telemetry or PhaseTelemetry(run.metadata.name, round, phase)
    with tempfile.TemporaryDirectory(prefix=f"rlp-{phase}-") as tmp:
        out_dir = Path(tmp)
        if run.spec.phase_enabled(phase):
            ctx = PhaseContext(run, round, phase, root, cache_dir, out_dir, telemetry, step_callback=step_callback)
            metrics, state = PHASES[phase](ctx), "Succeeded"
        else:
            metrics, state = {"skipped": True, "reason": f"strategy {run.spec.reward_learning.strategy}"}, "Skipped"
        telemetry.finish()
        if not is_main:
            return PhaseResult(round, phase, state, None, time.perf_counter() - t0)
        manifest = publish_phase_output(prefix, out_dir, phase=phase, round=round, metrics=metrics,
                                        spec_hash=run.spec.hash(), code_version=code_version(), started_at=started)
    return PhaseResult(round, phase, state, manifest, time.perf_counter() - t0)
