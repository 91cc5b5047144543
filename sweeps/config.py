"""The typed config of a mixture sweep (`gx sweep EXPERIMENT`).

A sweep experiment's get_config returns a ConfigDict with the proxy training experiment under
`proxy` (a full gemini_core experiment: every trial is that run with its own mixture), the
search space, the objective, the fit and the resources. It is validated once, like every
config: one UserError naming the key path.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Collection, Mapping

import ml_collections

from gemini_core import config as gc_config
from gemini_core.config import ExperimentConfig, to_dataclass
from gemini_core.errors import UserError
from gemini_core.nested import merge
from sweeps import fit as fit_lib
from sweeps import space as space_lib
from sweeps.doremi import DoReMiConfig
from sweeps.doremi import check as check_doremi
from sweeps.space import SpaceConfig
from sweeps.sweep_dir import DOWNSTREAM, LOSS

EMPTY: Mapping = types.MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """What the mixture is chosen for (sweeps.fit.Objective): metric -> weight, where a metric
    is a domain's name (its held-out loss), `downstream/<task>/<metric>` of a task the proxy
    evaluates (config.proxy.eval.downstream), or a glob (`downstream/*/bpb`: every task's gold
    bpb); empty = the mean loss over the domains. Accuracies count with their sign flipped."""

    targets: Mapping[str, float] = dataclasses.field(default_factory=lambda: EMPTY)
    # > 0: no domain's predicted loss may be worse than the natural mixture's by more than this
    max_worse_than_baseline: float = 0.0
    # metric or glob -> the largest relative worsening against the natural mixture, e.g.
    # {"loss/*": 0.01, "downstream/*/bpb": 0.02}
    constraints: Mapping[str, float] = dataclasses.field(default_factory=lambda: EMPTY)
    # 0: the constraints are hard limits; > 0: a cost of penalty x the worst relative excess
    penalty: float = 0.0


@dataclasses.dataclass(frozen=True)
class FitConfig:
    folds: int = 5
    regressors: tuple[str, ...] = fit_lib.REGRESSORS
    holdout_fraction: float = 0.25  # trials never used in fitting: Spearman and regret
    method: str = "search"  # search | topk
    samples: int = 100_000
    # the best measured trial wins when the fit predicts its own mixture better than it by less
    # than the fit's error there: the CV error on the objective with the CV folds' models'
    # spread at that mixture (sweeps.optimize.prefer_measured)
    prefer_measured: bool = True
    # then the natural mixture (its anchor trial) wins unless the choice leads its measured
    # objective by more than that error: no move off the default without evidence
    prefer_baseline: bool = False


@dataclasses.dataclass(frozen=True)
class ResourcesConfig:
    cpus_per_trial: int = 1  # XLA is pinned to this many threads in each trial
    max_concurrent: int = 0  # 0 = as many as the CPUs allow
    max_failures: int = 1  # retries of a failing trial
    # a running trial's progress line (step, loss, tok/s, eta) reaches the driver this often
    # while no trial has finished for as long: a 30-minute run is not silent; 0 = never
    progress_every_s: float = 60.0


def check_resources(r: ResourcesConfig) -> None:
    for name, least in (("cpus_per_trial", 1), ("max_concurrent", 0), ("max_failures", 0),
                        ("progress_every_s", 0)):
        value = getattr(r, name)
        if not (math.isfinite(value) and value >= least):
            raise UserError(f"config.resources.{name}={value!r}: must be a finite number >= "
                            f"{least}")


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """The winner against baselines (natural, uniform, the best trial, the winner without its
    end-of-training stage when it has its own), each with `seeds` seeds, at proxy and at target
    scale.

    `boost` declares an end-of-training upweighting to measure on its own, as the Gemini recipe
    uses one: the winner's base stage, then over its last stage (or from the middle of
    `space.anneal_start`) the same weights with these domains multiplied by `boost_factor`,
    renormalized under the caps; compared with the base stage alone."""

    enabled: bool = True
    seeds: int = 2
    scales: tuple[str, ...] = ("proxy", "target")  # or one of them
    # fields replacing the proxy's at target scale, e.g. {"model": {"d_model": 128}}; empty =
    # d_model x2 (about 4x the non-embedding parameters) and steps x4 (4x the tokens; as many
    # checkpoints as the proxy's)
    target: Mapping[str, Any] = dataclasses.field(default_factory=lambda: EMPTY)
    boost: tuple[str, ...] = ()
    boost_factor: float = 4.0
    # decision accuracy across scales: the first `rank_trials` finished trials trained at target
    # scale too (`rank_seeds` seeds each, scored on the held-out half); how often the proxies'
    # order on the objective holds there
    rank_trials: int = 0
    rank_seeds: int = 1
    # the validation runs sample generative tasks (exact match, pass@k) on their held-out
    # examples; False: gold bpb only, as proxies with eval.downstream.generate=False
    generate: bool = True
    # DoReMi's mixture (config.doremi: a reference proxy and a Group-DRO proxy) as one more
    # baseline of a regression sweep
    doremi: bool = False


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    name: str
    proxy: Any  # the proxy's experiment ConfigDict; converted below to an ExperimentConfig
    target_tokens: int = 0  # token budget of the target run, for the repetition caps; 0 = 4x proxy
    space: SpaceConfig = SpaceConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    fit: FitConfig = FitConfig()
    resources: ResourcesConfig = ResourcesConfig()
    validate: ValidateConfig = ValidateConfig()
    # regression: a swarm of proxies + per-domain fits (RegMix / Data Mixing Laws);
    # doremi: a reference proxy + a Group-DRO proxy (sweeps/doremi.py)
    method: str = "regression"
    doremi: DoReMiConfig = DoReMiConfig()


def proxy_config(sweep: SweepConfig) -> ExperimentConfig:
    """The proxy experiment, named after the sweep (the W&B group), job_type proxy."""
    cfg = ml_collections.ConfigDict(gc_config.to_json_dict(sweep.proxy))
    cfg.name = sweep.name
    cfg.tracking.job_type = "proxy"
    try:
        return gc_config.from_config_dict(cfg)
    except UserError as e:
        raise UserError(str(e).replace("config.", "config.proxy.", 1)) from None


def check_proxy_data(sweep: SweepConfig, *, skip: Collection[str] = (),
                     running: bool = False) -> None:
    """The proxy's data paths exist and are of the right kind (gemini_core.config.check_paths)
    and, `running`, its corpus is set; named under config.proxy, the key the user typed.
    `skip`: fields (proxy.data.root, ...) that a recipe's upstream steps fill, not there yet."""
    data = proxy_config(sweep).data
    data = dataclasses.replace(data, **{f: "" for f in ("root", "schedule", "cache_dir")
                                        if f"proxy.data.{f}" in skip})
    try:
        if running:
            gc_config.require_data_root(data)
        gc_config.check_paths(data)
    except UserError as e:  # --config.data.root in its example becomes --config.proxy.data.root
        raise UserError(str(e).replace("config.data.", "config.proxy.data.")) from None


