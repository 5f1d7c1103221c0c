"""The Grafana dashboard (charts/rlp-operator/files/dashboard.json): valid, laid out, and every query names
a metric that is really exported, checked against real HTTP scrapes of the operator's /metrics endpoint
(its own HealthServer and OperatorMetrics) and of a phase pod's (rlp_core.telemetry.PhaseTelemetry.serve).

The scrape helpers here are shared with test_alerts.py and test_chart_cluster.py (which scrapes the
operator process of a full run).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "rlp-operator"
DASHBOARD = CHART / "files" / "dashboard.json"
ALERTS = CHART / "files" / "alerts.yaml"

# Series Prometheus makes itself rather than scraping them.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS", "ALERTS_FOR_STATE"}
# Recording rules the chart's PrometheusRule defines outside files/alerts.yaml (templates/prometheusrule.yaml).
CHART_RECORDED = {"rlp:phase_expected_seconds:configured"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "atan2", "inf", "nan"}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# PromQL: metric names of an expression


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, labels, strings and ranges removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range/subquery selectors ([5m], [$__range])
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def test_metric_names_parser():
    expr = ('histogram_quantile(0.95, sum by (phase, le) (rate(rlp_job_step_seconds_bucket{run=~"$run", x="a{b}"}'
            '[$__rate_interval]))) / on (phase) group_left () rlp:phase_expected_seconds > bool 0 or up{job="x"}'
            ' unless absent(rlp_runs offset 5m)')  # fmt: skip
    assert metric_names(expr) == {"rlp_job_step_seconds_bucket", "rlp:phase_expected_seconds", "up", "rlp_runs"}
    assert metric_names("time() - max by (namespace, run) (rlp_phase_start_timestamp_seconds)") == {
        "rlp_phase_start_timestamp_seconds"}  # fmt: skip
    assert metric_names("label_values(rlp_run_info{namespace=~\"$namespace\"}, run)") == {"rlp_run_info", "run"}


# --------------------------------------------------------------------------------------------------
# real scrapes


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def exported_names(text: str) -> set[str]:
    """Every series name a scrape exposes, including the ones a family promises before any sample
    (a counter's _total, a histogram's _bucket/_sum/_count)."""
    from prometheus_client.parser import text_string_to_metric_families

    names = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created", ""), "gauge": ("",), "info": ("_info",),
                "untyped": ("",), "unknown": ("",), "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount")}  # fmt: skip
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


class _IdleQueue:
    """What HealthServer asks of the operator's work queue."""

    alive = True
    known: set = set()

    def depth(self) -> int:
        return 0


@contextmanager
def operator_metrics_endpoint() -> Iterator[str]:
    """The operator's own /metrics handler (rlp_operator.runtime.HealthServer) over its OperatorMetrics,
    after one run's worth of updates; yields the URL."""
    from rlp_operator.metrics import OperatorMetrics
    from rlp_operator.runtime import HealthServer
    from rlp_operator.status import RLPRunStatus

    from infra._process import free_port

    metrics = OperatorMetrics()
    status = RLPRunStatus.model_validate({
        "phase": "Running", "currentPhase": "optimize", "round": 1,
        "phases": [{"name": "generate", "round": 1, "state": "Succeeded"},
                   {"name": "optimize", "round": 1, "state": "Running", "attemptStartedAt": "2026-01-01T00:00:00Z"}],
    })  # fmt: skip
    metrics.observe_run("ml", "demo", status)
    metrics.observe_run("ml", "broken", RLPRunStatus.model_validate({"phase": "Failed"}))
    for state in ("Pending", "Running", "Succeeded"):
        metrics.transition("generate", state)
    metrics.phase_duration("generate", "succeeded", 42.0)
    metrics.phase_duration("optimize", "failed", 7.0)
    metrics.retry("optimize")
    metrics.error("reconcile")

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = free_port()
    server = HealthServer(metrics, _IdleQueue(), asyncio.Event())
    try:
        asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", [port]), loop).result(10)
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@contextmanager
def phase_metrics_endpoint() -> Iterator[str]:
    """A phase pod's /metrics (PhaseTelemetry.serve, as `rlp phase` does) after a few training steps."""
    from rlp_core.telemetry import PhaseTelemetry

    from infra._process import free_port

    tel = PhaseTelemetry(run="demo", round=1, phase="optimize", total_steps=4)
    tel.step(tokens=512, reward_mean=0.4, kl=0.02, policy_loss=0.7, value_loss=1.2)
    tel.step(tokens=512, reward_mean=0.5, kl=0.03, policy_loss=0.6, value_loss=1.1, rm_accuracy=0.8, clip_fraction=0.1,
             zero_signal_groups=0.25)
    tel.set_accuracy("policy_gold", 0.75)
    port = free_port()
    tel.serve(port, addr="127.0.0.1")
    yield f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="module")
