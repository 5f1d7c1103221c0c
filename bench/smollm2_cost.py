"""Where the SmolLM2 pipeline's time and memory go: each phase's wall time and peak RSS, phase by phase.

    uv run --all-extras python -m bench.smollm2_cost --label after          # this checkout
    uv run --all-extras python -m bench.smollm2_cost --label before --code /tmp/rlp-at-adcadee

Every phase of a variant runs as its own `rlp phase` process, in plan order, on a fresh store: that is
how a job pod runs it, so the peak is the phase's own (in one `rlp run` process a phase's high-water
mark starts from what earlier phases left allocated). The peak is the phase manifest's `peak_rss_mb`
(the kernel's VmHWM, reset when the phase starts); the seconds are the phase's own, from its manifest
(model loading included, the process's start-up not). `--code DIR` runs another checkout's rlp (a `git worktree` of an older
commit) with this bench, so "before" and "after" are measured the same way.

Variants: `example` is examples/smollm2-arith.yaml as committed; `spg-64x8` is the same file with
`rewardLearning.strategy: rlp-spg` and 64 prompts x 8 samples (the issue's memory case). Rows of variants
no longer run stay in the report: `lean` (the example of df7a02d with no system prompt and LoRA on the
reward model) is what the example became.

Rows go to docs/bench/smollm2-cost.jsonl as each phase finishes (a rerun skips the phases a label
already has), and docs/bench/smollm2-cost.md is rendered from all rows (`--render` only renders).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

from rlp_core.manifest import MANIFEST_NAME
from rlp_core.provenance import output_key

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "smollm2-arith.yaml"
ROWS = ROOT / "docs" / "bench" / "smollm2-cost.jsonl"
REPORT = ROOT / "docs" / "bench" / "smollm2-cost.md"
VARIANTS = ("example", "spg-64x8")


def variant_spec(variant: str, store: Path) -> dict:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["name"] = f"smollm2-cost-{variant}"
    doc["spec"]["storage"]["uri"] = f"file://{store}"
    if variant == "spg-64x8":
        doc["spec"]["rewardLearning"] = {"strategy": "rlp-spg"}
        doc["spec"]["generation"] |= {"maxPrompts": 64, "samplesPerPrompt": 8}
    return doc


def plan(doc: dict) -> list[tuple[int, str]]:
    from rlp_core.spec import RLPRun

    spec = RLPRun.model_validate(doc).spec
    return [(r, p) for r, p in spec.phase_plan() if spec.phase_enabled(p)]


def done_rows() -> list[dict]:
    return [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()] if ROWS.exists() else []


def run_variant(label: str, variant: str, code: Path, work: Path, threads: int) -> None:
    store = work / f"{label}-{variant}"
    doc = variant_spec(variant, store)
    spec_file = work / f"{label}-{variant}.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    have = {(r["round"], r["phase"]) for r in done_rows() if r["label"] == label and r["variant"] == variant}
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    env = os.environ | {"PYTHONPATH": os.pathsep.join(str(code / d) for d in (".", "cli", "jobs", "operator")),
                        "OMP_NUM_THREADS": str(threads)}
    for round_, phase in plan(doc):
        if (round_, phase) in have:
            continue
        manifest_path = store / doc["metadata"].get("namespace", "default") / doc["metadata"]["name"] / \
            output_key(round_, phase) / MANIFEST_NAME
        ran = not manifest_path.exists()  # else made by an interrupted run of this bench: its process wall is lost
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rlp_cli", "phase", phase, "--spec", str(spec_file), "--round",
                        str(round_), "--cache-dir", str(work / f"cache-{label}-{variant}"), "--metrics-port", "0"],
                       cwd=code, env=env, check=True)
        wall = time.perf_counter() - t0
        manifest = json.loads(manifest_path.read_text())
        metrics = manifest["metrics"]
        inside = (datetime.fromisoformat(manifest["created_at"]) - datetime.fromisoformat(manifest["started_at"]))
        row = {"label": label, "commit": commit, "variant": variant, "round": round_, "phase": phase,
               "seconds": round(wall, 1) if ran else None, "phase_seconds": round(inside.total_seconds(), 1),
               "peak_rss_mb": metrics.get("peak_rss_mb"), "threads": threads,
               "result": {k: metrics[k] for k in ("rm_accuracy_held_out", "reward_mean_last", "gold_mean_last",
                                                   "policy_accuracy", "baseline_accuracy", "win_rate", "pairs")
                          if k in metrics}}
        with ROWS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{label} {variant} {output_key(round_, phase)}: {wall:.0f} s, peak {row['peak_rss_mb']} MB", flush=True)


def render(rows: list[dict]) -> str:
    """The report: per variant, each phase's seconds and peak RSS under every label, and the results."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    lines = ["# SmolLM2 pipeline: wall time and peak memory per phase", "",
             "Made by `bench/smollm2_cost.py` (its docstring says how); each phase is its own `rlp phase` process "
             "on a fresh store, as in a job pod. Peak = the phase's RSS high-water mark; seconds = the phase's own "
             "(its manifest's start to end, model loading included; the process's start-up, about 10 s, is not).", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores; labels: "
             + ", ".join(f"`{lab}` at {next(r['commit'] for r in rows if r['label'] == lab)}" for lab in labels), ""]
    for variant in dict.fromkeys([*VARIANTS, *(r["variant"] for r in rows)]):
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        phases = list(dict.fromkeys((r["round"], r["phase"]) for r in mine))
        lines += [f"## {variant}", "", "| phase | " + " | ".join(f"{lab} s | {lab} peak MB" for lab in labels) + " |",
                  "|---|" + "---:|---:|" * len(labels)]
        by = {(r["label"], r["round"], r["phase"]): r for r in mine}
        for round_, phase in phases:
            cells = []
            for lab in labels:
                r = by.get((lab, round_, phase))
                cells += [f"{r['phase_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}"] if r else ["", ""]
            lines.append(f"| {round_}/{phase} | " + " | ".join(cells) + " |")
        totals = []
        for lab in labels:
            got = [r for r in mine if r["label"] == lab]
            totals += [f"**{sum(r['phase_seconds'] for r in got):.0f}**", f"**{max(r['peak_rss_mb'] for r in got):.0f}**"
                       ] if got else ["", ""]
        lines += ["| all (sum, max) | " + " | ".join(totals) + " |", ""]
        results = [(lab, r["phase"], r["result"]) for lab in labels for r in mine if r["label"] == lab and r["result"]]
        shown = lambda res: ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items())  # noqa: E731
        lines += ["Results beside the cost (same seed):", ""] + [f"- `{lab}` {phase}: {shown(res)}" for lab, phase, res in results]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="after", help="name of this measurement's columns")
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose rlp runs the phases")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "rlp-smollm2-cost")
    ap.add_argument("--render", action="store_true", help="only re-render the report from the rows")
    args = ap.parse_args()
    if not args.render:
        args.work.mkdir(parents=True, exist_ok=True)
        for variant in args.variants:
            run_variant(args.label, variant, args.code.resolve(), args.work, args.threads)
    notes = REPORT.with_name("smollm2-cost-notes.md")
    REPORT.write_text(render(done_rows()) + ("\n" + notes.read_text() if notes.exists() else ""))


if __name__ == "__main__":
    main()
