"""`rlp run`: the quickstart end to end, resume after a kill, and bad input rejected before training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart.yaml"


def rlp(*args, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "rlp_cli", *args], cwd=cwd, capture_output=True, text=True, **kw)


def manifests(store: Path) -> dict[str, dict]:
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text()) for p in store.rglob("_MANIFEST.json")}


def test_malformed_spec_fails_naming_the_field(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("kind: RLPRun\nmetadata: {name: bad}\nspec:\n  optimization: {algoritm: ppo, clipRange: 0.2}\n"
                    "  rounds: 0\n")
    res = rlp("run", str(spec), "--store", f"file://{tmp_path}/store", cwd=tmp_path)
    assert res.returncode == 2
    assert "spec.optimization.algoritm" in res.stderr and "spec.rounds" in res.stderr
    assert not (tmp_path / "store").exists()


def test_malformed_data_fails_naming_the_line_before_training(tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'
                     '{"prompt": "2+2=", "chosen": "4", "rejected": "5"}\n'
                     '{"prompt": "3+3=", "rejected": "7"}\n')
    spec = tmp_path / "run.yaml"
    spec.write_text(f"kind: RLPRun\nmetadata: {{name: bad-data}}\nspec:\n  rewardModel: {{humanPreferences: {prefs}}}\n")
    res = rlp("run", str(spec), "--store", f"file://{tmp_path}/store", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert f"{prefs}:3: chosen: Field required" in res.stderr
    assert not list((tmp_path / "store").rglob("_MANIFEST.json")) if (tmp_path / "store").exists() else True


def evaluate_on_training_prompts(spec: Path, store: Path, cache: Path) -> dict:
    """The finished run's policy judged against its start as the evaluate phase does, on the quickstart's RL
    prompts (`builtin://arith/prompts`, 512) instead of its held-out sums: the phase is run again under a new
    output path beside the first (`rerun_changed`), so the run's own evaluation stays as it was."""
    import yaml

    from rlp_core.pipeline import execute_phase
    from rlp_core.spec import RLPRun

    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["evaluation"]["prompts"] = "builtin://arith/prompts"
    run = RLPRun.model_validate(doc)
    root = run.spec.storage.open(f"file://{store}")
    return execute_phase(run, root, run.spec.rounds, "evaluate", cache_dir=cache, rerun_changed=True).manifest.metrics


