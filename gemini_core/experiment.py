"""Loading an experiment: `path.py[:arg]` plus `--config.a.b=value` overrides, validated once.

One function (`load_experiment`) serves the CLI and sweeps alike. Overrides follow
ml_collections' own flag semantics (types are checked against the field's current value).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
import traceback
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from gemini_core import config as config_lib
from gemini_core.errors import UserError

_OVERRIDE = re.compile(r"^--?config\.([^=]+)(=.*)?$", re.DOTALL)  # a value may hold a newline


@dataclasses.dataclass(frozen=True)
class Experiment:
    spec: str  # what the user typed: experiments/quickstart.py:size=tiny
    path: Path
    arg: str | None
    config: Any  # config_lib.ExperimentConfig, or the schema given to load_experiment
    overrides: dict  # key path -> value, only what differs from the file's own defaults


def split_spec(spec: str) -> tuple[Path, str | None]:
    """`a/b.py:size=tiny` -> (a/b.py, "size=tiny"); big_vision style."""
    path, sep, arg = spec.partition(".py:")
    if sep:
        return Path(path + ".py"), arg
    return Path(spec), None


def load_module(path: Path):
    if not path.is_file():
        what = "a directory, not an experiment file" if path.is_dir() else "experiment file not found"
        raise UserError(f"{path}: {what}")
    if path.suffix != ".py":  # importlib finds no loader for it: say so, not AttributeError
        raise UserError(f"{path}: not a Python experiment file (expected a .py file defining "
                        "get_config(arg=None))")
    spec = importlib.util.spec_from_file_location(f"gx_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: report its own line, not our traceback
        raise UserError(f"{user_frame(e, path)}: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"{path}: defines no get_config(arg=None) function")
    return module


def user_frame(e: BaseException, path: Path) -> str:
    """`path:line` of the innermost frame of a user's file in the error (else the path)."""
    if isinstance(e, SyntaxError) and e.lineno:
        return f"{path}:{e.lineno}"
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == path]
    return f"{path}:{frames[-1].lineno}" if frames else str(path)


def call_get_config(module, path: Path, arg: str | None) -> ml_collections.ConfigDict:
    try:
        cfg = module.get_config(arg) if arg is not None else module.get_config()
    except Exception as e:
        call = f"get_config({arg!r})" if arg is not None else "get_config()"
        raise UserError(f"{user_frame(e, path)}: {call} failed: "
                        f"{type(e).__name__}: {e}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise UserError(f"{path}: get_config must return an ml_collections.ConfigDict, "
                        f"got {type(cfg).__name__}")
    return cfg


