"""Quickstart settings chosen on a dev split: 21 of the 70 training operand pairs are held back from the
preferences and the RL prompts and judged like the eval split (1,000 samples). The eval split is not touched.

    uv run python docs/bench/explore/qs_dev.py CONFIG...   # seeds 0-7 of each, 2 at a time; appends to qs-dev.jsonl

Report: docs/bench/quickstart-dev.md. A rerun skips the (config, seed) rows already in qs-dev.jsonl.
"""
import json, os, random, subprocess, sys, tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import yaml

CODE = str(Path(__file__).resolve().parents[3])
OUT = Path(__file__).with_name("qs-dev.jsonl")
WORK = Path(tempfile.mkdtemp(prefix="qs-dev-"))
sys.path.insert(0, CODE)
from rlp_core.tasks import ArithTask  # noqa: E402

TASK = ArithTask()
TRAIN_PAIRS = TASK.operand_pairs("prompts")
DEV = set(random.Random(2026).sample(TRAIN_PAIRS, 21))
CONFIGS = {  # name -> spec changes (dotted paths)
    "base": {},
    "kl0.15": {"optimization.klCoef": 0.15},
    "kl0.6": {"optimization.klCoef": 0.6},
    "steps120": {"optimization.steps": 120},
    "lr1e-3": {"optimization.learningRate": 0.001},
    "rb64": {"optimization.rolloutBatchSize": 64, "optimization.miniBatchSize": 32},
    "kl1.0": {"optimization.klCoef": 1.0},
    "none": {"rewardLearning.strategy": "none"},
    "gold": {"optimization.reward": "judge"},
}


def pair(prompt):
    a, b = prompt.rstrip("=").split("+")
    return int(a), int(b)


def write_data(data: Path) -> dict:
    data.mkdir(parents=True, exist_ok=True)
    prefs = [r for r in TASK.records("preferences", n=3000) if pair(r["prompt"]) not in DEV][:2000]
    prompts = [r for r in TASK.records("prompts") if pair(r["prompt"]) not in DEV]
    rng, dev = random.Random(53), sorted(DEV)
    evals = [{"id": f"dev-{i}", "prompt": TASK.prompt(*rng.choice(dev))} for i in range(1000)]
    out = {}
    for name, rows in (("preferences", prefs), ("prompts", prompts), ("dev", evals)):
        out[name] = str(data / f"{name}.jsonl")
        Path(out[name]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def one(config, seed, data):
    work = WORK / f"{config}-{seed}"
    subprocess.run(["rm", "-rf", str(work)]); work.mkdir(parents=True)
    doc = yaml.safe_load(open(f"{CODE}/examples/quickstart.yaml"))
    spec = doc["spec"]
    spec["seed"] = seed
    spec["rewardModel"]["humanPreferences"] = data["preferences"]
    spec["prompts"] = data["prompts"]
    spec["evaluation"]["prompts"] = data["dev"]
    for path, value in CONFIGS[config].items():
        *head, last = path.split(".")
        node = spec
        for key in head:
            node = node.setdefault(key, {})
        node[last] = value
    (work / "s.yaml").write_text(yaml.safe_dump(doc))
    env = os.environ | {"PYTHONPATH": f"{CODE}:{CODE}/cli:{CODE}/jobs:{CODE}/operator", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "rlp_cli", "run", str(work / "s.yaml"), "--store", f"file://{work}/store",
                    "--cache-dir", str(work / "cache")], check=True, cwd=work, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    ev = json.loads(next((work / "cache" / "reports").rglob("report.json")).read_text())["evaluation"]
    row = {"config": config, "seed": seed, "dev_win_rate": ev["win_rate"], "ci_low": ev["ci_low"],
           "accuracy_change": ev["accuracy_change"], "score_change": ev["score_change"]}
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")
    subprocess.run(["rm", "-rf", str(work)])
    return row


if __name__ == "__main__":
    data = write_data(WORK / "data")
    done = {(r["config"], r["seed"]) for r in map(json.loads, OUT.read_text().splitlines())} if OUT.exists() else set()
    jobs = [(c, s) for c in sys.argv[1:] for s in range(8) if (c, s) not in done]
    with ThreadPoolExecutor(2) as ex:
        for r in ex.map(lambda a: one(*a, data), jobs):
            print(r, flush=True)
