"""Distillation: a student distilled from a larger teacher vs the same student from scratch, at
equal tokens, by held-out bits per byte per domain (target: >= 5% lower mean bpb distilled).

Runs experiments/distill_nano.py (size=small by default): the teacher (role=teacher), the
student from scratch (role=scratch) and the distilled student for each --alpha (forward KL; and
with --top-k K, a student trained from the teacher's cached top K). All are real runs under
--work, so a rerun reuses what is done.

usage: python bench/distill.py [--size small] [--alpha 0.5 0.9] [--temperature 1]
                             [--teacher-steps N] [--student-steps N] [--student-d N]
                             [--top-k 64] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("books", "wiki", "math", "code", "web", "multilingual")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus"))
    p.add_argument("--size", default="small")
    p.add_argument("--alpha", type=float, nargs="+", default=[0.5, 0.9])
    p.add_argument("--temperature", type=float, default=1.0, help="tau of the distilled runs")
    p.add_argument("--teacher-steps", type=int, default=0,
                   help="steps of the teacher (0: the size's)")
    p.add_argument("--student-steps", type=int, default=0,
                   help="steps of the students and the scratch run (0: the size's)")
    p.add_argument("--student-d", type=int, default=0,
                   help="d_model of the students and the scratch run (0: the size's)")
    p.add_argument("--top-k", type=int, default=64, help="also a top-K cached student; 0 = no")
    p.add_argument("--work", default="/tmp/gx-bench-distill")
    p.add_argument("--out", default="")
    return p.parse_args()


def run(args, role: str, *overrides: str) -> tuple[dict, float]:
    from gemini_core.experiment import load_experiment
    from gemini_core.train import trainer
    n, d = (args.teacher_steps, 0) if role == "teacher" else (args.student_steps, args.student_d)
    extra = (f",steps={n}" if n else "") + (f",d={d}" if d else "")
    cfg = load_experiment(f"experiments/distill_nano.py:role={role},size={args.size}{extra}", [
        f"--config.data.root={args.corpus}", "--config.tracking.wandb=false", *overrides]).config
    t0 = time.perf_counter()
    summary = trainer.run_experiment(cfg, Path(args.work), log=lambda s: print(s, flush=True))
    return summary, time.perf_counter() - t0


def main() -> None:
    from gemini_core.train import step_fns
    args = parse()
    step_fns.tune_host_malloc()
    teacher, t_teacher = run(args, "teacher")
    scratch, t_scratch = run(args, "scratch")
    rows = {"teacher": (teacher, t_teacher), "scratch": (scratch, t_scratch)}
    tau = f" t={args.temperature:g}" if args.temperature != 1.0 else ""
    distill = (f"--config.distill.teacher={teacher['run_id']}",
               f"--config.distill.temperature={args.temperature}")
    for alpha in args.alpha:
        rows[f"distilled a={alpha:g}{tau}"] = run(args, "student", *distill,
                                                  f"--config.distill.alpha={alpha}")
    if args.top_k:
        alpha = args.alpha[0]
        rows[f"top-{args.top_k} a={alpha:g}{tau}"] = run(
            args, "student", *distill, f"--config.distill.alpha={alpha}",
            f"--config.distill.top_k={args.top_k}")
    base = scratch["eval/mean/bpb"]
    print(f"\n== distillation (size={args.size}; student params {scratch['params']:,}, "
          f"teacher {teacher['params']:,}; student tokens {scratch['tokens']:,}) ==")
    print(f"{'run':<18}" + "".join(f"{d[:7]:>9}" for d in DOMAINS) + f"{'mean bpb':>10}"
          f"{'vs scratch':>12}{'seconds':>9}")
    for name, (s, secs) in rows.items():
        gap = (s["eval/mean/bpb"] - base) / base
        print(f"{name:<18}" + "".join(f"{s[f'eval/{d}/bpb']:>9.4f}" for d in DOMAINS)
              + f"{s['eval/mean/bpb']:>10.4f}{gap:>+12.2%}{secs:>9.0f}")
    best = min((k for k in rows if k not in ("teacher", "scratch")),
               key=lambda k: rows[k][0]["eval/mean/bpb"])
    gain = 1 - rows[best][0]["eval/mean/bpb"] / base
    print(f"best distilled ({best}): {gain:.2%} lower mean bpb than scratch (target >= 5%)")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {k: {"summary": s, "seconds": t} for k, (s, t) in rows.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