def scraped() -> dict[str, set[str]]:
    with operator_metrics_endpoint() as url:
        operator = exported_names(scrape(url))
    with phase_metrics_endpoint() as url:
        phase = exported_names(scrape(url))
    return {"operator": operator, "phase": phase}


# --------------------------------------------------------------------------------------------------
# the dashboard


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])  # collapsed rows
    return out


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    queries = []
    for p in panels(dash):
        for t in p.get("targets", []):
            queries.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
            queries.append((f"variable {var['name']}", inner.group(1) if inner else q))
    return queries


def recorded_names() -> set[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r} | CHART_RECORDED


def check_names_exported(queries: list[tuple[str, str]], exported: set[str]) -> list[str]:
    problems = []
    recorded = recorded_names()
    for where, expr in queries:
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: no metric in {expr!r}")
        for name in names - PROMETHEUS_SYNTHETIC:
            if ":" in name:
                if name not in recorded:
                    problems.append(f"{where}: recording rule {name} is not defined by the chart")
            elif name not in exported:
                problems.append(f"{where}: {name} is exported by neither the operator nor a phase pod")
    return problems


def test_dashboard_is_valid_grafana_json():
    dash = dashboard()
    assert dash["uid"] == "rlp-overview" and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels(dash):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"], p["title"]
            assert t["expr"].count("(") == t["expr"].count(")"), (p["title"], t["expr"])
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
    # no two panels overlap
    cells: dict[tuple[int, int], str] = {}
    for p in panels(dash):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "run", "phase"} <= set(variables)


def test_dashboard_covers_runs_phases_and_training_curves():
    used = set()
    for _, expr in dashboard_queries(dashboard()):
        used |= metric_names(expr)
    required = {
        "rlp_runs",  # runs by state
        "rlp_run_info",  # phase timeline per run
        "rlp_phase_start_timestamp_seconds",  # running phases
        "rlp_phase_duration_seconds_bucket", "rlp_phase_duration_seconds_sum", "rlp_phase_duration_seconds_count",
        "rlp_phase_transitions_total", "rlp_phase_retries_total", "rlp_reconcile_errors_total",
        "rlp_job_reward_mean", "rlp_job_kl", "rlp_job_loss", "rlp_job_rm_accuracy", "rlp_job_tokens_per_second",
        "rlp_job_progress", "rlp_job_step_seconds_bucket", "rlp_job_steps_total", "rlp_job_policy_stat",
    }  # fmt: skip
    assert required <= used, f"dashboard lacks {sorted(required - used)}"


def test_every_dashboard_query_names_an_exported_metric(scraped):
    exported = scraped["operator"] | scraped["phase"]
    problems = check_names_exported(dashboard_queries(dashboard()), exported)
    assert not problems, "\n".join(problems)


def test_phase_pod_metrics_filtered_by_namespace_run_and_phase():
    """Training panels follow the $namespace/$run/$phase variables (namespace: the pod's, from the scrape)."""
    for where, expr in dashboard_queries(dashboard()):
        if "rlp_job_" in expr:
            assert 'namespace=~"$namespace"' in expr and 'run=~"$run"' in expr and 'phase=~"$phase"' in expr, where


def test_metrics_contract_names_are_all_exported(scraped):
    """docs/metrics.md, the contract the dashboard and alerts are written against, matches the scrapes."""
    text = (REPO / "docs" / "metrics.md").read_text()
    operator_part, phase_part = text.split("## Phase job pods", 1)
    for part, exported in ((operator_part, scraped["operator"]), (phase_part, scraped["phase"])):
        documented = set(re.findall(r"^\| `(rlp_[a-z0-9_]+)` \|", part, flags=re.M))
        assert documented, "no metric rows found in docs/metrics.md"
        # a histogram is documented by its family name; its series are name_bucket/_sum/_count
        missing = {n for n in documented if n not in exported and n + "_bucket" not in exported}
        assert not missing, f"documented but not exported: {sorted(missing)}"


def test_dashboard_configmap_is_for_the_grafana_sidecar():
    from test_chart import one, render

    objs = render(set_={"dashboard.namespace": "monitoring"})
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["rlp.json"]) == dashboard()
    assert not by_kind_configmaps(render(set_={"dashboard.enabled": "false"}))


def by_kind_configmaps(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] == "ConfigMap"]


def test_name_check_catches_unknown_and_undefined_names(scraped):
    exported = scraped["operator"] | scraped["phase"]
    problems = check_names_exported(
        [("a", "rate(rlp_job_stepz_total[5m])"), ("b", "rlp:nope"), ("c", "sum(rlp_runs)"), ("d", "vector(1)")], exported
    )
    assert [p.split(":")[0] for p in problems] == ["a", "b", "d"]
