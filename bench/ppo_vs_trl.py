"""PPO step time and generation tokens/s of rlp beside TRL's PPO, same tiny model, same batch, one process.

    uv run --group bench python bench/ppo_vs_trl.py          # writes docs/bench/ppo-vs-trl.md

A benchmark, not a test: trl (1.12.0, the last release with PPO, `trl.experimental.ppo`) is only in the
`bench` dependency group.

What it does, in one process, on CPU with a fixed number of torch threads (default 1: the tiny model's
kernels are far too small to gain from intra-op threads, and on a shared 2-core machine two OpenMP threads
spin at every barrier whenever the other core is busy, which made single forward passes 50× slower and
turned the figures into a measure of the neighbours' load; `--threads 2` is there for an idle machine):

1. Builds one tiny Llama (the `TinyModel()` defaults, a BPE tokenizer trained on the built-in addition
   task) and saves policy, reward model (policy + fresh scalar head) and value model (RM + token head)
   once to a temp dir; each framework loads its own copies from there, so both start from identical
   weights. The saved generation config suppresses every special token (EOS and PAD included; rlp's
   sampler, which sets its own suppressed tokens, is given the same list), so every rollout is exactly
   `--response-length` new tokens in both frameworks (no early stop, same work per step).
2. PPO step time (rollout + update): rlp's `rlp_core.ppo.PPOTrainer` and TRL's
   `trl.experimental.ppo.PPOTrainer` with matching settings (batch, minibatches, PPO epochs, response
   length, temperature, β, γ, λ, clip ranges, value coefficient, lr, AdamW). The two run *interleaved
   step by step*: TRL's `train()` runs all its steps, and a `TrainerCallback.on_step_end` records the time
   since the previous step boundary and then runs one rlp step (rlp's `train()` with `steps=1`, whose own
   per-step `seconds` is the rlp sample) before re-arming TRL's clock. So a TRL sample is one full trip
   round TRL's loop (generation, scoring, GAE, minibatch updates, metrics, its per-step `gc.collect()`),
   with the rlp step excluded, and background load hits both sides alike. The time TRL spends in its two
   explicit `gc.collect()` calls per step is measured too (reported separately, and subtracted in a row).
3. Generation tokens/s on the same prompts and policy weights, interleaved call by call: rlp's
   `sample_responses` (HF `generate`, then one forward pass for the sampling log-probs); TRL's PPO rollout
   generation (`batch_generation` + `selective_log_softmax` over `generate`'s output scores, inside
   `unwrap_model_for_generation`, exactly as its `train()` does); and plain HF `generate` (no log-probs)
   as a floor for both.

Reported: median and interquartile range over the timed samples, and rlp/TRL ratios (time ratio < 1 and
throughput ratio > 1 mean rlp is faster), plus the median of paired per-step ratios.
"""

from __future__ import annotations

import os

# Before torch/transformers/tqdm are imported: CPU only, no hub traffic, no progress bars in the timings.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import importlib.metadata as md  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GenerationConfig, PreTrainedTokenizerFast  # noqa: E402

from rlp_core.models import (  # noqa: E402
    build_tiny_policy, encode_prompts, load_policy, load_reward_model, load_tokenizer, load_value_model, save_model,
    train_tokenizer,
)
from rlp_core.pipeline import rm_score_fn  # noqa: E402
from rlp_core.ppo import PPOTrainer as RlpPPOTrainer  # noqa: E402
from rlp_core.sampling import sample_responses  # noqa: E402
from rlp_core.spec import Optimization, TinyModel  # noqa: E402
from rlp_core.tasks import TASKS  # noqa: E402

try:
    import trl.experimental.ppo.ppo_trainer as trl_ppo_module
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOConfig as TrlPPOConfig
    from trl.experimental.ppo import PPOTrainer as TrlPPOTrainer
    from trl.experimental.ppo.ppo_trainer import batch_generation
    from trl.models.utils import unwrap_model_for_generation
    from trl.trainer.utils import selective_log_softmax
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"{exc}\nthis benchmark needs trl 1.12.0 from the bench dependency group: "
             "uv run --group bench python bench/ppo_vs_trl.py")

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "uv run --group bench python bench/ppo_vs_trl.py"


