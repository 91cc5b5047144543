"""Sharding: presets against one device (loss curves and final parameters), a sharded run killed
and resumed, parameter shardings, mesh config errors, the dry-run memory plan. (Multi-host:
tests/test_multihost.py.)

JAX fixes its device count when it first starts, and other tests start it in this pytest process
with one CPU device, so what needs 8 devices runs in child processes: the 1-device reference
through the real CLI, the three presets in one 8-device worker (this file run as a script), the
killed run through the CLI. Checkpoints restore onto any mesh, so their parameters are compared
here on one device.
The runs use two of the six domains: the same code path, a fifth of the tokenizing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
    "--config.model.mlp_dim=64", "--config.data.seq_len=32",
    "--config.data.tokenizer.vocab_size=384", "--config.data.tokenizer.sample_chars=200000",
    "--config.train.batch_size=8", "--config.train.steps=20", "--config.train.log_every=1",
    "--config.train.eval_batches=1", "--config.optimizer.warmup_steps=2",
    "--config.tracking.wandb=false",
    "--config.data.domains=('wiki','web')",
    "--config.mixture.stages.base.weights={'wiki':0.5,'web':0.5}",
    "--config.mixture.stages.anneal.weights={'wiki':0.3,'web':0.7}",
]
PRESETS = ("dp", "fsdp", "fsdp_tp")
SCANNED = ["--config.model.scan_layers=True", "--config.model.remat=full",
           "--config.model.attention=blockwise"]
RTOL = 1e-4
PARAMS_RTOL, PARAMS_ATOL = 1e-5, 2e-6  # parameters after 20 steps: measured |diff| <= 1.2e-7

# What the rule tables say for the tiny model (D=32, H=2 query heads, G=1 kv head, K=16, F=64,
# V=384) on 8 devices, written out by hand: dp replicates everything; fsdp (fsdp=8) splits
# embed; fsdp_tp (fsdp=4, model=2) also splits vocab, query heads and mlp over `model`, but the
# single kv head cannot be split in two and stays whole.
N = None
EXPECTED_SPECS = {
    "dp": {"embed_VxD": (N, N), "wq_DxHxK": (N, N, N), "wk_DxGxK": (N, N, N),
           "wv_DxGxK": (N, N, N), "wo_HxKxD": (N, N, N), "gate_DxF": (N, N), "up_DxF": (N, N),
           "down_FxD": (N, N), "scale": (N,)},
    "fsdp": {"embed_VxD": (N, "fsdp"), "wq_DxHxK": ("fsdp", N, N), "wk_DxGxK": ("fsdp", N, N),
             "wv_DxGxK": ("fsdp", N, N), "wo_HxKxD": (N, N, "fsdp"), "gate_DxF": ("fsdp", N),
             "up_DxF": ("fsdp", N), "down_FxD": (N, "fsdp"), "scale": ("fsdp",)},
    "fsdp_tp": {"embed_VxD": ("model", "fsdp"), "wq_DxHxK": ("fsdp", "model", N),
                "wk_DxGxK": ("fsdp", N, N), "wv_DxGxK": ("fsdp", N, N),
                "wo_HxKxD": ("model", N, "fsdp"), "gate_DxF": ("fsdp", "model"),
                "up_DxF": ("fsdp", "model"), "down_FxD": ("model", "fsdp"),
                "scale": ("fsdp",)},
}
MESH_SIZES = {"dp": {"data": 8, "fsdp": 1, "context": 1, "model": 1},
              "fsdp": {"data": 1, "fsdp": 8, "context": 1, "model": 1},
              "fsdp_tp": {"data": 1, "fsdp": 4, "context": 1, "model": 2}}


def _env(devices: int | None = None, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GX_", "JAX_COORDINATOR"))}
    env["WANDB_MODE"] = "offline"
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(extra)
    return env


def data_args(data_cache: Path, corpus_root: Path) -> list[str]:
    """The corpus, and the session's tokenizer/token cache (conftest.py; shared with
    test_multihost.py and, under pytest-xdist, across workers: concurrent builders wait on
    its lock)."""
    return [f"--config.data.root={corpus_root}", f"--config.data.cache_dir={data_cache}"]


def _gx(*args: str, runs: Path, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gx", "--runs-root", str(runs), "run",
           "experiments/quickstart.py", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-4000:]}"
    return out


def _losses(run_dir: Path) -> dict[int, float]:
    from gemini_core.runs.metrics import read_metrics
    return {row["step"]: row["train/loss"] for row in read_metrics(run_dir)}


def _only_run(runs: Path):
    from gemini_core.runs.rundir import iter_runs
    found = list(iter_runs(runs))
    assert len(found) == 1, found
    return found[0]


def _assert_close(got: dict[int, float], want: dict[int, float], what: str) -> None:
    assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
    for step in sorted(want):
        rel = abs(got[step] - want[step]) / abs(want[step])
        assert rel <= RTOL, f"{what}: step {step} loss {got[step]} vs {want[step]} (rel {rel:.2e})"


def _final_params(run_dir: Path) -> dict[str, np.ndarray]:
    """A run's last checkpoint, restored onto this process's one device (a checkpoint restores
    onto any mesh), as {parameter path: array}."""
    import jax

    from gemini_core.config import OptimizerConfig, model_from_json
    from gemini_core.runs.checkpoint import Checkpointer
    from gemini_core.runs.rundir import read_json
    from gemini_core.train import step_fns

    cfg = read_json(run_dir / "config.json")
    _, like = step_fns.init_state(model_from_json(cfg["model"]), OptimizerConfig(**cfg["optimizer"]),
                                  cfg["train"]["steps"], cfg["seed"])
    ckpt = Checkpointer(run_dir / "checkpoints", keep=3, async_save=False)
    try:
        step = ckpt.latest_step()
        assert step == cfg["train"]["steps"], (run_dir, step)
        state = ckpt.restore(step, like)
    finally:
        ckpt.close()
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(state["model"])[0]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_root, data_cache):
    """The 1-device CLI run, then the 8-device worker (the presets)."""
    root = tmp_path_factory.mktemp("sharding")
    data = data_args(data_cache, corpus_root)
    one = _finish(_gx(*TINY, *data, runs=root / "one", env=_env()))
    # a distilled student of that run, on 1 device here and under fsdp_tp in the worker (full
    # teacher distribution; and its top-K cache with K = V, which is the same distribution)
    distill = [*TINY, *data, f"--config.distill.teacher={_only_run(root / 'one').path}",
               "--config.distill.alpha=0.5"]
    _finish(_gx(*distill, runs=root / "distill-one", env=_env()))
    jobs = [{"name": p, "runs": str(root / p), "overrides": [*TINY, *data,
                                                              f"--config.mesh.preset={p}"]}
            for p in PRESETS]
    jobs += [{"name": name, "runs": str(root / name), "distill": True,
              "overrides": [*distill, "--config.mesh.preset=fsdp_tp", *extra]}
             for name, extra in (("distill_fsdp_tp", []),
                                 ("distill_topk_fsdp_tp", ["--config.distill.top_k=384"]))]
    # the long-context stack under a mesh: stacked weights (their layer axis replicated),
    # remat and the blockwise kernel compute the 1-device run's curve
    jobs.append({"name": "scanned_fsdp_tp", "runs": str(root / "scanned_fsdp_tp"),
                 "overrides": [*TINY, *data, "--config.mesh.preset=fsdp_tp", *SCANNED]})
    # context parallelism: the sequence split in four (fsdp=2 x context=4), blockwise kernels
    jobs.append({"name": "context_fsdp", "runs": str(root / "context_fsdp"),
                 "overrides": [*TINY, *data, "--config.mesh.preset=fsdp",
                               "--config.mesh.context=4", "--config.model.attention=blockwise"]})
    spec = root / "worker.json"
    spec.write_text(json.dumps({"jobs": jobs, "out": str(root / "worker-out.json")}))
    worker = subprocess.run([sys.executable, __file__, str(spec)], cwd=REPO, env=_env(8),
                            capture_output=True, text=True, timeout=600)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-5000:]
    return {"root": root, "data": data, "one_log": one,
            "one": _losses(_only_run(root / "one").path),
            "distill_one": _losses(_only_run(root / "distill-one").path),
            "worker": json.loads((root / "worker-out.json").read_text())}


def test_presets_give_the_one_device_loss_curve(runs):
    one = runs["one"]
    assert sorted(one) == list(range(1, 21)), sorted(one)
    assert _only_run(runs["root"] / "one").config()["placement"]["devices"] == 1
    for preset in PRESETS:
        result = runs["worker"][preset]
        assert result["devices"] == 8 and result["mesh"] == MESH_SIZES[preset], result["mesh"]
        _assert_close({int(k): v for k, v in result["losses"].items()}, one, preset)
    # the layout is not part of what a run is: every preset has the 1-device run's id
    ids = {runs["worker"][p]["run_id"] for p in PRESETS}
    assert ids == {_only_run(runs["root"] / "one").run_id}, ids


def test_a_scanned_rematerialised_blockwise_stack_under_fsdp_tp_gives_the_one_device_curve(runs):
    result = runs["worker"]["scanned_fsdp_tp"]
    assert result["mesh"] == MESH_SIZES["fsdp_tp"]
    _assert_close({int(k): v for k, v in result["losses"].items()}, runs["one"], "scanned")
    params = _final_params(_only_run(runs["root"] / "scanned_fsdp_tp").path)
    (wq,) = [w for key, w in params.items() if "wq_DxHxK" in key]
    assert wq.shape == (1, 32, 2, 16)  # (layers, D, H, K): the weights stacked


def test_a_sequence_split_over_devices_gives_the_one_device_curve(runs):
    result = runs["worker"]["context_fsdp"]
    assert result["mesh"] == {"data": 1, "fsdp": 2, "context": 4, "model": 1}
    _assert_close({int(k): v for k, v in result["losses"].items()}, runs["one"], "context")
    assert result["run_id"] == _only_run(runs["root"] / "one").run_id  # placement, not identity
    one = _final_params(_only_run(runs["root"] / "one").path)
    split = _final_params(_only_run(runs["root"] / "context_fsdp").path)
    for key, want in one.items():
        np.testing.assert_allclose(split[key], want, rtol=PARAMS_RTOL, atol=PARAMS_ATOL,
                                   err_msg=key)
    assert runs["worker"]["seq_error"]["message"].startswith(
        "config.data.seq_len=36: must be divisible by the 8 context shards of the mesh")


def test_presets_end_with_the_one_device_parameters(runs):
    # not only the losses: every parameter after the last step, to float rounding (the presets
    # sum gradients in another order: an ulp or so of the largest parameters after 20 steps)
    one = _final_params(_only_run(runs["root"] / "one").path)
    assert len(one) == 11, sorted(one)
    for preset in PRESETS:
        got = _final_params(_only_run(runs["root"] / preset).path)
        assert got.keys() == one.keys(), preset
        for key in one:
            np.testing.assert_allclose(got[key], one[key], rtol=PARAMS_RTOL, atol=PARAMS_ATOL,
                                       err_msg=f"{preset} {key}")


def test_a_sharded_run_killed_mid_run_resumes_to_the_uninterrupted_result(runs):
    # fsdp_tp on 8 devices through the CLI, checkpointing every 5 steps, kill -9 once a checkpoint
    # mid-run is written, the same command again: it resumes, and ends bit for bit where the
    # worker's uninterrupted fsdp_tp run ended (checkpoint_every is not part of the computation)
    killed = runs["root"] / "killed"
    args = [*TINY, *runs["data"], "--config.mesh.preset=fsdp_tp",
            "--config.train.checkpoint_every=5"]
    proc = _gx(*args, runs=killed, env=_env(8))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            steps = [int(p.name) for p in killed.glob("*/*/checkpoints/*") if p.name.isdigit()]
            if any(5 <= s < 20 for s in steps):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before a mid-run checkpoint was seen"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    run = _only_run(killed)
    assert run.status()["state"] == "running"  # what it was doing when it died
    resumed = _finish(_gx(*args, runs=killed, env=_env(8)))
    assert "resuming" in resumed, resumed[-2000:]
    assert run.status()["state"] == "done"
    want = _final_params(_only_run(runs["root"] / "fsdp_tp").path)
    got = _final_params(run.path)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    from gemini_core.runs.metrics import read_metrics
    steps = [row["step"] for row in read_metrics(run.path)]
    assert steps == sorted(set(steps)), steps  # no step logged twice after the resume
    _assert_close(_losses(run.path), runs["one"], "killed and resumed fsdp_tp")


def test_gx_eval_restores_onto_the_runs_mesh_and_gives_its_numbers(runs):
    ev = runs["worker"]["fsdp_tp"]["gx_eval"]
    said = "eval: fsdp_tp mesh over 8 devices (data=1, fsdp=4, context=1, model=2)"
    assert said in ev["log"], ev["log"]
    for key, value in ev["metrics"].items():
        assert value == pytest.approx(ev["summary"][key], rel=1e-5), key


def test_distilled_student_under_fsdp_tp_gives_the_one_device_curve(runs):
    one = runs["distill_one"]
    assert sorted(one) == list(range(1, 21)) and one != runs["one"]  # it did distill
    for name in ("distill_fsdp_tp", "distill_topk_fsdp_tp"):
        result = runs["worker"][name]
        placement = result["placement"]
        assert placement["devices"] == 8, placement
        assert {a: placement["mesh"][a] for a in MESH_SIZES["fsdp_tp"]} == MESH_SIZES["fsdp_tp"]
        _assert_close({int(k): v for k, v in result["losses"].items()}, one, name)


@pytest.mark.parametrize("preset", PRESETS)
def test_parameter_shardings_follow_the_rules(runs, preset):
    result = runs["worker"][preset]
    params = result["params"]
    assert len(params) == 11, sorted(params)  # embed, 7 block matrices, 3 norm scales
    for path, spec in params.items():
        want = EXPECTED_SPECS[preset][path.rsplit(".", 1)[-1]]
        assert tuple(spec) == want, (preset, path, spec, want)
    # AdamW moments follow their parameter; a train step keeps every sharding as it was
    for path, spec in params.items():
        for moment in ("mu", "nu"):
            assert result["moments"][f"{moment}.{path}"] == spec, (preset, moment, path)
    assert result["after_step"] == result["restored"]
    assert result["batch_spec"] == [["data", "fsdp"], None]


def test_checkpoints_restore_onto_another_mesh(runs):
    # the dp run's checkpoint (replicated arrays) restored onto the fsdp_tp layout: the same
    # values, split as fsdp_tp says
    result = runs["worker"]["fsdp_tp"]
    assert result["cross_restore"]["equal"], result["cross_restore"]
    assert result["cross_restore"]["embed_spec"] == ["model", "fsdp"]


# ---------------------------------------------------------------------------------------------
# config errors and the dry-run plan (in process: nothing here starts a device)


def _load(*overrides: str):
    from gemini_core.experiment import load_experiment
    return load_experiment("experiments/quickstart.py", list(overrides)).config


@pytest.mark.parametrize("override, message", [
    ("--config.mesh.preset=zero3", "config.mesh.preset='zero3': must be one of dp, fsdp, fsdp_tp"),
    ("--config.mesh.rules.heads=model", "config.mesh.rules.heads: unknown key"),
    ("--config.mesh.rules.mlp=tensor", "config.mesh.rules.mlp='tensor': unknown mesh axis"),
    ("--config.mesh.rules.batch=data,data", "config.mesh.rules.batch='data,data': a mesh axis "
                                             "is named twice"),
    ("--config.mesh.fsdp=-2", "config.mesh.fsdp=-2: must be a size >= 1"),
    ("--config.distributed.mode=slurm", "config.distributed.mode='slurm': must be one of"),
])
def test_mesh_config_errors_name_the_key(override, message, capsys):
    from gx import cli
    code = cli.main(["run", "experiments/quickstart.py", override, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_mesh_errors_that_need_the_device_count(capsys):
    from gemini_core.errors import UserError
    from gemini_core.scale import distributed, sharding

    with pytest.raises(UserError, match=r"config.mesh.fsdp=-1: only one mesh axis may be -1"):
        _load("--config.mesh.data=-1", "--config.mesh.fsdp=-1")
    with pytest.raises(UserError, match=r"config.mesh.data=3, config.mesh.fsdp=1, "
                                        r"config.mesh.context=1, config.mesh.model=1: the "
                                        r"mesh has 3 devices, but "
                                        r"there are 8"):
        sharding.mesh_shape(_load("--config.mesh.data=3", "--config.mesh.fsdp=1",
                                  "--config.mesh.model=1").mesh, 8)
    with pytest.raises(UserError, match=r"config.mesh.fsdp=-1: the other axes \(data=1 x "
                                        r"context=1 x model=2 = 2\) do not divide the 7 devices"):
        sharding.mesh_shape(_load("--config.mesh.preset=fsdp_tp").mesh, 7)
    assert sharding.mesh_shape(_load("--config.mesh.preset=fsdp_tp").mesh, 8) == \
        {"data": 1, "fsdp": 4, "context": 1, "model": 2}
    # a user's own -1 axis replaces the preset's
    assert sharding.mesh_shape(_load("--config.mesh.preset=fsdp", "--config.mesh.data=-1",
                                     "--config.mesh.fsdp=2").mesh, 8) == \
        {"data": 4, "fsdp": 2, "context": 1, "model": 1}
    # distributed settings: config first, then the environment; incomplete ones name the key
    cfg = _load("--config.distributed.coordinator_address=10.0.0.1:1234").distributed
    with pytest.raises(UserError, match="config.distributed.num_processes: not set"):
        distributed.settings(cfg, env={})
    assert distributed.settings(cfg, env={"GX_NUM_PROCESSES": "4", "GX_PROCESS_ID": "3"}) == \
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert distributed.settings(_load().distributed, env={}) is None
    assert distributed.settings(_load("--config.distributed.mode=auto").distributed, env={}) == \
        {"coordinator_address": None, "num_processes": None, "process_id": None}
    with pytest.raises(UserError, match=r"\$GX_PROCESS_ID='x': expected an integer"):
        distributed.settings(cfg, env={"GX_NUM_PROCESSES": "2", "GX_PROCESS_ID": "x"})


def test_every_logical_axis_the_model_names_has_a_rule():
    from gemini_core.model import transformer
    from gemini_core.scale import sharding
    assert set(transformer.LOGICAL_AXES) <= set(sharding.LOGICAL_AXES)
    assert set(_load().mesh.rules) == set(sharding.LOGICAL_AXES)  # resolved: none left out


def test_distributed_and_mesh_stay_out_of_the_fingerprint():
    from gemini_core.data.mixture import MixtureSchedule, Stage
    from gemini_core.train import trainer

    schedule = MixtureSchedule((Stage(0.0, {"web": 1.0}),))
    base = trainer.identity(_load(), schedule, "m")
    other = trainer.identity(_load("--config.mesh.preset=fsdp_tp",
                                 "--config.distributed.coordinator_address=h:1",
                                 "--config.distributed.num_processes=2"), schedule, "m")
    assert base == other and "mesh" not in base and "distributed" not in base


def test_batch_not_divisible_by_the_batch_shards_is_a_user_error(runs):
    # checked by the 8-device worker: run_experiment with batch 12 under dp (8 batch shards)
    error = runs["worker"]["batch_error"]
    assert error["message"].startswith("config.train.batch_size=12: must be divisible by the 8 "
                                       "batch shards of the mesh"), error
    assert error["written"] == [], "nothing is written before the check"


def test_dry_run_prints_per_device_memory_and_flags_what_does_not_fit():
    from gemini_core.scale import dry_run
    from gemini_core.train import trainer

    def render(*overrides):
        cfg = _load(*overrides)
        return dry_run.render(cfg, trainer.declared_schedule(cfg))

    fits = render("--config.mesh.preset=fsdp_tp", "--config.mesh.fsdp=4")
    assert ("mesh         fsdp_tp: data=1 x fsdp=4 x context=1 x model=2 = 8 devices "
            "(as configured)") in fits
    assert "per device   params" in fits and "WARNING" not in fits
    # the multi-query kv head cannot be split over model: said, not hidden
    assert "blocks.*.attn.wk_DxGxK: (fsdp, model, -) -> (fsdp, -, -)" in fits
    # 8-way FSDP holds an eighth of the state a replicated layout holds on each device
    def per_device(text, what):
        line = next(ln for ln in text.splitlines() if ln.startswith("per device"))
        value, unit = line.split(f"{what} ")[1].split()[:2]
        return float(value) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    dp = render("--config.mesh.data=8")
    fsdp = render("--config.mesh.preset=fsdp", "--config.mesh.fsdp=8")
    assert per_device(dp, "params") == pytest.approx(8 * per_device(fsdp, "params"), rel=0.01)
    assert per_device(dp, "activations") == pytest.approx(per_device(fsdp, "activations"))
    tight = render("--config.mesh.data=8", "--config.mesh.device_memory_gib=0.01")
    assert "WARNING: does not fit" in tight
    odd = render("--config.mesh.data=64")
    assert "batch_size=32 is not divisible by the 64 batch shards" in odd
    # long context: the dense kernel's scores grow with T per token, blockwise keeps one number
    # per query and head; remat full keeps a layer's input only (the quickstart: D=128, H=4,
    # F=512, V=4096, 4 layers, batch 32, f32)
    long = ("--config.data.seq_len=8192",)
    dense = per_device(render(*long, "--config.model.attention=dense"), "activations")
    blockwise = per_device(render(*long, "--config.model.attention=blockwise"), "activations")
    B_T = 32 * 8192
    assert dense - blockwise == pytest.approx(4 * B_T * (2 * 4 * 8192 - 4) * 4, rel=0.01)
    assert per_device(render(*long), "activations") == pytest.approx(blockwise)  # auto at 8k
    full = per_device(render(*long, "--config.model.remat=full"), "activations")
    per_layer = (4 * 128 + 3 * 4 * 32 + 3 * 32 + 4 + 4 * 512) * 4  # bytes per token
    assert blockwise - full == pytest.approx(B_T * (3 * per_layer - 4 * 128 * 4), rel=0.01)


# ---------------------------------------------------------------------------------------------
# the 8-device worker: `python tests/test_sharding.py spec.json`


def _spec_json(spec) -> list:
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def _specs(state) -> dict[str, list]:
    import jax
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = [str(k.key if hasattr(k, "key") else k.idx if hasattr(k, "idx") else k.name)
                for k in path]
        out[".".join(k for k in keys if k != "value")] = _spec_json(x.sharding.spec)
    return out


def _worker(spec_path: str) -> None:
    import jax
    import numpy as np

    from gemini_core.experiment import load_experiment
    from gemini_core.runs.checkpoint import Checkpointer
    from gemini_core.scale import sharding
    from gemini_core.train import step_fns, trainer

    assert jax.device_count() == 8, jax.devices()
    spec = json.loads(Path(spec_path).read_text())
    results, states = {}, {}
    for job in spec["jobs"]:
        cfg = load_experiment("experiments/quickstart.py", job["overrides"]).config
        t0 = time.perf_counter()
        summary = trainer.run_experiment(cfg, Path(job["runs"]), log=lambda _: None)
        run = _only_run(Path(job["runs"]))
        layout = sharding.Layout.from_config(cfg.mesh)
        if job.get("distill"):  # the run's own record of where it ran
            results[job["name"]] = {"losses": _losses(run.path),
                                    "placement": run.config()["placement"]}
            continue
        graphdef, like = step_fns.init_state(cfg.model, cfg.optimizer, cfg.train.steps, cfg.seed,
                                          layout)
        ckpt = Checkpointer(run.checkpoints, keep=3, async_save=False)
        state = ckpt.restore(ckpt.latest_step(), like)
        ckpt.close()
        all_specs = _specs(state)
        step = step_fns.make_train_step(graphdef, layout)
        tokens = np.zeros((cfg.train.batch_size, cfg.data.seq_len + 1), np.int32)
        stepped, _ = step(jax.tree.map(lambda x: x.copy(), state), tokens)
        params = {k[len("model."):]: v for k, v in all_specs.items() if k.startswith("model.")}
        moments = {}
        for k, v in all_specs.items():
            for moment in ("mu", "nu"):
                if f".{moment}." in k:
                    moments[f"{moment}." + k.split(f".{moment}.", 1)[1]] = v
        results[job["name"]] = {
            "run_id": summary["run_id"], "losses": _losses(run.path), "devices": layout.mesh.size,
            "mesh": layout.sizes, "params": params, "moments": moments, "restored": all_specs,
            "after_step": _specs(stepped), "seconds": time.perf_counter() - t0,
            "batch_spec": _spec_json(layout.batch_sharding().spec)}
        states[job["name"]] = (cfg, layout, like, state)
        if job["name"] == "fsdp_tp":  # `gx eval` of the sharded run, on the devices here
            from gemini_core.eval import run_eval
            said = []
            metrics = run_eval.evaluate_run(run, Path(cfg.data.root), log=said.append)
            results["fsdp_tp"]["gx_eval"] = {"metrics": metrics, "summary": summary, "log": said}
    # the dp checkpoint (replicated) onto the fsdp_tp layout
    cfg, layout, like, fsdp_tp_state = states["fsdp_tp"]
    dp_run = _only_run(Path(spec["jobs"][0]["runs"]))
    ckpt = Checkpointer(dp_run.checkpoints, keep=3, async_save=False)
    moved = ckpt.restore(ckpt.latest_step(), like)
    ckpt.close()
    dp_state = states["dp"][3]
    equal = all(np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(dp_state)))
    results["fsdp_tp"]["cross_restore"] = {
        "equal": bool(equal),
        "embed_spec": _spec_json(moved["model"]["embed_VxD"].get_value().sharding.spec)}
    # a batch the mesh cannot split: a UserError before anything is read or written
    from gemini_core.errors import UserError
    bad = Path(spec["jobs"][0]["runs"]).parent / "bad-batch"
    cfg = load_experiment("experiments/quickstart.py",
                          [*spec["jobs"][0]["overrides"], "--config.train.batch_size=12"]).config
    try:
        trainer.run_experiment(cfg, bad, log=lambda _: None)
        message = "no error"
    except UserError as e:
        message = str(e)
    results["batch_error"] = {"message": message,
                              "written": sorted(p.name for p in bad.glob("*/*"))}
    cfg = load_experiment("experiments/quickstart.py",
                          [*spec["jobs"][0]["overrides"], "--config.mesh.context=8",
                           "--config.data.seq_len=36"]).config
    try:
        trainer.run_experiment(cfg, bad, log=lambda _: None)
        message = "no error"
    except UserError as e:
        message = str(e)
    results["seq_error"] = {"message": message}
    Path(spec["out"]).write_text(json.dumps(results))


if __name__ == "__main__":
    _worker(sys.argv[1])
