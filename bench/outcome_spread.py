"""The spread of the training outcomes the test suite asserts, over seeds and torch thread counts.

A test that bounds a training outcome (a reward rising, a KL bound, a win-rate) runs one seed on one CPU. Floating
point differs between CPUs and BLAS kernels, and over many RL steps a last-bit difference grows into another
trajectory: on another machine the test sees, in effect, another draw. So each bound is set from the spread
measured here, with the very recipe the test runs (imported from tests/), and the test's docstring quotes it.
The thread count stands in for another CPU: 1 and 2 threads split reductions differently, so the same seed
gives another trajectory.

    uv run --all-extras python -m bench.outcome_spread --jobs 2                # every target, resumable
    uv run --all-extras python -m bench.outcome_spread --targets quickstart --seeds 0 1 --threads 2
    uv run --all-extras python -m bench.outcome_spread --render                # the report from the saved results

Every measurement runs in its own process (OMP_NUM_THREADS set before torch starts, CUDA hidden) and is
appended to docs/bench/outcome-spread.jsonl as it finishes; a rerun skips what is there. The report is
docs/bench/outcome-spread.md, with docs/bench/outcome-spread-notes.md (written by hand) at its end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "bench" / "outcome-spread.jsonl"
REPORT = REPO / "docs" / "bench" / "outcome-spread.md"
NOTES = REPO / "docs" / "bench" / "outcome-spread-notes.md"  # written by hand, appended to the report
QUICKSTART = REPO / "examples" / "quickstart.yaml"
SEEDS = {"quickstart": range(8), "trainers": range(10), "user-reward": range(10), "mib": range(5),
         "pretrained-ppo": range(5), "reward-learning": range(5), "spg-smollm2": range(5), "tiny-properties": range(5),
         "rm-curve": range(5), "pipeline": range(5), "quickstart-grpo": range(5), "smollm2-greedy": range(5),
         "smollm2-preferences": range(5)}
ALGORITHMS = ("ppo", "apa", "grpo", "rloo")


def measure_quickstart(seed: int, work: Path) -> list[dict]:
    """`rlp run examples/quickstart.yaml` with `spec.seed` set: the evaluate phase's win-rate and gold means on
    the held-out sums, and the win-rate on the RL prompts (tests/test_run_local.py's second evaluation)."""
    import yaml
    from test_run_local import evaluate_on_training_prompts

    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"]["seed"] = seed
    spec = work / "quickstart.yaml"
    spec.write_text(yaml.safe_dump(doc))
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "rlp_cli", "run", str(spec), "--store", f"file://{work}/store",
                    "--cache-dir", str(work / "cache")], check=True, cwd=work, stdout=subprocess.DEVNULL)
    report = json.loads(next((work / "cache" / "reports").rglob("report.json")).read_text())
    ev = report["evaluation"]
    on_training = evaluate_on_training_prompts(spec, work / "store", work / "cache")
    return [{"train_win_rate": on_training["win_rate"], "train_ci_low": on_training["ci_low"],
             "win_rate": ev["win_rate"], "ci_low": ev["ci_low"], "ci_high": ev["ci_high"],
             "policy_score_mean": ev["policy_score_mean"], "baseline_score_mean": ev["baseline_score_mean"],
             "score_change": ev["score_change"], "score_ci_low": ev["score_ci_low"],
             "accuracy_change": ev["accuracy_change"], "accuracy_ci_low": ev["accuracy_ci_low"],
             "wall_s": round(time.monotonic() - start, 1)}]


def measure_trainers(seed: int, work: Path) -> list[dict]:
    """tests/test_policy_optimization.py's four trainers on a tiny SFT policy of the same seed."""
    from recipes import train_tiny_sft
    from test_policy_optimization import ALGORITHMS as TRAINERS
    from recipes import improvement
    from test_policy_optimization import train

    sft = train_tiny_sft(work, seed)
    rows = []
    for name in ALGORITHMS:
        history = train(TRAINERS[name], sft, seed)
        first, last = improvement(history)
        rows.append({"algorithm": name, "first": first, "last": last, "gain": last - first,
                     "kl_last10": sum(h["kl"] for h in history[-10:]) / 10, "kl_max": max(h["kl"] for h in history),
                     "kl_step0": history[0]["kl"]})
    return rows


