"""`gx plan --compute FLOPS [--inference-tokens N]`: model size and tokens for a compute budget.

Chinchilla (Hoffmann et al. 2022): training compute C ≈ 6·N·D, compute-optimal at D ≈ 20·N, so
N = sqrt(C / 120). The predicted loss uses Chinchilla's approach-3 fit
L(N, D) = E + A/N^α + B/D^β with its published constants, fitted on MassiveText with its
tokenizer: a relative guide, not a prediction for our data or tokenizer.

Inference-aware (Sardana & Frankle 2023, "Beyond Chinchilla-Optimal"): a model that will serve
N_inf tokens costs 6·N·D + 2·N·N_inf in total; minimize that while reaching the Chinchilla
choice's loss, which gives a smaller model trained on more tokens (what the Gemini reports do
for their small models).

Which iso-loss curve: the published A and B put the fit's own compute optimum far from the
20-tokens rule (N ≈ 30B rather than 70B at Chinchilla's budget: approach 3 disagrees with
approaches 1 and 2, see Besiroglu et al. 2024), so with them even N_inf = 0 would "save" compute
against the rule. We keep the fit's exponents α, β and take the curve of constant loss through
the Chinchilla point on which that point is compute-optimal. Writing n = N/N0, d = D/D0,
tangency (α·A/N0^α = β·B'/D0^β) fixes the coefficients' ratio and the curve becomes
    n^-α + (α/β)·d^-β = 1 + α/β,
independent of E, A, B: N_inf = 0 gives back exactly the Chinchilla choice.

The chosen N is mapped to `experiments/pretrain.py` arguments: the width d whose model, built
by the experiment file through the experiment loader and counted by `flops.param_counts`, is
closest to N, and steps = ceil(D / (batch·seq)). Widths are multiples of 16 below 512, of 64
below 1024 and of 128 from there. `--size auto` takes the family nearest N in full size, or the
next nearest when its widths miss N by more than 5% (pro and ultra share K/V heads in groups,
so only some of their widths are valid models).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
from scipy import optimize

from gemini_core.errors import UserError

TOKENS_PER_PARAM = 20.0  # Chinchilla's compute-optimal ratio (approaches 1 and 2)
TRAIN_FLOPS_PER_PARAM_TOKEN = 6.0  # forward + backward
INFERENCE_FLOPS_PER_PARAM_TOKEN = 2.0  # forward only

FAMILIES = ("nano", "pro", "ultra")  # experiments/pretrain.py's size= values
DEFAULT_EXPERIMENT = "experiments/pretrain.py"
FULL_DATA_SHAPE_FROM = 1e9  # from here on the family's full vocab/seq/batch, below the CPU ones
# widths tried: multiples of 16 at CPU scale, where a step of 64 in width can change the count
# (embedding-dominated, two layers) by half; 64 from 512; 128 (the TPU MXU's side) from 1024
WIDTHS = (tuple(range(64, 512, 16)) + tuple(range(512, 1024, 64))
          + tuple(range(1024, 65536 + 1, 128)))
MATCH_TOLERANCE = 0.05  # --size auto tries the next family when the nearest misses N by more


@dataclasses.dataclass(frozen=True)
class LossFit:
    """L(N, D) = E + A/N^α + B/D^β."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def compute_optimal_params(self, compute: float) -> float:
        """The fit's own argmin_N L subject to 6·N·D = C (Hoffmann et al., eq. 4)."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        return g * (compute / TRAIN_FLOPS_PER_PARAM_TOKEN) ** (b / (a + b))


CHINCHILLA_FIT = LossFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


@dataclasses.dataclass(frozen=True)
class Choice:
    params: float
    tokens: float
    inference_tokens: float

    @property
    def train_flops(self) -> float:
        return TRAIN_FLOPS_PER_PARAM_TOKEN * self.params * self.tokens

    @property
    def inference_flops(self) -> float:
        return INFERENCE_FLOPS_PER_PARAM_TOKEN * self.params * self.inference_tokens

    @property
    def total_flops(self) -> float:
        return self.train_flops + self.inference_flops

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


@dataclasses.dataclass(frozen=True)
class Match:
    """The pretrain.py arguments whose model is closest to a target parameter count."""

    spec: str  # experiments/pretrain.py:size=...,d=...,steps=...
    d: int
    params: int  # flops.param_counts(...)["total"] of the config the experiment file builds
    steps: int
    tokens: int  # steps · batch · seq
    target_params: float
    run_flops: float  # flops.training_flops of the run: 6·N_nonembed + attention, per token

    @property
    def command(self) -> str:
        return f"gx run {self.spec} --dry-run"

    @property
    def error(self) -> float:
        return self.params / self.target_params - 1


@dataclasses.dataclass(frozen=True)
class Plan:
    compute: float
    inference_tokens: float
    chinchilla: Choice
    inference_aware: Choice | None  # None without --inference-tokens
    size: str
    data_shape: dict  # vocab, seq, batch
    data_shape_reason: str
    matches: dict  # "chinchilla" / "inference-aware" -> Match


# ---------------------------------------------------------------------------------------------
# the arithmetic


def parse_amount(text: str, flag: str, *, allow_zero: bool = False) -> float:
    """'1e21', '3.5e20', '1_000' -> float; anything else is one clear UserError."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise UserError(f"{flag}={text!r}: expected a number such as 1e21 or 3.5e20") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        need = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise UserError(f"{flag}={text!r}: expected {need}")
    return value


