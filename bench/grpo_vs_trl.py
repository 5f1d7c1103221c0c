"""GRPO step time and peak memory of rlp beside TRL's GRPOTrainer, same model, same batch, one process.

    uv run --group bench python bench/grpo_vs_trl.py          # writes docs/bench/grpo-vs-trl.md
    uv run --all-extras --group bench python bench/grpo_vs_trl.py --model smollm2   # docs/bench/grpo-vs-trl-smollm2.md

A benchmark, not a test: trl (1.12.0) is only in the `bench` dependency group. The comparison is built from
bench/ppo_vs_trl.py (its checkpoints, token suppression, interleaving callback, child processes for peak memory,
statistics and report pieces); read its docstring first. What is particular to GRPO:

1. Models. The same saved policy (the tiny Llama, or SmolLM2-135M-Instruct) and reward model (policy + one fresh
   scalar head) for both frameworks; no value model (GRPO is critic-free). Every special token, EOS included, is
   suppressed in sampling on both sides (rlp through its sampler's list, TRL through
   `GRPOConfig.generation_kwargs["suppress_tokens"]`), so every completion is exactly `--response-length` tokens
   and a step is the same work on both sides (checked: rlp's mean response length and TRL's logged min/max
   completion lengths). `--model smollm2`: the same LoRA (rank 8, α 16, dropout 0, all attention and MLP
   projections) on both sides, TRL through `peft_config`, rlp through `with_lora`; the reference is the policy with
   its adapters disabled on both. Tiny model: full fine-tuning, and a separate frozen reference copy on both sides
   (TRL loads its own from the policy's path).
2. One GRPO step = one rollout of `--prompts-per-step` P prompts × `--group-size` G completions, scored by the RM,
   group-normalised advantages, then `--epochs` E passes over `--num-mini-batches` S minibatches of P·G/S
   completions, one AdamW step each. In rlp that is one `GRPOTrainer.train()` with `steps=1`. In TRL's Trainer it
   is S·E optimizer steps (`per_device_train_batch_size` = P·G/S, `steps_per_generation` = S, `num_iterations` = E,
   `gradient_accumulation_steps` = 1): it generates once every S·E steps and reuses the buffered rollout. So the
   interleaving callback (`Interleave(every=S·E)`) takes a TRL sample over S·E consecutive `on_step_end` calls (one
   generation + S·E updates + TRL's per-rollout logging) and then runs one rlp step outside TRL's clock.
3. Peak memory: each framework alone in a child process (`--child rlp|trl`, as in ppo_vs_trl.py), peak RSS read
   as the child's own `VmHWM` (`getrusage().ru_maxrss`, which ppo_vs_trl.py reads, starts a child at its parent's
   peak RSS: Linux carries it across fork + exec).

What is matched, setting by setting (`rlp_optimization` and `trl_grpo_args` below; tests/test_bench_grpo_vs_trl.py
checks the pairs):
- group size: rlp `grpo.groupSize` = TRL `num_generations`; prompts per rollout and completions per rollout;
- advantages: (r − group mean) / (group std + 1e-4), unbiased std, on both (rlp `scaleRewards: true`; TRL
  `scale_rewards="group"`, `multi_objective_aggregation="sum_then_normalize"` with one reward function);
- loss: the clipped surrogate with ε = `clip_range` on both sides of the ratio (TRL `epsilon`, `epsilon_high`
  unset), plus β·k3 per token, k3 = exp(δ) − δ − 1 with δ = log π_ref − log π (rlp `klIn: loss`, TRL
  `beta`), each response's token mean, then the mean over the minibatch's responses: rlp's default
  `lengthNormalize: true`, TRL `loss_type="grpo"` (TRL's default is "dapo", a token mean over the whole batch, not
  rlp's loss). TRL's
  `use_bias_correction_kl` (default True: k3 multiplied by the importance ratio π/π_old) is set False, so its KL
  term is the same plain k3 as rlp's;
- update: E epochs (TRL `num_iterations`) × S minibatches, one AdamW step each (torch AdamW, lr constant without
  warm-up, eps 1e-5, weight decay 0.01, betas (0.9, 0.999); TRL `optim="adamw_torch"`), gradient norm clipped to
  1.0 on both; rlp's early stop on approximate KL (`maxApproxKl`) off, as TRL has none; rlp's `rewardClip` and
  `missingEosPenalty` off (no EOS is ever sampled); TRL's `mask_truncated_completions` off;
- sampling: temperature, top-p 1, no top-k, HF `generate` on CPU in fp32 on both (TRL `use_vllm=False`, no
  continuous batching); dropout off on both (TRL `disable_dropout=True`); no gradient checkpointing, no bf16 (TRL's
  defaults turned off, as rlp uses neither on CPU);
- reward: the same RM weights. TRL is given the RM model itself as its reward function (`reward_funcs=RM`, TRL's
  own code path for a sequence-classification RM); rlp scores with `rm_score_fn`;
- prompts: the same pool and the same token ids (TRL gets each prompt as the text rlp renders, with SmolLM2's chat
  template and system turn; checked to tokenise to rlp's ids).

What cannot match, as each framework ships (also in the report):
- RM input: rlp scores the sampled token ids as they are (the head read at the last real token); TRL decodes
  prompts and completions to text, re-tokenises prompt + completion (right padding) and pools at the last
  non-pad token. Same model and head; the ids differ wherever decode → encode is not the identity.
- Prompt draws: rlp draws each group's prompt with replacement from a seeded RNG; TRL's `RepeatSampler` walks a
  shuffled pass without replacement. Same pool, so prompt widths vary per step alike, not identically.
- Minibatch order: rlp reshuffles the rollout before every epoch; TRL shuffles it once and reuses the same S
  slices in each of its E iterations.
- Forward passes: rlp takes the rollout's log-probs in one extra no-grad forward over the whole rollout after
  `generate` and the reference's in one more; TRL computes the old log-probs (only when S·E > 1; else it uses the
  detached current ones) and the reference's in chunks of P·G/S rows. rlp passes position ids from the attention
  mask, TRL leaves them to the model (left-padded rows shifted; RoPE attention is unchanged by a shift).
- Suppressed tokens in log-probs: rlp renormalises over the unsuppressed vocabulary in every log-prob; TRL
  suppresses them in `generate` only and takes its log-probs over the full vocabulary.
- Weight decay: TRL's Trainer exempts biases and norm weights (matters for the tiny model's full fine-tuning;
  LoRA adapters have neither); rlp decays all trainable weights.
- Bookkeeping: TRL runs through accelerate and the Trainer loop (metrics gathered per micro-step, logged once per
  rollout here: `logging_steps` = S·E; its console callbacks removed); rlp keeps a history row.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

# The settings and their mapping onto both frameworks need no TRL (the unit test imports them without the bench
# group); everything that runs a framework needs it, and bench.ppo_vs_trl first sets the CPU-only, offline,
# quiet environment before torch is imported.
if __package__ in (None, ""):  # run as a script (python bench/grpo_vs_trl.py): the repository root for `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
HAVE_TRL = importlib.util.find_spec("trl") is not None
if HAVE_TRL:
    from bench.ppo_vs_trl import (  # noqa: E402
        Interleave, bench_prompts, build_checkpoints, child_main, cpu_name, fmt_med_iqr, fmt_rate, lora_config,
        memory_section, model_line, prompt_ids, rlp_step, rss_mib, run_children, suppressed_ids, trl_tokenizer,
        versions,
    )

from rlp_core.spec import LoRA, Optimization, TinyModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UV_RUN = {"tiny": "uv run --group bench", "smollm2": "uv run --all-extras --group bench"}
REPORTS = {"tiny": "grpo-vs-trl.md", "smollm2": "grpo-vs-trl-smollm2.md"}
SMOLLM2_LORA = LoRA(rank=8, alpha=16, dropout=0.0, target_modules=[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass(frozen=True)
class Settings:
    prompts_per_step: int = 8
    group_size: int = 4
    response_length: int = 16
    num_mini_batches: int = 2
    epochs: int = 2
    warmup_steps: int = 5
    timed_steps: int = 100
    learning_rate: float = 1e-5
    kl_coef: float = 0.04  # β of the k3 term (the GRPO paper's value)
    clip_range: float = 0.2
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    threads: int = 2  # the project's benchmark rule: both cores, 2 torch threads
    seed: int = 0
    prompts: int = 512  # size of the prompt pool
    model: str = "tiny"
    lora: LoRA | None = None
    memory_steps: int = 3  # > 0: also each framework alone in a child process, for its peak RSS
    tiny: TinyModel = field(default_factory=TinyModel)

    @property
    def batch(self) -> int:
        """Completions per rollout: prompts × group."""
        return self.prompts_per_step * self.group_size

    @property
    def mini_batch(self) -> int:
        return self.batch // self.num_mini_batches

    @property
    def updates_per_step(self) -> int:
        """AdamW steps per rollout: TRL's optimizer steps per GRPO step."""
        return self.num_mini_batches * self.epochs


