"""The one rule for names a user gives (runs, experiments, sweeps, recipe steps, data outputs,
domains), checked once at the config boundary (gemini_core.config.to_dataclass)."""

from __future__ import annotations

import re
from typing import Any

from gemini_core.errors import UserError

# A name becomes a directory (<runs root>/<name>/), part of a W&B run id (<name>-<8 hex>), a W&B
# group and part of W&B artifact names (winner-<name>). W&B artifact names allow letters, digits,
# `_`, `-` and `.` only, and W&B caps names at 128 characters: 100 leaves room for what gx adds.
# A leading letter or digit keeps names from looking like flags or hidden folders.
NAME_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_MAX = 100


def name_problem(name: Any) -> str | None:
    """Why `name` cannot name a run, sweep, step or data output; None when it can."""
    if not isinstance(name, str):
        return f"expected a string, got {type(name).__name__}"
    if not name:
        return "empty"
    if len(name) > NAME_MAX:
        return f"{len(name)} characters, at most {NAME_MAX}"
    if ".." in name or not NAME_CHARS.fullmatch(name):
        return ("use letters, digits, '_', '-' and '.', starting with a letter or digit, no "
                "'..' (a name becomes a directory and a W&B run id)")
    return None


def check_name(path: str, name: Any, *, key: bool = False) -> None:
    """`path` is the key path of the name (config.name), or with `key` of the section whose key
    it is (config.steps). The name is quoted: a newline in it cannot break the one-line error."""
    problem = name_problem(name)
    if problem:
        where = f"{path}: the key {name!r}" if key else f"{path}={name!r}"
        raise UserError(f"{where} is not a valid name: {problem}")