def measure_user_reward(seed: int, work: Path) -> list[dict]:
    """tests/test_reward_functions.py's GRPO run against a Python reward function (the gold judge)."""
    from recipes import train_tiny_sft
    from recipes import improvement
    from test_reward_functions import GOLD_REWARD_MODULE, history_of, optimize_against

    sft = train_tiny_sft(work / "sft", seed)
    (work / "gold_reward.py").write_text(GOLD_REWARD_MODULE)
    sys.path.insert(0, str(work))
    result = optimize_against("python://gold_reward:score", sft, work, seed)
    first, last = improvement(history_of(work))
    return [{"first": first, "last": last, "gain": last - first, "kl_last": result.manifest.metrics["kl_last"]}]


def measure_mib(seed: int, work: Path) -> list[dict]:
    """tests/test_uml.py's MIB objective on a tiny RM: the JSD bound over the first and the last 5 steps."""
    import math

    from test_uml import mib_training

    mi_first, mi_last, _ = mib_training(seed)
    floor = -2 * math.log(2)
    return [{"mi_first_above_floor": mi_first - floor, "mi_last_above_floor": mi_last - floor,
             "mi_rise": mi_last - mi_first}]


def measure_pretrained_ppo(seed: int, work: Path) -> list[dict]:
    """tests/test_pretrained.py's 8 LoRA PPO steps of SmolLM2 with the last-number gold reward (16 rollouts a
    step): the gold accuracy on its 4 questions (24 samples each) before and after, and the KL reached."""
    from rlp_core.pretrained import fetch_model
    from test_pretrained import lora_ppo

    *_, before, after, history = lora_ppo(fetch_model("smollm2"), seed)
    return [{"gold_before": before, "gold_after": after, "gold_gain": after - before, "kl_last": history[-1]["kl"],
             "gold_first_step": history[0]["gold_mean"], "gold_last_step": history[-1]["gold_mean"]}]


def measure_reward_learning(seed: int, work: Path) -> list[dict]:
    """tests/test_bench_reward_learning.py's set-up: PPO against the gold judge, and the RMs after RLP."""
    from test_bench_reward_learning import base_of, gold_reward_ppo, rm_accuracies_after_rlp

    data, base = base_of(seed, work)
    first, last = gold_reward_ppo(work, data, base, seed)
    rm = rm_accuracies_after_rlp(work, data, base, seed)
    return [{"gold_first": first, "gold_last": last, "gold_gain": last - first, **rm,
             "refined_minus_fixed": rm["refined"] - rm["fixed"], "synthesized_minus_fixed": rm["synthesized"] - rm["fixed"]}]


def measure_spg_smollm2(seed: int, work: Path) -> list[dict]:
    """tests/test_spg.py's SPG pairs on SmolLM2's samples, clustered by answer: their gold outcomes."""
    from test_spg import smollm2_answer_pairs

    outcome = smollm2_answer_pairs(seed)
    return [{"right": outcome["right"], "wrong": outcome["wrong"], "tied": outcome["tied"],
             "decided": outcome["right"] + outcome["wrong"], "decisive_accuracy": outcome["decisive_accuracy"]}]