# A step of SmolLM2-135M on CPU takes tens of seconds: 4 prompts × 4, few steps.
PRESETS: dict[str, dict] = {
    "tiny": {},
    "smollm2": dict(prompts_per_step=4, group_size=4, response_length=32, num_mini_batches=2, epochs=1,
                    warmup_steps=2, timed_steps=10, memory_steps=2, prompts=16, lora=SMOLLM2_LORA),
}


# --- the settings on both sides (pure; tested) -------------------------------------------------------------
def rlp_optimization(s: Settings) -> Optimization:
    """rlp's `optimization` for one GRPO step with these settings (rlp's default GRPO loss)."""
    return Optimization(
        algorithm="grpo", steps=1, rollout_batch_size=s.batch, mini_batch_size=s.mini_batch, ppo_epochs=s.epochs,
        learning_rate=s.learning_rate, warmup_steps=0, max_grad_norm=s.max_grad_norm, kl_coef=s.kl_coef,
        target_kl=None, max_approx_kl=None, reward_clip=None, missing_eos_penalty=None, temperature=s.temperature,
        max_new_tokens=s.response_length, deepspeed={"enabled": "false"}, lora=s.lora,
        grpo={"group_size": s.group_size, "clip_range": s.clip_range, "scale_rewards": True,
              "length_normalize": True, "kl_in": "loss"},
    )


