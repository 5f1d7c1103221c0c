"""Models the tests train, as functions of the seed, so that bench/outcome_spread.py measures the spread of a
test's outcome over seeds and thread counts with the very recipe the test runs."""

from __future__ import annotations

from pathlib import Path


def train_tiny_sft(work: Path, seed: int = 0) -> Path:
    """A tiny SFT policy on builtin://arith, competent but imperfect (the gold score of its first rollouts over
    seeds 0-9 is in docs/bench/outcome-spread.md, "trainers", `first`); returns its model directory."""
    from rlp_core.pipeline import POLICY_DIR, execute_phase
    from rlp_core.spec import parse_run
    from rlp_core.store import Store

    run = parse_run({"metadata": {"name": "toy"}, "spec": {
        "seed": seed,
        "policy": {"sft": {"tiny": {"maxPositions": 32}, "training": {"epochs": 6, "batchSize": 64, "learningRate": 0.003}}},
    }})
    execute_phase(run, Store.from_uri(f"file://{work}/store"), 0, "sft", cache_dir=work / "cache")
    return next((work / "store").rglob("_MANIFEST.json")).parent / POLICY_DIR


def improvement(history: list[dict]) -> tuple[float, float]:
    """The rollouts' mean reward over the first 5 steps and over the last 10: the gain the optimisation tests bound."""
    first = sum(h["reward_mean"] for h in history[:5]) / 5
    last = sum(h["reward_mean"] for h in history[-10:]) / 10
    return first, last
