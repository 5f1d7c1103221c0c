"""`rlp phase NAME --spec FILE --round K`: what one phase pod runs.

The pod downloads its inputs from the store, runs the phase from rlp_core, uploads its outputs and
writes the manifest last (`execute_phase`), serving `/metrics` meanwhile. It is idempotent (a phase
whose manifest verifies exits 0 at once) and resumable (optimize restarts from its checkpoint).

Multi-process phases: only `optimize` spans several processes. In an indexed Job the operator sets
NNODES, NODE_RANK (the completion index), NPROC_PER_NODE, MASTER_ADDR and MASTER_PORT; this entrypoint
then re-executes itself under `torch.distributed.run` with those values (one process per GPU: NPROC_PER_NODE,
else GPUS_PER_NODE, else the GPUs this pod sees), and
DeepSpeed joins the process group from the environment torchrun sets. Every other phase runs on node 0
only; the other indexed pods of such a phase exit 0.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from rlp_core.spec import SpecError, load_run, settings_problems

log = logging.getLogger("rlp.phase")


def torchrun_argv(argv: list[str], env: dict[str, str], local_gpus: int = 1) -> list[str] | None:
    """The torchrun command to re-execute under, or None when this process should run the phase itself."""
    if "LOCAL_RANK" in env:
        return None
    nnodes = int(env.get("NNODES", "1"))
    nproc = int(env.get("NPROC_PER_NODE") or env.get("GPUS_PER_NODE") or max(1, local_gpus))
    if nnodes * nproc <= 1:
        return None
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            f"--node-rank={env.get('NODE_RANK', env.get('JOB_COMPLETION_INDEX', '0'))}",
            f"--master-addr={env.get('MASTER_ADDR', '127.0.0.1')}", f"--master-port={env.get('MASTER_PORT', '29500')}",
            "-m", "rlp_cli", *argv]


def run_phase(name: str, spec_path: Path, round: int, *, store_uri: str | None, cache_dir: Path,
              metrics_port: int = 0, rerun_changed: bool = False, redo: bool = False) -> int:
    logging.basicConfig(level=os.environ.get("RLP_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        run = load_run(spec_path)
    except SpecError as err:
        print(str(err), file=sys.stderr)
        return 2
    for warning in settings_problems(run.spec)[1]:
        log.warning("%s", warning)
    # the training stack is imported only once the spec is known to be good (a bad spec fails in a second)
    from rlp_core.data import DataError
    from rlp_core.pipeline import PhaseError, execute_phase
    from rlp_core.store import StoreError
    from rlp_core.telemetry import PhaseTelemetry

    if name == "optimize":
        import torch

        cmd = torchrun_argv(sys.argv[1:], dict(os.environ), torch.cuda.device_count())
        if cmd is not None:
            log.info("re-executing under torchrun: %s", " ".join(cmd))
            os.execv(cmd[0], cmd)
        if "LOCAL_RANK" in os.environ:
            log.info("optimize: rank %s of %s (node %s, local rank %s)", os.environ.get("RANK"),
                     os.environ.get("WORLD_SIZE"), os.environ.get("GROUP_RANK"), os.environ["LOCAL_RANK"])
    elif int(os.environ.get("NODE_RANK", os.environ.get("JOB_COMPLETION_INDEX", "0"))) != 0:
        log.info("phase %s runs on node 0 only; node %s has nothing to do", name, os.environ.get("NODE_RANK"))
        return 0
    telemetry = PhaseTelemetry(run.metadata.name, round, name)
    if metrics_port and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            telemetry.serve(metrics_port)
        except OSError as err:  # a phase without /metrics beats a failed phase
            log.warning("cannot serve /metrics on port %d: %s; the phase runs without it", metrics_port, err)
    try:
        root = run.spec.storage.open(store_uri)
        result = execute_phase(run, root, round, name, cache_dir=cache_dir, telemetry=telemetry,
                               rerun_changed=rerun_changed, redo=redo)
    except (PhaseError, DataError, StoreError) as err:
        print(f"rlp phase {name} (round {round}) failed: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - the traceback for the logs, then one line for the pod's status
        log.exception("phase %s round %d crashed", name, round)
        print(f"rlp phase {name} (round {round}) failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    log.info("phase %s round %d: %s", name, round, result.state)
    return 0