def trl_grpo_args(s: Settings, output_dir: Path, steps: int, suppress: list[int]) -> dict:
    """`trl.GRPOConfig` keyword arguments for `steps` GRPO steps with these settings (each S·E optimizer steps),
    sampling with the `suppress` token ids suppressed."""
    return dict(
        output_dir=str(output_dir), report_to="none", save_strategy="no", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, seed=s.seed, disable_tqdm=True, dataloader_num_workers=0,
        logging_strategy="steps", logging_steps=s.updates_per_step, log_completions=False,
        # batch: P·G completions per generation, S minibatches of P·G/S, E passes
        num_generations=s.group_size, per_device_train_batch_size=s.mini_batch, gradient_accumulation_steps=1,
        steps_per_generation=s.num_mini_batches, num_iterations=s.epochs, max_steps=steps * s.updates_per_step,
        shuffle_dataset=True,
        # sampling
        max_completion_length=s.response_length, temperature=s.temperature, top_p=1.0, top_k=0,
        generation_kwargs={"suppress_tokens": sorted(suppress)}, use_vllm=False, disable_dropout=True,
        # loss: rlp's default GRPO loss
        loss_type="grpo", scale_rewards="group", beta=s.kl_coef, use_bias_correction_kl=False,
        epsilon=s.clip_range, mask_truncated_completions=False,
        # optimiser
        learning_rate=s.learning_rate, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_epsilon=1e-5, weight_decay=0.01, max_grad_norm=s.max_grad_norm,
    )


def child_flags(s: Settings) -> list[str]:
    """The settings a `--child` process needs beyond model, threads and memory steps."""
    return ["--prompts-per-step", str(s.prompts_per_step), "--group-size", str(s.group_size), "--response-length",
            str(s.response_length), "--epochs", str(s.epochs), "--num-mini-batches", str(s.num_mini_batches)]


