"""Reward-learning benchmark around over-optimisation: gold score against KL for every method, on the
built-in addition task, over seeds, through the product's own phases (`execute_phase`, as `rlp run`).

    uv run python -m bench.reward_learning --setting headline --jobs 2   # docs/bench/reward-learning.{md,png,json}

Set-up (per seed, every method starts from the same SFT policy and the same fixed RM):
- task: single-digit addition, gold judge = the task's score (1 for the exact sum, partial credit for near
  misses, 0 when no number can be read: the "hack" case);
- SFT: a tiny Llama on demonstrations that are 30% wrong (competent but unreliable);
- the fixed RM: trained once on "human" pairs labelled by noisy annotators (`human_pairs`, `flip_rate`);
- evaluation and probe prompts are operand pairs reserved from every RLHF phase (no preference pair and no
  RL prompt uses them; see rlp_core.tasks), so every gold number below is on prompts no RL step saw.

Methods: best-of-n from the SFT policy with the proxy RM and with the gold judge (n = 1…32, KL = log n −
(n−1)/n); PPO with the gold judge as reward (the ceiling); PPO with the fixed RM at several β, and with the
critic started from the policy instead of the RM (`optimization.valueInit`); PPO + RLP-UML,
+ RLP-SPG, + both (`rlp`), + SER; APA with the fixed RM; and iterative RLP-SPG (several rounds of fewer
steps, the RM refreshed on the current policy's samples before each round).

Measured every `probe_every` optimisation steps, on the held-out probe prompts: the policy's gold score,
its KL to the SFT policy (Σ over response tokens of log π − log π_ref, the k1 estimator on its own samples),
the hack rate (responses the judge cannot read), and the accuracy of the RM being optimised on gold-labelled
pairs of the *current* policy's samples. Final: the evaluate phase's gold win-rate against SFT.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from rlp_core.data import Sample
from rlp_core.models import (
    load_policy, load_reward_model, load_tokenizer, response_logprobs, reward_scores, suppressed_token_ids,
)
from rlp_core.pipeline import POLICY_DIR, RM_DIR, execute_phase
from rlp_core.sampling import decode_responses, sample_responses
from rlp_core.spec import parse_run
from rlp_core.store import Store
from rlp_core.tasks import ArithTask

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 32
MAX_NEW_TOKENS = 4


@dataclass(frozen=True)
class Setting:
    """Sizes of one benchmark setting."""

    name: str
    seeds: int = 5
    demonstrations: int = 3000
    sft_epochs: float = 8
    human_pairs: int = 2000
    flip_rate: float = 0.25
    rm_epochs: float = 4
    reward_learning_epochs: float = 2  # every strategy's retraining budget (passes over its data)
    prompts: int = 512
    samples_per_prompt: int = 8
    eval_prompts: int = 500
    probe_prompts: int = 120
    probe_samples: int = 4
    steps: int = 90
    rounds: int = 3  # of the iterative method: `steps` split over them
    probe_every: int = 10
    rollout_batch: int = 32
    learning_rate: float = 3e-4
    kl_coef: float = 0.1
    kl_sweep: tuple[float, ...] = (0.03, 0.3)  # extra β for PPO with the fixed RM
    best_of: tuple[int, ...] = (1, 2, 4, 8, 16, 32)


SETTINGS = {
    "headline": Setting("headline"),
    "small-rm": Setting("small-rm", seeds=3, human_pairs=200, rm_epochs=30, kl_sweep=()),
    "tiny": Setting("tiny", seeds=1, demonstrations=1000, sft_epochs=4, human_pairs=300, prompts=64, eval_prompts=60,
                    probe_prompts=20, steps=6, rounds=2, probe_every=3, rollout_batch=16, kl_sweep=(),
                    best_of=(1, 4)),
}

# SPG as tuned on seed 0 of the quickstart's task (not on the eval prompts): every eligible prompt, up to
# three pairs each, synthetic pairs weighted 5× so ~260 of them are not drowned by ~1,800 human ones.
SPG_TUNED = {"keepFraction": 1.0, "pairsPerPrompt": 3, "syntheticWeight": 5.0}


def methods(setting: Setting) -> list[tuple[str, str, dict[str, Any], int, dict[str, Any]]]:
    """(label, rewardLearning.strategy, optimization overrides, rounds, rewardLearning.spg overrides)."""
    fixed = FIXED.format(setting.kl_coef)
    out = [("PPO, gold reward (ceiling)", "none", {"reward": "judge"}, 1, {}), (fixed, "none", {}, 1, {})]
    out += [(FIXED.format(b), "none", {"klCoef": b}, 1, {}) for b in setting.kl_sweep]
    out += [(f"{fixed}, critic from the policy", "none", {"valueInit": "policy"}, 1, {}),
            ("PPO + RLP-UML", "rlp-uml", {}, 1, {}),
            ("PPO + RLP-SPG (1 pair/prompt, unweighted)", "rlp-spg", {}, 1, {}),
            ("PPO + RLP-SPG", "rlp-spg", {}, 1, SPG_TUNED),
            ("PPO + RLP (UML+SPG)", "rlp", {}, 1, SPG_TUNED),
            ("PPO + SER", "ser", {}, 1, {}),
            ("APA, fixed RM", "none", {"algorithm": "apa"}, 1, {}),
            (f"PPO + RLP-SPG, {setting.rounds} rounds", "rlp-spg", {}, setting.rounds, SPG_TUNED)]
    return out


FIXED = "PPO, fixed RM, β={:g}"


def task_of(setting: Setting) -> ArithTask:
    return ArithTask(annotator_flip_rate=setting.flip_rate)


def write_data(setting: Setting, data_dir: Path) -> dict[str, str]:
    """The task's splits as JSONL files (eval and probe from the reserved operand pairs)."""
    task = task_of(setting)
    sizes = {"demonstrations": setting.demonstrations, "preferences": setting.human_pairs,
             "prompts": setting.prompts, "eval": setting.eval_prompts}
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in sizes.items():
        paths[split] = str(data_dir / f"{split}.jsonl")
        Path(paths[split]).write_text("".join(json.dumps(r) + "\n" for r in task.records(split, n=n)))
    paths["probe"] = str(data_dir / "probe.jsonl")
    probe = task.records("eval", n=setting.probe_prompts, seed=991)
    Path(paths["probe"]).write_text("".join(json.dumps(r) + "\n" for r in probe))
    return paths


