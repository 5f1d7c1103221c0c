"""What a run reuses is exactly what its spec asks for (issue 14): the cache, spec changes, damaged
outputs and their repair, model URIs, checkpoints without pickle, storage outages, one-line errors.

Runs are the tiny spec of test_phase_entrypoint (seconds per run); one seed-0 run is made once per
module and copied (file:// stores are plain directories) by the tests that change it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_phase_entrypoint import tiny_spec

from rlp_core.checkpoint import CheckpointError, StoreCheckpointer, decode_state, encode_state
from rlp_core.pipeline import PhaseError, SpecChanged, execute_phase
from rlp_core.provenance import verify_run
from rlp_core.runner import run_local
from rlp_core.spec import SpecError, parse_run, settings_problems
from rlp_core.store import LocalStore, Store

NS_RUN = Path("team-a") / "entry"


def _spec(store: Path, **changes) -> dict:
    doc = tiny_spec(f"file://{store}")
    doc["spec"].update(changes)
    return doc


def _manifests(store: Path) -> dict[str, dict]:
    return {p.parent.relative_to(store / NS_RUN).as_posix(): json.loads(p.read_text())
            for p in store.rglob("_MANIFEST.json")}


def _files(manifests: dict[str, dict]) -> dict[str, dict[str, str]]:
    """sha256 of every output file but optimize's history (it records step times)."""
    return {k: {f["path"]: f["sha256"] for f in m["files"] if f["path"] != "history.jsonl"}
            for k, m in manifests.items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished seed-0 run's store (do not modify: copy it)."""
    root = tmp_path_factory.mktemp("base")
    run_local(parse_run(_spec(root / "store")), cache_dir=root / "cache")
    return root / "store"


def _copy(base: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(base, dst)
    return dst


# 1 -----------------------------------------------------------------------------------------------------
def test_a_shared_cache_never_serves_another_stores_outputs(base, tmp_path):
    """Issue 14.1: seed 7 on a new store with the cache of a seed-0 run equals seed 7 from a clean directory."""
    shared = tmp_path / "shared-cache"
    run_local(parse_run(_spec(base)), cache_dir=shared)  # fills the cache with seed 0's outputs
    seeded = run_local(parse_run(_spec(tmp_path / "seed7", seed=7)), cache_dir=shared)
    clean = run_local(parse_run(_spec(tmp_path / "clean", seed=7)), cache_dir=tmp_path / "clean-cache")
    measured = lambda evaluation: {k: v for k, v in evaluation.items() if not k.startswith("peak_")}  # noqa: E731 - not memory
    assert measured(seeded.evaluation) == measured(clean.evaluation)
    assert _files(_manifests(tmp_path / "seed7")) == _files(_manifests(tmp_path / "clean"))
    assert _files(_manifests(tmp_path / "seed7"))["round-0/sft"] != _files(_manifests(base))["round-0/sft"]


# 2 -----------------------------------------------------------------------------------------------------
def test_a_changed_spec_stops_naming_the_fields_or_reruns_under_new_paths(base, tmp_path):
    store = _copy(base, tmp_path)
    before = _manifests(store)
    changed = _spec(store, seed=7)
    changed["spec"]["optimization"]["steps"] = 4
    with pytest.raises(SpecChanged, match=r"round-0/sft .* changed: seed \(default -> 7\).*--rerun-changed"):
        run_local(parse_run(changed), cache_dir=tmp_path / "cache")
    assert _manifests(store) == before  # nothing was run or replaced

    report = run_local(parse_run(changed), cache_dir=tmp_path / "cache", rerun_changed=True)
    assert {r.state for r in report.results} == {"Succeeded", "Skipped"}
    assert all("~" in r.output.rsplit("/", 1)[-1] for r in report.results)
    after = _manifests(store)
    assert {k: v for k, v in after.items() if "~" not in k} == before  # the old outputs are kept
    optimize = next(v for k, v in after.items() if k.startswith("round-1/optimize~"))
    assert optimize["spec_fields"]["optimization"]["steps"] == 4 and optimize["metrics"]["steps"] == 4
    assert optimize["inputs"].keys() == {"round-0/sft", "round-1/synthesize"}
    assert (store / NS_RUN / "_specs" / f"{optimize['spec_hash']}.json").is_file()  # the spec beside the run

    again = run_local(parse_run(changed), cache_dir=tmp_path / "cache")  # no flag needed to reuse them now
    assert {r.state for r in again.results} == {"Cached"}
    assert [r.output for r in again.results] == [r.output for r in report.results]
    assert {r.state for r in run_local(parse_run(_spec(store)), cache_dir=tmp_path / "cache").results} == {"Cached"}


def test_a_change_reruns_only_the_phases_it_affects(base, tmp_path):
    store = _copy(base, tmp_path)
    changed = _spec(store)
    changed["spec"]["evaluation"]["maxPrompts"] = 8
    with pytest.raises(SpecChanged, match=r"round-1/evaluate .* evaluation.maxPrompts \(16 -> 8\)"):
        run_local(parse_run(changed), cache_dir=tmp_path / "cache")
    report = run_local(parse_run(changed), cache_dir=tmp_path / "cache", rerun_changed=True)
    assert [r.state for r in report.results][:-1] == ["Cached"] * 6 and report.results[-1].state == "Succeeded"


# 4 -----------------------------------------------------------------------------------------------------
def test_same_size_corruption_is_found_by_verify_and_repaired_by_redo(base, tmp_path):
    store = _copy(base, tmp_path)
    run = parse_run(_spec(store))
    weights = store / NS_RUN / "round-0" / "sft" / "policy" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10:] = bytes(10)  # same size, other bytes
    weights.write_bytes(bytes(data))
    rows = {key: (state, detail) for key, state, detail in verify_run(run, LocalStore(store))}
    assert rows["round-0/sft"][0] == "damaged" and "model.safetensors does not match its sha256" in rows["round-0/sft"][1]
    assert {state for key, (state, _) in rows.items() if key != "round-0/sft"} == {"ok"}

    assert {r.state for r in run_local(run, cache_dir=tmp_path / "cache").results} == {"Cached"}  # sizes match
    with pytest.raises(PhaseError, match=r"sha256 mismatch .*model.safetensors.*--redo round-0/sft"):
        # a phase that downloads the damaged output checks its content
        execute_phase(run, LocalStore(store), 1, "generate", cache_dir=tmp_path / "fresh-cache", redo=True)
    report = run_local(run, cache_dir=tmp_path / "cache", redo=["sft"])
    assert {r.state for r in report.results} == {"Succeeded", "Skipped"}  # sft and everything that reads it
    assert {state for _, state, _ in verify_run(run, LocalStore(store))} == {"ok"}


def test_a_shorter_damaged_output_stops_the_run_with_the_redo_to_run(base, tmp_path):
    store = _copy(base, tmp_path)
    (store / NS_RUN / "round-1" / "generate" / "samples.jsonl").write_text("junk\n")
    run = parse_run(_spec(store))
    with pytest.raises(PhaseError, match=r"round-1/generate is damaged: .*samples.jsonl has 5 bytes.*"
                                         r"--redo round-1/generate"):
        run_local(run, cache_dir=tmp_path / "cache")
    report = run_local(run, cache_dir=tmp_path / "cache", redo=["round-1/generate"])
    assert [r.state for r in report.results][:2] == ["Cached", "Cached"]
    assert {r.state for r in report.results[2:]} == {"Succeeded", "Skipped"}


# 5 -----------------------------------------------------------------------------------------------------
def test_an_empty_model_prefix_is_an_error_and_is_fetched_once_uploaded(base, tmp_path, s3_server, s3_bucket,
                                                                        monkeypatch):
    from rlp_core.context import PhaseContext
    from rlp_core.telemetry import PhaseTelemetry

    doc = _spec(tmp_path / "store")
    doc["spec"]["storage"]["endpoint"] = s3_server.endpoint_url
    uri = f"s3://{s3_bucket}/models/sft"
    doc["spec"]["policy"]["model"] = uri
    run = parse_run(doc)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    ctx = PhaseContext(run, 1, "generate", LocalStore(tmp_path / "store"), tmp_path / "cache", tmp_path / "out",
                       PhaseTelemetry("entry", 1, "generate"))
    with pytest.raises(PhaseError, match=rf"{uri}: not a model directory \(nothing there\); upload"):
        ctx.fetch_uri(uri)
    s3_server.client().put_object(Bucket=s3_bucket, Key="models/sft/config.json", Body=b"\x00\xff junk")
    with pytest.raises(PhaseError, match=rf"{uri}/config.json: not a JSON transformers config"):
        ctx.fetch_uri(uri)
    s3_server.store(f"s3://{s3_bucket}/models/sft").upload_dir(base / NS_RUN / "round-0" / "sft" / "policy")
    assert (ctx.fetch_uri(uri) / "model.safetensors").is_file()  # the same prefix, now complete


# 3 -----------------------------------------------------------------------------------------------------
def test_checkpoints_are_safetensors_and_json_verified_on_load(tmp_path):
    import torch

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    import random

    state = {"step": 4, "module": model.state_dict(), "optimizer": optimizer.state_dict(), "kl_coef": 0.05,
             "history": [{"step": 1, "kl": float("inf")}], "rng": {"python": random.Random(1).getstate(),
                                                                    "torch": torch.get_rng_state()}}
    tensors, rest = encode_state(state)
    back = decode_state(tensors, rest)
    assert back["rng"]["python"] == state["rng"]["python"] and back["history"] == state["history"]
    assert torch.equal(back["module"]["weight"], state["module"]["weight"])
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    restored.load_state_dict(back["optimizer"])  # int keys and tuples (betas) survive JSON

    store = LocalStore(tmp_path / "phase")
    checkpointer = StoreCheckpointer(store)
    assert checkpointer.load() is None
    checkpointer.save(4, state)
    checkpointer.wait()
    checkpointer.save(8, {**state, "step": 8})
    checkpointer.wait()
    assert sorted(e.path for e in store.list()) == ["_checkpoints/LATEST.json", "_checkpoints/step-8/state.json",
                                                    "_checkpoints/step-8/state.safetensors"]
    assert StoreCheckpointer(store).load()["step"] == 8
    from safetensors import safe_open

    with safe_open(str(tmp_path / "phase/_checkpoints/step-8/state.safetensors"), "pt") as f:
        assert len(list(f.keys())) == len(tensors)

    weights = tmp_path / "phase/_checkpoints/step-8/state.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint file://.*/_checkpoints/step-8/state.safetensors is corrupt"
                                              r".*delete file://.*/_checkpoints/ to restart the phase from step 0"):
        StoreCheckpointer(store).load()