# --- the two trainers --------------------------------------------------------------------------------------
def make_rlp(ck, tokenizer, prompts: list[str], s: Settings):
    """rlp's GRPOTrainer as rlp_core.pipeline builds it: with LoRA the adapters-disabled policy is the reference."""
    import torch

    from rlp_core.grpo import GRPOTrainer
    from rlp_core.models import load_policy, load_reward_model, with_lora
    from rlp_core.pipeline import rm_score_fn

    reward_model = load_reward_model(ck.reward).eval().requires_grad_(False)
    policy, reference = load_policy(ck.policy), None
    if s.lora is None:
        reference = load_policy(ck.policy)
    else:
        policy = with_lora(policy, s.lora, "CAUSAL_LM")
    return GRPOTrainer(config=rlp_optimization(s), policy=policy, reference=reference, value_model=None,
                       tokenizer=tokenizer, score_fn=rm_score_fn(reward_model, torch.device("cpu")), prompts=prompts,
                       seed=s.seed)


def make_trl(ck, tokenizer, prompts: list[str], s: Settings, out: Path, steps: int, callback):
    """TRL's GRPOTrainer for `steps` GRPO steps, the RM as its one reward function; prompts as the text rlp renders."""
    import copy

    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlp_core.models import load_policy, load_reward_model, render_prompt

    tok = copy.deepcopy(trl_tokenizer(tokenizer))  # TRL's own copy (it may set attributes on it)
    texts = [render_prompt(tokenizer, p) for p in prompts]
    if [tok(t)["input_ids"] for t in texts] != prompt_ids(tokenizer, prompts):
        raise RuntimeError("TRL would tokenise the prompts to other ids than rlp feeds its policy")
    args = GRPOConfig(**trl_grpo_args(s, out, steps, sorted(suppressed_ids(tokenizer))))
    trainer = GRPOTrainer(
        model=load_policy(ck.policy), reward_funcs=load_reward_model(ck.reward), args=args,
        train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tok, reward_processing_classes=tok,
        peft_config=lora_config(s.lora) if s.lora else None, callbacks=[callback],
    )
    for cb in (PrinterCallback, ProgressCallback):  # console output is not part of the loop being measured
        trainer.remove_callback(cb)
    return trainer


def round_trip_share(trainer, tokenizer, s: Settings, rollouts: int) -> tuple[int, int]:
    """(rows, of them) whose TRL RM input would be the sampled ids: `rollouts` rollouts of the rlp policy, each
    row's prompt text + decoded completion re-tokenised as TRL's reward path does it, against prompt + sampled ids."""
    from rlp_core.models import render_prompt
    from rlp_core.sampling import sample_responses

    tok = trl_tokenizer(tokenizer)
    same = total = 0
    for _ in range(rollouts):
        prompts = trainer.draw_prompts(s.batch)
        rollout = sample_responses(trainer.policy, tokenizer, prompts, max_new_tokens=s.response_length,
                                   temperature=s.temperature, logprobs=False)
        responses = rollout.sequences[:, rollout.prompt_len:].tolist()
        for prompt, ids, text in zip(prompts, responses, tok.batch_decode(responses, skip_special_tokens=True),
                                     strict=True):
            rendered = render_prompt(tokenizer, prompt)
            same += tok(rendered + text, add_special_tokens=False)["input_ids"] == tok(
                rendered, add_special_tokens=False)["input_ids"] + ids
            total += 1
    return same, total


# --- peak memory ------------------------------------------------------------------------------------------
def own_peak_mib() -> float:
    """This process's own peak RSS since it started (`VmHWM`), MiB. Not `getrusage().ru_maxrss`: Linux carries
    that across fork/vfork + exec, so a child process of the benchmark would start from its parent's peak (here the
    checkpoint building, ~2 GB with SmolLM2) and report that wherever its own peak is lower."""
    return rss_mib("VmHWM")


PEAK = ("`VmHWM` at the end, the process's own high-water mark; not `getrusage().ru_maxrss`, which Linux carries "
        "across fork + exec from the parent process's peak")


