"""`rlp phase NAME --spec FILE --round K`, what every phase pod runs, as a real process.

On a file:// store and on S3 (versitygw, credentials only through AWS_* and RLP_S3_ENDPOINT as the
operator passes them): a phase runs and publishes its manifest, a rerun is a no-op, failures exit
non-zero with one clear line, and an optimize SIGKILLed after its first checkpoint (held there by its reward
function, and its /metrics scraped over HTTP) resumes from it without touching the earlier phases.
Specs are tiny (a few steps) and are written as JSON, like the operator's ConfigMap.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from infra._process import free_port
from infra.kube import wait_until

from rlp_jobs.phase import torchrun_argv

RLP = Path(sys.executable).parent / "rlp"  # the console script the image's ENTRYPOINT runs
RUN = "entry"
EARLY = ("sft", "reward", "generate", "refine", "synthesize")  # the phases before round 1's optimize


def tiny_spec(store_uri: str, **optimization) -> dict:
    return {
        "apiVersion": "rlp.dev/v1alpha1",
        "kind": "RLPRun",
        "metadata": {"name": RUN, "namespace": "team-a"},
        "spec": {
            "storage": {"uri": store_uri},
            "policy": {"sft": {"tiny": {"hiddenSize": 32, "numLayers": 1, "numHeads": 2, "intermediateSize": 64,
                                        "maxPositions": 32},
                               "training": {"epochs": 0.4, "batchSize": 64, "learningRate": 0.003}}},
            "rewardModel": {"training": {"epochs": 0.5, "batchSize": 64, "learningRate": 0.001}},
            "generation": {"samplesPerPrompt": 2, "maxPrompts": 16, "maxNewTokens": 4},
            "rewardLearning": {"strategy": "rlp-spg", "spg": {"training": {"epochs": 1, "batchSize": 32}}},
            "optimization": {"algorithm": "ppo", "steps": 6, "rolloutBatchSize": 8, "miniBatchSize": 8, "ppoEpochs": 1,
                             "maxNewTokens": 4, "checkpointEvery": 2, "deepspeed": {"enabled": "false"},
                             **optimization},
            "evaluation": {"maxPrompts": 16, "maxNewTokens": 4},
        },
    }  # fmt: skip


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec, indent=2))
    return path


def phase_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RLP_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def phase_cmd(name: str, spec: Path, round_: int, *args: str) -> list[str]:
    return [str(RLP), "phase", name, "--spec", str(spec), "--round", str(round_), *args]


def rlp_phase(name: str, spec: Path, round_: int, *args: str, cwd: Path, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:  # fmt: skip
    return subprocess.run(phase_cmd(name, spec, round_, *args), cwd=cwd, env=env or phase_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def scrape(port: int) -> dict[tuple[str, tuple], float] | None:
    """/metrics as {(sample name, sorted labels): value}, or None when nothing answers (yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except (OSError, http.client.HTTPException):  # not up yet, or the process ended mid-answer (IncompleteRead)
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def labelled(samples: dict, name: str, **labels: str) -> list[float]:
    return [v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab)]


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    """Every file with (size, mtime_ns): a rerun that rewrites anything shows up here."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------------
# torchrun re-exec


def test_torchrun_argv_from_the_indexed_jobs_environment():
    argv = ["phase", "optimize", "--spec", "/etc/rlp/spec.json", "--round", "2"]
    # one process, one node: run in this process
    assert torchrun_argv(argv, {}) is None
    assert torchrun_argv(argv, {"NNODES": "1", "NPROC_PER_NODE": "1"}) is None
    # what the operator sets on an indexed Job's pods (NODE_RANK from the completion index)
    env = {"NNODES": "3", "NPROC_PER_NODE": "4", "NODE_RANK": "2", "MASTER_ADDR": "run-r2-optimize-a1-0.run-r2-optimize-a1",
           "MASTER_PORT": "29500", "WORLD_SIZE": "12"}  # fmt: skip
    cmd = torchrun_argv(argv, env)
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nnodes=3", "--nproc-per-node=4", "--node-rank=2",
                   "--master-addr=run-r2-optimize-a1-0.run-r2-optimize-a1", "--master-port=29500",
                   "-m", "rlp_cli", *argv]  # fmt: skip
    # the node rank falls back to the Job's completion index; GPUS_PER_NODE or the visible GPUs give the width
    cmd = torchrun_argv(argv, {"NNODES": "2", "GPUS_PER_NODE": "2", "JOB_COMPLETION_INDEX": "1"})
    assert "--node-rank=1" in cmd and "--nproc-per-node=2" in cmd and "--master-addr=127.0.0.1" in cmd
    cmd = torchrun_argv(argv, {}, local_gpus=8)
    assert "--nnodes=1" in cmd and "--nproc-per-node=8" in cmd
    assert torchrun_argv(argv, {}, local_gpus=0) is None
    # torchrun's workers (LOCAL_RANK set) run the phase themselves: no re-exec loop
    assert torchrun_argv(argv, {**env, "LOCAL_RANK": "0"}) is None


# --------------------------------------------------------------------------------------------------
# failures


def test_failures_exit_non_zero_with_one_clear_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "RLPRun", "metadata": {"name": RUN},
                               "spec": {"rounds": 0, "optimization": {"algoritm": "ppo"}}}))  # fmt: skip
    res = rlp_phase("sft", bad, 0, cwd=tmp_path)
    assert res.returncode == 2
    assert "spec.rounds" in res.stderr and "spec.optimization.algoritm" in res.stderr

    res = rlp_phase("sft", tmp_path / "missing.json", 0, cwd=tmp_path)
    assert res.returncode == 2 and "missing.json" in res.stderr

    store = tmp_path / "store"
    spec = write_spec(tmp_path / "spec.json", tiny_spec(f"file://{store}"))
    # an input phase that has not run: names the missing output and what to do
    res = rlp_phase("generate", spec, 1, "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("rlp phase generate (round 1) failed:"), res.stderr[-2000:]
    assert "inputs ['round-0/sft'] are not all complete; run them first" in last
    assert not list(store.rglob("_MANIFEST.json")) if store.exists() else True

    # a phase that is not in the run's plan
    res = rlp_phase("optimize", spec, 3, "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert res.returncode == 1
    assert "not in round 3 of this run's plan" in res.stderr.strip().splitlines()[-1]

    # storage that cannot be reached: says which endpoint and what to check
    s3_spec = write_spec(tmp_path / "s3.json", tiny_spec("s3://no-such-bucket/runs"))
    env = phase_env(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", RLP_S3_ENDPOINT=f"http://127.0.0.1:{free_port()}",
                    AWS_MAX_ATTEMPTS="1")  # fmt: skip
    res = rlp_phase("sft", s3_spec, 0, "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path, env=env)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("rlp phase sft (round 0) failed: cannot read s3://no-such-bucket/runs/"), res.stderr[-2000:]
    assert "Check that the S3 endpoint is reachable" in last


# --------------------------------------------------------------------------------------------------
# file:// store: run, /metrics while running, idempotent rerun


def test_phase_on_a_file_store_publishes_its_manifest_and_reruns_as_a_no_op(tmp_path):
    store = tmp_path / "store"
    spec = write_spec(tmp_path / "spec.json", tiny_spec(f"file://{store}"))
    first = rlp_phase("sft", spec, 0, "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]

    out = store / "team-a" / RUN / "round-0" / "sft"
    manifest = json.loads((out / "_MANIFEST.json").read_text())
    assert manifest["phase"] == "sft" and manifest["metrics"]["steps"] >= 2
    assert manifest["metrics"]["peak_rss_mb"] > 50
    assert any(f["path"].endswith(".safetensors") for f in manifest["files"])
    before = files_under(store)

    again = rlp_phase("sft", spec, 0, "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "phase sft round 0: Cached" in again.stderr
    assert files_under(store) == before  # nothing rewritten, manifest included


# --------------------------------------------------------------------------------------------------
# S3: SIGKILL during optimize, resume from its checkpoint, earlier phases untouched, rerun no-op


def _run_early_phases(spec: dict, bucket: str, s3_server, cache: Path) -> None:
    """The phases before optimize, in this process (what earlier pods would have left in S3)."""
    from rlp_core.pipeline import execute_phase
    from rlp_core.spec import parse_run
    from rlp_core.store import Store

    run = parse_run(spec)
    root = Store.from_uri(f"s3://{bucket}/runs", endpoint=s3_server.endpoint_url,
                          access_key=s3_server.access_key, secret_key=s3_server.secret_key)  # fmt: skip
    for round_, phase in run.spec.phase_plan():
        if phase == "optimize":
            return
        execute_phase(run, root, round_, phase, cache_dir=cache)


def _s3_manifests(s3, bucket: str) -> dict[str, bytes]:
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", []) if o["Key"].endswith("/_MANIFEST.json")]  # fmt: skip
    return {k.split("/")[-2]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


# The optimize's reward: the task's gold score, as a user's Python function. Where HOLD_AFTER_CALLS is set it
# blocks from that call on, so a phase can be caught mid-way on any machine, however fast it trains.
HOLDING_REWARD = """import os, threading
from rlp_core.tasks import TASKS
_calls = 0
def score(prompts, responses):
    global _calls
    _calls += 1
    if _calls > int(os.environ.get("HOLD_AFTER_CALLS", "1000000000")):
        threading.Event().wait()
    return [TASKS["arith"].gold_score(p, r) for p, r in zip(prompts, responses)]
