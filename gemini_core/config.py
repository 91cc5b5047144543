"""The config boundary: a user's ConfigDict becomes frozen, typed dataclasses exactly once.

Library code takes `ExperimentConfig`, never a ConfigDict. Every user mistake found here is a
`UserError` naming the full key path (`config.model.num_heads`) and the offending value, raised
before any data is read or anything compiles.

Names are checked here too, once, for every config converted through `to_dataclass` (runs,
sweeps, ladders, recipes, curation pipelines): a field called `name`, and every key of a section
of sections (recipe steps, mixture stages), must pass `names.check_name`. Over 500 lines on
purpose: the whole schema and every check of it in one place.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import ml_collections

from gemini_core.data import modality
from gemini_core.data.modality import ModalityDomain
from gemini_core.data.synthetic import SyntheticDomain, check_declared
from gemini_core.errors import UserError
from gemini_core.eval.settings import EvalConfig, check_downstream
from gemini_core.model.options import ATTENTION, REMAT, EncoderConfig, MediaTable, RopeScaling
from gemini_core.names import check_name

MISSING = dataclasses.MISSING
DEFAULT_DOMAINS = ("books", "wiki", "math", "code", "web", "multilingual")
NAMED_WEIGHTS = ("natural", "uniform")  # resolved from the data: token shares, or 1/D each
# ModelConfig fields that follow from data fields, never set under config.model
FILLED_FROM_DATA = ("vocab_size", "document_mask", "media")

# every integer field: step, token and FLOP arithmetic mixes ints and floats, exact up to 2**53
# (a larger step count would also send the schedule's float boundary search into a long loop)
MAX_INT = 2**53


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int = 1  # 1 = multi-query attention
    head_dim: int = 0  # 0 = d_model // num_heads
    mlp_dim: int = 0  # hidden width of the gated MLP; 0 = 4 * d_model
    tie_embeddings: bool = True
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "float32"  # activations / matmul inputs
    param_dtype: str = "float32"
    rope: RopeScaling = RopeScaling()  # none | linear | ntk | yarn, for a longer context
    # how it computes, not what (equal within float rounding; not part of a run's identity):
    attention: str = "auto"  # auto | dense | blockwise | cudnn (gemini_core.model.attention)
    remat: str = "none"  # none | full | a jax.checkpoint_policies name: what backward recomputes
    scan_layers: bool = False  # one block scanned over stacked weights (in the identity)
    # encoders of the modality domains' media (gemini_core.model.media): name -> encoder
    encoders: Mapping[str, EncoderConfig] = dataclasses.field(default_factory=dict)
    vocab_size: int = 0  # filled from data.tokenizer.vocab_size: one source of truth
    document_mask: bool = False  # filled from data.document_mask
    media: tuple[MediaTable, ...] = ()  # filled from the modality domains' prepared data

    def __hash__(self) -> int:
        # a model config is static in jitted graphs; `encoders` is a mapping, hashed by items
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, Mapping) else v
                          for v in (getattr(self, f.name) for f in dataclasses.fields(self))))

    @property
    def qk_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def ffw_dim(self) -> int:
        return self.mlp_dim or 4 * self.d_model


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int
    model_type: str = "bpe"  # bpe | unigram
    sample_chars: int = 5_000_000  # characters drawn from the training mix to train on
    character_coverage: float = 0.9995
    # which weights draw the training sample: the run's mixture averaged over training time
    # ("mixture"), token-proportional ("natural"; byte shares, since no tokenizer exists yet),
    # or equal ("uniform"). Sweeps fix it so all trials share one tokenizer.
    sample_weights: str = "mixture"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    root: str
    seq_len: int
    tokenizer: TokenizerConfig
    domains: tuple[str, ...] = DEFAULT_DOMAINS
    train_file: str = "train.jsonl.gz"
    valid_file: str = "valid.jsonl.gz"
    text_field: str = "text"
    on_bad_record: str = "error"  # error | skip (skipped records are counted per file)
    max_epochs: float = 4.0  # warn when a domain would repeat more often than this
    schedule: str = ""  # path to a MixtureSchedule JSON; replaces mixture.stages when set
    cache_dir: str = ""  # tokenizers and token arrays; "" = <runs root>/.cache
    num_workers: int = 0  # encoding processes; 0 = all cores
    # packed documents attend only within themselves and their positions restart at each
    # document's EOS (segments follow from the tokens: EOS starts a document)
    document_mask: bool = False
    synthetic: Mapping[str, SyntheticDomain] = dataclasses.field(default_factory=dict)
    # image and audio domains (gemini_core.data.modality), each also listed in `domains`
    modalities: Mapping[str, ModalityDomain] = dataclasses.field(default_factory=dict)

    @property
    def text_domains(self) -> tuple[str, ...]:
        """The domains read from the data root and tokenized: all but the modality ones."""
        return tuple(d for d in self.domains if d not in self.modalities)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    start: float
    weights: Any  # Mapping[str, float], or one of NAMED_WEIGHTS
    seq_len: int = 0  # 0 = data.seq_len; longer: a long-context stage (same tokens per step)


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    stages: Mapping[str, StageConfig]  # stage name -> stage; ordered by start


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: decay over the last fraction of steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 4  # fixed valid batches per domain
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    wandb: bool = True
    project: str = "gemini-core"
    job_type: str = "train"
    tags: tuple[str, ...] = ()


def _default_mesh_rules() -> dict[str, str]:
    from gemini_core.scale import sharding  # imports jax: only when a MeshConfig is made
    return sharding.default_rules()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh (axes data, fsdp, context: the sequence split, model) and the rules.
    Sizes: 0 = the preset's, -1 = the devices the other axes leave (at most one axis). Rules:
    logical axis -> comma-separated mesh axes ("data,fsdp"), "" = replicated, "preset" = the
    preset's rule. Validated, sizes and rules are the resolved ones (-1 until devices are known).
    """

    preset: str = "dp"  # dp | fsdp | fsdp_tp
    data: int = 0
    fsdp: int = 0
    context: int = 0
    model: int = 0
    rules: Mapping[str, str] = dataclasses.field(default_factory=_default_mesh_rules)
    device_memory_gib: float = 16.0  # per device, for `gx run --dry-run` (a TPU v5e chip: 16)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host JAX (jax.distributed.initialize); gemini_core.scale.distributed. Where the run
    runs, not what it computes: not in the fingerprint. Unset fields come from the environment
    (GX_COORDINATOR_ADDRESS or JAX_COORDINATOR_ADDRESS, GX_NUM_PROCESSES, GX_PROCESS_ID)."""

    mode: str = "env"  # env: initialize when a coordinator is known | auto: JAX detects (TPU VM, SLURM) | off
    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0  # 0 = not set
    process_id: int = -1  # -1 = not set


@dataclasses.dataclass(frozen=True)
class FaultsConfig:
    """Surviving faults inside one process (gemini_core.scale.faults). How a run is protected, not
    what it computes (a rolled-back or rechecked run is bit-identical): not in the fingerprint.
    Defaults cost about 1% of step time (docs/faults.md)."""

    snapshot_every: int = 50  # steps between in-memory copies of the state; 0 = none
    max_rollbacks: int = 3  # rollbacks to a snapshot in one process before the run fails
    sdc_check_every: int = 100  # steps between a step computed twice and compared; 0 = none
    sdc_max_mismatches: int = 3  # mismatching recomputations in one process that stop the run
    replica: bool = True  # under Ray: also hold the newest good snapshot in a separate actor


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """A student trained towards a teacher run's distribution (gemini_core.train.distill)."""

    teacher: str = ""  # a done run's id (or unique prefix, or run dir); "" = no distillation
    alpha: float = 0.5  # weight of the KL term; 1 - alpha on the data's cross-entropy
    temperature: float = 1.0
    kl: str = "forward"  # forward KL(teacher || student), as Gemma 2 | reverse KL(student || teacher)
    top_k: int = 0  # 0 = the teacher runs beside the student; K = its top-K cached, then trained from


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str
    model: ModelConfig
    data: DataConfig
    mixture: MixtureConfig
    optimizer: OptimizerConfig
    train: TrainConfig
    tracking: TrackingConfig = TrackingConfig()
    seed: int = 0
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = DistributedConfig()
    faults: FaultsConfig = FaultsConfig()
    distill: DistillConfig = DistillConfig()
    eval: EvalConfig = EvalConfig()