# --- report ------------------------------------------------------------------------------------------------
def write_report(path: Path, s: Settings, steps: dict, env: dict, n_params: dict[str, int], wall: float) -> str:
    import statistics

    rlp_t, trl_t = steps["rlp"], steps["trl"]
    paired = [a / b for a, b in zip(rlp_t, trl_t, strict=True)]
    rlp_med, trl_med = statistics.median(rlp_t), statistics.median(trl_t)
    tokens = s.batch * s.response_length
    v = env["versions"]
    loaded = env["load_max"] > s.threads + 0.5  # more than the benchmark's own threads
    tiny = s.model == "tiny"
    memory = env.get("memory")
    sanity = steps["sanity"]
    E = f"{s.epochs} epoch{'s' if s.epochs > 1 else ''}"
    lines = [
        "# GRPO step time and peak memory: rlp vs TRL" + ("" if tiny else ", SmolLM2-135M-Instruct with LoRA"),
        "",
        f"Generated by `{env['command']}` (`bench/grpo_vs_trl.py`); one process, both frameworks interleaved "
        "step by step" + ("." if memory is None else "; peak memory from each framework alone in a child process.")
        + f" Whole run {wall:.0f} s ({wall / 60:.1f} min).",
        "",
        f"- Machine: {env['cores']} CPU cores ({env['cpu']}), CPU only, `torch.set_num_threads({s.threads})`; "
        f"load average during the run {env['load_min']:.1f}–{env['load_max']:.1f}, of which the benchmark's own "
        f"{s.threads} threads make up to {s.threads}"
        + (" — **the machine was shared with other work** (interleaving exposes both sides to it alike, but "
           "absolute times are inflated and noisier)." if loaded else
           " (the machine is shared, but little else ran then)."),
        f"- Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']} "
        f"(`trl.GRPOTrainer`), accelerate {v['accelerate']}, datasets {v['datasets']}"
        + (f", peft {v['peft']}." if "peft" in v else "."),
        model_line(s, env, n_params, critic=False),
        f"- GRPO: {s.prompts_per_step} prompts × group {s.group_size} = {s.batch} completions × "
        f"{s.response_length} new tokens per step (EOS and every special token suppressed, so exactly {tokens} "
        f"completion tokens per step on both sides), {E} × {s.num_mini_batches} minibatches of {s.mini_batch} "
        f"({s.updates_per_step} AdamW steps per rollout), clip ε {s.clip_range}, β {s.kl_coef} (k3 in the loss), "
        f"temperature {s.temperature}, lr {s.learning_rate} constant, gradient norm clipped to {s.max_grad_norm}; "
        "loss: std-scaled group advantages, per-response token mean, mean over responses (rlp's default GRPO "
        "loss; TRL `loss_type=\"grpo\"`, `scale_rewards=\"group\"`, `use_bias_correction_kl=False`).",
        f"- Steps: {s.warmup_steps} warm-up + {s.timed_steps} timed GRPO steps per framework, alternating TRL, "
        "rlp, TRL, rlp…" + ("" if memory is None else f"; peak memory: {s.memory_steps} steps per framework alone, "
                            "before the interleaved run") + ".",
        "- Timing: rlp — the `seconds` its `GRPOTrainer.train()` records per step (rollout + update). TRL — a "
        f"`TrainerCallback` takes the time over {s.updates_per_step} consecutive `on_step_end` calls (TRL's "
        f"optimizer steps: one generation, buffered, then the {s.updates_per_step} updates, plus its Trainer loop, "
        "metrics and one log call per rollout); the rlp step run inside that callback is excluded from TRL's clock.",
        "",
        "## GRPO step (rollout + update)",
        "",
        "| | seconds/step, median (IQR) | completion tokens/s | rlp/TRL time, ratio of medians | "
        "rlp/TRL time, paired per step: median (IQR) |",
        "|---|---|---|---|---|",
        f"| rlp `GRPOTrainer` | {fmt_med_iqr(rlp_t, 1, 3)} | {fmt_rate(tokens / rlp_med)} | | |",
        f"| TRL `GRPOTrainer` | {fmt_med_iqr(trl_t, 1, 3)} | {fmt_rate(tokens / trl_med)} | "
        f"**{rlp_med / trl_med:.2f}** | {fmt_med_iqr(paired, 1, 2)} |",
        "",
        f"Time ratio < 1: rlp faster (the issue's goal: ≤ 0.8). Completion tokens/s = the {tokens} sampled tokens "
        "of a step over the step time. The paired ratio compares each rlp step with the TRL step just before it, "
        "which cancels slow drifts in background load.",
        "",
        "Same work on both sides, per step, medians over the timed steps (each side samples its own completions, "
        "so these agree in distribution, not row by row):",
        "",
        "| | RM score, rollout mean | k3 KL to the reference (in the loss) | entropy |",
        "|---|---|---|---|",
        *(f"| {name} | {statistics.median(sanity[side]['reward']):.4f} | {statistics.median(sanity[side]['kl']):.2e} "
          f"| {statistics.median(sanity[side]['entropy']):.3f} |" for side, name in (("rlp", "rlp"), ("trl", "TRL"))),
        "",
        *([] if memory is None else memory_section(s, memory, ("rlp `GRPOTrainer`", "TRL `GRPOTrainer`"), "GRPO",
                                                   "two (policy, RM)", PEAK)),
        "## What differs between the two loops",
        "",
        DIFFERENCES.format(rt=round_trip_line(env.get("round_trip")), G=s.group_size, P=s.prompts_per_step,
                           S=s.num_mini_batches, E=s.epochs, M=s.mini_batch, SE=s.updates_per_step,
                           Eit=f"{s.epochs} iteration{'s' if s.epochs > 1 else ''}", pool=len(env["prompt_tokens"]),
                           Lmin=min(env["prompt_tokens"]), Lmax=max(env["prompt_tokens"]))
        + ("" if s.lora is None else LORA_DIFFERENCES.format(trl_pad=env.get("trl_pad"))),
        "## Reading the figures",
        "",
        "- The model is tiny on purpose (the project's CPU quickstart model): a step is milliseconds of arithmetic, "
        "so these figures measure per-step framework overhead (Python, dispatch, generation loop, Trainer and "
        "accelerate machinery, bookkeeping) much more than FLOPs. They say nothing about GPU throughput at real "
        "model sizes." if tiny else
        "- A 135M-parameter model on CPU in fp32: a step is seconds of arithmetic (generation, the sampling and "
        "reference forwards, the RM forward, forward and backward passes of the LoRA policy), so framework "
        "overhead is a small share and the ratio mostly reflects how many passes each loop makes and how it "
        "batches them. Few steps are timed, so the IQRs are wide; the paired ratio is the firmer figure. Nothing "
        "here says how either does on a GPU (bf16, larger batches, vLLM for TRL).",
        "",
    ]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def round_trip_line(rt: list[int] | None) -> str:
    if not rt:
        return ""
    same, rows = rt
    return (f"Measured after the timed steps on {rows} completions of the policy (prompt text + decoded completion, "
            f"re-tokenised as TRL's reward path does): the RM gets the sampled ids back for {same} of them "
            f"({same / rows:.0%}); the others it scores as another tokenisation of the same text.")


