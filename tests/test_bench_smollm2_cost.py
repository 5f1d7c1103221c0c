"""bench/smollm2_cost.py's report: each phase's seconds and peak under every label, totals, results beside them."""

from bench.smollm2_cost import render, variant_spec


def row(label, phase, seconds, peak, round_=1, **result):
    return {"label": label, "commit": label[:3], "variant": "example", "round": round_, "phase": phase,
            "seconds": seconds, "phase_seconds": seconds, "peak_rss_mb": peak, "threads": 2, "result": result}


def test_the_report_puts_labels_side_by_side_with_totals():
    rows = [row("before", "reward", 250, 5200, round_=0), row("before", "evaluate", 50, 1800, policy_accuracy=0.5),
            row("after", "reward", 120, 2100, round_=0), row("after", "evaluate", 40, 1500, policy_accuracy=0.5)]
    report = render(rows)
    assert "`before` at bef, `after` at aft" in report
    assert "| 0/reward | 250 | 5200 | 120 | 2100 |" in report
    assert "| all (sum, max) | **300** | **5200** | **160** | **2100** |" in report
    assert "- `after` evaluate: policy_accuracy 0.500" in report


def test_variants_change_only_what_they_name(tmp_path):
    example, spg = variant_spec("example", tmp_path), variant_spec("spg-64x8", tmp_path)
    assert spg["spec"]["rewardLearning"] == {"strategy": "rlp-spg"}
    assert (spg["spec"]["generation"]["maxPrompts"], spg["spec"]["generation"]["samplesPerPrompt"]) == (64, 8)
    assert spg["spec"]["optimization"] == example["spec"]["optimization"]
    assert example["spec"]["storage"]["uri"] == f"file://{tmp_path}"
