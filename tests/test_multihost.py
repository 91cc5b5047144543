"""Multi-host on one machine: 2 `gx run` processes x 4 CPU devices, joined by jax.distributed
(CPU collectives over gloo), on a (data=4, model=2) mesh, against one process with 8 devices.

Only process 0 writes status, metrics and W&B; both write and restore their checkpoint shards.
The parameters are split over `data` too (a rule override: ZeRO-3 over the data axis), so that
each process holds shards no other process has: with parameters replicated across the two
processes, process 0 alone would hold (and write) a copy of everything.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from test_sharding import TINY, _assert_close, _env, _finish, _gx, _losses, _only_run, data_args

MESH = ["--config.mesh.preset=fsdp_tp", "--config.mesh.data=4", "--config.mesh.fsdp=1",
        "--config.mesh.model=2", "--config.mesh.rules.embed=data", "--config.train.steps=6", "--config.train.checkpoint_every=3",
        "--config.train.keep_checkpoints=3", "--config.tracking.wandb=true"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(runs: Path, data: list[str]) -> tuple[list[str], list[int]]:
    port = _free_port()
    procs = [_gx(*TINY, *data, *MESH, runs=runs,
                 env=_env(4, GX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", GX_NUM_PROCESSES="2",
                          GX_PROCESS_ID=str(i)))
             for i in range(2)]
    try:
        return [_finish(p) for p in procs], [p.pid for p in procs]
    finally:
        for p in procs:  # one failed: do not leave the other waiting for its peer
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_root, data_cache):
    """The same run in one process with 8 devices."""
    root = tmp_path_factory.mktemp("multihost")
    data = data_args(data_cache, corpus_root)
    _finish(_gx(*TINY, *data, *MESH, runs=root / "one-process", env=_env(8)))
    run = _only_run(root / "one-process")
    return {"root": root, "data": data, "run_id": run.run_id, "losses": _losses(run.path)}


def test_two_processes_match_one_process_and_only_process_0_writes(reference):
    from gemini_core.runs.wandb_offline import read_offline_run

    ref = reference["losses"]
    assert sorted(ref) == list(range(1, 7))
    root = reference["root"] / "two-processes"
    (out0, out1), (pid0, _) = _two_processes(root, reference["data"])
    run = _only_run(root)
    assert run.run_id == reference["run_id"]  # where it runs is not what it is
    status = run.status()
    assert status["state"] == "done" and status["pid"] == pid0, status
    placement = run.config()["placement"]
    assert placement["processes"] == 2 and placement["devices"] == 8, placement
    assert placement["mesh"]["data"] == 4 and placement["mesh"]["model"] == 2, placement
    first = _losses(run.path)
    _assert_close(first, ref, "2 processes x 4 devices vs 1 process x 8")
    # process 1 printed nothing of the run and opened no W&B session
    assert "W&B" in out0 and run.run_id in out0
    assert "W&B" not in out1 and run.run_id not in out1, out1[-2000:]
    assert read_offline_run(run.path)["sessions"] == 1
    # both processes wrote their shards of every checkpoint
    for step in (3, 6):
        item = run.checkpoints / str(step) / "default"
        written = sorted(p.name for p in item.iterdir() if p.name.startswith("ocdbt.process_"))
        assert written == ["ocdbt.process_0", "ocdbt.process_1"], (step, written)

    # a crash after the step-3 checkpoint (its last checkpoint gone, its status failed): the
    # same two commands resume, each process restoring its own shards, and continue the same
    # curve and the same W&B run
    shutil.rmtree(run.checkpoints / "6")
    run.set_status("failed", error="simulated crash after the step-3 checkpoint")
    (out0, out1), (pid0, _) = _two_processes(root, reference["data"])
    assert f"resuming {run.run_id} from step 3" in out0, out0[-2000:]
    assert run.status()["state"] == "done" and run.status()["pid"] == pid0
    assert _losses(run.path) == first  # bit for bit: the same mesh, shards and steps
    wandb = read_offline_run(run.path)
    assert wandb["sessions"] == 2 and wandb["id"] == run.run_id
    assert [r["step"] for r in wandb["history"]] == list(range(1, 7))