def chinchilla(compute: float, inference_tokens: float = 0.0) -> Choice:
    params = math.sqrt(compute / (TRAIN_FLOPS_PER_PARAM_TOKEN * TOKENS_PER_PARAM))
    return Choice(params, TOKENS_PER_PARAM * params, inference_tokens)


def iso_loss_tokens_ratio(n: np.ndarray | float, alpha: float, beta: float):
    """d = D/D0 on the iso-loss curve n^-α + (α/β)·d^-β = 1 + α/β (inf where unreachable)."""
    r = beta / alpha
    base = 1 + r - r * np.power(n, -alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(base > 0, np.power(np.maximum(base, 1e-300), -1 / beta), np.inf)


def smallest_params_ratio(alpha: float, beta: float) -> float:
    """Below this n no amount of data reaches the loss: d -> inf."""
    return (beta / (alpha + beta)) ** (1 / alpha)


def inference_aware(compute: float, inference_tokens: float,
                    fit: LossFit = CHINCHILLA_FIT) -> Choice:
    """argmin 6·N·D + 2·N·N_inf on the iso-loss curve through the Chinchilla choice.

    In units of 6·N0·D0 the objective is n·d(n) + k·n with k = N_inf / (3·D0). At k = 0 its only
    stationary point is n = 1, and k > 0 only adds an increasing term, so the optimum lies in
    (n_min, 1]. We search x = ln n on a dense grid, then refine with bounded Brent around the
    best grid point, so a flat or skewed objective cannot trap the solver.
    """
    ref = chinchilla(compute, inference_tokens)
    k = inference_tokens / (3 * ref.tokens)
    a, b = fit.alpha, fit.beta

    def objective(x):
        n = np.exp(x)
        return n * iso_loss_tokens_ratio(n, a, b) + k * n

    x_lo = math.log(smallest_params_ratio(a, b)) + 1e-9
    grid = np.linspace(x_lo, 0.0, 4001)
    values = objective(grid)
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best = optimize.minimize_scalar(lambda x: float(objective(x)), bounds=(lo, hi),
                                    method="bounded", options={"xatol": 1e-12})
    x = best.x if best.success and best.fun <= values[i] else grid[i]
    n = math.exp(x)
    d = float(iso_loss_tokens_ratio(n, a, b))
    return Choice(n * ref.params, d * ref.tokens, inference_tokens)


# ---------------------------------------------------------------------------------------------
# mapping to experiments/pretrain.py


def _experiment_path(experiment: str | None) -> str:
    if experiment:
        return experiment
    if Path(DEFAULT_EXPERIMENT).is_file():
        return DEFAULT_EXPERIMENT
    beside_package = Path(__file__).resolve().parents[1] / DEFAULT_EXPERIMENT
    return str(beside_package) if beside_package.is_file() else DEFAULT_EXPERIMENT


@functools.lru_cache(maxsize=None)  # the search asks for the same widths again
def _load(experiment: str, arg: str):
    from gemini_core.experiment import load_experiment
    return load_experiment(f"{experiment}:{arg}").config


def _total_params(cfg) -> int:
    from gemini_core.scale import flops
    return flops.param_counts(cfg.model)["total"]


class _Widths:
    """Parameter counts of pretrain.py models by width, built through the experiment loader."""

    def __init__(self, experiment: str, size: str, shape: dict):
        self.experiment, self.size, self.shape = experiment, size, shape
        self._params: dict[int, int | None] = {}

    def arg(self, d: int, steps: int | None = None) -> str:
        parts = [f"size={self.size}", f"d={d}"] + ([f"steps={steps}"] if steps else [])
        parts += [f"{key}={value}" for key, value in self.shape.items()]
        return ",".join(parts)

    def params(self, d: int) -> int | None:
        """None where the file's shape rules give an invalid model at this width."""
        if d not in self._params:
            try:
                self._params[d] = _total_params(_load(self.experiment, self.arg(d)))
            except UserError:
                self._params[d] = None
        return self._params[d]

    def valid_index(self, i: int, step: int) -> int | None:
        """The first width index from i in direction step whose model is valid: the family's
        K/V sharing makes many widths invalid (pro needs a multiple of 6 heads)."""
        while 0 <= i < len(WIDTHS):
            if self.params(WIDTHS[i]) is not None:
                return i
            i += step
        return None

    def closest(self, target: float) -> int:
        """Bisection for the first valid width whose count reaches the target, then the best
        of the few valid widths around it: depth is rounded to whole layers, so the count is
        only nearly monotone in d."""
        lo, hi = 0, len(WIDTHS)
        while lo < hi:  # smallest i whose next valid width has >= target params
            mid = (lo + hi) // 2
            j = self.valid_index(mid, +1)
            if j is not None and self.params(WIDTHS[j]) >= target:
                hi = mid
            else:
                lo = mid + 1
        candidates = []
        for start, step in ((lo, +1), (lo - 1, -1)):
            i = start
            for _ in range(3):
                i = self.valid_index(i, step) if 0 <= i < len(WIDTHS) else None
                if i is None:
                    break
                candidates.append(i)
                i += step
        if not candidates:
            raise UserError(f"{self.experiment}: no valid width d for size={self.size}")
        return min((abs(math.log(self.params(WIDTHS[i]) / target)), WIDTHS[i])
                   for i in candidates)[1]


def match(widths: _Widths, choice: Choice) -> Match:
    d = widths.closest(choice.params)
    tokens_per_step = widths.shape["batch"] * widths.shape["seq"]
    steps = max(1, math.ceil(choice.tokens / tokens_per_step))
    from gemini_core.scale import flops

    arg = widths.arg(d, steps)
    cfg = _load(widths.experiment, arg)
    tokens = steps * tokens_per_step
    return Match(spec=f"{widths.experiment}:{arg}", d=d, params=widths.params(d), steps=steps,
                 tokens=tokens, target_params=choice.params,
                 run_flops=flops.training_flops(cfg.model, cfg.data.seq_len, tokens))


def _family_params(experiment: str) -> dict[str, int]:
    return {size: _total_params(_load(experiment, f"size={size}")) for size in FAMILIES}


def _data_shape(experiment: str, size: str, params: float, vocab: int, seq: int,
                batch: int) -> tuple[dict, str]:
    """vocab/seq/batch written into the command: the family's full-size values for models of
    1B parameters and up, pretrain.py's scaled-down (CPU) defaults below; flags override."""
    full = params >= FULL_DATA_SHAPE_FROM
    cfg = _load(experiment, f"size={size}" if full else f"size={size},d=64")
    shape = {"vocab": vocab or cfg.data.tokenizer.vocab_size, "seq": seq or cfg.data.seq_len,
             "batch": batch or cfg.train.batch_size}
    reason = (f"{size}'s full-size vocab/seq/batch (N >= {FULL_DATA_SHAPE_FROM:.0e})" if full
              else f"{Path(experiment).name}'s scaled-down defaults (N < "
                   f"{FULL_DATA_SHAPE_FROM:.0e})")
    if vocab or seq or batch:
        reason += "; set by flags: " + ", ".join(
            f"{k}" for k, v in (("vocab", vocab), ("seq", seq), ("batch", batch)) if v)
    return shape, reason


def make_plan(compute: str | float, inference_tokens: str | float | None = None, *,
              size: str = "auto", experiment: str | None = None, vocab: int = 0, seq: int = 0,
              batch: int = 0) -> Plan:
    c = parse_amount(compute, "--compute")
    n_inf = (parse_amount(inference_tokens, "--inference-tokens", allow_zero=True)
             if inference_tokens is not None else None)
    for flag, value in (("--vocab", vocab), ("--seq", seq), ("--batch", batch)):
        if value < 0:
            raise UserError(f"{flag}={value}: must be > 0 (or 0 for the default)")
    if size != "auto" and size not in FAMILIES:
        raise UserError(f"--size={size!r}: expected auto or one of {', '.join(FAMILIES)}")
    experiment = _experiment_path(experiment)

    base = chinchilla(c, n_inf or 0.0)
    aware = inference_aware(c, n_inf) if n_inf is not None else None
    targets = {"chinchilla": base} | ({"inference-aware": aware} if aware else {})
    if size == "auto":  # families by how near their full size is to N on a log scale
        fam = _family_params(experiment)
        sizes = sorted(FAMILIES, key=lambda s: abs(math.log(fam[s] / base.params)))
    else:
        sizes = [size]
    tried = []
    for i, family in enumerate(sizes):
        shape, reason = _data_shape(experiment, family, base.params, vocab, seq, batch)
        widths = _Widths(experiment, family, shape)
        if i == 0:
            _check_range(widths, base, compute)
        matches = {name: match(widths, choice) for name, choice in targets.items()}
        worst = max(abs(m.error) for m in matches.values())
        tried.append((worst, i, family, shape, reason, matches))
        if worst <= MATCH_TOLERANCE:  # near enough: keep the nearest family's shape
            break
    worst, i, family, shape, reason, matches = min(tried)
    if i:  # pro and ultra share K/V heads in groups, so only some of their widths are valid
        missed = ", ".join(sizes[:i])
        reason += (f"; size={family}: the widths of {missed} (nearer in full size) miss N by "
                   f"more than {MATCH_TOLERANCE:.0%}")
    return Plan(c, n_inf or 0.0, base, aware, family, shape, reason, matches)


def _check_range(widths: _Widths, base: Choice, compute) -> None:
    first, last = widths.valid_index(0, +1), widths.valid_index(len(WIDTHS) - 1, -1)
    if first is None:
        raise UserError(f"{widths.experiment}: no valid width d for size={widths.size}")
    smallest, largest = widths.params(WIDTHS[first]), widths.params(WIDTHS[last])
    if base.params < smallest:
        raise UserError(
            f"--compute={compute}: the Chinchilla model would have {base.params:.3g} params, "
            f"below the smallest model {widths.experiment} builds ({smallest:,} at "
            f"d={WIDTHS[first]}, which needs >= {chinchilla_compute(smallest):.2g} FLOPs)")
    if base.params > largest:
        raise UserError(
            f"--compute={compute}: the Chinchilla model would have {base.params:.3g} params, "
            f"above the largest width searched ({largest:.3g} at d={WIDTHS[last]}, "
            f"<= {chinchilla_compute(largest):.2g} FLOPs)")


def chinchilla_compute(params: float) -> float:
    return TRAIN_FLOPS_PER_PARAM_TOKEN * TOKENS_PER_PARAM * params**2


# ---------------------------------------------------------------------------------------------
# output


def si(x: float) -> str:
    """A count with an SI suffix for plans and tables: 1.23M, 45.6B."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        out.append("  " + "  ".join(cells))
        if j == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


def render(plan: Plan, fit: LossFit = CHINCHILLA_FIT) -> str:
    base, aware = plan.chinchilla, plan.inference_aware
    loss = fit.loss(base.params, base.tokens)
    lines = [f"compute budget   {plan.compute:.3g} FLOPs of training (C = 6·N·D)"]
    if aware is not None:
        lines.append(f"inference        {plan.inference_tokens:.3g} tokens served "
                     f"(2·N FLOPs each)")
    rows = [("choice", "params N", "tokens D", "tokens/param", "train FLOPs", "inference FLOPs",
             "total FLOPs", "loss (fit)")]
    rows.append(("Chinchilla (D = 20·N)", si(base.params), si(base.tokens),
                 f"{base.tokens_per_param:.1f}", f"{base.train_flops:.3g}",
                 f"{base.inference_flops:.3g}", f"{base.total_flops:.3g}", f"{loss:.3f}"))
    if aware is not None:
        rows.append(("inference-aware", si(aware.params), si(aware.tokens),
                     f"{aware.tokens_per_param:.1f}", f"{aware.train_flops:.3g}",
                     f"{aware.inference_flops:.3g}", f"{aware.total_flops:.3g}", "same"))
    lines += [""] + _table(rows)
    if aware is not None:
        saving = 1 - aware.total_flops / base.total_flops
        if saving < 1e-6:  # N_inf = 0 (or negligible): the Chinchilla row is the optimum
            lines += ["", "inference-aware: the Chinchilla choice itself (no inference cost "
                          "to trade against)"]
        else:
            lines += ["", f"inference-aware: {aware.params / base.params:.2f}x the params, "
                          f"{aware.tokens / base.tokens:.2f}x the tokens, "
                          f"{saving:.1%} less total compute for the same loss "
                          f"({base.total_flops - aware.total_flops:.3g} FLOPs saved)"]
    lines += ["", f"experiments/pretrain.py arguments (size={plan.size}; data shape "
                  f"vocab={plan.data_shape['vocab']} seq={plan.data_shape['seq']} "
                  f"batch={plan.data_shape['batch']}: {plan.data_shape_reason})"]
    for name, m in plan.matches.items():
        lines += [f"  {name}: d={m.d} -> {m.params:,} params ({si(m.params)}, {m.error:+.1%} vs "
                  f"N), {m.steps:,} steps = {si(m.tokens)} tokens, {m.run_flops:.3g} FLOPs "
                  f"with attention (gemini_core.scale.flops)",
                  f"    {m.command}"]
        if abs(m.error) > MATCH_TOLERANCE:
            lines.append(f"    (the closest width: no size={plan.size} model is within "
                         f"{MATCH_TOLERANCE:.0%} of N)")
    lines += [
        "",
        f"loss (fit): Chinchilla's approach-3 fit L = E + A/N^α + B/D^β with its published "
        f"constants (E={fit.E}, A={fit.A}, B={fit.B}, α={fit.alpha}, β={fit.beta}),",
        "  fitted on MassiveText with Chinchilla's tokenizer: a relative guide only, not a "
        "prediction for our data or tokenizer.",
    ]
    if aware is not None:
        lines += [
            "inference-aware (Sardana & Frankle 2023): minimizes 6·N·D + 2·N·N_inf at the "
            "Chinchilla row's loss, on the fit's iso-loss",
            "  curve (exponents α, β) re-balanced so that the Chinchilla row is "
            "compute-optimal on it; the published A, B alone",
            f"  would put the optimum at N = {si(fit.compute_optimal_params(plan.compute))} "
            f"(approach 3 disagrees with approaches 1-2) and rate this row at "
            f"L = {fit.loss(aware.params, aware.tokens):.3f}.",
        ]
    return "\n".join(lines)
