"""A sweep whose trials fail: every try of a trial fails (retried resources.max_failures times;
each retry and the last failure on the driver's live table; the reason kept as one line), and
then the fit has too few finished trials (one UserError naming how many, and the first failure).

Real Ray Tune and real trial runs through the sweep's own fan-out (`runner.run_trials`), whose
corpus is missing on the workers (as on a node without the data mount): they fail before any
data is read, so no training. The setup is built by hand for the same reason: the driver's own
data preparation would stop on the missing corpus first."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemini_core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TRIALS = 2
FIT_NEEDS = 4  # sweeps.fit.MIN_TRIALS


@pytest.fixture(scope="module")
def failed(tmp_path_factory):
    """(setup, rows of runner.run_trials, the driver's log lines, the missing corpus)."""
    import ray

    from gemini_core.experiment import load_experiment
    from sweeps import config as sweep_config
    from sweeps import runner, space
    from sweeps.sweep_setup import SweepSetup, trial_base, write_setup

    tmp = tmp_path_factory.mktemp("failing")
    missing = tmp / "not-mounted"
    sweep = load_experiment(
        f"{REPO / 'experiments' / 'mixture_sweep.py'}:size=tiny",
        [f"--config.proxy.data.root={missing}", f"--config.space.trials={TRIALS}",
         "--config.resources.max_failures=1", "--config.proxy.tracking.wandb=false"],
        schema=sweep_config.SweepConfig, convert=sweep_config.from_config_dict).config
    proxy = trial_base(sweep_config.proxy_config(sweep))
    domains = proxy.data.domains
    tokens = {d: 10**6 for d in domains}
    schedules, fixed = space.sample_space(sweep.space, domains, tokens, 10**6)
    setup = SweepSetup(sweep, proxy, trial_base(sweep_config.target_config(sweep)), domains,
                       tokens, 10**6, schedules, tmp / "runs" / "sweeps" / "failing-00000000",
                       tmp / "runs", fixed)
    write_setup(setup)
    log: list[str] = []
    with pytest.MonkeyPatch.context() as env:
        # a Ray of this module's own, stopped at its end
        env.setenv("GX_RAY_TEMP_DIR", str(tmp_path_factory.mktemp("r")))
        env.setenv("RAY_AUTH_MODE", "disabled")
        try:
            rows = runner.run_trials(setup, log.append)
        finally:
            ray.shutdown()
    return setup, rows, log, missing


def test_a_trial_that_fails_every_try_is_retried_then_reported(failed):
    setup, rows, log, missing = failed
    assert [r["trial"] for r in rows] == list(range(TRIALS))
    for r in rows:
        assert r["run_id"] == "" and not any(k.startswith("loss/") for k in r), r
        # the trainable's own error in one line: not Ray's wrapping, not a traceback
        assert r["failed"].startswith(f"UserError: config.data.root='{missing}': no such "
                                      "directory"), r["failed"]
        assert "\n" not in r["failed"]
        assert "Traceback" not in r["failed"] and "RayTaskError" not in r["failed"]
    for i in range(TRIALS):
        name = f"trial-{i:03d}"
        retries = [line for line in log if line.startswith(f"trials {name}: error, retry ")]
        assert retries == [f"trials {name}: error, retry 1 of 1: {rows[i]['failed']}"], log
        assert f"trials {name}: failed 2 time(s), not retried again " \
               "(resources.max_failures=1)" in log, log


def test_too_few_finished_trials_stop_the_fit_naming_the_first_failure(failed):
    from sweeps import runner

    setup, rows, log, missing = failed
    with pytest.raises(UserError) as e:
        runner.fit_and_choose(setup, runner.trials_table(setup, rows), log.append)
    assert str(e.value) == (f"sweep: only 0 of {TRIALS} trials finished; the fit needs at least "
                            f"{FIT_NEEDS} (first failure: {rows[0]['failed']})")
    # some finished, still too few: the count says so
    finished = [{**r, "failed": "", "run_id": f"r{r['trial']}",
                 **{f"loss/{d}": 3.0 + r["trial"] for d in setup.domains},
                 "loss/mean": 3.0 + r["trial"]} for r in rows[:-1]]
    with pytest.raises(UserError) as e:
        runner.fit_and_choose(setup, runner.trials_table(setup, finished + rows[-1:]),
                              log.append)
    assert str(e.value).startswith(f"sweep: only {TRIALS - 1} of {TRIALS} trials finished; the "
                                   f"fit needs at least {FIT_NEEDS} (first failure: UserError: "
                                   "config.data.root=")
