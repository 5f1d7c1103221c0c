"""bench/outcome_spread.py's report: min / mean / max per value, and whether thread counts changed a seed's outcome."""

from bench.outcome_spread import render

ROWS = [{"target": "trainers", "seed": s, "threads": t, "algorithm": "ppo", "gain": g, "kl_max": k}
        for s, t, g, k in [(0, 1, 0.2, 1.0), (0, 2, 0.2, 1.0), (1, 1, 0.3, 2.0)]]


def test_the_report_gives_each_values_range_and_the_thread_counts_difference():
    report = render(ROWS)
    assert "## trainers / ppo" in report and "3 runs: seeds [0, 1], threads [1, 2]." in report
    assert "| gain | 0.200 | 0.233 | 0.058 | 0.300 |" in report
    assert "largest difference between thread counts at one seed: none (the same to the bit)." in report
    moved = render(ROWS[:1] + [ROWS[1] | {"gain": 0.25}] + ROWS[2:])
    assert "largest difference between thread counts at one seed: 0.05." in moved