def read_prompts(path: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines()]


def spec_for(setting: Setting, data: dict[str, str], seed: int, strategy: str = "none",
             optimization: dict[str, Any] | None = None, rounds: int = 1, base: dict[str, Any] | None = None,
             spg: dict[str, Any] | None = None) -> dict:
    training = {"epochs": setting.reward_learning_epochs, "batchSize": 32, "learningRate": 5e-4}
    spec: dict[str, Any] = {
        "seed": seed,
        "rounds": rounds,
        "policy": {"sft": {"demonstrations": data["demonstrations"], "tiny": {"maxPositions": MAX_LENGTH},
                           "training": {"epochs": setting.sft_epochs, "batchSize": 64, "learningRate": 0.003}}},
        "rewardModel": {"humanPreferences": data["preferences"],
                        "training": {"epochs": setting.rm_epochs, "batchSize": 32, "learningRate": 0.001}},
        "prompts": data["prompts"],
        "generation": {"samplesPerPrompt": setting.samples_per_prompt, "maxPrompts": 128, "maxNewTokens": MAX_NEW_TOKENS},
        "rewardLearning": {"strategy": strategy, "uml": {"training": training}, "ser": {"training": training},
                           "spg": {"training": training, **(spg or {})}},
        "optimization": {"steps": max(1, setting.steps // rounds), "rolloutBatchSize": setting.rollout_batch,
                         "miniBatchSize": min(16, setting.rollout_batch), "ppoEpochs": 2,
                         "learningRate": setting.learning_rate, "klCoef": setting.kl_coef,
                         "maxNewTokens": MAX_NEW_TOKENS, "checkpointEvery": 1000, **(optimization or {})},
        "evaluation": {"prompts": data["eval"], "judge": "builtin://arith", "maxNewTokens": MAX_NEW_TOKENS},
    }
    if base is not None:
        spec["policy"]["model"] = base["policy"]
        spec["rewardModel"]["model"] = base["reward_model"]
    return spec


def output_dir(work: Path, name: str, round: int, phase: str) -> Path:
    return work / "store" / "default" / name / f"round-{round}" / phase


def execute(spec: dict[str, Any], name: str, work: Path, phases: set[str] | None = None,
            step_callback=None) -> dict[tuple[int, str], dict]:
    """Run the plan's phases (all, or those named) in order; returns each phase's manifest metrics."""
    run = parse_run({"metadata": {"name": name}, "spec": spec})
    root = Store.from_uri(f"file://{work}/store")
    out = {}
    for round, phase in run.spec.phase_plan():
        if phases is None or phase in phases:
            callback = None if step_callback is None else (lambda t, s, r=round: step_callback(t, s, r))
            result = execute_phase(run, root, round, phase, cache_dir=work / "cache", step_callback=callback)
            out[(round, phase)] = result.manifest.metrics
    return out


def train_base(setting: Setting, data: dict[str, str], seed: int, work: Path) -> dict[str, Any]:
    """SFT policy and fixed RM of one seed (directories, and the RM's held-out human accuracy)."""
    name = f"base-{seed}"
    metrics = execute(spec_for(setting, data, seed), name, work, {"sft", "reward"})
    return {"policy": str(output_dir(work, name, 0, "sft") / POLICY_DIR),
            "reward_model": str(output_dir(work, name, 0, "reward") / RM_DIR),
            "rm_accuracy_held_out": metrics[(0, "reward")]["rm_accuracy_held_out"]}


# --- probes ------------------------------------------------------------------------------------------
def sample_probe(policy, tokenizer, prompts: list[str], k: int, seed: int):
    """k samples per probe prompt: (rollout, prompts as sampled, decoded responses)."""
    torch.manual_seed(10_000 + seed)
    repeated = [p for p in prompts for _ in range(k)]
    rollout = sample_responses(policy, tokenizer, repeated, max_new_tokens=MAX_NEW_TOKENS)
    return rollout, repeated, decode_responses(tokenizer, rollout)


def as_samples(prompts: list[str], responses: list[str], k: int) -> list[Sample]:
    return [Sample(prompt_id=str(i // k), prompt=p, response=r, sample_index=i % k, logprob=0.0, num_tokens=0,
                   finished=True) for i, (p, r) in enumerate(zip(prompts, responses))]


def rm_scores(rm, tokenizer, rollout) -> torch.Tensor:
    with torch.no_grad():
        return reward_scores(rm, rollout.sequences, rollout.attention_mask)


def pairwise_accuracy(scores: list[float], prompts: list[str], responses: list[str], gold, k: int) -> float:
    """Share of the pairs of one prompt's samples that the gold judge orders (ties dropped) and the scores
    order the same way; ties in score count half."""
    right = total = 0.0
    for start in range(0, len(prompts), k):
        for i in range(start, start + k):
            for j in range(i + 1, start + k):
                gi, gj = gold(prompts[i], responses[i]), gold(prompts[j], responses[j])
                if gi == gj:
                    continue
                si, sj = scores[i], scores[j]
                right += 0.5 if si == sj else float((si > sj) == (gi > gj))
                total += 1
    return right / total if total else math.nan


@torch.no_grad()
def probe_point(policy, reference, tokenizer, rm, prompts: list[str], k: int, seed: int, task: ArithTask) -> dict:
    """Gold, KL to the reference, hack rate and RM accuracy of a policy on the probe prompts."""
    was_training = policy.training
    policy.eval()
    rollout, repeated, responses = sample_probe(policy, tokenizer, prompts, k, seed)
    mask = rollout.response_mask
    ref, _ = response_logprobs(reference, rollout.sequences, rollout.attention_mask, rollout.prompt_len, 1.0,
                               suppressed_token_ids(tokenizer))
    kl = ((rollout.logprobs - ref) * mask).sum(1).mean().item()
    gold = [task.gold_score(p, r) for p, r in zip(repeated, responses)]
    point = {"gold": statistics.fmean(gold), "kl": kl, "hack_rate": statistics.fmean(not task.parses(r) for r in responses)}
    if rm is not None:
        point["rm_accuracy"] = pairwise_accuracy(rm_scores(rm, tokenizer, rollout).tolist(), repeated, responses, task.gold_score, k)
    policy.train(was_training)
    return point


class CurveRecorder:
    """Step callback of the optimize phase: a probe point every `every` steps (global over rounds)."""

    def __init__(self, setting: Setting, base: dict[str, Any], probe_prompts: list[str], seed: int,
                 steps_per_round: int, work: Path, name: str):
        self.setting, self.prompts, self.seed, self.per_round = setting, probe_prompts, seed, steps_per_round
        self.reference = load_policy(Path(base["policy"])).eval()
        self.task = task_of(setting)
        self.work, self.name, self.curve = work, name, []
        self.base_rm = Path(base["reward_model"])
        self._rm_round, self._rm = None, None

    def rm_for(self, trainer, round: int):
        """The RM this optimize phase scores with (None when the reward is the judge)."""
        if trainer.config.reward == "judge":
            return None
        if self._rm_round != round:
            phase = next((p for p in ("synthesize", "refine") if (output_dir(self.work, self.name, round, p) / RM_DIR).exists()),
                         None)
            path = output_dir(self.work, self.name, round, phase) / RM_DIR if phase else self.base_rm
            self._rm, self._rm_round = load_reward_model(path).eval(), round
        return self._rm

    def __call__(self, trainer, stats: dict[str, float], round: int) -> None:
        step = (round - 1) * self.per_round + int(stats["step"])
        if step % self.setting.probe_every and stats["step"] != trainer.config.steps:
            return
        point = probe_point(trainer.policy, self.reference, trainer.tokenizer, self.rm_for(trainer, round),
                            self.prompts, self.setting.probe_samples, self.seed + step, self.task)
        self.curve.append({"step": step, "round": round, "proxy_reward": stats["reward_mean"],
                           "rollout_gold": stats.get("gold_mean"), **point})


def best_of_n(setting: Setting, base: dict[str, Any], prompts: list[str], seed: int) -> list[dict[str, float]]:
    """Gold score of best-of-n from the SFT policy, picked by the proxy RM and by the gold judge."""
    task = task_of(setting)
    tokenizer, policy = load_tokenizer(Path(base["policy"])), load_policy(Path(base["policy"])).eval()
    rm = load_reward_model(Path(base["reward_model"])).eval()
    n_max = max(setting.best_of)
    rollout, repeated, responses = sample_probe(policy, tokenizer, prompts, n_max, seed)
    proxy = rm_scores(rm, tokenizer, rollout).tolist()
    gold = [task.gold_score(p, r) for p, r in zip(repeated, responses)]
    out = []
    for n in setting.best_of:
        picked = {"proxy": [], "gold": []}
        for start in range(0, len(gold), n):  # disjoint groups of n samples of one prompt (n divides n_max)
            group = range(start, start + n)
            picked["proxy"].append(gold[max(group, key=lambda i: proxy[i])])
            picked["gold"].append(max(gold[i] for i in group))
        out.append({"n": n, "kl": math.log(n) - (n - 1) / n,
                    "gold_by_proxy": statistics.fmean(picked["proxy"]), "gold_by_gold": statistics.fmean(picked["gold"])})
    return out


# --- one seed ----------------------------------------------------------------------------------------
def run_seed(setting: Setting, seed: int, work: Path, threads: int) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    work = work / f"seed-{seed}"
    data = write_data(setting, work / "data")
    probe_prompts = read_prompts(data["probe"])
    base = train_base(setting, data, seed, work)
    task = task_of(setting)
    sft_tok, sft = load_tokenizer(Path(base["policy"])), load_policy(Path(base["policy"])).eval()
    fixed_rm = load_reward_model(Path(base["reward_model"])).eval()
    start = probe_point(sft, sft, sft_tok, fixed_rm, probe_prompts, setting.probe_samples, seed, task)
    rows = [{"label": "SFT", "seed": seed, "win_rate": 0.5, "gold_mean": None, "start": start,
             "rm_accuracy_held_out": base["rm_accuracy_held_out"], "best_of_n": best_of_n(setting, base, probe_prompts, seed)}]
    for label, strategy, optimization, rounds, spg in methods(setting):
        print(f"[bench] seed {seed}: {label}", flush=True)
        t0 = time.perf_counter()
        name = f"m{len(rows)}-{seed}"
        spec = spec_for(setting, data, seed, strategy, optimization, rounds, base, spg)
        recorder = CurveRecorder(setting, base, probe_prompts, seed, spec["optimization"]["steps"], work, name)
        metrics = execute(spec, name, work, step_callback=recorder)
        ev = metrics[(rounds, "evaluate")]
        learned = [metrics.get((r, "synthesize")) or metrics.get((r, "refine")) or {} for r in range(1, rounds + 1)]
        rows.append({
            "label": label, "seed": seed, "strategy": strategy, "rounds": rounds, **optimization, "spg": spg,
            "seconds": time.perf_counter() - t0, "win_rate": ev["win_rate"], "gold_mean": ev["policy_score_mean"],
            "sft_gold_mean": ev["baseline_score_mean"], "curve": [{"step": 0, "round": 1, **start}] + recorder.curve,
            "reward_learning": [{k: v for k, v in m.items() if not isinstance(v, (dict, list))} for m in learned if m],
        })
        rows[0]["gold_mean"] = ev["baseline_score_mean"]
    return rows


# --- statistics and report ---------------------------------------------------------------------------
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds (a single value has no interval: nan)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan, math.nan
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan, math.nan
    half = _T975[min(len(values) - 2, len(_T975) - 1)] * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def fmt(mci: tuple[float, float, float], digits: int = 3) -> str:
    m, lo, hi = mci
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" if math.isnan(lo) else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def curve_summary(curve: list[dict]) -> dict[str, float]:
    """Peak gold along the curve, the KL where it peaked, final gold/KL/hack rate, min RM accuracy."""
    peak = max(curve, key=lambda c: c["gold"])
    accs = [c["rm_accuracy"] for c in curve if "rm_accuracy" in c and not math.isnan(c["rm_accuracy"])]
    return {"peak_gold": peak["gold"], "peak_kl": peak["kl"], "final_gold": curve[-1]["gold"], "final_kl": curve[-1]["kl"],
            "final_hack": curve[-1]["hack_rate"], "rm_acc_start": accs[0] if accs else math.nan,
            "rm_acc_final": accs[-1] if accs else math.nan}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    table = []
    for label in labels:
        rs = [r for r in rows if r["label"] == label]
        if label == "SFT":
            curves = [[r["start"]] for r in rs]
        else:
            curves = [r["curve"] for r in rs]
        summaries = [curve_summary(c) for c in curves]
        entry = {"label": label, "seeds": len(rs), "win_rate": mean_ci([r["win_rate"] for r in rs]),
                 "eval_gold": mean_ci([r["gold_mean"] for r in rs])}
        for key in ("peak_gold", "peak_kl", "final_gold", "final_kl", "final_hack", "rm_acc_start", "rm_acc_final"):
            entry[key] = mean_ci([s[key] for s in summaries])
        def pairs_gold_accuracy(row):  # mean over the row's rounds
            accs = [m.get("synthetic_pairs_gold_accuracy", m.get("self_labelled_pairs_gold_accuracy"))
                    for m in row.get("reward_learning", [])]
            accs = [a for a in accs if a is not None]
            return statistics.fmean(accs) if accs else None

        entry["pairs_gold_acc"] = mean_ci([pairs_gold_accuracy(r) for r in rs])
        table.append(entry)
    return table


def paired(rows: list[dict[str, Any]], label: str, reference: str, key) -> tuple[float, float, float]:
    """Mean per-seed difference label − reference of key(row), with its 95% t-interval."""
    by = {(r["label"], r["seed"]): r for r in rows}
    diffs = [key(by[(label, s)]) - key(by[(reference, s)]) for (lab, s) in by if lab == label and (reference, s) in by]
    return mean_ci(diffs)


def findings(rows: list[dict[str, Any]], setting: Setting) -> list[str]:
    reference = FIXED.format(setting.kl_coef)
    out = []

    def peak(r):
        return curve_summary(r["curve"])["peak_gold"]

    def final(r):
        return curve_summary(r["curve"])["final_gold"]

    for label in dict.fromkeys(r["label"] for r in rows):
        if label in ("SFT", reference):
            continue
        for what, key in (("peak gold", peak), ("final gold", final), ("eval win-rate vs SFT", lambda r: r["win_rate"])):
            m, lo, hi = paired(rows, label, reference, key)
            if math.isnan(m):
                continue
            verdict = ("one seed: no interval" if math.isnan(lo) else "better" if lo > 0 else "worse" if hi < 0
                       else "no measurable difference")
            out.append(f"- {label} − {reference}, {what}: {fmt((m, lo, hi))} ({verdict}).")
    sft = {r["seed"]: r for r in rows if r["label"] == "SFT"}
    for label in dict.fromkeys(r["label"] for r in rows):
        if label == "SFT":
            continue
        diffs = [r["gold_mean"] - sft[r["seed"]]["gold_mean"] for r in rows if r["label"] == label and r["seed"] in sft]
        out.append(f"- {label} − SFT, eval gold score: {fmt(mean_ci(diffs))}.")
    return out


def plot(rows: list[dict[str, Any]], table: list[dict[str, Any]], path: Path, setting: Setting) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_step, ax_acc) = plt.subplots(1, 3, figsize=(19, 5.5))
    sft = [r for r in rows if r["label"] == "SFT"]
    for key, style, name in (("gold_by_gold", "k--", "best-of-n, gold picks"), ("gold_by_proxy", "k:", "best-of-n, proxy RM picks")):
        ns = [b["n"] for b in sft[0]["best_of_n"]]
        ys = [statistics.fmean(r["best_of_n"][i][key] for r in sft) for i in range(len(ns))]
        ax_kl.plot([sft[0]["best_of_n"][i]["kl"] for i in range(len(ns))], ys, style, marker="o", ms=3, label=name)
    colors = plt.cm.tab20.colors
    for index, label in enumerate([t["label"] for t in table if t["label"] != "SFT"]):
        curves = [r["curve"] for r in rows if r["label"] == label]
        points = min(len(c) for c in curves)
        kl = [statistics.fmean(c[i]["kl"] for c in curves) for i in range(points)]
        gold = [statistics.fmean(c[i]["gold"] for c in curves) for i in range(points)]
        steps = [curves[0][i]["step"] for i in range(points)]
        line = ax_kl.plot(kl, gold, marker="o", ms=3, color=colors[(2 * index) % 20 + (2 * index) // 20], label=label)[0]
        ax_step.plot(steps, gold, marker="o", ms=3, color=line.get_color(), label=label)
        accs = [[c[i].get("rm_accuracy", math.nan) for c in curves] for i in range(points)]
        acc = [statistics.fmean(a) if not any(math.isnan(x) for x in a) else math.nan for a in accs]
        if not all(math.isnan(a) for a in acc):
            ax_acc.plot(steps, acc, marker="o", ms=3, color=line.get_color(), label=label)
    ax_kl.set(title="gold score vs KL to SFT (held-out probe prompts)", xlabel="KL(π ‖ π_SFT), nats per response",
              ylabel="gold score")
    ax_step.set(title="gold score vs optimisation step", xlabel="step")
    ax_acc.set(title="RM accuracy on gold-labelled pairs of the current policy's samples", xlabel="step")
    for ax in (ax_kl, ax_step, ax_acc):
        ax.grid(alpha=0.3)
    ax_kl.legend(fontsize=7)
    fig.suptitle(f"reward-learning benchmark '{setting.name}': mean over {len(sft)} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_markdown(setting: Setting, table: list[dict[str, Any]], rows: list[dict[str, Any]], minutes: float,
                    notes: str = "") -> str:
    sft = [r for r in rows if r["label"] == "SFT"]
    lines = [
        "# Reward-learning benchmark: gold score against KL (built-in addition task)", "",
        f"Produced by `uv run python -m bench.reward_learning --setting {setting.name} --jobs 2 --notes "
        f"docs/bench/reward-learning-notes.md` ({minutes:.0f} min on this machine's 2 CPU cores; `--from-json` redraws "
        "the report from the saved results). Every number below was measured by that command; the closing analysis "
        "is written by hand in docs/bench/reward-learning-notes.md. `bench/reward_learning.py` has the set-up. "
        "Evaluation and probe prompts are operand pairs that no preference pair and no RL prompt uses.", "",
        "## Setting", "", "```json", json.dumps(asdict(setting)), "```", "",
        "## Results", "",
        "Mean over seeds with a 95% t-interval over seeds. *peak / final gold*: the policy's gold score on the "
        "held-out probe prompts at the best probe point of its curve and at its end; *KL*: to the SFT policy "
        "(nats per response); *hack*: share of responses the judge cannot read; *RM acc.*: accuracy of the RM "
        "being optimised on gold-labelled pairs of the current policy's probe samples, at the start and the end; "
        "*win-rate*: the evaluate phase's gold win-rate against SFT (held-out eval prompts, ties ½); *pairs gold "
        "acc.*: share of synthetic (SPG) / self-labelled (SER) pairs the gold judge agrees with.", "",
        "| method | peak gold | KL at peak | final gold | final KL | final hack | RM acc. start → end | win-rate vs SFT | pairs gold acc. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(f"| {t['label']} | {fmt(t['peak_gold'])} | {fmt(t['peak_kl'], 2)} | {fmt(t['final_gold'])} | "
                     f"{fmt(t['final_kl'], 2)} | {fmt(t['final_hack'], 2)} | {fmt(t['rm_acc_start'], 2)} → "
                     f"{fmt(t['rm_acc_final'], 2)} | {fmt(t['win_rate'])} | {fmt(t['pairs_gold_acc'], 2)} |")
    lines += ["", "Best-of-n from the SFT policy (probe prompts; KL = log n − (n−1)/n):", "",
              "| n | KL | gold, proxy RM picks | gold, gold judge picks |", "|---|---|---|---|"]
    for i, b in enumerate(sft[0]["best_of_n"]):
        lines.append(f"| {b['n']} | {b['kl']:.2f} | {fmt(mean_ci([r['best_of_n'][i]['gold_by_proxy'] for r in sft]))} | "
                     f"{fmt(mean_ci([r['best_of_n'][i]['gold_by_gold'] for r in sft]))} |")
    lines += ["", "![gold vs KL, gold vs step, RM accuracy on the policy's samples](reward-learning.png)", "",
              "## Paired differences", "",
              f"Per seed (every method of a seed shares its SFT policy and fixed RM), against {FIXED.format(setting.kl_coef)}, "
              "then against SFT:", ""]
    lines += findings(rows, setting)
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def dump(rows: list[dict[str, Any]], setting: Setting, out: Path, minutes: float, suffix: str = "",
         notes: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"reward-learning{suffix}"
    (out / f"{stem}.json").write_text(json.dumps({"setting": asdict(setting), "minutes": minutes, "rows": rows}, indent=1))
    table = summarize(rows)
    plot(rows, table, out / f"{stem}.png", setting)
    text = report_markdown(setting, table, rows, minutes, notes.read_text() if notes and notes.exists() else "")
    (out / f"{stem}.md").write_text(text.replace("reward-learning.png", f"{stem}.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="headline")
    parser.add_argument("--seeds", type=int, help="override the setting's number of seeds")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (1 thread each when > 1)")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    parser.add_argument("--suffix", default="", help="report file name suffix, e.g. -small-rm")
    parser.add_argument("--from-json", type=Path, help="only redraw the report from a results JSON")
    parser.add_argument("--notes", type=Path, help="a hand-written analysis of the run, appended to the report")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        setting = Setting(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["setting"].items()})
        dump(saved["rows"], setting, args.out, saved["minutes"], args.suffix, args.notes)
        return 0
    setting = SETTINGS[args.setting]
    if args.seeds:
        setting = replace(setting, seeds=args.seeds)
    t0 = time.perf_counter()
    work = args.work / setting.name
    rows: list[dict[str, Any]] = []
    threads = 1 if args.jobs > 1 else max(1, torch.get_num_threads())
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for seed_rows in pool.map(run_seed, [setting] * setting.seeds, range(setting.seeds), [work] * setting.seeds,
                                  [threads] * setting.seeds):
            rows += seed_rows
            dump(rows, setting, args.out, (time.perf_counter() - t0) / 60, args.suffix)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
