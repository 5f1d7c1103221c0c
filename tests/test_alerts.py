"""The chart's alerting rules (charts/rlp-operator/files/alerts.yaml, shipped unchanged in the
PrometheusRule): `promtool check rules`, the promtool unit tests in charts/rlp-operator/tests/ that fire
every alert from synthetic series, the rules as the chart renders them, and the metric names they use
against real scrapes of the operator and a phase pod.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from infra.tools import promtool_bin
from test_chart import FULL_VALUES, one, render
from test_dashboard import ALERTS, CHART, check_names_exported, scraped  # noqa: F401 - scraped is a fixture

UNIT_TESTS = CHART / "tests" / "alerts_test.yaml"
EXPECTED_ALERTS = {"RLPRunFailed", "RLPPhaseStuck", "RLPPhaseRetriesClimbing", "RLPOperatorDown",
                   "RLPOperatorReconcileErrors"}  # fmt: skip


def promtool(*args: str) -> str:
    proc = subprocess.run([str(promtool_bin()), *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules():
    out = promtool("check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(rules())} rules found" in out


def test_promtool_unit_tests_fire_every_alert():
    out = promtool("test", "rules", str(UNIT_TESTS))
    assert "SUCCESS" in out
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts == EXPECTED_ALERTS
    fired = set()
    for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            if case.get("exp_alerts"):
                fired.add(case["alertname"])
    assert fired == alerts, f"alerts never fired in {UNIT_TESTS.name}: {sorted(alerts - fired)}"


def test_every_alert_has_severity_summary_and_description():
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_rendered_prometheus_rule_passes_promtool(tmp_path: Path):
    """What the chart renders with prometheusRule.phaseExpectedSeconds set (an extra group) is valid too."""
    spec = one(render(FULL_VALUES), "PrometheusRule")["spec"]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump({"groups": spec["groups"]}))
    out = promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(rules()) + 2} rules found" in out


def test_alert_expressions_name_exported_metrics(scraped):  # noqa: F811
    exported = scraped["operator"] | scraped["phase"]
    queries = [(r.get("alert") or r["record"], r["expr"]) for r in rules()]
    problems = check_names_exported(queries, exported)
    assert not problems, "\n".join(problems)
