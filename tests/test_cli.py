"""The `rlp` command's subcommands as processes."""

import subprocess
import sys


def rlp(*args):
    return subprocess.run([sys.executable, "-m", "rlp_cli", *args], capture_output=True, text=True, timeout=120)


def test_rlp_operator_passes_its_flags_through():
    res = rlp("operator", "--standalone", "--help")
    assert res.returncode == 0, res.stderr
    assert "--metrics-port" in res.stdout and "--peering" in res.stdout


def test_rlp_crd_prints_the_committed_crd():
    from pathlib import Path

    res = rlp("crd")
    assert res.returncode == 0, res.stderr
    assert res.stdout == (Path(__file__).resolve().parents[1] / "crds" / "rlp.dev_rlpruns.yaml").read_text()
