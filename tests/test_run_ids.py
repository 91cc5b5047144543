"""Run ids on the command line: a unique prefix finds its run; an id that matches nothing, or a
prefix of several runs, is one clear error line (exit 2) from `gx show` and `gx eval`.

The runs are run directories with their config.json only (what `find_run` looks for), written
through RunDir: nothing here trains, so every case costs milliseconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemini_core.runs.rundir import RunDir
from gx import cli

REPO = Path(__file__).resolve().parents[1]
IDS = ("quickstart-ab12cd34", "quickstart-ab99ff00", "pretrain-0f0f0f0f")


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    for rid in IDS:
        experiment = rid.rsplit("-", 1)[0]
        run = RunDir(root, experiment, rid)
        run.write_config({"run_id": rid, "fingerprint": rid.rsplit("-", 1)[1] + "0" * 56})
        run.set_status("done")
    return root


def gx(runs: Path, *args: str, capsys) -> tuple[int, str, str]:
    code = cli.main(["--runs-root", str(runs), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gx: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", [["show"], ["eval", "--data", "nowhere"]])
def test_an_id_that_matches_no_run(runs, command, capsys):
    code, _, err = gx(runs, command[0], "quickstart-77", *command[1:], capsys=capsys)
    assert code == 2
    assert one_error_line(err) == (f"gx: error: quickstart-77: no such run under {runs} "
                                   "(see `gx ls`)")


@pytest.mark.parametrize("command", [["show"], ["eval", "--data", "nowhere"]])
def test_a_prefix_of_two_runs_is_ambiguous_and_names_both(runs, command, capsys):
    code, _, err = gx(runs, command[0], "quickstart-ab", *command[1:], capsys=capsys)
    assert code == 2
    assert one_error_line(err) == ("gx: error: quickstart-ab: ambiguous, matches "
                                   "quickstart-ab12cd34, quickstart-ab99ff00")


def test_a_unique_prefix_and_a_run_dir_path_find_the_run(runs, capsys):
    code, out, _ = gx(runs, "show", "quickstart-ab9", capsys=capsys)
    assert code == 0 and out.startswith("run       quickstart-ab99ff00   (done)"), out
    code, out, _ = gx(runs, "show", "pretrain", capsys=capsys)  # a prefix of one run only
    assert code == 0 and "pretrain-0f0f0f0f" in out.splitlines()[0], out
    path = runs / "quickstart" / "quickstart-ab12cd34"
    code, out, _ = gx(runs, "show", str(path), capsys=capsys)
    assert code == 0 and out.startswith("run       quickstart-ab12cd34"), out


def test_the_installed_command_exits_2_without_a_traceback(runs):
    # the real process: exit status and stderr as a shell sees them
    proc = subprocess.run([sys.executable, "-m", "gx", "--runs-root", str(runs), "eval",
                           "quickstart-ab", "--data", "nowhere"], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc.stderr).endswith("quickstart-ab12cd34, quickstart-ab99ff00")