def objective(sweep: SweepConfig) -> fit_lib.Objective:
    o = sweep.objective
    return fit_lib.Objective(targets=dict(o.targets), constraints=dict(o.constraints),
                             max_worse_than_baseline=o.max_worse_than_baseline,
                             penalty=o.penalty)


def task_metrics(sweep: SweepConfig) -> list[str]:
    """`downstream/<task>/<metric>` of every task the proxy evaluates."""
    from gemini_core.eval.downstream import configured_specs
    from gemini_core.eval.tasks import metric_names

    dc = proxy_config(sweep).eval.downstream
    specs = configured_specs(dataclasses.replace(dc, split="all"))
    return [f"{DOWNSTREAM}{spec.name}/{m}" for spec in specs
            for m in metric_names(spec, dc.generate)]


def available_metrics(sweep: SweepConfig) -> list[str]:
    """What an objective may name: each domain (its loss), the mean loss, each task metric."""
    return [*proxy_config(sweep).data.domains, f"{LOSS}mean", *task_metrics(sweep)]


def target_config(sweep: SweepConfig) -> ExperimentConfig:
    """The validation's target scale: the proxy with `validate.target` (or x4 params, x4 tokens)."""
    proxy = gc_config.to_json_dict(proxy_config(sweep))
    proxy["model"] = gc_config.declared_model(proxy["model"])
    if sweep.validate.target:
        update = gc_config.to_json_dict(sweep.validate.target)
    else:
        m, t = proxy["model"], proxy["train"]
        # 4x the steps, and 4x the checkpoint interval: as many checkpoints as a proxy writes
        update = {"model": {"d_model": 2 * m["d_model"], "mlp_dim": 2 * m["mlp_dim"]},
                  "train": {"steps": 4 * t["steps"],
                            "checkpoint_every": 4 * t["checkpoint_every"]}}
    try:
        return gc_config.from_config_dict(merge(proxy, update))
    except UserError as e:
        raise UserError(f"config.validate.target: {e}") from None