DIFFERENCES = """\
Both loops do the same GRPO iteration: sample {G} completions for each of {P} prompts, score them with the
RM, group-normalised advantages, then {E} × {S} minibatches of {M} completions of the clipped loss + β·k3,
one AdamW step each ({SE} per rollout). What still differs, as each framework ships:

- **RM input.** rlp scores the sampled token ids as they are (the RM head read at the last real token). TRL
  decodes prompts and completions, re-tokenises prompt text + completion text (right padding) and lets
  `AutoModelForSequenceClassification` pool at the last non-pad token: the same model and head, plus a
  decode/encode round trip, and other ids wherever that round trip is not the identity. {rt}
- **Rollout forwards.** rlp takes the sampling log-probs in one extra no-grad forward over the whole rollout
  after `generate`, and the reference's in one more; TRL computes the old log-probs (it skips them when one
  rollout feeds a single update) and the reference's in chunks of {M} rows. rlp passes position ids from the
  attention mask; TRL leaves them to the model (shifted for left-padded rows, which RoPE attention does not see).
- **Suppressed tokens in the log-probs.** Both sample from the same π (every special token suppressed). rlp
  renormalises over the unsuppressed vocabulary in every log-prob (rollout, reference, update); TRL's log-probs
  use the full vocabulary. The cost is the same (one masked fill of the logits).
- **Prompt draws and minibatch order.** rlp draws each group's prompt with replacement (seeded) and reshuffles
  the rollout before each epoch; TRL's `RepeatSampler` walks a shuffled pass over the pool without replacement
  and reuses the same {S} slices of its once-shuffled rollout over its {Eit}. The pool is the same
  ({pool} prompts, {Lmin}–{Lmax} tokens each), so the padded prompt width varies per step alike, not identically.
- **Update.** Both clip the gradient norm to 1.0 and use `torch.optim.AdamW` (eps 1e-5, weight decay 0.01;
  TRL `optim="adamw_torch"` rather than its default fused AdamW); TRL's Trainer exempts biases and norm weights
  from weight decay, rlp does not. TRL's update runs through accelerate and the Trainer's `training_step`, with
  its metrics (entropy, KL, clip ratios) reduced per micro-step and logged once per rollout; rlp computes its
  statistics with `.item()` per minibatch and keeps a history row. rlp's optional early stop on approximate KL
  (`maxApproxKl`) is off, as TRL has none.
- **Generation.** Both call HF `generate` with sampling and a KV cache, fp32, on CPU: TRL with its own
  `GenerationConfig` inside `unwrap_model_for_generation` (no vLLM, no continuous batching), rlp with its
  sampler's. The prompts are the same token ids on both sides (TRL gets the text rlp renders; checked).
"""

