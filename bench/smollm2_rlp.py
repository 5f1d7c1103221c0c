"""Does RLP beat the fixed reward model on a real pretrained model? SmolLM2-135M-Instruct on reasoning-gym's
basic_arithmetic, every arm through the product's own phases (`execute_phase`, as `rlp run`).

    uv run --all-extras --group bench python -m bench.smollm2_rlp --jobs 2   # docs/bench/smollm2-rlp.{md,json,png}

Per seed, shared by every arm of that seed (`seed_base`):
- the start model: SmolLM2-135M-Instruct (`packaged://smollm2`), the same for every seed;
- the "human" pairs: two of the start model's own samples per preference prompt, labelled by the gold judge
  with 20% of the labels flipped, ties dropped (`rlp_core.policy_preferences`, seeded), as AlpacaFarm's
  simulated annotators label the SFT policy's samples;
- the fixed RM: the reward phase once, on those pairs; every arm names it in `rewardModel.model`;
- the start model's probe (its answers are measured once, not once per arm).

Arms (`ARMS`): PPO against the fixed RM (strategy none); + RLP-SPG with answer equivalence; + RLP-UML; + both;
+ SER; PPO against the gold judge (ceiling); and RLP-SPG over several rounds (the RM refreshed on the current
policy's samples before each), with the same total steps; and the control for SPG's retraining: the same
synthesize phase with its synthetic pairs weighted 1e-6, so the fixed RM is retrained for the same steps at the
same learning rate on the human pairs alone. `--merge` adds arms to an earlier run's results, after checking that
each seed's shared parts came out identical.

Probes, every `probe_every` steps, on the held-out evaluation questions (reasoning-gym reserves them from every
training split): greedy accuracy, sampled accuracy (k answers per question at the run's temperature), KL to the
start model on those samples (Σ over response tokens of log π − log π_start, at that temperature), and the
accuracy of the RM being optimised on gold-labelled pairs of those samples (ties dropped). Differences against
the fixed RM are paired (same seed, same question) and their intervals a bootstrap over seeds and questions;
at the end and at matched KL (each arm's curve interpolated at the fixed RM's final KL of that seed).
Settings are the example's and were not chosen on the evaluation questions.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.reward_learning import fmt, mean_ci, output_dir, pairwise_accuracy
from rlp_core.data import Prompt, load_records
from rlp_core.judges import programmatic_judge
from rlp_core.models import load_policy, load_reward_model, load_tokenizer, response_logprobs, reward_scores
from rlp_core.models import suppressed_token_ids
from rlp_core.pipeline import RM_DIR, execute_phase
from rlp_core.policy_preferences import Labelling, policy_preferences
from rlp_core.pretrained import fetch_model
from rlp_core.sampling import decode_responses, sample_responses
from rlp_core.spec import parse_run
from rlp_core.store import Store

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "smollm2-arith.yaml"
TASK = "min_terms=2&max_terms=2&min_digits=1&max_digits=1&operators=+,-&allow_parentheses=false&allow_negation=false"


@dataclass(frozen=True)
class Setting:
    name: str
    seeds: int = 3
    preference_prompts: int = 192
    preference_samples: int = 4
    flip: float = 0.2
    rl_prompts: int = 128
    eval_questions: int = 64
    probe_samples: int = 4
    steps: int = 8
    probe_every: int = 4
    rounds: int = 2  # of the iterative arm; `steps` split over them
    generate_prompts: int = 32  # per round, for SPG / UML / SER
    generate_samples: int = 8
    rm_epochs: float = 2


SETTINGS = {"headline": Setting("headline"),
            "tiny": Setting("tiny", seeds=1, preference_prompts=24, rl_prompts=16, eval_questions=8, steps=2,
                            probe_every=1, generate_prompts=4, generate_samples=4, rm_epochs=1)}

# SPG chosen a priori (not tuned on anything): the most confident half of the prompts, two pairs each,
# synthetic pairs weighted 2x so the few dozen of them are not drowned by ~130 human ones.
SPG = {"equivalence": "answer", "keepFraction": 0.5, "pairsPerPrompt": 2, "syntheticWeight": 2.0}
FIXED = "PPO, fixed RM"
CONTROL = "PPO, fixed RM retrained on human pairs only (control)"
ARMS: dict[str, dict[str, Any]] = {
    FIXED: {"strategy": "none"},
    "PPO + RLP-SPG (answer)": {"strategy": "rlp-spg"},
    "PPO + RLP-UML": {"strategy": "rlp-uml"},
    "PPO + RLP (UML+SPG)": {"strategy": "rlp"},
    "PPO + SER": {"strategy": "ser"},
    "PPO, gold reward (ceiling)": {"strategy": "none", "reward": "judge"},
    "PPO + RLP-SPG, rounds": {"strategy": "rlp-spg", "rounds": True},
    # SPG's synthesize phase with its pairs silenced (the loss is Σ w·ℓ / Σ w per batch, so weight 1e-6 leaves
    # the human pairs alone): the same retraining of the fixed RM, steps and learning rate, without what SPG adds.
    CONTROL: {"strategy": "rlp-spg", "spg": {"syntheticWeight": 1e-6}},
}


def uri(split: str, n: int, seed: int | None = None) -> str:
    return (f"reasoning-gym://basic_arithmetic/{split}?n={n}" + (f"&seed={seed}" if seed is not None else "")
            + f"&{TASK}")


JUDGE = f"reasoning-gym://basic_arithmetic?answer=last-number&{TASK}"


# --- specs ---------------------------------------------------------------------------------------------
def base_spec(setting: Setting, work: Path, seed: int) -> dict[str, Any]:
    """The example's run with this seed's pairs and the benchmark's sizes."""
    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
    spec["seed"] = seed
    spec["policy"]["systemPrompt"] = ""  # SmolLM2's default system block is ~20 of a prompt's ~44 tokens
    # the reward model and PPO as docs/bench/smollm2-rlp.md measured them (the example has since moved to a LoRA RM
    # and gradient checkpointing for a laptop's memory)
    spec["rewardModel"].pop("lora", None)
    spec["rewardModel"]["training"]["learningRate"] = 5e-5
    spec["optimization"]["gradientCheckpointing"] = False
    spec["storage"] = {"uri": f"file://{work / 'store'}"}
    spec["rewardModel"]["humanPreferences"] = f"file://{pairs_path(work, seed)}"
    spec["rewardModel"]["training"]["epochs"] = setting.rm_epochs
    spec["prompts"] = uri("prompts", setting.rl_prompts)
    spec["generation"] |= {"samplesPerPrompt": setting.generate_samples, "maxPrompts": setting.generate_prompts,
                           "batchSize": 64}
    spec["optimization"] |= {"steps": setting.steps, "checkpointEvery": 1000}
    spec["evaluation"] |= {"prompts": uri("eval", setting.eval_questions), "judge": JUDGE}
    return spec