"""


@pytest.mark.slow
def test_optimize_on_s3_killed_after_its_first_checkpoint_resumes_from_it(tmp_path, s3_server, s3_client, s3_bucket):
    """The reward function holds step 4's rollout (one call a step), after step 3's checkpoint: the phase is
    scraped and killed there, whatever the machine's speed."""
    spec_doc = tiny_spec(f"s3://{s3_bucket}/runs", steps=24, checkpointEvery=3, reward="function",
                         rewardFunction={"uri": "python://holding_reward:score"})
    (tmp_path / "holding_reward.py").write_text(HOLDING_REWARD)
    _run_early_phases(spec_doc, s3_bucket, s3_server, tmp_path / "early-cache")
    early = _s3_manifests(s3_client, s3_bucket)
    assert set(early) == set(EARLY)

    spec = write_spec(tmp_path / "spec.json", spec_doc)  # no endpoint, no keys: the pod's environment gives them
    port = free_port()
    env = phase_env(AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
                    RLP_S3_ENDPOINT=s3_server.endpoint_url, RLP_METRICS_PORT=str(port), PYTHONPATH=str(tmp_path))  # fmt: skip
    args = ("--cache-dir", str(tmp_path / "cache"))
    prefix = f"runs/team-a/{RUN}/round-1/optimize/"
    proc = subprocess.Popen(phase_cmd("optimize", spec, 1, *args), cwd=tmp_path, env={**env, "HOLD_AFTER_CALLS": "3"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    labels = {"run": RUN, "round": "1", "phase": "optimize"}
    try:
        deadline = time.monotonic() + 300
        while not s3_client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix + "_checkpoints/LATEST.json")["KeyCount"]:
            assert proc.poll() is None, f"optimize ended before it checkpointed: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        wait_until(lambda: labelled(scrape(port) or {}, "rlp_job_steps_total", **labels), timeout=60)
        scraped = scrape(port)  # held in step 4: the metrics of steps 1-3, served while the phase runs
        assert proc.poll() is None, "optimize ended while its reward function held it"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix).get("Contents", [])]
    assert prefix + "_MANIFEST.json" not in keys  # a killed phase is not complete
    assert labelled(scraped, "rlp_job_steps_total", **labels)[0] == 3
    assert labelled(scraped, "rlp_job_progress", **labels)[0] == pytest.approx(3 / 24)
    assert labelled(scraped, "rlp_job_step_seconds_count", **labels)[0] == 3
    assert labelled(scraped, "rlp_job_peak_memory_bytes", **labels, memory="rss")[0] > 50 * 2**20  # torch alone is more
    for name in ("rlp_job_reward_mean", "rlp_job_kl", "rlp_job_tokens_per_second"):
        assert labelled(scraped, name, **labels), name
    assert labelled(scraped, "rlp_job_loss", **labels), "no loss terms"

    res = rlp_phase("optimize", spec, 1, *args, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    after = _s3_manifests(s3_client, s3_bucket)
    for phase in EARLY:  # completed phases were not redone (their manifests are written once)
        assert after[phase] == early[phase], phase
    manifest = json.loads(after["optimize"])
    metrics = manifest["metrics"]
    assert metrics["resumed_from_step"] >= 3 and metrics["resumed_from_step"] % 3 == 0, metrics
    assert metrics["steps"] == 24  # the history covers every step, the resumed ones included
    assert any(f["path"].endswith(".safetensors") for f in manifest["files"])

    from rlp_core.manifest import verify_manifest
    from rlp_core.store import Store

    store = Store.from_uri(f"s3://{s3_bucket}/{prefix}", endpoint=s3_server.endpoint_url,
                           access_key=s3_server.access_key, secret_key=s3_server.secret_key)  # fmt: skip
    assert verify_manifest(store, deep=True) is not None

    again = rlp_phase("optimize", spec, 1, *args, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "phase optimize round 1: Cached" in again.stderr
    assert _s3_manifests(s3_client, s3_bucket) == after


# --------------------------------------------------------------------------------------------------
# multi-node optimize: two "pods" of an indexed Job, re-executed under torchrun, rendezvous on loopback


def _run_early_phases_local(spec: dict, store: Path, cache: Path) -> None:
    from rlp_core.pipeline import execute_phase
    from rlp_core.spec import parse_run
    from rlp_core.store import Store

    run = parse_run(spec)
    for round_, phase in run.spec.phase_plan():
        if phase == "optimize":
            return
        execute_phase(run, Store.from_uri(f"file://{store}"), round_, phase, cache_dir=cache)


@pytest.mark.slow
def test_optimize_across_two_indexed_pods_runs_under_torchrun_with_deepspeed(tmp_path):
    store = tmp_path / "store"
    spec_doc = tiny_spec(f"file://{store}", steps=2, checkpointEvery=1, rolloutBatchSize=8, miniBatchSize=4,
                         deepspeed={"enabled": "auto", "zeroStage": 2})  # fmt: skip
    _run_early_phases_local(spec_doc, store, tmp_path / "early-cache")
    spec = write_spec(tmp_path / "spec.json", spec_doc)
    port = free_port()
    # what the operator puts on the pods of a 2-node indexed Job (NODE_RANK from the completion index)
    common = {"NNODES": "2", "NPROC_PER_NODE": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = []
    for rank in (0, 1):
        cwd = tmp_path / f"pod-{rank}"
        cwd.mkdir()
        procs.append(subprocess.Popen(phase_cmd("optimize", spec, 1, "--cache-dir", str(cwd / "cache")), cwd=cwd,
                                      env=phase_env(**common, NODE_RANK=str(rank)), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))  # fmt: skip
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=400)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {rank}:\n{out[-4000:]}"
    manifest = json.loads((store / "team-a" / RUN / "round-1" / "optimize" / "_MANIFEST.json").read_text())
    assert manifest["metrics"]["steps"] == 2
    assert any(f["path"].endswith(".safetensors") for f in manifest["files"])
    # both pods went through torchrun, and DeepSpeed saw a world of two
    for rank, out in enumerate(outputs):  # each pod re-executed itself under torchrun and joined a world of two
        assert "re-executing under torchrun" in out and f"--node-rank={rank}" in out, out[-3000:]
        assert f"optimize: rank {rank} of 2 (node {rank}, local rank 0)" in out, out[-3000:]