LORA_DIFFERENCES = """\
- **LoRA and reference.** Both wrap the policy with peft's `get_peft_model` and the same `LoraConfig`; TRL
  through `GRPOTrainer(peft_config=…)`, rlp with `with_lora` as `rlp_core.pipeline` does. Both take the
  reference log-probs from the policy with its adapters disabled (one backbone copy). The adapters are freshly
  initialised on each side (B = 0, so both start from the same policy); the RM is frozen.
- **Padding token.** SmolLM2's pad token is its EOS, `<|im_end|>`, which also ends each turn inside a
  chat-templated prompt; TRL derives its masks from `ids != pad_token_id`, so its tokenizer pads with
  `<|endoftext|>` (id {trl_pad}; in no prompt, suppressed in sampling), as in bench/ppo_vs_trl.py. Prompt and
  completion token ids are identical on both sides; only the id in (masked) padding positions differs.
"""


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(PRESETS), default="tiny",
                   help="tiny: the TinyModel Llama (default); smollm2: SmolLM2-135M-Instruct with LoRA")
    # Unset options take the model's preset (PRESETS), else the Settings defaults.
    for name in ("timed_steps", "warmup_steps", "prompts_per_step", "group_size", "response_length", "epochs",
                 "num_mini_batches", "threads", "memory_steps"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="report path (default: docs/bench/" + ", ".join(
        f"{f} for {m}" for m, f in REPORTS.items()) + ")")
    p.add_argument("--child", choices=["rlp", "trl"], help=argparse.SUPPRESS)  # peak-memory child process
    p.add_argument("--checkpoints", type=Path, help=argparse.SUPPRESS)  # its saved models
    p.add_argument("--render", type=Path, help=argparse.SUPPRESS)  # re-write the report from a run's raw JSON
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if not HAVE_TRL:
        sys.exit("this benchmark needs trl 1.12.0 from the bench dependency group: "
                 "uv run --group bench python bench/grpo_vs_trl.py")
    given = {k: v for k, v in vars(a).items() if v is not None and k in Settings.__dataclass_fields__}
    s = replace(Settings(), **{"model": a.model, **PRESETS[a.model], **given})
    out = a.out or ROOT / "docs" / "bench" / REPORTS[s.model]
    if s.batch % s.num_mini_batches:
        p.error("prompts-per-step × group-size must be a multiple of --num-mini-batches")
    run(s, a, argv, out)


