"""Command-line tools the chart tests run: helm and promtool (built by scripts/build-test-servers.sh into
the test-binary cache), and the Prometheus Operator's CRDs (from its Go module, cached by Go's module
cache), so that the chart's ServiceMonitor, PodMonitor and PrometheusRule are checked against their
real schemas.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from . import _process

# github.com/prometheus-operator/prometheus-operator: its module ships the CRDs under
# example/prometheus-operator-crd/ (Apache-2.0).
PROMETHEUS_OPERATOR_VERSION = "0.85.0"
PROMETHEUS_OPERATOR_CRDS = ("servicemonitors", "podmonitors", "prometheusrules")


def helm_bin() -> Path:
    """The cached helm (v4) binary."""
    return _tool("helm")


def promtool_bin() -> Path:
    """The cached promtool binary."""
    return _tool("promtool")


def _tool(name: str) -> Path:
    path = _process.ensure_test_binaries() / name
    if not os.access(path, os.X_OK):
        raise _process.ServerError(f"{path} is missing: scripts/build-test-servers.sh should have built it")
    return path


def _go() -> str:
    for candidate in (os.environ.get("RLP_GO"), shutil.which("go"), "/usr/local/go/bin/go"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise _process.ServerError("no go command: the Prometheus Operator CRDs come from its Go module")


def prometheus_operator_crds() -> list[Path]:
    """The CRD files of ServiceMonitor, PodMonitor and PrometheusRule, copied next to the test binaries
    (downloaded once with `go mod download`, like the binaries' own modules)."""
    cache = _process.ensure_test_binaries().parent / f"prometheus-operator-{PROMETHEUS_OPERATOR_VERSION}-crds"
    wanted = [cache / f"monitoring.coreos.com_{name}.yaml" for name in PROMETHEUS_OPERATOR_CRDS]
    if all(p.is_file() and p.stat().st_size for p in wanted):
        return wanted
    env = {**os.environ, "GOFLAGS": ""}
    proc = subprocess.run(
        [_go(), "mod", "download", "-json", f"github.com/prometheus-operator/prometheus-operator@v{PROMETHEUS_OPERATOR_VERSION}"],
        cwd=cache.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise _process.ServerError(f"go mod download of the Prometheus Operator failed:\n{proc.stdout}\n{proc.stderr}")
    source = Path(json.loads(proc.stdout)["Dir"]) / "example" / "prometheus-operator-crd"
    cache.mkdir(parents=True, exist_ok=True)
    for path in wanted:
        tmp = path.with_suffix(f".tmp.{os.getpid()}")
        shutil.copyfile(source / path.name, tmp)
        tmp.chmod(0o644)
        tmp.replace(path)
    return wanted