def measure_tiny_properties(seed: int, work: Path) -> list[dict]:
    """Properties three tests check on untrained tiny models of the seed: tests/test_chat_models.py's pooling gap
    (pad == EOS; transformers' pooling against ours), tests/test_ppo_details.py's count of sampled response tokens
    up to and including EOS (of 2,048), and the policy's gradient norm in its one-update critic test (under
    value_coef 0.01 and 1.0; the test asserts both above the clipping threshold, 0.05) with the largest difference
    between the two updated policies (the test asserts them equal)."""
    from test_chat_models import pad_eos_scores, sums_tokenizer
    from test_ppo_details import arith_tokenizer, sample_untrained, updates_under_two_value_coefs

    scores = pad_eos_scores(sums_tokenizer(), seed)
    tokenizer = arith_tokenizer()
    rollout = sample_untrained(tokenizer, seed)
    (norm_small, policy_small), (norm_large, policy_large) = updates_under_two_value_coefs(tokenizer, seed)
    return [{"pad_eos_pooling_gap": abs(scores["hf_pooled"].item() - scores["alone"].item()),
             "special_tokens_inside": int(rollout.response_mask.sum()),
             "policy_grad_norm_min": min(norm_small, norm_large), "policy_grad_norm_max": max(norm_small, norm_large),
             "policy_updates_differ": float((policy_small - policy_large).abs().max())}]


def measure_rm_curve(seed: int, work: Path) -> list[dict]:
    """tests/test_bench_reward_learning.py's fixed-RM curve: 12 PPO steps against the fixed RM, probe points at
    steps 4, 8, 12 (KL to the SFT policy on the probe prompts, and its gold score)."""
    from test_bench_reward_learning import base_of, fixed_rm_curve

    data, base = base_of(seed, work)
    curve = fixed_rm_curve(work, data, base, seed)
    return [{"kl_step4": curve[0]["kl"], "kl_step8": curve[1]["kl"], "kl_last": curve[-1]["kl"],
             "gold_last": curve[-1]["gold"], "points": len(curve)}]


def measure_pipeline(seed: int, work: Path) -> list[dict]:
    """tests/test_reward_learning_pipeline.py's runs on base models of the seed: synthesize's kept prompts in the
    `strategy: rlp` run, how many of round 1's samples round 2 did not repeat, and the distinct answers of a
    3-samples-per-prompt evaluation."""
    import json

    from test_reward_learning_pipeline import base_models, evaluation_of_three_samples, rlp_run, two_rounds

    base = base_models(work / "base", seed)
    _, results, _ = rlp_run(work / "rlp", base, seed)
    synth = results[(1, "synthesize")].manifest.metrics
    *_, samples_1, samples_2 = two_rounds(work / "rounds", base, seed)
    lines_1, lines_2 = samples_1.splitlines(), samples_2.splitlines()
    responses = [(json.loads(a)["response"], json.loads(b)["response"]) for a, b in zip(lines_1, lines_2, strict=True)]
    _, rows = evaluation_of_three_samples(work / "multi", base, seed)
    return [{"prompts_kept": synth["prompts_kept"], "prompts_eligible": synth["prompts_eligible"],
             "round_samples_changed": sum(a != b for a, b in zip(lines_1, lines_2)),
             "round_responses_changed": sum(a != b for a, b in responses), "round_samples": len(lines_1),
             "distinct_eval_answers": len({r["policy"] for r in rows})}]


def greedy_min_logit_gap(model, tokenizer, rollout, word: str) -> float:
    """The smallest lead, in logits, of the greedy token over the runner-up at each answer token up to the first
    that completes `word` (the whole answer if none does): how far a greedy answer is from taking another path."""
    import torch
    from rlp_core.models import suppressed_token_ids

    with torch.no_grad():
        logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask).logits[0].float()
    logits[:, suppressed_token_ids(tokenizer)] = float("-inf")
    response = rollout.response_ids[0][rollout.response_mask[0].bool()].tolist()
    upto = next((i + 1 for i in range(len(response)) if word in tokenizer.decode(response[: i + 1])), len(response))
    gaps = []
    for i, token in enumerate(response[:upto]):
        top = logits[rollout.prompt_len - 1 + i].topk(2)
        assert top.indices[0].item() == token, (i, token, top)  # greedy took the top logit
        gaps.append((top.values[0] - top.values[1]).item())
    return min(gaps)


