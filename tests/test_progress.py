"""Progress lines: the first step of a process compiles, so the ETA is measured after it."""

import re

from gemini_core.train.progress import Progress


def test_eta_waits_for_the_steps_after_the_compiling_one():
    lines: list[str] = []
    p = Progress(total=100, start=40, log=lines.append, interactive=False, every_s=0.0)
    p.update(41, 5.0)
    p.set_rate(1234.0)
    p.update(42, 4.5)
    assert lines[0].startswith("step 41/100  loss 5.0000  eta ? (compiling")
    assert re.fullmatch(r"step 42/100  loss 4\.5000  1,234 tok/s  eta \d+m\d\ds", lines[1])
    assert (p.first_loss, p.last_loss) == (5.0, 4.5)