def run(s: Settings, a, argv: list[str], out: Path) -> None:
    import json
    import shlex
    import tempfile
    import time
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(s.threads)
    torch.set_num_interop_threads(1)
    if a.child:
        child_main(s, a.child, a.checkpoints, make_rlp_fn=make_rlp, make_trl_fn=make_trl, every=s.updates_per_step,
                   peak_fn=own_peak_mib)
        return
    if a.render:  # the measurements of a finished run (its raw JSON), written as a report again
        raw = json.loads(a.render.read_text())
        print(write_report(out, s, raw["steps"], raw["env"], raw["n_params"], raw["wall"]))
        return
    start = time.perf_counter()
    loads = [os.getloadavg()[0]]
    prompts = bench_prompts(s)

    with tempfile.TemporaryDirectory(prefix="rlp-bench-grpo-vs-trl-") as tmp:
        ck, tokenizer = build_checkpoints(Path(tmp), s, critic=False)
        memory = None
        if s.memory_steps > 0:
            memory = run_children(s, Path(tmp), script=Path(__file__).resolve(), flags=child_flags(s))
            loads += [m["load"] for m in memory.values()]
        torch.manual_seed(s.seed)
        rlp = make_rlp(ck, tokenizer, prompts, s)
        n_params = {"total": sum(p.numel() for p in rlp.policy.parameters()),
                    "trainable": sum(p.numel() for p in rlp.policy.parameters() if p.requires_grad)}
        total = s.warmup_steps + s.timed_steps
        cb = Interleave(lambda: rlp_step(rlp), s.threads, every=s.updates_per_step)
        trl = make_trl(ck, tokenizer, prompts, s, Path(tmp) / "trl", total, cb)
        torch.set_num_threads(s.threads)
        print(f"GRPO: {s.warmup_steps} warm-up + {s.timed_steps} timed steps each "
              f"({s.updates_per_step} TRL optimizer steps per step), interleaved ...", flush=True)
        trl.train()
        if len(cb.trl_seconds) != total:
            raise RuntimeError(f"TRL ran {len(cb.trl_seconds)} GRPO steps, expected {total}")
        for row in cb.rlp_rows:  # same work on both sides: full-length responses, no EOS
            if row["response_length"] != s.response_length or row["eos_fraction"]:
                raise RuntimeError(f"rlp rollout: mean response length {row['response_length']}, "
                                   f"EOS fraction {row['eos_fraction']}")
        logs = [h for h in trl.state.log_history if "completions/max_length" in h]
        lengths = {(h["completions/min_length"], h["completions/max_length"]) for h in logs}
        if len(logs) != total or lengths != {(s.response_length, s.response_length)}:
            raise RuntimeError(f"TRL completions: {len(logs)} logged rollouts, (min, max) lengths {lengths}")
        w = s.warmup_steps
        steps = {"rlp": [r["seconds"] for r in cb.rlp_rows[w:]], "trl": cb.trl_seconds[w:],
                 "sanity": {"rlp": {"reward": [r["reward_mean"] for r in cb.rlp_rows[w:]],
                                    "kl": [r["k3_kl"] for r in cb.rlp_rows[w:]],
                                    "entropy": [r["entropy"] for r in cb.rlp_rows[w:]]},
                            "trl": {"reward": [h["reward"] for h in logs[w:]], "kl": [h["kl"] for h in logs[w:]],
                                    "entropy": [h["entropy"] for h in logs[w:]]}}}
        same, rows = round_trip_share(rlp, tokenizer, s, rollouts=4 if s.model == "tiny" else 1)
        loads += cb.loadavg
        loads.append(os.getloadavg()[0])
        vers = versions()
        if s.lora is not None:
            import importlib.metadata as md

            vers["peft"] = md.version("peft")
        env = {"cores": os.cpu_count(), "cpu": cpu_name(), "versions": vers, "vocab": len(tokenizer),
               "command": " ".join([UV_RUN[s.model], "python bench/grpo_vs_trl.py", *map(shlex.quote, argv)]),
               "prompt_tokens": [len(x) for x in prompt_ids(tokenizer, prompts)],
               "trl_pad": trl.processing_class.pad_token_id, "round_trip": [same, rows],
               "load_min": min(loads), "load_max": max(loads), "memory": memory}
        wall = time.perf_counter() - start
        raw_path = Path(tempfile.gettempdir()) / f"grpo-vs-trl-{s.model}-raw.json"  # kept: --render RAW
        raw_path.write_text(json.dumps({"argv": argv, "steps": steps, "env": env, "n_params": n_params,
                                        "wall": wall}))
        print(f"raw measurements: {raw_path}", flush=True)
        text = write_report(out, s, steps, env, n_params, wall)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