def with_schema_defaults(cfg: ml_collections.ConfigDict, name: str,
                         schema: type = config_lib.ExperimentConfig) -> ml_collections.ConfigDict:
    """Adds every schema field the file left out, so `--config.x.y=v` can override it too."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if not cfg.get("name"):
        cfg.name = name
    _fill(cfg, schema)
    return cfg


def _fill(cfg: ml_collections.ConfigDict, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if cls is config_lib.ModelConfig and field.name in config_lib.FILLED_FROM_DATA:
            continue  # comes from data: the tokenizer's vocab_size, data.document_mask
        tp = hints[field.name]
        if field.name not in cfg:
            if _has_default(field) and not dataclasses.is_dataclass(tp):
                default = (field.default if field.default is not dataclasses.MISSING
                           else field.default_factory())
                cfg[field.name] = dict(default) if isinstance(default, Mapping) else default
            elif dataclasses.is_dataclass(tp) and _all_default(tp):
                cfg[field.name] = ml_collections.ConfigDict()
            else:
                continue
        value = cfg[field.name]
        if dataclasses.is_dataclass(tp) and isinstance(value, ml_collections.ConfigDict):
            _fill(value, tp)
        elif tp == Mapping[str, config_lib.StageConfig] and isinstance(
                value, ml_collections.ConfigDict):  # each mixture stage: its seq_len too
            for stage in value.values():
                if isinstance(stage, ml_collections.ConfigDict):
                    _fill(stage, config_lib.StageConfig)


def _has_default(field: dataclasses.Field) -> bool:
    return (field.default is not dataclasses.MISSING
            or field.default_factory is not dataclasses.MISSING)


def _all_default(cls: type) -> bool:
    return all(_has_default(f) for f in dataclasses.fields(cls))


def _key_exists(cfg: ml_collections.ConfigDict, dotted: str) -> str | None:
    """None when `dotted` names a field; else the first missing key's full path."""
    node, walked = cfg, "config"
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = ", ".join(node.keys()) if isinstance(node, ml_collections.ConfigDict) else ""
            return f"{walked}.{part}: unknown key" + (f" (known keys: {known})" if known else "")
        node, walked = node[part], f"{walked}.{part}"
    return None


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies `--config.a.b=value` flags with ml_collections' own parsing, in place."""
    if not overrides:  # the flag machinery below serializes the whole config twice (~30 ms)
        return
    for arg in overrides:
        match = _OVERRIDE.match(arg)
        if not match:
            raise UserError(f"{arg}: expected --config.<key path>=<value>")
        if match.group(2) is None:
            raise UserError(f"{arg}: missing value (write --config.{match.group(1)}=VALUE)")
        problem = _key_exists(cfg, match.group(1))
        if problem:
            raise UserError(problem)
    fv = flags.FlagValues()
    argv = ["gx", *overrides]
    config_flags.DEFINE_config_dict("config", cfg, flag_values=fv, sys_argv=argv,
                                    lock_config=False)
    try:
        fv(argv)
    except (flags.Error, TypeError, ValueError, KeyError, AttributeError) as e:
        raise UserError(_flag_message(str(e))) from None


def _flag_message(text: str) -> str:
    # absl says "flag --config.train.steps=abc: invalid literal ..."; drop the leading dashes
    return re.sub(r"flag --(config\.[\w.]+)=(.*?):", r"\1=\2:", text.splitlines()[0])


def _diff(base: dict, new: dict, prefix: str = "") -> dict:
    out = {}
    for key in sorted(set(base) | set(new)):
        a, b = base.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_diff(a, b, path + "."))
        elif a != b:
            out[path] = b
    return out


def load_experiment(spec: str, overrides: Sequence[str] = (), *,
                    schema: type = config_lib.ExperimentConfig,
                    convert: Callable[[ml_collections.ConfigDict], Any] =
                    config_lib.from_config_dict) -> Experiment:
    """`experiments/x.py:arg` + overrides -> a validated Experiment; UserError on any mistake.

    `schema`/`convert` name another typed config, e.g. a data-curation pipeline's.
    """
    path, arg = split_spec(spec)
    module = load_module(path)
    defaults = with_schema_defaults(call_get_config(module, path, arg), path.stem, schema)
    cfg = ml_collections.ConfigDict(defaults.to_dict())
    apply_overrides(cfg, overrides)
    exp_cfg = convert(cfg)
    return Experiment(spec=spec, path=path, arg=arg, config=exp_cfg,
                      overrides=_diff(defaults.to_dict(), cfg.to_dict()))


def config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits argv into (--config.* overrides, the rest)."""
    ours = [a for a in argv if _OVERRIDE.match(a) or a.startswith("--config.")]
    return ours, [a for a in argv if a not in ours]


if __name__ == "__main__":  # debugging aid: print a resolved experiment
    print(load_experiment(sys.argv[1], sys.argv[2:]).config)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """big_vision-style `get_config` argument: "size=nano,d=256" -> typed fields over defaults."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        if not sep or key not in defaults:
            raise UserError(f"experiment argument {item!r}: expected key=value with key one of "
                            f"{', '.join(defaults)}")
        kind = type(defaults[key])
        try:
            out[key] = (raw.lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
        except ValueError:
            raise UserError(f"experiment argument {key}={raw!r}: expected "
                            f"{kind.__name__}") from None
    return out