def run_killed_during_optimize(tmp_path: Path, spec: Path) -> tuple[tuple[str, ...], dict[str, dict], dict[str, dict]]:
    """`rlp run` killed once optimize has checkpointed, then rerun: (args, manifests before, manifests after)."""
    store = tmp_path / "store"
    args = ("run", str(spec), "--store", f"file://{store}", "--cache-dir", str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "rlp_cli", *args], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = store / "default" / "quickstart" / "round-1" / "optimize" / "_checkpoints" / "LATEST.json"
    deadline = time.monotonic() + 600
    while not checkpoint.exists():
        assert proc.poll() is None, f"rlp run ended before optimize checkpointed: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = manifests(store)
    assert "round-1/optimize" not in before
    assert {"round-0/sft", "round-0/reward", "round-1/generate", "round-1/synthesize"} <= set(before)

    res = rlp(*args, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    after = manifests(store)
    for key, manifest in before.items():  # completed phases were not redone
        assert after[key]["created_at"] == manifest["created_at"], key
    assert after["round-1/optimize"]["metrics"]["resumed_from_step"] >= 5
    return args, before, after


@pytest.mark.slow
@pytest.mark.timeout(1800)  # its own waits add up to 600 + 600 + 300 s: they, with their messages, must expire first
def test_quickstart_runs_end_to_end_and_resumes_after_a_kill_during_optimize(tmp_path):
    """The quickstart killed in optimize and resumed (the checkpoint restores the sampling RNG too) improves its
    policy under the gold judge: clearly on the sums PPO trained on, and on held-out sums by a thinner margin.

    Measured with each phase seeded from (spec.seed, round, phase) (docs/bench/outcome-spread.md, "quickstart";
    seeds 0-7, 1 thread; the thread count changed nothing to the bit on this model):
    - on the RL prompts the win-rate's interval lies above 0.5 on every seed: lower end 0.547-0.600. The bound is
      that lower end above 0.5; a pipeline that stops improving the policy (win-rate about 0.5) fails it.
    - on the held-out sums: win-rate 0.514-0.605 (mean 0.542, sd 0.029), its interval's lower end under 0.5 on
      seeds 0 and 5 (0.489, 0.494); a point estimate above 0.5 would miss about once in 15 draws from a normal of
      that mean and sd. The exact-answer accuracy moves further from no change: +0.037 to +0.187 (mean 0.089, sd
      0.044); a bound at 0 would still miss about once in 45 CI runs, so the held-out bound is only that the
      policy got no worse: accuracy change above -0.05, 3.2 sd under the mean (under once in 1,000). The improvement
      itself is asserted on the RL prompts, where it is wide. The margin is the task's, not the reward model's: on a dev split of the
      training sums (docs/bench/quickstart-dev.md) PPO against the gold judge itself wins 0.515-0.609 with its
      interval under 0.5 on one seed of 8, and no setting tried (β 0.15, 0.6; no SPG) did better than the
      quickstart's own.
    """
    args, _, after = run_killed_during_optimize(tmp_path, QUICKSTART)
    store = tmp_path / "store"
    assert after["round-1/refine"]["metrics"]["skipped"] is True
    evaluation = after["round-1/evaluate"]["metrics"]
    assert 0 <= evaluation["ci_low"] <= evaluation["win_rate"] <= evaluation["ci_high"] <= 1
    assert evaluation["accuracy_change"] > -0.05, evaluation
    report = json.loads((tmp_path / "cache" / "reports" / "default" / "quickstart" / "report.json").read_text())
    assert report["evaluation"]["win_rate"] == evaluation["win_rate"]
    assert (tmp_path / "cache" / "reports" / "default" / "quickstart" / "curves.png").stat().st_size > 1000

    again = rlp(*args, cwd=tmp_path, timeout=300)  # a finished run: nothing is redone
    assert again.returncode == 0
    assert manifests(store) == after
    states = {p["phase"]: p["state"] for p in json.loads(
        (tmp_path / "cache" / "reports" / "default" / "quickstart" / "report.json").read_text())["phases"]}
    assert set(states.values()) == {"Cached"}

    on_training = evaluate_on_training_prompts(QUICKSTART, store, tmp_path / "cache")
    assert on_training["ci_low"] > 0.5, on_training


def grpo_quickstart_killed_and_resumed(tmp_path: Path, seed: int = 0):
    """The quickstart with `algorithm: grpo` (and spec.seed `seed`), killed in optimize and rerun."""
    import yaml

    doc = yaml.safe_load(QUICKSTART.read_text().replace("algorithm: ppo", "algorithm: grpo"))
    doc["spec"]["seed"] = seed
    spec = tmp_path / "grpo.yaml"
    spec.write_text(yaml.safe_dump(doc))
    return run_killed_during_optimize(tmp_path, spec)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # its own waits add up to 600 + 600 s: they, with their messages, must expire first
def test_quickstart_with_grpo_trains_without_a_critic_and_resumes_after_a_kill(tmp_path):
    """The quickstart with only `algorithm: grpo` changed runs critic-free and resumes after a kill.

    What GRPO learns is asserted where the reward is exact, in tests/test_policy_optimization.py. Here no
    outcome is: at the quickstart's PPO-tuned settings GRPO's gold score does not reliably rise (CI on another
    CPU saw the rollouts' gold 0.632 at the first step and 0.618 over the last five) and its held-out
    win-rate ends below its start (README, "Critic-free optimisation").

    The one outcome bounded is that not every group of 8 samples was tied for the whole run (a zero advantage
    everywhere, so no policy gradient): measured (docs/bench/outcome-spread.md, "quickstart-grpo",
    `zero_signal_groups_mean`, the share of tied groups averaged over the 60 steps; spec.seed 0-4 at 1 and 2
    threads, 10 runs of this recipe, kill and resume included, the same to the bit at both thread counts):
    0.092-0.217. The bound, under 1, sits far above the largest share seen; a reward that scores every sample of
    a prompt alike gives 1."""
    _, _, after = grpo_quickstart_killed_and_resumed(tmp_path)
    optimize = after["round-1/optimize"]["metrics"]
    assert optimize["algorithm"] == "grpo" and optimize["value_init"] is None  # no critic was loaded
    assert 0 <= optimize["zero_signal_groups_mean"] < 1


def test_data_files_on_s3_are_validated_before_training(s3_server, s3_bucket, monkeypatch):
    from rlp_core.data import DataError
    from rlp_core.pipeline import validate_inputs
    from rlp_core.spec import parse_run

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="data/prompts.jsonl", Body=b'{"prompt": "1+2="}\n{"prompt": "3+4="}\n')
    client.put_object(Bucket=s3_bucket, Key="data/prefs.jsonl",
                      Body=b'{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "2+2=", "chosen": 4}\n')
    spec = {"prompts": f"s3://{s3_bucket}/data/prompts.jsonl", "storage": {"endpoint": s3_server.endpoint_url},
            "rewardModel": {"humanPreferences": f"s3://{s3_bucket}/data/prefs.jsonl"}}
    with pytest.raises(DataError) as err:
        validate_inputs(parse_run({"spec": spec}))
    assert f"s3://{s3_bucket}/data/prefs.jsonl:2: chosen: Input should be a valid string" in str(err.value)
    client.put_object(Bucket=s3_bucket, Key="data/prefs.jsonl",
                      Body=b'{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n')
    validate_inputs(parse_run({"spec": spec}))


@pytest.mark.slow
def test_a_phase_makes_the_same_output_whatever_the_processs_random_state(tmp_path):
    """torch seeds itself at random in every process; the reward phase draws its new head before any seeding of
    its own, so `execute_phase` seeds each phase from spec.seed, round and phase: the RM comes out the same."""
    import torch
    import yaml

    from rlp_core.pipeline import execute_phase
    from rlp_core.spec import RLPRun

    run = RLPRun.model_validate(yaml.safe_load(QUICKSTART.read_text()))
    root = run.spec.storage.open(f"file://{tmp_path / 'store'}")
    execute_phase(run, root, 0, "sft", cache_dir=tmp_path / "cache")
    digests = []
    for _ in range(2):
        torch.seed()  # as a fresh process would be
        result = execute_phase(run, root, 0, "reward", cache_dir=tmp_path / "cache", redo=True)
        digests.append({f.path: f.sha256 for f in result.manifest.files})
    assert digests[0] == digests[1]