def test_a_checkpoint_that_cannot_be_written_does_not_stop_training(s3_server, caplog):
    store = s3_server.store("s3://no-such-bucket-rlp/phase", retry_seconds=0)
    checkpointer = StoreCheckpointer(store)
    checkpointer.save(2, {"step": 2})
    checkpointer.wait()  # logged, not raised
    assert "checkpoint at step 2 not saved" in caplog.text and "does not exist" in caplog.text


def test_a_finished_phase_leaves_no_checkpoints(base):
    assert not list(base.rglob("_checkpoints"))
    assert not list(base.rglob("*.pt"))


# 8 -----------------------------------------------------------------------------------------------------
def test_settings_that_cannot_work_together_are_rejected_or_warned_about():
    doc = tiny_spec("file://x")
    doc["spec"]["generation"]["maxNewTokens"] = 8192
    with pytest.raises(SpecError, match=r"spec.generation.maxNewTokens: 8192 leaves no room for the prompt within "
                                        r"spec.policy.sft.tiny.maxPositions \(32\)"):
        parse_run(doc)
    doc = tiny_spec("file://x")
    doc["spec"]["generation"]["samplesPerPrompt"] = 1
    _, warnings = settings_problems(parse_run(doc).spec)
    assert warnings and "samplesPerPrompt is 1: rlp-spg builds its pairs from several samples" in warnings[0]


