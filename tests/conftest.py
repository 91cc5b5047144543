import os
from pathlib import Path

import pytest


def _session_dir(tmp_path_factory, name: str) -> Path:
    """A folder of the whole test session: under pytest-xdist, shared by its workers (each has
    a base temp of its own below the session's)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    (base / name).mkdir(exist_ok=True)
    return base / name


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One JAX compilation cache for the whole session, inherited by every `gx` subprocess and
    Ray worker (train.enable_compilation_cache honours it): each test's runs root would
    otherwise compile the same tiny models again (~9 of a tiny run's 14 s)."""
    before = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_session_dir(tmp_path_factory, "jax-cache"))
    yield
    if before is None:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR")
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def corpus_root() -> Path:
    """The shared real corpus, referenced in place (never copied into the repo)."""
    return Path(__file__).resolve().parents[2] / "shared" / "corpus"


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One data cache (tokenizers, token shards) for the tests whose runs share tokenizer
    settings: each is trained and tokenized once per session, not once per test module."""
    return _session_dir(tmp_path_factory, "data-cache")


# the longest modules, started first (measured on 2 cores without AVX-512 under pyproject's 3
# pytest-xdist workers, a module per worker at a time: recipe, scaling, sweep and curation 4-6
# minutes each, the rest 2 or less): the workers then end together instead of leaving one long
# module running alone at the end
SLOWEST_FIRST = ("test_recipe", "test_scaling", "test_sweep", "test_curation", "test_sharding",
                 "test_hardening", "test_context_parallel", "test_downstream", "test_steps",
                 "test_faults", "test_distill", "test_multihost", "test_lm_eval", "test_sandbox",
                 "test_run", "test_model", "test_contamination", "test_generate", "test_needle",
                 "test_layer_stack", "test_layer_layout", "test_attention", "test_long_stage",
                 "test_doremi", "test_sweep_failures", "test_selftrain", "test_multimodal")


# modules of half a minute or more on 2 cores (real Ray, training in subprocesses, whole
# pipelines): `pytest -m "not slow"` is the quick local loop; the README command and CI run all
SLOW = set(SLOWEST_FIRST)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable
    for item in items:
        if item.module.__name__ in SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Headless Chromium, for the tests that render a page. Not installed: the test skips,
    naming what to install, unless GX_REQUIRE_BROWSER=1 (.ci/run sets it), where it fails."""
    import shutil

    path = shutil.which("chromium")
    if path:
        return path
    reason = "chromium is not on PATH: apt-get install chromium (.ci/run installs it)"
    if os.environ.get("GX_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}; GX_REQUIRE_BROWSER=1 makes a missing browser a failure")
    pytest.skip(reason)


# the tiny trained run that the evaluation modules (test_downstream, test_lm_eval) read: a
# 512-token window, so every PIQA continuation of lm-eval's parity check fits one window, and
# two downstream tasks scored every 12 steps and at the end
EVAL_RUN_ARGS = ["--config.data.seq_len=512", "--config.tracking.wandb=false",
                 "--config.eval.downstream.tasks=('piqa','lambada')",
                 "--config.eval.downstream.every_steps=12", "--config.eval.downstream.limit=6"]


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory, data_cache, corpus_root) -> dict:
    """A tiny run trained once per session (under pytest-xdist by the first worker that asks;
    the others wait on a lock and reuse it). Read it, never change it: a test that writes into
    a run works on a copy (`run_copy`). Returns the runs root, the run
    and what its training printed."""
    import fcntl
    import subprocess
    import sys

    from test_run import TINY

    from gemini_core.runs.rundir import iter_runs

    base = _session_dir(tmp_path_factory, "eval-run")
    runs, printed = base / "runs", base / "printed.txt"
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not printed.is_file():
            proc = subprocess.run(
                [sys.executable, "-m", "gx", "--runs-root", str(runs), "run",
                 "experiments/quickstart.py", *TINY, *EVAL_RUN_ARGS,
                 f"--config.data.root={corpus_root}", f"--config.data.cache_dir={data_cache}"],
                cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                env={**os.environ, "WANDB_MODE": "offline"})
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            printed.write_text(proc.stdout + proc.stderr)
    [run] = list(iter_runs(runs))
    return {"runs": runs, "run": run, "printed": printed.read_text(), "args": EVAL_RUN_ARGS}


@pytest.fixture
def run_copy(eval_run, tmp_path) -> dict:
    """A copy of `eval_run`'s runs root, for a test that writes into the run."""
    import shutil

    from gemini_core.runs.rundir import iter_runs
    runs = tmp_path / "runs"
    shutil.copytree(eval_run["runs"], runs, symlinks=True)
    [run] = list(iter_runs(runs))
    return {"runs": runs, "run": run}
