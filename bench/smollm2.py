"""SmolLM2-135M-Instruct on reasoning-gym's basic_arithmetic, through the product's own pipeline.

    uv run --all-extras python -m bench.smollm2 --work /tmp/smollm2-bench     # writes docs/bench/smollm2.{md,json}

Runs `examples/smollm2-arith.yaml` (RM trained from the policy's backbone on gold-labelled pairs with 20%
annotator noise, then generate → optimize with LoRA PPO → evaluate) twice, each in its own process
(`rlp run`'s `run_local`, so its peak RSS is its own): against the learned RM, and against the gold
reward itself (`optimization.reward: judge`, the ceiling; it starts from the first run's RM, which it
does not read, rather than train an identical one). Then the gold accuracy of the starting model
and of both tuned policies on the held-out evaluation questions, greedy and sampled (the example's
evaluation temperature, 8 answers per question), with the paired change against the start and its 95%
interval (normal approximation over questions).
On a shared CPU torch runs one thread (intra-op threads spin at barriers while the other core is busy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from rlp_core.context import POLICY_DIR, RM_DIR
from rlp_core.data import Prompt, load_records
from rlp_core.evaluate import paired_change
from rlp_core.judges import programmatic_judge
from rlp_core.models import load_policy, load_tokenizer
from rlp_core.pretrained import fetch_model
from rlp_core.sampling import decode_responses, sample_responses
from rlp_core.spec import parse_run

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "smollm2-arith.yaml"
VARIANTS = {"learned-rm": "reward-model", "gold-reward": "judge"}
SAMPLES = 8  # sampled answers per question in the sampled-accuracy column


def spec_doc(work: Path, variant: str, steps: int | None) -> dict:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["name"] = f"smollm2-{variant}"
    doc["spec"]["storage"]["uri"] = f"file://{work / 'store'}"
    doc["spec"]["optimization"]["reward"] = VARIANTS[variant]
    if variant == "gold-reward":  # it does not read the RM: skip training a second, identical one
        rm = phase_dir(work, "learned-rm", 0, "reward") / RM_DIR
        doc["spec"]["rewardModel"]["model"] = f"file://{rm}"
    if steps is not None:
        doc["spec"]["optimization"]["steps"] = steps
    return doc


def run_variant(work: Path, variant: str, steps: int | None) -> dict:
    """One pipeline run in this process (called in a child): phase times, evaluate metrics, peak RSS."""
    from rlp_core.runner import run_local

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    report = run_local(parse_run(spec_doc(work, variant, steps)), cache_dir=work / "cache", report_dir=work / variant)
    phases = {f"{r.round}/{r.phase}": {"state": r.state, "seconds": r.seconds,
                                       "metrics": r.manifest.metrics if r.manifest else {}} for r in report.results}
    return {"variant": variant, "seconds": time.perf_counter() - t0, "phases": phases,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def accuracy(policy_dir: Path, prompts: list[str], judge, evaluation, greedy: bool, seed: int = 0) -> list[float]:
    """Per question: 1/0 for the greedy answer, or the share of right answers among SAMPLES sampled ones."""
    tok, model = load_tokenizer(policy_dir), load_policy(policy_dir).eval()
    torch.manual_seed(seed)
    k = 1 if greedy else SAMPLES
    asked = [p for p in prompts for _ in range(k)]
    right: list[float] = []
    for i in range(0, len(asked), 32):
        chunk = asked[i : i + 32]
        roll = sample_responses(model, tok, chunk, max_new_tokens=evaluation.max_new_tokens,
                                temperature=evaluation.temperature, do_sample=not greedy, logprobs=False)
        right += [float(judge(p, r) == 1.0) for p, r in zip(chunk, decode_responses(tok, roll))]
    return [sum(right[i : i + k]) / k for i in range(0, len(right), k)]


def phase_dir(work: Path, variant: str, round: int, phase: str) -> Path:
    """Where a variant's phase output lands in the benchmark's file:// store."""
    return work / "store" / "default" / f"smollm2-{variant}" / f"round-{round}" / phase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    parser.add_argument("--steps", type=int, help="PPO steps (default: the example's)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.variant:
        print(json.dumps(run_variant(args.work, args.variant, args.steps)))
        return 0
    runs = {}
    for variant in VARIANTS:  # a finished variant's record is kept in WORK, so a rerun goes on from there
        record = args.work / variant / "bench-run.json"
        if not record.exists():
            cmd = [sys.executable, "-m", "bench.smollm2", "--work", str(args.work), "--variant", variant]
            cmd += ["--steps", str(args.steps)] if args.steps else []
            done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            record.write_text(done.stdout.strip().splitlines()[-1])
        runs[variant] = json.loads(record.read_text())
    torch.set_num_threads(1)
    example = parse_run(yaml.safe_load(EXAMPLE.read_text())).spec
    judge = programmatic_judge(example.evaluation.judge)
    prompts = [p.prompt for p in load_records(example.evaluation.prompts, Prompt)]
    results = {}
    for greedy in (True, False):
        mode = "greedy" if greedy else "sampled"
        base = accuracy(fetch_model("smollm2"), prompts, judge, example.evaluation, greedy)
        results[mode] = {"start": sum(base) / len(base)}
        for variant in VARIANTS:
            tuned = accuracy(phase_dir(args.work, variant, 1, "optimize") / POLICY_DIR, prompts, judge,
                             example.evaluation, greedy)
            results[mode][variant] = {"accuracy": sum(tuned) / len(tuned),
                                      **paired_change(tuned, base).as_dict("change_")}
    doc = {"eval_prompts": len(prompts), "accuracy": results, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smollm2.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