# ---------------------------------------------------------------------------------------------
# ConfigDict -> dataclasses


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:
                raise UserError(f"{path}={value!r}: too large (at most 2**53 in magnitude)")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # never a setting: NaN passes every comparison check, infinity most upper bounds
            if not math.isfinite(value):
                raise UserError(f"{path}={value!r}: must be a finite number")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return _plain(value)
    raise UserError(f"{path}={value!r}: expected {_type_name(tp)}, got {type(value).__name__}")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return to_dataclass(value, tp, path)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise UserError(f"{path}={value!r}: expected a tuple, got {type(value).__name__}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
            raise UserError(f"{path}={value!r}: expected a mapping, got {type(value).__name__}")
        _, val_tp = typing.get_args(tp)
        if dataclasses.is_dataclass(val_tp):  # named sections (steps, stages): names, too
            for k, _ in _items(value):
                check_name(path, str(k), key=True)
        return types.MappingProxyType(
            {str(k): _convert(v, val_tp, f"{path}.{k}") for k, v in _items(value)})
    return _convert_scalar(value, tp, path)


def _plain(value: Any) -> Any:
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
        return types.MappingProxyType({str(k): _plain(v) for k, v in _items(value)})
    return value


def _items(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, ml_collections.ConfigDict):
        return list(value.items())
    return list(value.items())


def to_dataclass(value: Any, cls: type, path: str) -> Any:
    if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
        raise UserError(f"{path}={value!r}: expected a section of keys ({cls.__name__})")
    given = dict(_items(value))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    filled = FILLED_FROM_DATA if cls is ModelConfig else ()
    unknown = [k for k in given if k not in fields or k in filled]
    if unknown:
        known = ", ".join(k for k in fields if k not in filled)
        raise UserError(f"{path}.{unknown[0]}: unknown key (known keys: {known})")
    kwargs = {}
    for name, field in fields.items():
        if name not in given:
            if field.default is MISSING and field.default_factory is MISSING:
                if name in filled:
                    continue
                raise UserError(f"{path}.{name}: missing required field ({_type_name(hints[name])})")
            continue
        kwargs[name] = _convert(given[name], hints[name], f"{path}.{name}")
        if name == "name" and hints[name] is str and kwargs[name]:  # "" has its own message
            check_name(f"{path}.name", kwargs[name])
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# value checks: each names the full key path and the value


def _positive(path: str, value: float) -> None:
    if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise UserError(f"{path}={value!r}: must be > 0")


def _non_negative(path: str, value: float) -> None:
    if not value >= 0:
        raise UserError(f"{path}={value!r}: must be >= 0")


def _one_of(path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{path}={value!r}: must be one of {', '.join(allowed)}")


def _check_model(m: ModelConfig) -> None:
    p = "config.model"
    for name in ("d_model", "num_layers", "num_heads", "num_kv_heads", "rope_base", "norm_eps",
                 "init_std"):
        _positive(f"{p}.{name}", getattr(m, name))
    for name in ("head_dim", "mlp_dim"):
        _non_negative(f"{p}.{name}", getattr(m, name))
    if not m.head_dim and m.d_model % m.num_heads:
        raise UserError(f"{p}.num_heads={m.num_heads}: must divide config.model.d_model={m.d_model}")
    if m.num_heads % m.num_kv_heads:
        raise UserError(f"{p}.num_kv_heads={m.num_kv_heads}: must divide "
                        f"config.model.num_heads={m.num_heads}")
    if m.qk_dim % 2:
        raise UserError(f"{p}.head_dim={m.qk_dim}: rotary embeddings need an even head dimension")
    for name in ("dtype", "param_dtype"):
        _one_of(f"{p}.{name}", getattr(m, name), ("float32", "bfloat16"))
    _one_of(f"{p}.attention", m.attention, ATTENTION)
    _one_of(f"{p}.remat", m.remat, REMAT)
    m.rope.check(f"{p}.rope")
    for name, encoder in m.encoders.items():
        check_name(f"{p}.encoders.{name}", name)
        encoder.check(f"{p}.encoders.{name}")


def require_data_root(d: DataConfig) -> None:
    """Training needs the corpus; a --dry-run plan does not, so this is not in check_data."""
    if not d.root:
        raise UserError("config.data.root='': set it to the corpus folder, e.g. "
                        "--config.data.root=../shared/corpus")


def check_paths(d: DataConfig) -> None:
    """The paths a run reads exist and are of the right kind (a --dry-run too, which reads none
    of them): a mistyped path fails now, not after minutes of data preparation. Not part of
    from_config_dict: a recipe validates step configs whose paths upstream steps write later."""
    p = "config.data"
    root, schedule, cache = (path_kind(x) for x in (d.root, d.schedule, d.cache_dir))
    if d.root and root != "directory":
        raise UserError(f"{p}.root={d.root!r}: {_not(root, 'directory')} (the corpus folder, "
                        "one folder per domain)")
    if d.schedule and schedule != "file":
        raise UserError(f"{p}.schedule={d.schedule!r}: {_not(schedule, 'file')} (a "
                        "MixtureSchedule JSON such as a sweep's winner.json)")
    if d.cache_dir and cache not in ("directory", "missing"):
        raise UserError(f"{p}.cache_dir={d.cache_dir!r}: {_not(cache, 'directory')}")


def path_kind(path: str) -> str:
    """directory | file | missing | other (a device, a socket) | why it cannot be looked at."""
    if not path:
        return "missing"
    try:
        p = Path(path)
        return ("directory" if p.is_dir() else "file" if p.is_file() else
                "other" if p.exists() else "missing")
    except OSError as e:  # a name too long, a loop of links
        return f"unusable path ({e.strerror or e})"


def _not(kind: str, wanted: str) -> str:
    return {"missing": f"no such {wanted}", "directory": "a directory, not a file",
            "file": "a file, not a directory",
            "other": f"not a {wanted}"}.get(kind, kind)


def check_data(d: DataConfig) -> None:
    p = "config.data"
    _positive(f"{p}.seq_len", d.seq_len)
    _positive(f"{p}.max_epochs", d.max_epochs)
    check_declared(d.synthetic, d.domains)
    for name in set(d.synthetic) & set(d.modalities):
        raise UserError(f"{p}.modalities.{name}: also declared under {p}.synthetic")
    if d.domains and not d.text_domains:
        raise UserError(f"{p}.domains: every domain is a modality domain; the tokenizer needs "
                        "at least one text domain")
    _non_negative(f"{p}.num_workers", d.num_workers)
    _one_of(f"{p}.on_bad_record", d.on_bad_record, ("error", "skip"))
    if not d.domains:
        raise UserError(f"{p}.domains=(): name at least one domain")
    if len(set(d.domains)) != len(d.domains):
        raise UserError(f"{p}.domains={d.domains!r}: a domain is named twice")
    for i, domain in enumerate(d.domains):  # folders under the data root and the cache
        check_name(f"{p}.domains[{i}]", domain)
    t, tp = d.tokenizer, f"{p}.tokenizer"
    if t.vocab_size < 260:  # 256 byte-fallback pieces + specials must fit
        raise UserError(f"{tp}.vocab_size={t.vocab_size}: must be at least 260 (byte fallback "
                        "needs 256 pieces)")
    _positive(f"{tp}.sample_chars", t.sample_chars)
    _one_of(f"{tp}.model_type", t.model_type, ("bpe", "unigram"))
    _one_of(f"{tp}.sample_weights", t.sample_weights, ("mixture",) + NAMED_WEIGHTS)
    if not 0 < t.character_coverage <= 1:
        raise UserError(f"{tp}.character_coverage={t.character_coverage}: must be in (0, 1]")


def _check_optimizer(o: OptimizerConfig, train: TrainConfig) -> None:
    p = "config.optimizer"
    _positive(f"{p}.lr", o.lr)
    _one_of(f"{p}.schedule", o.schedule, ("cosine", "wsd", "constant"))
    for name in ("warmup_steps", "weight_decay", "eps", "clip_norm", "min_lr_ratio"):
        _non_negative(f"{p}.{name}", getattr(o, name))
    if o.warmup_steps >= train.steps:
        raise UserError(f"{p}.warmup_steps={o.warmup_steps}: must be below "
                        f"config.train.steps={train.steps}")
    for name in ("b1", "b2", "decay_fraction", "min_lr_ratio"):
        value = getattr(o, name)
        if not 0 <= value <= 1:
            raise UserError(f"{p}.{name}={value}: must be in [0, 1]")


def _check_train(t: TrainConfig) -> None:
    p = "config.train"
    for name in ("steps", "batch_size", "log_every", "eval_batches", "keep_checkpoints"):
        _positive(f"{p}.{name}", getattr(t, name))
    for name in ("eval_every", "checkpoint_every"):
        _non_negative(f"{p}.{name}", getattr(t, name))


def check_weights(path: str, weights: Any, domains: tuple[str, ...]) -> None:
    """Mixture weights: a named rule, or non-negative weights over known domains summing to 1."""
    if isinstance(weights, str):
        _one_of(path, weights, NAMED_WEIGHTS)
        return
    if not isinstance(weights, Mapping):
        raise UserError(f"{path}={weights!r}: expected a mapping domain -> weight or one of "
                        f"{', '.join(NAMED_WEIGHTS)}")
    for domain, w in weights.items():
        if domain not in domains:
            raise UserError(f"{path}.{domain}: unknown domain (known: {', '.join(domains)})")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise UserError(f"{path}.{domain}={w!r}: expected a number")
        if w < 0:
            raise UserError(f"{path}.{domain}={w}: weights must be non-negative")
    total = sum(weights.values())
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"{path}: weights sum to {total:.8g}, not 1 (within 1e-6)")


def _check_mixture(m: MixtureConfig, domains: tuple[str, ...], step_tokens: int) -> None:
    p = "config.mixture.stages"
    if not m.stages:
        raise UserError(f"{p}: declare at least one stage")
    for name, stage in m.stages.items():  # first: an ordering error would name another stage
        if not 0.0 <= stage.start < 1.0:
            raise UserError(f"{p}.{name}.start={stage.start}: must be in [0, 1)")
    ordered = sorted(m.stages.items(), key=lambda kv: kv[1].start)
    if ordered[0][1].start != 0.0:
        name, stage = ordered[0]
        raise UserError(f"{p}.{name}.start={stage.start}: the first stage must start at 0.0")
    for (name_a, a), (name_b, b) in zip(ordered, ordered[1:]):
        if b.start <= a.start:
            raise UserError(f"{p}.{name_b}.start={b.start}: stage starts must be strictly "
                            f"increasing (stage {name_a} also starts at {a.start})")
    for name, stage in m.stages.items():
        check_weights(f"{p}.{name}.weights", stage.weights, domains)
        if stage.seq_len and step_tokens % stage.seq_len or stage.seq_len < 0:
            raise UserError(f"{p}.{name}.seq_len={stage.seq_len}: must divide the {step_tokens:,}"
                            " tokens of a step (train.batch_size x data.seq_len); 0 = data.seq_len")


def _check_tracking(t: TrackingConfig) -> None:
    """W&B's own limits (wandb_settings): checked here, not when W&B starts after data prep."""
    p = "config.tracking"
    bad = sorted(set(t.project) & set("/\\#?%:"))
    if not t.project or len(t.project) > 128 or bad:
        raise UserError(f"{p}.project={t.project!r}: a W&B project name is 1-128 characters "
                        "without / \\ # ? % :")
    for i, tag in enumerate(t.tags):
        if not 1 <= len(tag) <= 64:
            raise UserError(f"{p}.tags[{i}]={tag!r}: a W&B tag is 1-64 characters")


def _check_distributed(d: DistributedConfig) -> None:
    p = "config.distributed"
    _one_of(f"{p}.mode", d.mode, ("env", "auto", "off"))
    if d.num_processes < 0:
        raise UserError(f"{p}.num_processes={d.num_processes}: must be >= 1 (0 = not set)")
    if d.process_id < -1:
        raise UserError(f"{p}.process_id={d.process_id}: must be >= 0 (-1 = not set)")
    if d.num_processes and d.process_id >= d.num_processes:
        raise UserError(f"{p}.process_id={d.process_id}: must be below "
                        f"{p}.num_processes={d.num_processes}")


def _check_faults(f: FaultsConfig) -> None:
    p = "config.faults"
    for name in ("snapshot_every", "max_rollbacks", "sdc_check_every"):
        _non_negative(f"{p}.{name}", getattr(f, name))
    _positive(f"{p}.sdc_max_mismatches", f.sdc_max_mismatches)


def _check_distill(d: DistillConfig) -> None:
    p = "config.distill"
    if not 0.0 <= d.alpha <= 1.0:
        raise UserError(f"{p}.alpha={d.alpha}: must be in [0, 1]")
    _positive(f"{p}.temperature", d.temperature)
    _one_of(f"{p}.kl", d.kl, ("forward", "reverse"))
    _non_negative(f"{p}.top_k", d.top_k)
    if d.top_k and d.kl == "reverse":
        raise UserError(f"{p}.top_k={d.top_k} with {p}.kl='reverse': the teacher's top K cannot "
                        "give KL(student || teacher), which needs the teacher on every token")


def from_config_dict(cfg: ml_collections.ConfigDict | Mapping) -> ExperimentConfig:
    """Validates and converts a user's experiment config; raises UserError on any mistake."""
    exp = to_dataclass(cfg, ExperimentConfig, "config")
    if not exp.name:
        raise UserError("config.name='': every experiment needs a name")
    model = dataclasses.replace(exp.model, vocab_size=exp.data.tokenizer.vocab_size,
                                document_mask=exp.data.document_mask)
    exp = dataclasses.replace(exp, model=model)
    _check_model(exp.model)
    check_data(exp.data)
    modality.check_declared(exp.data.modalities, exp.data.domains, exp.model.encoders)
    _check_train(exp.train)
    _check_optimizer(exp.optimizer, exp.train)
    _check_mixture(exp.mixture, exp.data.domains, exp.train.batch_size * exp.data.seq_len)
    _check_tracking(exp.tracking)
    _check_distributed(exp.distributed)
    _check_faults(exp.faults)
    _check_distill(exp.distill)
    check_downstream(exp.eval.downstream)
    from gemini_core.scale import sharding  # checks the mesh: sizes, rules, device memory
    return dataclasses.replace(exp, mesh=sharding.resolve_config(exp.mesh))


def declared_model(model_json: Mapping) -> dict:
    """A resolved model section as a user declares it: without the fields filled from data."""
    return {k: v for k, v in model_json.items() if k not in FILLED_FROM_DATA}


def model_from_json(model_json: Mapping) -> ModelConfig:
    """A run's config.json model section as the typed config (fields it predates: defaults)."""
    return ModelConfig(**{
        **model_json, "rope": RopeScaling(**model_json.get("rope", {})),
        "encoders": {k: EncoderConfig(**v) for k, v in model_json.get("encoders", {}).items()},
        "media": tuple(MediaTable(**t) for t in model_json.get("media", ()))})


def to_json_dict(obj: Any) -> Any:
    """Plain JSON-able form of a config (dataclasses, mapping proxies and tuples unrolled)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_json_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_json_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_dict(v) for v in obj]
    return obj