def measure_smollm2_greedy(seed: int, work: Path) -> list[dict]:
    """tests/test_pretrained.py's greedy SmolLM2 answer to its capital question: whether it names Paris, and the
    smallest lead of the greedy token over the runner-up up to "Paris" (greedy, so the seed does not enter it);
    the same for the question the test asked before, "What is the capital of France?"."""
    from rlp_core.models import load_tokenizer
    from rlp_core.pretrained import fetch_model
    from test_pretrained import greedy_capital_answer
    from transformers import AutoModelForCausalLM

    smollm2 = fetch_model("smollm2")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(smollm2).eval(), load_tokenizer(smollm2)
    rollout, answer = greedy_capital_answer(model, smollm2)
    former, former_answer = greedy_capital_answer(model, smollm2, "What is the capital of France?")
    return [{"paris": float("Paris" in answer),
             "greedy_min_logit_gap": greedy_min_logit_gap(model, tokenizer, rollout, "Paris"),
             "former_question_paris": float("Paris" in former_answer),
             "former_question_min_logit_gap": greedy_min_logit_gap(model, tokenizer, former, "Paris")}]


def measure_smollm2_preferences(seed: int, work: Path) -> list[dict]:
    """tests/test_policy_preferences.py's `rlp preferences` on SmolLM2 with --seed set to the seed: how many pairs
    (of 8 prompts), and how many the gold judge orders as labelled."""
    import json

    from rlp_core.gym_tasks import gold_judge
    from test_policy_preferences import SMOLLM2_JUDGE, smollm2_preferences

    pairs = [json.loads(line) for line in smollm2_preferences(work, seed)]
    gold = gold_judge(SMOLLM2_JUDGE)
    return [{"preference_pairs": len(pairs),
             "preference_pairs_gold_agree": sum(gold(p["prompt"], p["chosen"]) > gold(p["prompt"], p["rejected"])
                                                for p in pairs)}]


def measure_quickstart_grpo(seed: int, work: Path) -> list[dict]:
    """tests/test_run_local.py's quickstart with `algorithm: grpo`, killed in optimize and resumed: the optimize
    phase's share of groups with all-equal scores (mean over steps) and its rollouts' gold."""
    from test_run_local import grpo_quickstart_killed_and_resumed

    start = time.monotonic()
    _, _, after = grpo_quickstart_killed_and_resumed(work, seed)
    m = after["round-1/optimize"]["metrics"]
    return [{"zero_signal_groups_mean": m["zero_signal_groups_mean"], "gold_mean_first": m["gold_mean_first"],
             "gold_mean_last": m["gold_mean_last"], "resumed_from_step": m["resumed_from_step"],
             "wall_s": round(time.monotonic() - start, 1)}]


TARGETS = {"quickstart": measure_quickstart, "trainers": measure_trainers, "user-reward": measure_user_reward,
           "mib": measure_mib, "pretrained-ppo": measure_pretrained_ppo, "reward-learning": measure_reward_learning,
           "spg-smollm2": measure_spg_smollm2, "tiny-properties": measure_tiny_properties,
           "rm-curve": measure_rm_curve, "pipeline": measure_pipeline, "quickstart-grpo": measure_quickstart_grpo,
           "smollm2-greedy": measure_smollm2_greedy, "smollm2-preferences": measure_smollm2_preferences}


