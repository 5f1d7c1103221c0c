"""The `rlp` command: run a whole RLPRun locally, verify its outputs, run one phase (job pods), print the CRD, run
the operator. The operator and the training stack are imported only by the subcommands that need them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rlp_core.spec import SpecError, load_run


def _one_line(err: BaseException) -> str:
    """An error as the line a user reads. rlp_core's errors (spec, data, store, phase, checkpoint) and the
    store's missing-object errors say what to fix; anything else is named by its type."""
    if type(err).__module__.startswith("rlp_core.") or isinstance(err, (FileNotFoundError, FileExistsError)):
        return " ".join(str(err).split())
    return f"{type(err).__name__}: {err} (rerun with --debug for the traceback)"


def _cmd_run(args: argparse.Namespace) -> int:
    run = load_run(args.spec)  # before the training stack is imported: a bad spec fails in a fraction of a second
    from rlp_core.runner import run_local

    report = run_local(run, store_uri=args.store, cache_dir=Path(args.cache_dir), rerun_changed=args.rerun_changed,
                       redo=args.redo)
    return 0 if report.evaluation is not None else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from rlp_core.provenance import verify_run

    run = load_run(args.spec)
    rows = verify_run(run, run.spec.storage.open(args.store))
    for key, state, detail in rows:
        print(f"{key:24} {state:8} {detail}")
    broken = [key for key, state, _ in rows if state in ("damaged", "changed")]
    if broken:
        print(f"to redo them and what reads them: rlp run {args.spec} --redo {' --redo '.join(broken)}"
              + (f" --store {args.store}" if args.store else ""), file=sys.stderr)
    return 1 if broken else 0


def _cmd_phase(args: argparse.Namespace) -> int:
    from rlp_jobs.phase import run_phase

    return run_phase(args.name, Path(args.spec), args.round, store_uri=args.store, cache_dir=Path(args.cache_dir),
                     metrics_port=args.metrics_port, rerun_changed=args.rerun_changed, redo=args.redo)


def _cmd_preferences(args: argparse.Namespace) -> int:
    from rlp_core.policy_preferences import Labelling, write_policy_preferences

    run = load_run(args.spec)
    labelling = Labelling(samples_per_prompt=args.samples, flip=args.flip, seed=args.seed,
                          temperature=run.spec.generation.temperature, max_new_tokens=run.spec.generation.max_new_tokens)
    written = write_policy_preferences(run.spec, args.prompts, Path(args.out), labelling, args.pairs,
                                       Path(args.cache_dir))
    print(f"{written} pairs -> {args.out}")
    return 0


def _cmd_crd(args: argparse.Namespace) -> int:
    from rlp_operator.crd import render_crd

    sys.stdout.write(render_crd())
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    from rlp_operator.main import main as operator_main

    return operator_main(args.operator_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cache = os.environ.get("RLP_CACHE_DIR", ".rlp-cache")

    run = sub.add_parser("run", help="run every phase of an RLPRun in this process (local store)")
    run.add_argument("spec", help="RLPRun YAML, e.g. examples/quickstart.yaml")
    run.add_argument("--store", help="storage URI overriding spec.storage.uri (file://dir or s3://bucket/prefix)")
    run.add_argument("--cache-dir", default=cache, help="local cache of fetched phase outputs and reports")
    run.add_argument("--rerun-changed", action="store_true",
                     help="phases whose output was made under other spec fields or inputs run again under a new "
                          "output path (round-K/PHASE~FINGERPRINT) instead of stopping the run")
    run.add_argument("--redo", action="append", default=[], metavar="PHASE",
                     help="delete and redo PHASE (every round) or round-K/PHASE, and every phase that reads it; "
                          "repeatable")
    run.add_argument("--debug", action="store_true", help="print the traceback of an error")
    run.set_defaults(func=_cmd_run)

    verify = sub.add_parser("verify", help="re-hash every output of a run and say which phase to redo")
    verify.add_argument("spec", help="RLPRun YAML")
    verify.add_argument("--store", help="storage URI overriding spec.storage.uri")
    verify.add_argument("--debug", action="store_true", help="print the traceback of an error")
    verify.set_defaults(func=_cmd_verify)

    phase = sub.add_parser("phase", help="run one phase of one round (what a job pod runs)")
    phase.add_argument("name", choices=["sft", "reward", "generate", "refine", "synthesize", "optimize", "evaluate"])
    phase.add_argument("--spec", required=True, help="the RLPRun as YAML or JSON")
    phase.add_argument("--round", type=int, required=True)
    phase.add_argument("--store", help="storage URI overriding spec.storage.uri")
    phase.add_argument("--cache-dir", default=cache)
    phase.add_argument("--metrics-port", type=int, default=int(os.environ.get("RLP_METRICS_PORT", "0")),
                       help="serve /metrics on this port while the phase runs (0: off)")
    phase.add_argument("--rerun-changed", action="store_true", help="as for rlp run")
    phase.add_argument("--redo", action="store_true", help="delete this phase's output and run it again")
    phase.set_defaults(func=_cmd_phase)

    prefs = sub.add_parser("preferences", help="label pairs of the starting policy's own samples with the run's judge "
                           "(simulated annotators), for spec.rewardModel.humanPreferences")
    prefs.add_argument("spec", help="RLPRun YAML: its policy, chat template, generation settings and evaluation.judge")
    prefs.add_argument("--prompts", required=True, help="data URI of the prompts to sample (keep them apart from "
                       "evaluation.prompts)")
    prefs.add_argument("--out", required=True, help="JSONL file to write")
    prefs.add_argument("--pairs", type=int, help="stop after this many pairs (default: one per decisive prompt)")
    prefs.add_argument("--samples", type=int, default=4, help="samples per prompt the pair is drawn from")
    prefs.add_argument("--flip", type=float, default=0.2, help="share of labels flipped (annotator noise)")
    prefs.add_argument("--seed", type=int, default=0)
    prefs.add_argument("--cache-dir", default=cache)
    prefs.add_argument("--debug", action="store_true", help="print the traceback of an error")
    prefs.set_defaults(func=_cmd_preferences)

    crd = sub.add_parser("crd", help="print the RLPRun CustomResourceDefinition generated from the spec model")
    crd.set_defaults(func=_cmd_crd)

    op = sub.add_parser("operator", help="run the operator against the current kubeconfig", add_help=False)
    op.add_argument("operator_args", nargs=argparse.REMAINDER)
    op.set_defaults(func=_cmd_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["operator"]:  # argparse's REMAINDER drops leading --flags: hand them over untouched
        return _cmd_operator(argparse.Namespace(operator_args=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as err:
        print(str(err), file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - one line for the user; the traceback behind --debug
        if getattr(args, "debug", False):
            raise
        print(f"rlp {args.command}: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