def arm_spec(setting: Setting, work: Path, seed: int, arm: str) -> dict[str, Any]:
    """One arm's spec: the seed's base with the fixed RM named and the arm's strategy and reward."""
    choice = ARMS[arm]
    spec = base_spec(setting, work, seed)
    spec["rewardModel"]["model"] = f"file://{fixed_rm_dir(work, seed)}"
    rounds = setting.rounds if choice.get("rounds") else 1
    spec["rounds"] = rounds
    spec["optimization"]["steps"] = setting.steps // rounds
    spec["optimization"]["reward"] = choice.get("reward", "reward-model")
    spec["rewardLearning"] = {"strategy": choice["strategy"], "spg": SPG | choice.get("spg", {})}
    return spec


def pairs_path(work: Path, seed: int) -> Path:
    return work / f"seed-{seed}" / "human-pairs.jsonl"


def run_name(seed: int, arm: str | None = None) -> str:
    return f"base-{seed}" if arm is None else f"arm{list(ARMS).index(arm)}-{seed}"


def fixed_rm_dir(work: Path, seed: int) -> Path:
    return output_dir(work, run_name(seed), 0, "reward") / RM_DIR


# --- probes --------------------------------------------------------------------------------------------
class Prober:
    """Held-out accuracy (greedy, sampled), KL to the start model and an RM's accuracy on the policy's samples."""

    def __init__(self, setting: Setting, seed: int):
        spec = parse_run({"metadata": {"name": "probe"}, "spec": base_spec(setting, Path("/nonexistent"), seed)}).spec
        self.questions = [p.prompt for p in load_records(spec.evaluation.prompts, Prompt)]  # registers the gold entries
        self.judge = programmatic_judge(JUDGE)
        self.k, self.seed = setting.probe_samples, seed
        self.temperature, self.max_new_tokens = spec.evaluation.temperature, spec.evaluation.max_new_tokens
        self.start = load_policy(fetch_model("smollm2")).eval()

    def right(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(self.judge(p, r) == 1.0) for p, r in zip(prompts, responses)]

    @torch.no_grad()
    def __call__(self, policy, tokenizer, rm, step: int) -> dict[str, Any]:
        was_training = policy.training
        policy.eval()
        greedy = sample_responses(policy, tokenizer, self.questions, max_new_tokens=self.max_new_tokens,
                                  do_sample=False)
        greedy_right = self.right(self.questions, decode_responses(tokenizer, greedy))
        torch.manual_seed(10_000 * self.seed + step)
        asked = [q for q in self.questions for _ in range(self.k)]
        responses, kls, scores = [], [], []
        for i in range(0, len(asked), 64):
            roll = sample_responses(policy, tokenizer, asked[i : i + 64], max_new_tokens=self.max_new_tokens,
                                    temperature=self.temperature)
            ref, _ = response_logprobs(self.start, roll.sequences, roll.attention_mask, roll.prompt_len,
                                       self.temperature, suppressed_token_ids(tokenizer))
            kls += ((roll.logprobs - ref) * roll.response_mask).sum(1).tolist()
            responses += decode_responses(tokenizer, roll)
            if rm is not None:
                scores += reward_scores(rm, roll.sequences, roll.attention_mask).tolist()
        policy.train(was_training)
        sampled = self.right(asked, responses)
        point = {"step": step, "kl": statistics.fmean(kls), "greedy": greedy_right,
                 "sampled": [statistics.fmean(sampled[i : i + self.k]) for i in range(0, len(sampled), self.k)]}
        if rm is not None:
            point["rm_accuracy"] = pairwise_accuracy(scores, asked, responses, self.judge, self.k)
            point["best_of_k_by_rm"] = [sampled[max(range(i, i + self.k), key=lambda j: scores[j])]
                                        for i in range(0, len(sampled), self.k)]
        return point