def _check(s: SweepConfig) -> None:
    f = s.fit
    if f.folds < 2:
        raise UserError(f"config.fit.folds={f.folds}: cross-validation needs at least 2")
    if not 0.0 <= f.holdout_fraction < 1.0:
        raise UserError(f"config.fit.holdout_fraction={f.holdout_fraction}: must be in [0, 1)")
    if f.method not in ("search", "topk"):
        raise UserError(f"config.fit.method={f.method!r}: expected 'search' or 'topk'")
    unknown = set(f.regressors) - set(fit_lib.REGRESSORS)
    if unknown or not f.regressors:
        raise UserError(f"config.fit.regressors={f.regressors}: choose from "
                        f"{', '.join(fit_lib.REGRESSORS)}")
    check_resources(s.resources)
    if s.validate.rank_trials == 1 or s.validate.rank_trials < 0:
        raise UserError(f"config.validate.rank_trials={s.validate.rank_trials}: 0 (off) or >= 2 "
                        "(pairs of trials to order)")
    if s.validate.rank_seeds < 1:
        raise UserError(f"config.validate.rank_seeds={s.validate.rank_seeds}: at least 1")
    if s.validate.seeds < 1:
        raise UserError(f"config.validate.seeds={s.validate.seeds}: at least 1")
    scales = s.validate.scales
    if not scales or not set(scales) <= {"proxy", "target"} or len(set(scales)) < len(scales):
        raise UserError(f"config.validate.scales={scales}: 'proxy', 'target' or both")
    factor = s.validate.boost_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1 \
            or not math.isfinite(factor):
        raise UserError(f"config.validate.boost_factor={factor!r}: expected a finite number > 1")
    worse = s.objective.max_worse_than_baseline
    if not (math.isfinite(worse) and worse >= 0):
        raise UserError(f"config.objective.max_worse_than_baseline={worse!r}: must be a finite "
                        "number >= 0 (0 = no constraint)")
    if f.samples < 1:
        raise UserError(f"config.fit.samples={f.samples}: must be >= 1")
    if s.method not in ("regression", "doremi"):
        raise UserError(f"config.method={s.method!r}: expected 'regression' or 'doremi'")
    check_doremi(s.doremi)
    if s.target_tokens < 0:
        raise UserError(f"config.target_tokens={s.target_tokens}: must be >= 0")


def from_config_dict(cfg: ml_collections.ConfigDict | Mapping) -> SweepConfig:
    sweep = to_dataclass(cfg, SweepConfig, "config")
    if not sweep.name:
        raise UserError("config.name='': every sweep needs a name")
    if not isinstance(sweep.proxy, Mapping) or not sweep.proxy:
        raise UserError("config.proxy: the proxy training experiment (a section of keys, e.g. "
                        "an experiment's get_config())")
    _check(sweep)
    proxy = proxy_config(sweep)
    target_config(sweep)  # a broken target scale fails now, not after the trials
    domains = proxy.data.domains
    space_lib.check_fields(sweep.space, domains, "config.space")  # the data's part: sweep_setup
    try:
        objective(sweep).check(available_metrics(sweep), where="config.objective")
    except UserError as e:
        hint = ("; a task's metrics need the task in config.proxy.eval.downstream.tasks"
                if "downstream/" in str(e) and not task_metrics(sweep) else "")
        raise UserError(f"{e}{hint}") from None
    unknown = [d for d in sweep.validate.boost if d not in domains]
    if unknown:
        raise UserError(f"config.validate.boost={tuple(sweep.validate.boost)!r}: unknown "
                        f"domain(s) {', '.join(unknown)} (known: {', '.join(domains)})")
    return sweep