# 7 -----------------------------------------------------------------------------------------------------
def _rlp(*args, cwd):
    return subprocess.run([sys.executable, "-m", "rlp_cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_rlp_run_errors_are_one_line_naming_what_to_fix(base, tmp_path):
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    res = _rlp("run", str(junk), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"{junk}: not UTF-8 text (invalid byte at offset 0); give the RLPRun YAML"]

    doc = _spec(tmp_path / "store")
    doc["spec"]["storage"]["uri"] = "gs://bucket/runs"
    spec = tmp_path / "gs.json"
    spec.write_text(json.dumps(doc))
    res = _rlp("run", str(spec), cwd=tmp_path)
    assert res.returncode == 2 and "spec.storage.uri: Value error, must be s3://BUCKET/PREFIX" in res.stderr

    data = tmp_path / "prompts.jsonl"
    data.write_bytes(b"\xff\xfe\x00junk")
    doc = _spec(tmp_path / "store", prompts=str(data))
    spec.write_text(json.dumps(doc))
    res = _rlp("run", str(spec), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (f"rlp run: {data}: not UTF-8 text (invalid byte at offset 0); "
                                                   "expected JSONL with one Prompt per line")
    assert "Traceback" not in res.stderr

    store = _copy(base, tmp_path)  # a changed spec, then a damaged checkpoint: one line each
    spec.write_text(json.dumps(_spec(store, seed=3)))
    res = _rlp("run", str(spec), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "rlp run: round-0/sft in file://" in res.stderr and "seed (default -> 3)" in res.stderr

    optimize = store / NS_RUN / "round-1" / "optimize"
    shutil.rmtree(optimize)
    (optimize / "_checkpoints").mkdir(parents=True)
    (optimize / "_checkpoints" / "LATEST.json").write_text("{not json")
    spec.write_text(json.dumps(_spec(store)))
    res = _rlp("run", str(spec), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"rlp run: checkpoint file://{optimize}/_checkpoints/LATEST.json is unreadable" in res.stderr
    assert f"delete file://{optimize}/_checkpoints/ to restart the phase from step 0" in res.stderr


def test_a_bad_spec_fails_before_the_training_stack_is_imported(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("kind: RLPRun\nspec:\n  rounds: 0\n")
    code = ("import sys; from rlp_cli.main import main; rc = main(['run', sys.argv[1]]); "
            "assert rc == 2 and 'torch' not in sys.modules, sorted(sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "spec.rounds" in res.stderr


# 6 -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1800)  # its own waits add up to 600 + 60 + 600 s: they, with their messages, must expire first
def test_a_60s_s3_outage_mid_optimize_is_ridden_out(tmp_path, s3_server, s3_bucket):
    """versitygw stops for 60 s once optimize has checkpointed; the run waits it out and finishes."""
    doc = tiny_spec(f"s3://{s3_bucket}/runs", steps=40, checkpointEvery=2)
    doc["spec"]["storage"]["endpoint"] = s3_server.endpoint_url
    spec = tmp_path / "run.json"
    spec.write_text(json.dumps(doc))
    env = {**os.environ, **s3_server.env()}
    proc = subprocess.Popen([sys.executable, "-m", "rlp_cli", "run", str(spec), "--cache-dir", str(tmp_path / "cache")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    client = s3_server.client()
    latest = "runs/team-a/entry/round-1/optimize/_checkpoints/LATEST.json"
    try:
        deadline = time.monotonic() + 600
        while not client.list_objects_v2(Bucket=s3_bucket, Prefix=latest).get("KeyCount"):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "optimize never checkpointed"
            time.sleep(0.2)
        s3_server.stop()
        assert proc.poll() is None, "the run ended before the outage began"
        time.sleep(60)
        s3_server.start()
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        s3_server.start()
    assert proc.returncode == 0, err[-3000:]
    store = Store.from_uri(f"s3://{s3_bucket}/runs/team-a/entry/round-1/optimize", **{
        "endpoint": s3_server.endpoint_url, "access_key": s3_server.access_key, "secret_key": s3_server.secret_key})
    manifest = json.loads(store.get_bytes("_MANIFEST.json"))
    assert manifest["metrics"]["steps"] == 40
    assert not store.list("_checkpoints")



def test_hub_and_packaged_model_uris_are_inputs_without_a_store(tmp_path):
    """A run from hf:// or packaged:// has a fingerprint (the URI, pinned by @revision or by the package's
    version) and never lists those URIs as store prefixes: `rlp run` on packaged://smollm2 once failed here."""
    from rlp_core.provenance import Provenance

    def phase_inputs(model: str) -> dict:
        run = parse_run(_spec(tmp_path / "store", policy={"model": model}))
        return Provenance(run, LocalStore(tmp_path / "store")).inputs(0, "reward")

    packaged, pinned, other = (phase_inputs(m) for m in ("packaged://smollm2", "hf://org/model@abc123",
                                                          "hf://org/model@def456"))
    assert set(packaged) == {"packaged://smollm2"} and set(pinned) == {"hf://org/model@abc123"}
    assert pinned["hf://org/model@abc123"] != other["hf://org/model@def456"]
