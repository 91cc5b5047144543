"""`gx compare RUN RUN ...`: runs side by side — the config fields where they differ, and their
final metrics. Reads run directories only (config.json, summary.json, status.json)."""

from __future__ import annotations

from gemini_core.runs.rundir import RunDir

SKIP = ("fingerprint", "run_id", "overrides", "paths")  # differ by construction


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def config_differences(runs: list[RunDir]) -> dict[str, list]:
    flat = [_flatten({k: v for k, v in (r.config() or {}).items() if k not in SKIP})
            for r in runs]
    keys = sorted(set().union(*flat))
    return {k: [f.get(k) for f in flat] for k in keys if len({repr(f.get(k)) for f in flat}) > 1}


def format_runs(runs: list[RunDir]) -> str:
    ids = [r.run_id for r in runs]
    width = max(14, *(len(i) for i in ids))
    lines = ["config differences:"]
    diffs = config_differences(runs)
    for key, values in diffs.items():
        lines.append(f"  {key}")
        lines += [f"    {i:<{width}} {_short(v)}" for i, v in zip(ids, values)]
    if not diffs:
        lines.append("  (none)")
    summaries = [r.summary() or {} for r in runs]
    metrics = sorted({k for s in summaries for k in s if k.startswith("eval/") and "/loss" in k},
                     key=lambda k: (k == "eval/mean/loss", k))
    tasks = sorted({k for s in summaries for k in s
                    if k.startswith("downstream/") and not k.endswith("_stderr")},
                   key=lambda k: (k == "downstream/mean/bpb", k))
    names = metrics + ["eval/mean/bpb"] + tasks
    name_w = max(24, *(len(m) + 1 for m in names))
    lines += ["", f"{'metric':<{name_w}}" + "".join(f"{i[-width:]:>{width + 2}}" for i in ids)]
    for m in names:
        row = [s.get(m) for s in summaries]
        lines.append(f"{m:<{name_w}}" + "".join(f"{v:>{width + 2}.4f}" if isinstance(v, float)
                                                else f"{'-':>{width + 2}}" for v in row))
    states = [(r.status() or {}).get("state", "?") for r in runs]
    lines.append(f"{'state':<{name_w}}" + "".join(f"{s:>{width + 2}}" for s in states))
    return "\n".join(lines)


def _short(value, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

