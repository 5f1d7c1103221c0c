"""Quickstart on the phase-seed code: win-rate on the TRAINING prompts (dev protocol) for optimize steps 60 vs 120, seeds 0-7."""
import json, subprocess, sys, os, yaml
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
CODE = "/tmp/rlp-phase-seed"
OUT = Path("/work/explore/qs-heldout.jsonl")
def one(steps, seed):
    work = Path(f"/work/explore/h-{steps}-{seed}")
    work.mkdir(parents=True, exist_ok=True)
    doc = yaml.safe_load(open(f"{CODE}/examples/quickstart.yaml"))
    doc["spec"]["seed"] = seed
    doc["spec"]["optimization"]["steps"] = steps
    pass
    (work / "s.yaml").write_text(yaml.safe_dump(doc))
    env = os.environ | {"PYTHONPATH": f"{CODE}:{CODE}/cli:{CODE}/jobs:{CODE}/operator", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "rlp_cli", "run", str(work / "s.yaml"), "--store", f"file://{work}/store",
                    "--cache-dir", str(work / "cache")], check=True, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ev = json.loads(next((work / "cache" / "reports").rglob("report.json")).read_text())["evaluation"]
    row = {"steps": steps, "seed": seed, "heldout_win_rate": ev["win_rate"], "ci_low": ev["ci_low"], "n": ev.get("n")}
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row
with ThreadPoolExecutor(2) as ex:
    for r in ex.map(lambda a: one(*a), [(s, seed) for seed in range(8) for s in (120,)]):
        print(r, flush=True)
