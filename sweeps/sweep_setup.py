"""What a mixture sweep runs (`SweepSetup`): data prepared once, the sampled schedules, the
sweep's identity and directory; written as sweep.json and schedules/ (`write_setup`).

The sweep's fingerprint covers its config (less where things are and how they run), the data's
manifest hash and the sampled schedules, so the same sweep finds the same directory again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from gemini_core import config as gc_config
from gemini_core.data.mixture import MixtureSchedule, Stage
from gemini_core.runs.rundir import fingerprint, write_json_atomic
from sweeps import fit as fit_lib
from sweeps import space as space_lib
from sweeps.config import SweepConfig, check_proxy_data, proxy_config, target_config

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class SweepSetup:
    sweep: SweepConfig
    proxy: gc_config.ExperimentConfig
    target: gc_config.ExperimentConfig  # the validation's target scale
    domains: tuple[str, ...]
    tokens: dict[str, int]
    target_tokens: int
    schedules: list[MixtureSchedule]
    dir: Path
    runs_root: Path
    fixed: dict[str, int]  # "centre" and the space's anchors -> trial index; always fitted


def trial_base(exp: gc_config.ExperimentConfig) -> gc_config.ExperimentConfig:
    """What every run of the sweep shares. Paths absolute: Ray runs trials in other working
    directories. One tokenizer: trials differ in mixture only, and a tokenizer drawn by the
    mixture would differ per trial."""
    data = exp.data
    data = dataclasses.replace(
        data, root=str(Path(data.root).absolute()) if data.root else "",
        cache_dir=str(Path(data.cache_dir).absolute()) if data.cache_dir else "")
    if data.tokenizer.sample_weights == "mixture":
        data = dataclasses.replace(data, tokenizer=dataclasses.replace(
            data.tokenizer, sample_weights="natural"))
    return dataclasses.replace(exp, data=data)


def setup_sweep(sweep: SweepConfig, runs_root: Path, log: Log = print) -> SweepSetup:
    """Prepares the data (tokenizer, token arrays) on the driver, samples the space, and names
    the sweep's directory; nothing is written to it yet."""
    from gemini_core.data.tokens import prepare_data
    from gemini_core.train import trainer

    runs_root = Path(runs_root).absolute()
    check_proxy_data(sweep, running=True)
    proxy = trial_base(proxy_config(sweep))
    cache = trainer.cache_root(proxy, runs_root)
    data = prepare_data(proxy.data, proxy.data.tokenizer.sample_weights, cache, log=log,
                        encoders=proxy.model.encoders)
    domains = proxy.data.domains
    tokens = {d: int(len(data.train[d])) for d in domains}
    proxy_tokens = proxy.train.steps * proxy.train.batch_size * proxy.data.seq_len
    target = sweep.target_tokens or 4 * proxy_tokens
    space_lib.check_space(sweep.space, domains, tokens, target,
                          min_trials=min_trials(sweep) if sweep.method == "regression" else 1)
    schedules, fixed = space_lib.sample_space(sweep.space, domains, tokens, target)
    ident = gc_config.to_json_dict(sweep)
    ident.pop("resources")  # how the trials run, not what they are: a resumed sweep may change it
    for path_field in ("root", "cache_dir", "schedule"):  # where things are, not what
        ident["proxy"]["data"].pop(path_field, None)
    fp = fingerprint({"sweep": ident, "manifest": data.manifest_hash,
                      "schedules": [s.to_dict() for s in schedules]})
    out = runs_root / "sweeps" / f"{sweep.name}-{fp[:8]}"
    return SweepSetup(sweep, proxy, trial_base(target_config(sweep)), domains, tokens,
                      target, schedules, out, runs_root, fixed)


def min_trials(sweep: SweepConfig) -> int:
    """The fewest trials that leave the fit fit_lib.MIN_TRIALS rows after the fit holds out its
    share of the drawn ones (counting every trial but the centre as drawn: an anchor may be
    dropped as a duplicate)."""
    trials = fit_lib.MIN_TRIALS
    while trials - round(sweep.fit.holdout_fraction * (trials - 1)) < fit_lib.MIN_TRIALS:
        trials += 1
    return trials


def write_setup(setup: SweepSetup) -> None:
    """sweep.json and schedules/trial-NNN.json: what every trial (a Ray worker) reads."""
    (setup.dir / "schedules").mkdir(parents=True, exist_ok=True)
    for i, schedule in enumerate(setup.schedules):
        path = setup.dir / "schedules" / f"trial-{i:03d}.json"
        if not path.exists():
            schedule.dump(path)
    write_json_atomic(setup.dir / "sweep.json", {
        "sweep": gc_config.to_json_dict(setup.sweep),
        "proxy": gc_config.to_json_dict(setup.proxy),
        "target": gc_config.to_json_dict(setup.target),
        "domains": list(setup.domains), "tokens": setup.tokens,
        "target_tokens": setup.target_tokens, "runs_root": str(setup.runs_root)})


def baselines(setup: SweepSetup) -> dict[str, MixtureSchedule]:
    """The natural (token shares) and uniform mixtures in every stage of the sweep's schedules,
    as the validation runs them: the space's anchor trial where it has one (the same mixture on
    the caps and the weight grid, so the same runs), else the exact shares."""
    natural = space_lib.prior_weights(dataclasses.replace(setup.sweep.space, prior_power=1.0),
                                      setup.domains, setup.tokens)
    uniform = {d: 1.0 / len(setup.domains) for d in setup.domains}
    return {name: setup.schedules[setup.fixed[name]] if name in setup.fixed else MixtureSchedule(
                tuple(Stage(s.start, dict(w)) for s in setup.schedules[0].stages))
            for name, w in (("natural", natural), ("uniform", uniform))}