class CurveRecorder:
    """Step callback of the optimize phase: a probe every `probe_every` steps (counted over rounds)."""

    def __init__(self, prober: Prober, setting: Setting, work: Path, name: str, seed: int, steps_per_round: int):
        self.prober, self.every, self.per_round = prober, setting.probe_every, steps_per_round
        self.work, self.name, self.fixed = work, name, fixed_rm_dir(work, seed)
        self.curve: list[dict[str, Any]] = []
        self._rm: tuple[int, Any] | None = None

    def rm_for(self, round: int):
        """The RM this round optimises (the latest synthesize / refine output, else the fixed one); for the
        gold-reward arm the fixed RM, which it does not optimise, so its accuracy is still measured."""
        if self._rm is None or self._rm[0] != round:
            phase = next((p for p in ("synthesize", "refine")
                          if (output_dir(self.work, self.name, round, p) / RM_DIR).exists()), None)
            path = output_dir(self.work, self.name, round, phase) / RM_DIR if phase else self.fixed
            self._rm = (round, load_reward_model(path).eval())
        return self._rm[1]

    def __call__(self, trainer, stats: dict[str, float], round: int) -> None:
        step = (round - 1) * self.per_round + int(stats["step"])
        if step % self.every and stats["step"] != trainer.config.steps:
            return
        point = self.prober(trainer.policy, trainer.tokenizer, self.rm_for(round), step)
        self.curve.append({**point, "round": round, "proxy_reward": stats["reward_mean"],
                           "rollout_gold": stats.get("gold_mean")})


# --- one seed's shared parts, one arm --------------------------------------------------------------------
def execute(spec: dict[str, Any], name: str, work: Path, phases: set[str], step_callback=None) -> dict[str, Any]:
    """Run the named phases of the plan in order: each one's metrics and wall time."""
    run = parse_run({"metadata": {"name": name}, "spec": spec})
    root = Store.from_uri(f"file://{work}/store")
    out = {}
    for round, phase in run.spec.phase_plan():
        if phase in phases:
            callback = None if step_callback is None else (lambda t, s, r=round: step_callback(t, s, r))
            result = execute_phase(run, root, round, phase, cache_dir=work / "cache", step_callback=callback)
            out[f"{round}/{phase}"] = {"state": result.state, "seconds": result.seconds,
                                       "metrics": result.manifest.metrics if result.manifest else {}}
    return out


