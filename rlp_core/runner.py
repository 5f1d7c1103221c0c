"""`rlp run`: every phase of a run in this process, in order, on one store.

Phases whose manifest verifies are skipped, so rerunning a finished run does nothing and a run killed
midway resumes (the killed phase itself resumes from its own checkpoints). The run ends with a short
report: per-phase time, the optimisation curves as a PNG, and the win-rate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlp_core.pipeline import HISTORY_FILE, PhaseError, PhaseResult, execute_phase, validate_inputs
from rlp_core.provenance import Provenance, downstream, parse_phase_refs
from rlp_core.spec import RLPRun, settings_problems


@dataclass
class RunReport:
    results: list[PhaseResult]
    curves_png: Path | None
    report_json: Path

    @property
    def evaluation(self) -> dict | None:
        for r in self.results:
            if r.phase == "evaluate" and r.manifest is not None:
                return r.manifest.metrics
        return None


def _seconds(manifest) -> float | None:
    if manifest is None or not manifest.started_at:
        return None
    return (datetime.fromisoformat(manifest.created_at) - datetime.fromisoformat(manifest.started_at)).total_seconds()


def run_local(run: RLPRun, *, store_uri: str | None = None, cache_dir: Path | None = None,
              report_dir: Path | None = None, console: Console | None = None, rerun_changed: bool = False,
              redo: list[str] = ()) -> RunReport:
    """Run the plan in order. `rerun_changed` and `redo` (phase names or round-K/PHASE; what reads them
    is redone too) decide what happens to outputs made under another spec: see execute_phase."""
    console = console or Console(stderr=True)
    spec = run.spec
    root = spec.storage.open(store_uri)
    cache_dir = cache_dir or Path(".rlp-cache")
    plan = spec.phase_plan()
    try:
        to_redo = downstream(spec, parse_phase_refs(spec, list(redo)))
    except ValueError as err:
        raise PhaseError(str(err)) from None
    validate_inputs(run)
    for warning in settings_problems(spec)[1]:
        console.print(f"[yellow]warning:[/] {warning}")
    provenance = Provenance(run, root)
    console.print(f"[bold]rlp run[/] {run.metadata.namespace}/{run.metadata.name}: {len(plan)} phases, store {root.uri}")
    results = []
    for i, (round, phase) in enumerate(plan, start=1):
        label = f"[{i}/{len(plan)}] round {round} {phase}"
        console.print(f"{label} …")
        result = execute_phase(run, root, round, phase, cache_dir=cache_dir, provenance=provenance,
                               rerun_changed=rerun_changed, redo=(round, phase) in to_redo)
        results.append(result)
        if result.state == "Cached":
            console.print(f"{label}: [green]Cached[/] ({result.output}, made {result.manifest.created_at})")
        else:
            console.print(f"{label}: [green]{result.state}[/] in {result.seconds:.1f}s")
    report_dir = Path(report_dir or cache_dir / "reports" / run.metadata.namespace / run.metadata.name)
    report_dir.mkdir(parents=True, exist_ok=True)
    curves = _plot_curves(run, provenance, results, report_dir / "curves.png")
    report_json = report_dir / "report.json"
    report = RunReport(results, curves, report_json)
    report_json.write_text(json.dumps({
        "run": f"{run.metadata.namespace}/{run.metadata.name}",
        "phases": [{"round": r.round, "phase": r.phase, "state": r.state, "seconds": _seconds(r.manifest),
                    "metrics": r.manifest.metrics if r.manifest else None} for r in results],
        "evaluation": report.evaluation,
    }, indent=2))
    _print_summary(console, report)
    return report


def _plot_curves(run: RLPRun, provenance: Provenance, results: list[PhaseResult], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = []
    for r in results:
        if r.phase == "optimize" and r.manifest is not None and any(f.path == HISTORY_FILE for f in r.manifest.files):
            store = provenance.locate(r.round, r.phase).store
            rows = [json.loads(line) for line in store.get_bytes(HISTORY_FILE).decode().splitlines() if line]
            histories.append((r.round, rows))
    if not histories:
        return None
    has_gold = all("gold_mean" in rows[0] for _, rows in histories)
    fig, axes = plt.subplots(1, 3 if has_gold else 2, figsize=(15 if has_gold else 10, 3.5))
    ax_r, ax_kl = axes[0], axes[-1]
    offset = 0
    for round, rows in histories:
        steps = [offset + h["step"] for h in rows]
        ax_r.plot(steps, [h["reward_mean"] for h in rows], label=f"round {round}")
        if has_gold:
            axes[1].plot(steps, [h["gold_mean"] for h in rows], label=f"round {round}")
        ax_kl.plot(steps, [h["kl"] for h in rows], label=f"round {round}")
        offset = steps[-1]
    reward = run.spec.optimization.reward
    ax_r.set(title="proxy reward (reward-model score)" if reward == "reward-model" else "reward (the judge)",
             xlabel="optimisation step")
    if has_gold:
        axes[1].set(title=f"gold score ({run.spec.evaluation.judge}) of the same rollouts", xlabel="optimisation step")
    ax_kl.set(title="KL to the reference policy", xlabel="optimisation step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{run.metadata.name}: {run.spec.optimization.algorithm.upper()}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _print_summary(console: Console, report: RunReport) -> None:
    table = Table(title="phases")
    for col in ("round", "phase", "state", "seconds", "peak MB", "key metrics"):
        table.add_column(col)
    keys = ("final_sft_loss", "rm_accuracy_held_out", "samples", "gold_score_mean", "synthetic_pairs",
            "reward_mean_last", "gold_mean_last", "kl_last", "win_rate", "policy_score_mean", "baseline_score_mean")
    for r in report.results:
        m = r.manifest.metrics if r.manifest else {}
        shown = ", ".join(f"{k}={m[k]:.3g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys if k in m)
        secs = _seconds(r.manifest)
        peak = "/".join(f"{m[k]:.0f}" for k in ("peak_rss_mb", "peak_cuda_mb") if k in m)  # RSS[/CUDA]
        table.add_row(str(r.round), r.phase, r.state, f"{secs:.1f}" if secs is not None else "", peak, shown)
    console.print(table)
    ev = report.evaluation
    if ev:
        console.print(f"win-rate vs the starting policy: [bold]{ev['win_rate']:.3f}[/] "
                      f"({ev['confidence']:.0%} CI {ev['ci_low']:.3f}–{ev['ci_high']:.3f}, n={ev['n']}, judge {ev['judge']})")
        console.print(f"mean score under the judge: {ev['policy_score_mean']:.3f} (starting policy "
                      f"{ev['baseline_score_mean']:.3f})")
    if report.curves_png:
        console.print(f"curves: {report.curves_png}")
    console.print(f"report: {report.report_json}")