def child(target: str, seed: int, threads: int) -> None:
    """One measurement, in this process (started by `run` with the thread count in its environment)."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix=f"spread-{target}-") as tmp:
        rows = TARGETS[target](seed, Path(tmp))
    for row in rows:
        print("RESULT " + json.dumps({"target": target, "seed": seed, "threads": threads} | row))


def saved() -> list[dict]:
    return [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []


def run(target: str, seed: int, threads: int) -> None:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.outcome_spread", "--child", target, str(seed), str(threads)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{target} seed {seed} threads {threads} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return
    rows = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    with RESULTS.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{target} seed {seed} threads {threads}: {len(rows)} rows in {time.monotonic() - start:.0f} s", flush=True)


def render(rows: list[dict]) -> str:
    """Per target (and algorithm), min / mean / max of each measured value over every seed and thread count."""
    lines = ["# The spread of the outcomes the tests assert, over seeds and thread counts", "",
             "Produced by `uv run --all-extras python -m bench.outcome_spread --jobs 2` on a 2-core AMD EPYC; raw "
             "rows in [outcome-spread.jsonl](outcome-spread.jsonl), one per (target, seed, threads). Each row is one "
             "run of the test's own recipe (imported from tests/) with the seed changed and torch on 1 or 2 threads; "
             "the thread count stands in for another CPU, on which the same seed takes another trajectory. Each "
             "test's docstring quotes the lines it bounds.", ""]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["target"], row.get("algorithm", "")), []).append(row)
    for (target, algorithm), members in sorted(groups.items()):
        keys = [k for k in members[0] if k not in ("target", "seed", "threads", "algorithm", "wall_s")]
        runs = sorted({(m["seed"], m["threads"]) for m in members})
        lines += [f"## {target}{' / ' + algorithm if algorithm else ''}", "",
                  f"{len(runs)} runs: seeds {sorted({s for s, _ in runs})}, threads {sorted({t for _, t in runs})}.",
                  "", "| value | min | mean | sd | max |", "|---|---|---|---|---|"]
        for key in keys:
            values = [m[key] for m in members]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            lines.append(f"| {key} | {min(values):.3f} | {statistics.mean(values):.3f} | {sd:.3f} | {max(values):.3f} |")
        by_seed: dict[int, dict[int, dict]] = {}
        for m in members:
            by_seed.setdefault(m["seed"], {})[m["threads"]] = m
        both = [rows for rows in by_seed.values() if len(rows) > 1]
        if both:
            gap = max(abs(rows[a][k] - rows[b][k]) for rows in both for a in rows for b in rows for k in keys)
            lines += ["", f"Seeds run at both thread counts: {sorted(s for s, rows in by_seed.items() if len(rows) > 1)}; "
                      "largest difference between thread counts at one seed: "
                      + ("none (the same to the bit)." if gap == 0 else f"{gap:.3g}.")]
        if target == "quickstart":
            lines += ["", "| seed | threads | held-out win-rate [95% CI] | gold score start -> end | accuracy change "
                      "(95% CI low) | RL-prompt win-rate (95% CI low) | wall |", "|---|---|---|---|---|---|---|"]
            for m in sorted(members, key=lambda m: (m["seed"], m["threads"])):
                lines.append(f"| {m['seed']} | {m['threads']} | {m['win_rate']:.3f} [{m['ci_low']:.3f}, "
                             f"{m['ci_high']:.3f}] | {m['baseline_score_mean']:.3f} -> {m['policy_score_mean']:.3f} | "
                             f"{m['accuracy_change']:+.3f} ({m['accuracy_ci_low']:+.3f}) | "
                             f"{m['train_win_rate']:.3f} ({m['train_ci_low']:.3f}) | {m['wall_s']:.0f} s |")
        lines.append("")
    if NOTES.exists():
        lines += [NOTES.read_text()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--seeds", nargs="+", type=int, help="instead of each target's own (SEEDS)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch intra-op threads")
    parser.add_argument("--jobs", type=int, default=2, help="processes at once; a 2-thread one counts twice")
    parser.add_argument("--render", action="store_true", help="only write the report from the saved rows")
    parser.add_argument("--child", nargs=3, metavar=("TARGET", "SEED", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), int(args.child[2]))
    if not args.render:
        done = {(r["target"], r["seed"], r["threads"]) for r in saved()}
        todo = [(t, s, n) for t in args.targets for s in (args.seeds or SEEDS[t]) for n in args.threads
                if (t, s, n) not in done]
        # two 1-thread runs share the 2 cores; a 2-thread run needs both, so those go one at a time after them
        for threads in sorted(args.threads):
            batch = [job for job in todo if job[2] == threads]
            with ThreadPoolExecutor(max(1, args.jobs // threads)) as pool:
                list(pool.map(lambda job: run(*job), batch))
    REPORT.write_text(render(saved()))
    print(f"report: {REPORT}")


if __name__ == "__main__":
    main()