@dataclass(frozen=True)
class Settings:
    batch: int = 16
    response_length: int = 8
    num_mini_batches: int = 2
    ppo_epochs: int = 2
    warmup_steps: int = 3
    timed_steps: int = 40
    gen_warmup: int = 3
    gen_repeats: int = 60
    learning_rate: float = 1e-5
    kl_coef: float = 0.05
    value_coef: float = 0.5
    clip_range: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    threads: int = 1
    seed: int = 0
    prompts: int = 512
    tiny: TinyModel = field(default_factory=TinyModel)

    @property
    def mini_batch(self) -> int:
        return self.batch // self.num_mini_batches


# --- models ---------------------------------------------------------------------------------------------
def suppress_in_rlp(extra: set[int]) -> None:
    """Make rlp's sampler suppress `extra` (EOS) too, in `generate()` and in every log-prob alike.

    rlp's `generation_config()` sets `suppress_tokens` itself (the special tokens other than the stop ids), which
    takes precedence over the model's saved generation config, so the EOS suppression saved with the policy
    reaches TRL's `generate()` but not rlp's. Both modules that import `suppressed_token_ids` get the widened
    list, so π stays one distribution (renormalised over the other tokens) in sampling, reference and update.
    """
    import rlp_core.models
    import rlp_core.ppo
    import rlp_core.sampling

    base = rlp_core.models.suppressed_token_ids

    def suppressed(tokenizer: PreTrainedTokenizerFast, stop_ids=()) -> list[int]:
        return sorted(set(base(tokenizer, stop_ids)) | extra)

    rlp_core.sampling.suppressed_token_ids = suppressed
    rlp_core.ppo.suppressed_token_ids = suppressed


@dataclass(frozen=True)
class Checkpoints:
    policy: Path
    reward: Path
    value: Path


def build_checkpoints(root: Path, s: Settings) -> tuple[Checkpoints, PreTrainedTokenizerFast]:
    """One tiny Llama, saved once: policy, RM (policy + scalar head), value model (RM + token head)."""
    task = TASKS["arith"]
    demos = task.records("demonstrations")
    tokenizer = train_tokenizer([d["prompt"] for d in demos] + [d["response"] for d in demos], s.tiny.vocab_size)
    policy = build_tiny_policy(tokenizer, s.tiny, s.seed)
    # Neither framework may stop a row early or emit a token the other reads as padding: both generate
    # exactly `response_length` tokens (TRL takes PAD for the end of a response). Every special token is
    # suppressed on both sides (rlp suppresses those other than EOS anyway), so both sample the same π.
    suppress = set(tokenizer.all_special_ids) | {tokenizer.eos_token_id, tokenizer.pad_token_id}
    policy.generation_config.suppress_tokens = sorted(suppress)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    suppress_in_rlp(suppress)
    ck = Checkpoints(root / "policy", root / "reward", root / "value")
    save_model(policy, tokenizer, ck.policy)
    torch.manual_seed(s.seed + 1)
    save_model(load_reward_model(ck.policy), tokenizer, ck.reward)
    torch.manual_seed(s.seed + 2)
    save_model(load_value_model(ck.reward), tokenizer, ck.value)
    return ck, load_tokenizer(ck.policy)


# --- rlp ------------------------------------------------------------------------------------------------
def make_rlp(ck: Checkpoints, tokenizer: PreTrainedTokenizerFast, prompts: list[str], s: Settings) -> RlpPPOTrainer:
    cfg = Optimization(
        steps=1, rollout_batch_size=s.batch, mini_batch_size=s.mini_batch, ppo_epochs=s.ppo_epochs,
        learning_rate=s.learning_rate, warmup_steps=0, kl_coef=s.kl_coef, target_kl=None, max_approx_kl=None,
        whiten_rewards=False, reward_clip=None, missing_eos_penalty=None, temperature=s.temperature,
        max_new_tokens=s.response_length, value_coef=s.value_coef, value_clip=s.value_clip, gamma=s.gamma,
        gae_lambda=s.lam, ppo={"clip_range": s.clip_range}, deepspeed={"enabled": "false"},
    )
    reward_model = load_reward_model(ck.reward).eval().requires_grad_(False)
    return RlpPPOTrainer(
        config=cfg, policy=load_policy(ck.policy), reference=load_policy(ck.policy),
        value_model=load_value_model(ck.value), tokenizer=tokenizer,
        score_fn=rm_score_fn(reward_model, torch.device("cpu")), prompts=prompts, seed=s.seed,
    )