def seed_base(setting: Setting, work: Path, seed: int, threads: int) -> dict[str, Any]:
    """Human pairs on the start model's samples, the fixed RM, the start model's probe."""
    record = work / f"seed-{seed}" / "base.json"
    if record.exists():
        return json.loads(record.read_text())
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    spec = base_spec(setting, work, seed)
    start_dir = fetch_model("smollm2")
    tokenizer = load_tokenizer(start_dir, spec["policy"]["chatTemplate"], spec["policy"]["systemPrompt"])
    prompts = [p.prompt for p in load_records(uri("prompts", setting.preference_prompts, 1000 + seed), Prompt)]
    labelling = Labelling(samples_per_prompt=setting.preference_samples, flip=setting.flip, seed=seed,
                          temperature=spec["generation"]["temperature"], max_new_tokens=spec["generation"]["maxNewTokens"])
    pairs = policy_preferences(start_dir, tokenizer, prompts, programmatic_judge(JUDGE), labelling)
    path = pairs_path(work, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p.model_dump_json() + "\n" for p in pairs))
    pairs_seconds = time.perf_counter() - t0
    phases = execute(spec, run_name(seed), work, {"reward"})
    prober = Prober(setting, seed)
    t1 = time.perf_counter()
    start = prober(prober.start, tokenizer, load_reward_model(fixed_rm_dir(work, seed)).eval(), 0)
    base = {"seed": seed, "pairs": len(pairs), "preference_prompts": len(prompts), "pairs_seconds": pairs_seconds,
            "phases": phases, "start": start, "probe_seconds": time.perf_counter() - t1,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    record.write_text(json.dumps(base))
    return base


def run_arm(setting: Setting, work: Path, seed: int, arm: str, threads: int) -> dict[str, Any]:
    record = work / f"seed-{seed}" / f"{run_name(seed, arm)}.json"
    if record.exists():
        return json.loads(record.read_text())
    torch.set_num_threads(threads)
    base = json.loads((work / f"seed-{seed}" / "base.json").read_text())
    spec = arm_spec(setting, work, seed, arm)
    name = run_name(seed, arm)
    recorder = CurveRecorder(Prober(setting, seed), setting, work, name, seed, spec["optimization"]["steps"])
    needs_samples = spec["rewardLearning"]["strategy"] != "none"
    phases = {"optimize"} | ({"generate", "refine", "synthesize"} if needs_samples else set())
    t0 = time.perf_counter()
    ran = execute(spec, name, work, phases, step_callback=recorder)
    row = {"arm": arm, "seed": seed, "seconds": time.perf_counter() - t0, "phases": ran,
           "curve": [base["start"]] + recorder.curve,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    record.write_text(json.dumps(row))
    return row


# --- statistics ------------------------------------------------------------------------------------------
def at_kl(curve: list[dict[str, Any]], target: float, key: str) -> tuple[list[float], bool]:
    """Per-question `key` interpolated linearly in KL at `target` along the curve (first crossing); the last
    point, flagged False, when the curve never reaches it."""
    for a, b in zip(curve, curve[1:]):
        if a["kl"] <= target <= b["kl"] or a["kl"] >= target >= b["kl"]:
            w = 0.0 if b["kl"] == a["kl"] else (target - a["kl"]) / (b["kl"] - a["kl"])
            return [(1 - w) * x + w * y for x, y in zip(a[key], b[key])], True
    return curve[-1][key], False


def bootstrap(diffs: list[list[float]], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-(seed, question) differences, with a 95% percentile interval resampling seeds, then the
    questions within each drawn seed (the same questions for both arms: paired)."""
    rng = random.Random(seed)
    mean = statistics.fmean(d for row in diffs for d in row)
    stats = []
    for _ in range(reps):
        drawn = [diffs[rng.randrange(len(diffs))] for _ in diffs]
        stats.append(statistics.fmean(row[rng.randrange(len(row))] for row in drawn for _ in row))
    stats.sort()
    return mean, stats[int(0.025 * reps)], stats[int(0.975 * reps) - 1]


def comparisons(rows: list[dict[str, Any]], baseline: str = FIXED, arms: list[str] | None = None) -> list[dict[str, Any]]:
    """Every arm (or `arms`) against `baseline` on the same seed: at the end (greedy, sampled) and at the
    baseline's final KL."""
    by = {(r["arm"], r["seed"]): r for r in rows}
    out = []
    for arm in arms or ARMS:
        if arm == baseline:
            continue
        seeds = sorted(s for (a, s) in by if a == arm and (baseline, s) in by)
        if not seeds:
            continue
        entry: dict[str, Any] = {"arm": arm, "seeds": len(seeds)}
        for key in ("greedy", "sampled"):
            entry[f"final_{key}"] = bootstrap([[x - y for x, y in zip(by[(arm, s)]["curve"][-1][key],
                                                                        by[(baseline, s)]["curve"][-1][key])]
                                               for s in seeds])
        matched, reached = [], []
        for s in seeds:
            fixed_curve = by[(baseline, s)]["curve"]
            values, ok = at_kl(by[(arm, s)]["curve"], fixed_curve[-1]["kl"], "sampled")
            matched.append([x - y for x, y in zip(values, fixed_curve[-1]["sampled"])])
            reached.append(ok)
        entry["matched_kl_sampled"] = bootstrap(matched)
        entry["matched_kl_reached"] = sum(reached)
        out.append(entry)
    return out


def summary(rows: list[dict[str, Any]], bases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = [{"arm": "SmolLM2-135M-Instruct (start)", "seeds": len(bases),
              "greedy": mean_ci([statistics.fmean(b["start"]["greedy"]) for b in bases]),
              "sampled": mean_ci([statistics.fmean(b["start"]["sampled"]) for b in bases]),
              "kl": (0.0, math.nan, math.nan),
              "rm_start": mean_ci([b["start"]["rm_accuracy"] for b in bases]), "rm_end": (math.nan,) * 3,
              "best_of_k": mean_ci([statistics.fmean(b["start"]["best_of_k_by_rm"]) for b in bases])}]
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue
        ends = [r["curve"][-1] for r in rs]
        table.append({"arm": arm, "seeds": len(rs), "greedy": mean_ci([statistics.fmean(e["greedy"]) for e in ends]),
                      "sampled": mean_ci([statistics.fmean(e["sampled"]) for e in ends]),
                      "kl": mean_ci([e["kl"] for e in ends]),
                      "rm_start": mean_ci([r["curve"][1].get("rm_accuracy", math.nan) for r in rs]),
                      "rm_end": mean_ci([e.get("rm_accuracy", math.nan) for e in ends]),
                      "best_of_k": mean_ci([statistics.fmean(e.get("best_of_k_by_rm", [math.nan])) for e in ends])})
    return table


# --- report --------------------------------------------------------------------------------------------
def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    for arm in ARMS:
        curves = [r["curve"] for r in rows if r["arm"] == arm]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = lambda f: [statistics.fmean(f(c[i]) for c in curves) for i in range(n)]  # noqa: E731
        steps = [curves[0][i]["step"] for i in range(n)]
        kl, sampled = mean(lambda p: p["kl"]), mean(lambda p: statistics.fmean(p["sampled"]))
        line = axes[0].plot(kl, sampled, marker="o", ms=3, label=arm)[0]
        axes[1].plot(steps, mean(lambda p: statistics.fmean(p["greedy"])), marker="o", ms=3, color=line.get_color())
        acc = mean(lambda p: p.get("rm_accuracy", math.nan))
        axes[2].plot(steps, acc, marker="o", ms=3, color=line.get_color())
    axes[0].set(title="sampled accuracy vs KL to the start (held-out questions)", xlabel="KL, nats per response",
                ylabel="accuracy")
    axes[1].set(title="greedy accuracy vs step", xlabel="step")
    axes[2].set(title="accuracy of the optimised RM on the current policy's samples", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(setting: Setting, rows: list[dict[str, Any]], bases: list[dict[str, Any]], minutes: float, command: str,
           notes: str = "") -> str:
    lines = ["# Does RLP beat the fixed reward model? SmolLM2-135M-Instruct on reasoning-gym arithmetic", "",
             f"Produced by `uv run --all-extras --group bench python -m bench.smollm2_rlp {command}` in {minutes:.0f} "
             "min on this machine's 2 CPU cores (`--from-json` redraws it). Every number "
             "below was measured by that command; the set-up is in `bench/smollm2_rlp.py`'s docstring.", "",
             "## Setting", "", "```json", json.dumps({**asdict(setting), "spg": SPG}), "```", "",
             "## Every arm at its end", "",
             f"Mean over {len(bases)} seed(s), 95% t-interval over seeds. Held-out questions: "
             f"{len(bases[0]['start']['greedy'])}; sampled: {setting.probe_samples} answers each. *RM acc.*: the RM "
             "being optimised, on gold-labelled pairs of the current policy's samples (first probe after the start → "
             "end; the gold arm's is the fixed RM it does not optimise). *best-of-k*: sampled accuracy when the RM "
             f"picks one of the {setting.probe_samples} answers.", "",
             "| arm | greedy acc. | sampled acc. | KL to start | RM acc. → end | best-of-k by RM |", "|---|---|---|---|---|---|"]
    for t in summary(rows, bases):
        lines.append(f"| {t['arm']} | {fmt(t['greedy'])} | {fmt(t['sampled'])} | {fmt(t['kl'], 2)} | "
                     f"{fmt(t['rm_start'], 2)} → {fmt(t['rm_end'], 2)} | {fmt(t['best_of_k'])} |")
    lines += ["", "![sampled accuracy vs KL, greedy accuracy vs step, RM accuracy on the policy's samples]"
              "(smollm2-rlp.png)", "", "## Against the fixed RM, paired", "",
              "Arm − fixed RM on the same seed and question; 95% bootstrap interval over seeds and questions. "
              "*matched KL*: the arm's sampled accuracy interpolated at the fixed RM's final KL of that seed "
              "(*reached*: seeds where the arm's curve got there; otherwise its last point).", "",
              "| arm | final greedy | final sampled | sampled at matched KL | reached |", "|---|---|---|---|---|"]
    for c in comparisons(rows):
        lines.append(f"| {c['arm']} | {fmt(c['final_greedy'])} | {fmt(c['final_sampled'])} | "
                     f"{fmt(c['matched_kl_sampled'])} | {c['matched_kl_reached']}/{c['seeds']} |")
    against_control = comparisons(rows, CONTROL, [a for a, c in ARMS.items() if c["strategy"] == "rlp-spg"])
    if against_control:
        lines += ["", "## SPG against its control, paired", "",
                  "The same, against the control arm: the fixed RM retrained as SPG retrains it, on the human pairs "
                  "alone. What remains is what the synthetic pairs add.", "",
                  "| arm | final greedy | final sampled | sampled at matched KL | reached |", "|---|---|---|---|---|"]
        for c in against_control:
            lines.append(f"| {c['arm']} | {fmt(c['final_greedy'])} | {fmt(c['final_sampled'])} | "
                         f"{fmt(c['matched_kl_sampled'])} | {c['matched_kl_reached']}/{c['seeds']} |")
    lines += ["", "## Reward learning per arm (mean over seeds and rounds)", "",
              "| arm | phase | seconds | metrics |", "|---|---|---|---|"]
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        for key in dict.fromkeys(k for r in rs for k in r["phases"]):
            done = [r["phases"][key] for r in rs if key in r["phases"] and r["phases"][key]["state"] != "Skipped"]
            if not done:
                continue
            metrics = [d["metrics"] for d in done]
            shown = {m: statistics.fmean(x[m] for x in metrics) for m in _SHOWN if all(m in x for x in metrics)}
            lines.append(f"| {arm} | {key} | {statistics.fmean(d['seconds'] for d in done):.0f} | "
                         + ", ".join(f"{m} {v:.3g}" for m, v in shown.items()) + " |")
    seconds = [b["pairs_seconds"] for b in bases]
    reward = [b["phases"]["0/reward"]["seconds"] for b in bases]
    lines += ["", f"Per seed: pairs on the start model's samples {statistics.fmean(seconds):.0f} s "
              f"({statistics.fmean(b['pairs'] for b in bases):.0f} pairs from {bases[0]['preference_prompts']} prompts), "
              f"fixed RM {statistics.fmean(reward):.0f} s (held-out accuracy "
              f"{statistics.fmean(b['phases']['0/reward']['metrics'].get('rm_accuracy_held_out', math.nan) for b in bases):.2f}), "
              f"start probe {statistics.fmean(b['probe_seconds'] for b in bases):.0f} s. Peak RSS of a worker process "
              f"{max(r['peak_rss_mb'] for r in rows + bases):.0f} MB."]
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


_SHOWN = ("rm_accuracy_held_out", "prompts_eligible", "prompts_kept", "synthetic_pairs", "answerless_share",
          "synthetic_pairs_gold_accuracy", "self_labelled_pairs_gold_accuracy", "kl_last", "gold_mean_last")


def dump(setting: Setting, rows: list[dict[str, Any]], bases: list[dict[str, Any]], out: Path, minutes: float,
         command: str, notes: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "smollm2-rlp.json").write_text(json.dumps({"setting": asdict(setting), "spg": SPG, "minutes": minutes,
                                                      "command": command, "bases": bases, "rows": rows}, indent=1))
    plot(rows, out / "smollm2-rlp.png")
    text = notes.read_text() if notes and notes.exists() else ""
    (out / "smollm2-rlp.md").write_text(report(setting, rows, bases, minutes, command, text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="headline")
    parser.add_argument("--seeds", type=int, help="override the setting's number of seeds")
    parser.add_argument("--arms", nargs="*", choices=list(ARMS), help="only these arms (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes (1 torch thread each when > 1)")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "smollm2-rlp")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    parser.add_argument("--notes", type=Path, help="hand-written analysis appended to the report")
    parser.add_argument("--from-json", type=Path, help="only redraw the report from a results JSON")
    parser.add_argument("--merge", type=Path, help="a results JSON whose other arms join this run's (its seeds' "
                        "shared parts must come out identical here, which is checked)")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        dump(Setting(**saved["setting"]), saved["rows"], saved["bases"], args.out, saved["minutes"], saved["command"],
             args.notes)
        return 0
    setting = SETTINGS[args.setting]
    if args.seeds:
        setting = replace(setting, seeds=args.seeds)
    work = args.work / setting.name
    threads = 1 if args.jobs > 1 else 2
    seeds = list(range(setting.seeds))
    arms = args.arms or list(ARMS)
    command = shlex.join(argv if argv is not None else sys.argv[1:])
    earlier = {"rows": [], "minutes": 0.0}
    if args.merge:
        earlier = json.loads(args.merge.read_text())
        if earlier["setting"] != asdict(setting) or earlier["spg"] != SPG:
            parser.error(f"--merge {args.merge}: it was run with other settings")
        command = f"{earlier['command']}` then `uv run --all-extras --group bench python -m bench.smollm2_rlp {command}"
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        bases = list(pool.map(seed_base, [setting] * len(seeds), [work] * len(seeds), seeds, [threads] * len(seeds)))
        if args.merge:
            check_same_bases(earlier["bases"], bases)
        rows = [r for r in earlier["rows"] if r["arm"] not in arms and r["seed"] in seeds]
        tasks = [(s, a) for a in arms for s in seeds]  # arm by arm: a cut-short run has whole arms over seeds
        futures = [pool.submit(run_arm, setting, work, s, a, threads) for s, a in tasks]
        for future in futures:
            rows.append(future.result())
            dump(setting, rows, bases, args.out, earlier["minutes"] + (time.perf_counter() - t0) / 60, command,
                 args.notes)
    return 0


def check_same_bases(earlier: list[dict[str, Any]], now: list[dict[str, Any]]) -> None:
    """Arms from two runs are paired only when each seed's pairs, fixed RM and start model measure the same."""
    saved = {b["seed"]: b for b in earlier}
    for base in now:
        old = saved.get(base["seed"])
        same = old is not None and all(old["start"][k] == base["start"][k] for k in ("greedy", "sampled", "rm_accuracy"))
        if not same or old["pairs"] != base["pairs"]:
            raise SystemExit(f"--merge: seed {base['seed']}'s pairs, fixed RM or start probe differ from the merged "
                             "run's; rerun every arm instead")


if __name__ == "__main__":
    raise SystemExit(main())