def rlp_step(trainer: RlpPPOTrainer) -> dict[str, float]:
    """One rlp PPO iteration through its own loop; returns that step's history row (with `seconds`)."""
    with contextlib.redirect_stderr(io.StringIO()):  # its one-step progress bar, not wanted on the console
        trainer.train()  # config.steps == 1: one iteration, appended to trainer.history
    return trainer.history[-1]


# --- TRL ------------------------------------------------------------------------------------------------
def make_trl(ck: Checkpoints, tokenizer: PreTrainedTokenizerFast, prompts: list[str], s: Settings, out: Path,
             steps: int, callback: TrainerCallback) -> TrlPPOTrainer:
    from datasets import Dataset

    args = TrlPPOConfig(
        output_dir=str(out), report_to="none", save_strategy="no", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, seed=s.seed, disable_tqdm=True, logging_strategy="no",
        per_device_train_batch_size=s.batch, gradient_accumulation_steps=1, num_mini_batches=s.num_mini_batches,
        num_ppo_epochs=s.ppo_epochs, total_episodes=s.batch * steps, local_rollout_forward_batch_size=s.batch,
        response_length=s.response_length, temperature=s.temperature, stop_token=None, missing_eos_penalty=None,
        kl_coef=s.kl_coef, kl_estimator="k1", whiten_rewards=False, cliprange=s.clip_range,
        cliprange_value=s.value_clip, vf_coef=s.value_coef, gamma=s.gamma, lam=s.lam,
        learning_rate=s.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", adam_epsilon=1e-5, weight_decay=0.01, num_sample_generations=0,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]})
    trainer = TrlPPOTrainer(
        args=args, processing_class=tokenizer, model=load_policy(ck.policy), ref_model=load_policy(ck.policy),
        reward_model=load_reward_model(ck.reward), value_model=load_value_model(ck.value),
        train_dataset=dataset, callbacks=[callback],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):  # console output is not part of the loop being measured
        trainer.remove_callback(cb)
    return trainer


class TimedGC:
    """Stand-in for the `gc` module inside TRL's PPO trainer: the same `collect()`, with its time added up."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def collect(self, *args, **kwargs) -> int:
        t0 = time.perf_counter()
        try:
            return gc.collect(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def __getattr__(self, name: str):
        return getattr(gc, name)


class Interleave(TrainerCallback):
    """At each TRL step boundary: record TRL's step time, run one rlp step, re-arm TRL's clock."""

    def __init__(self, rlp_step_fn: Callable[[], dict[str, float]], threads: int, timed_gc: TimedGC):
        self.rlp_step_fn = rlp_step_fn
        self.threads = threads
        self.timed_gc = timed_gc
        self.trl_seconds: list[float] = []
        self.trl_gc_seconds: list[float] = []
        self.rlp_rows: list[dict[str, float]] = []
        self.loadavg: list[float] = []
        self._t = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        torch.set_num_threads(self.threads)
        self.timed_gc.seconds = 0.0
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.trl_seconds.append(time.perf_counter() - self._t)
        self.trl_gc_seconds.append(self.timed_gc.seconds)
        self.rlp_rows.append(self.rlp_step_fn())
        self.loadavg.append(os.getloadavg()[0])
        self.timed_gc.seconds = 0.0
        self._t = time.perf_counter()


# --- generation -----------------------------------------------------------------------------------------
def generation_methods(ck: Checkpoints, tokenizer: PreTrainedTokenizerFast, prompts: list[str], s: Settings,
                       trl_trainer: TrlPPOTrainer) -> dict[str, Callable[[], int]]:
    """name -> call that generates for `prompts` and returns the number of response tokens produced."""
    policy = load_policy(ck.policy).eval()
    enc = encode_prompts(tokenizer, prompts)
    queries = enc["input_ids"]
    # TRL's rollout settings (PPOTrainer.train): its GenerationConfig, applied through the model's config.
    trl_kwargs = {"max_new_tokens": s.response_length, "temperature": s.temperature + 1e-7, "top_k": 0.0,
                  "top_p": 1.0, "do_sample": True}
    trl_config = GenerationConfig(**trl_kwargs)
    plain_config = GenerationConfig(max_new_tokens=s.response_length, do_sample=True, temperature=s.temperature,
                                    top_k=None, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)

    def rlp() -> int:
        rollout = sample_responses(policy, tokenizer, prompts, max_new_tokens=s.response_length,
                                   temperature=s.temperature)
        return int(rollout.response_mask.sum())

    @torch.no_grad()
    def trl() -> int:
        with unwrap_model_for_generation(policy, trl_trainer.accelerator, generation_kwargs=trl_kwargs) as model:
            query_responses, logits = batch_generation(model, queries, s.batch, tokenizer.pad_token_id, trl_config)
        responses = query_responses[:, queries.shape[1]:]
        selective_log_softmax(logits, responses)
        return int((responses != tokenizer.pad_token_id).sum())

    @torch.no_grad()
    def hf_generate() -> int:
        out = policy.generate(**enc, generation_config=plain_config)
        return int((out[:, queries.shape[1]:] != tokenizer.pad_token_id).sum())

    return {"rlp `sample_responses`": rlp, "TRL `batch_generation` (PPO rollout)": trl,
            "plain HF `generate` (no log-probs)": hf_generate}


def time_generation(methods: dict[str, Callable[[], int]], s: Settings) -> dict[str, list[float]]:
    """Tokens/s per call, the methods interleaved call by call (rotating which goes first)."""
    names = list(methods)
    expected = s.batch * s.response_length
    for name in names:
        for _ in range(s.gen_warmup):
            methods[name]()
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(s.gen_repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            tokens = methods[name]()
            dt = time.perf_counter() - t0
            if tokens != expected:
                raise RuntimeError(f"{name} generated {tokens} response tokens, expected {expected}")
            rates[name].append(tokens / dt)
    return rates


# --- statistics and report ------------------------------------------------------------------------------
def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def fmt_med_iqr(xs: list[float], scale: float = 1.0, digits: int = 1) -> str:
    q1, q2, q3 = (v * scale for v in quartiles(xs))
    return f"{q2:.{digits}f} ({q1:.{digits}f}–{q3:.{digits}f})"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "accelerate", "datasets"):
        out[pkg] = md.version(pkg)
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


DIFFERENCES = """\
Both loops do the same PPO iteration: sample {R} tokens for {B} prompts, score with the RM, per-token
KL penalty (k1, fixed β), GAE, whitened advantages, {E} epochs × {M} minibatches of the clipped policy
loss + {vc} × clipped value loss, one AdamW step per minibatch. The same models, batch, response length
and hyper-parameters are used on both sides. What still differs, as each framework ships:

- **Sampling log-probs.** rlp recomputes them with one extra no-grad forward pass of the policy over the
  full sequences after `generate` (so they are the log-probs of the raw logits/temperature, correct under
  top-p too); TRL takes them from `generate`'s output scores (`output_scores=True`), saving that forward
  pass but keeping {R} full-vocabulary score tensors. The generation table shows this cost separately.
- **Value and reward forwards.** TRL runs the value model's and RM's backbones with
  `output_hidden_states=True` and applies the head itself (`get_reward`); rlp calls the HF heads
  (`AutoModelForTokenClassification` / `...SequenceClassification`). Same arithmetic.
- **Update.** rlp clips the global gradient norm (`maxGradNorm` 1.0) before each step and steps an LR
  scheduler; TRL's PPO loop does neither per minibatch (its scheduler steps once per PPO step). TRL's
  forward in the update goes through `PolicyAndValueWrapper` (policy and critic backbone both run, as in
  rlp). TRL computes entropy, ratio and clip-fraction statistics into preallocated tensors and gathers
  them with `accelerator.gather_for_metrics` each step; rlp computes entropy and calls `.item()` per minibatch.
- **Per-step housekeeping.** TRL calls `gc.collect()` twice and `empty_cache()` several times per step and
  logs a metrics dict through the Trainer callback machinery (console printing callbacks removed here);
  rlp keeps a history row. rlp's optional early stop on approximate KL (`maxApproxKl`) is off here, as TRL
  has none; rlp's `rewardClip` and `missingEosPenalty` are off too (EOS is suppressed in both).
- **Optimiser.** Both use `torch.optim.AdamW` (TRL with `optim=adamw_torch`, eps 1e-5, weight decay 0.01,
  rather than its default fused AdamW); TRL's Trainer exempts biases and norm weights from weight decay, rlp
  does not. TRL wraps model and optimiser with `accelerate` (CPU, no mixed precision; its defaults bf16 and
  gradient checkpointing are turned off here, as rlp uses neither on CPU).
- **Prompts.** Both draw {B}-prompt batches from the same 512 addition prompts (rlp: seeded choice with
  replacement; TRL: its shuffled DataLoader), so prompt lengths vary per step alike; each left-pads a batch
  to its longest prompt.
"""


def write_report(path: Path, s: Settings, steps: dict, gen: dict[str, list[float]], env: dict, n_params: int,
                 wall: float) -> str:
    rlp_t, trl_t = steps["rlp"], steps["trl"]
    trl_nogc = [t - g for t, g in zip(trl_t, steps["trl_gc"], strict=True)]
    paired = [a / b for a, b in zip(rlp_t, trl_t, strict=True)]
    paired_nogc = [a / b for a, b in zip(rlp_t, trl_nogc, strict=True)]
    rlp_med, trl_med, nogc_med = (statistics.median(x) for x in (rlp_t, trl_t, trl_nogc))
    tokens_per_step = s.batch * s.response_length
    names = list(gen)
    rlp_gen, trl_gen, plain_gen = (statistics.median(gen[n]) for n in names)
    gen_paired = [a / b for a, b in zip(gen[names[0]], gen[names[1]], strict=True)]
    v = env["versions"]
    loaded = env["load_max"] > env["cores"]
    lines = [
        "# PPO step time and generation throughput: rlp vs TRL",
        "",
        f"Generated by `{COMMAND}` (`bench/ppo_vs_trl.py`); one process, both frameworks interleaved step by step.",
        "",
        f"- Machine: {env['cores']} CPU cores ({env['cpu']}), CPU only, `torch.set_num_threads({s.threads})`"
        + (" (one intra-op thread: the tiny model gains nothing from more, and on a shared machine two OpenMP "
           "threads spin at every barrier while the other core is busy)" if s.threads == 1 else "") + "; "
        f"load average during the run {env['load_min']:.1f}–{env['load_max']:.1f}"
        + (" — **taken under load** (the machine was shared with other work; interleaving exposes both "
           "sides to it alike, but absolute times are inflated and noisier)." if loaded else "."),
        f"- Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']} "
        f"(`trl.experimental.ppo.PPOTrainer`), accelerate {v['accelerate']}, datasets {v['datasets']}.",
        f"- Model: tiny Llama from `TinyModel()` defaults (hidden {s.tiny.hidden_size}, {s.tiny.num_layers} layers, "
        f"{s.tiny.num_heads} heads, MLP {s.tiny.intermediate_size}, vocab {env['vocab']}; {n_params:,} parameters "
        "per policy); policy, reference, value and reward models loaded by each framework from one saved set.",
        f"- PPO: batch {s.batch} prompts × {s.response_length} new tokens (EOS/PAD suppressed, so exactly "
        f"{tokens_per_step} response tokens per step on both sides), {s.ppo_epochs} PPO epochs × "
        f"{s.num_mini_batches} minibatches of {s.mini_batch}, temperature {s.temperature}, β {s.kl_coef}, "
        f"γ {s.gamma}, λ {s.lam}, clip {s.clip_range}, value clip {s.value_clip}, value coef {s.value_coef}, "
        f"lr {s.learning_rate} constant.",
        f"- Steps: {s.warmup_steps} warm-up + {s.timed_steps} timed PPO steps per framework, alternating "
        f"TRL, rlp, TRL, rlp…; generation: {s.gen_warmup} warm-up + {s.gen_repeats} timed calls per method, "
        f"rotating order. Whole run {wall:.0f} s.",
        "- Timing: rlp — the `seconds` its `PPOTrainer.train()` records per step (rollout + update). "
        "TRL — a `TrainerCallback` takes the time between consecutive `on_step_end` calls (one whole trip round "
        "TRL's loop, including its per-step metrics, `gc.collect()` and data loading); the rlp step run inside "
        "that callback is excluded from TRL's clock.",
        "",
        "## PPO step (rollout + update)",
        "",
        "| | seconds/step, median (IQR) | response tokens/s | rlp/TRL time, ratio of medians | "
        "rlp/TRL time, paired per step: median (IQR) |",
        "|---|---|---|---|---|",
        f"| rlp `PPOTrainer` | {fmt_med_iqr(rlp_t, 1, 3)} | {tokens_per_step / rlp_med:.0f} | | |",
        f"| TRL `PPOTrainer`, as shipped | {fmt_med_iqr(trl_t, 1, 3)} | {tokens_per_step / trl_med:.0f} | "
        f"**{rlp_med / trl_med:.2f}** | {fmt_med_iqr(paired, 1, 2)} |",
        f"| TRL minus the time in its own `gc.collect()` calls | {fmt_med_iqr(trl_nogc, 1, 3)} | "
        f"{tokens_per_step / nogc_med:.0f} | **{rlp_med / nogc_med:.2f}** | {fmt_med_iqr(paired_nogc, 1, 2)} |",
        f"| (TRL's `gc.collect()` time per step) | {fmt_med_iqr(steps['trl_gc'], 1, 3)} | | | |",
        "",
        "Time ratio < 1: rlp faster. Response tokens/s = the "
        f"{tokens_per_step} sampled tokens of a step over the step time (rlp's history field `tokens_per_second` "
        f"counts prompt + response tokens: median {statistics.median(steps['rlp_tps']):.0f}/s).",
        "",
        f"TRL's PPO loop calls `gc.collect()` twice per step (after the rollout and at the end of the step). A full "
        f"collection walks every object the collector tracks, here {env['gc_objects']:,} (torch, transformers, "
        "trl, datasets, pandas and rlp are imported; a process with TRL's imports alone holds about as many), so "
        "it costs a fixed fraction of a second per step whatever the model size. At this scale it dominates "
        "TRL's step. The row without it subtracts the time measured inside those calls (TRL's own `gc` "
        "reference is swapped for a timing wrapper; the collections still run): it compares the rest of the two "
        "loops, slightly flattering TRL, since without the explicit calls Python's automatic collector would do "
        "some of that work.",
        "",
        f"## Generation, response tokens/s ({s.batch} prompts × {s.response_length} tokens per call)",
        "",
        "| method | tokens/s, median (IQR) | ms per call (median) | rlp/TRL throughput, ratio of medians | "
        "rlp/TRL, paired per call: median (IQR) |",
        "|---|---|---|---|---|",
    ]
    for i, n in enumerate(names):
        ratio = f"**{rlp_gen / trl_gen:.2f}** | {fmt_med_iqr(gen_paired, 1, 2)}" if i == 1 else " | "
        lines.append(f"| {n} | {fmt_med_iqr(gen[n], 1, 0)} | "
                     f"{tokens_per_step / statistics.median(gen[n]) * 1e3:.1f} | {ratio} |")
    lines += [
        "",
        "Throughput ratio > 1: rlp faster. Each timed call produces sampled tokens *and* their log-probs, as a PPO "
        f"rollout needs them: rlp at {rlp_gen / plain_gen:.2f}× and TRL at {trl_gen / plain_gen:.2f}× the "
        "throughput of plain `generate` (rlp pays one extra forward pass; TRL keeps `generate`'s output scores).",
        "",
        "## What differs between the two loops",
        "",
        DIFFERENCES.format(R=s.response_length, B=s.batch, E=s.ppo_epochs, M=s.num_mini_batches, vc=s.value_coef),
        "## Reading the figures",
        "",
        "- The model is tiny on purpose (the project's CPU quickstart model): a step is a few milliseconds of "
        "arithmetic, so these figures measure per-step framework overhead (Python, dispatch, generation "
        "loop, bookkeeping) much more than FLOPs. They say nothing about GPU throughput at real model sizes.",
        "- Medians and IQRs are over individual steps/calls; the paired ratios compare each rlp step with the "
        "TRL step just before it, which cancels slow drifts in background load.",
        "",
    ]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timed-steps", type=int, default=Settings.timed_steps)
    p.add_argument("--warmup-steps", type=int, default=Settings.warmup_steps)
    p.add_argument("--gen-repeats", type=int, default=Settings.gen_repeats)
    p.add_argument("--batch", type=int, default=Settings.batch)
    p.add_argument("--response-length", type=int, default=Settings.response_length)
    p.add_argument("--ppo-epochs", type=int, default=Settings.ppo_epochs)
    p.add_argument("--num-mini-batches", type=int, default=Settings.num_mini_batches)
    p.add_argument("--threads", type=int, default=Settings.threads)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "ppo-vs-trl.md")
    a = p.parse_args(argv)
    s = Settings(timed_steps=a.timed_steps, warmup_steps=a.warmup_steps, gen_repeats=a.gen_repeats, batch=a.batch,
                 response_length=a.response_length, ppo_epochs=a.ppo_epochs, num_mini_batches=a.num_mini_batches,
                 threads=a.threads)
    if s.batch % s.num_mini_batches:
        p.error("--batch must be a multiple of --num-mini-batches")
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(s.threads)
    torch.set_num_interop_threads(1)
    start = time.perf_counter()
    loads = [os.getloadavg()[0]]
    prompts = [r["prompt"] for r in TASKS["arith"].records("prompts", n=s.prompts)]

    with tempfile.TemporaryDirectory(prefix="rlp-bench-ppo-vs-trl-") as tmp:
        ck, tokenizer = build_checkpoints(Path(tmp), s)
        rlp = make_rlp(ck, tokenizer, prompts, s)
        n_params = sum(p.numel() for p in rlp.policy.parameters())
        total = s.warmup_steps + s.timed_steps
        timed_gc = TimedGC()
        trl_ppo_module.gc = timed_gc  # TRL's own gc.collect() calls, timed (they still run)
        cb = Interleave(lambda: rlp_step(rlp), s.threads, timed_gc)
        trl = make_trl(ck, tokenizer, prompts, s, Path(tmp) / "trl", total, cb)
        torch.set_num_threads(s.threads)
        print(f"PPO: {s.warmup_steps} warm-up + {s.timed_steps} timed steps each, interleaved ...", flush=True)
        trl.train()
        if len(cb.trl_seconds) != total:
            raise RuntimeError(f"TRL ran {len(cb.trl_seconds)} steps, expected {total}")
        steps = {"rlp": [r["seconds"] for r in cb.rlp_rows[s.warmup_steps:]],
                 "trl": cb.trl_seconds[s.warmup_steps:],
                 "trl_gc": cb.trl_gc_seconds[s.warmup_steps:],
                 "rlp_tps": [r["tokens_per_second"] for r in cb.rlp_rows[s.warmup_steps:]]}
        for row in cb.rlp_rows:  # same work on both sides: full-length responses, no EOS
            if row["response_length"] != s.response_length:
                raise RuntimeError(f"rlp rollout had mean response length {row['response_length']}")
        trl_eos = [h["val/num_eos_tokens"] for h in trl.state.log_history if "val/num_eos_tokens" in h]
        if len(trl_eos) != total or any(trl_eos):
            raise RuntimeError(f"TRL rollouts sampled EOS tokens: {trl_eos}")
        loads += cb.loadavg
        print(f"generation: {s.gen_warmup} warm-up + {s.gen_repeats} timed calls per method ...", flush=True)
        methods = generation_methods(ck, tokenizer, prompts[: s.batch], s, trl)
        gen = time_generation(methods, s)
        loads.append(os.getloadavg()[0])
        env = {"cores": os.cpu_count(), "cpu": cpu_name(), "versions": versions(), "vocab": len(tokenizer),
               "gc_objects": len(gc.get_objects()),
               "load_min": min(loads), "load_max": max(loads)}
        text = write_report(a.out, s, steps, gen, env, n_params, time.perf_counter() - start)
    print(text)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
