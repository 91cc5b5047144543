"""`gx plan --compute`: Chinchilla sizing, the inference-aware trade-off, and the pretrain.py
arguments it prints, checked through the real experiment file and the real CLI."""

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gemini_core.errors import UserError
from gemini_core.experiment import load_experiment
from gemini_core.scale import compute_plan as cp
from gemini_core.scale import flops

REPO = Path(__file__).resolve().parents[1]
GOPHER_BUDGET = 5.76e23  # Chinchilla's own budget: 70B params on 1.4T tokens


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gx", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_chinchilla_numbers_for_the_gopher_budget():
    c = cp.chinchilla(GOPHER_BUDGET)
    assert c.params == pytest.approx(70e9, rel=0.03)
    assert c.tokens == pytest.approx(1.4e12, rel=0.03)
    assert c.train_flops == pytest.approx(GOPHER_BUDGET, rel=1e-12)
    # the fit's published constants at Chinchilla's own choice
    assert cp.CHINCHILLA_FIT.loss(70e9, 1.4e12) == pytest.approx(
        1.69 + 406.4 / 70e9**0.34 + 410.7 / 1.4e12**0.28, rel=1e-12)


def test_no_inference_gives_back_chinchilla():
    base, aware = cp.chinchilla(1e22), cp.inference_aware(1e22, 0.0)
    assert aware.params == pytest.approx(base.params, rel=1e-6)
    assert aware.tokens == pytest.approx(base.tokens, rel=1e-6)


def _total_on_curve(n, base, n_inf):
    d = cp.iso_loss_tokens_ratio(n, cp.CHINCHILLA_FIT.alpha, cp.CHINCHILLA_FIT.beta)
    return 6 * n * base.params * d * base.tokens + 2 * n * base.params * n_inf


@pytest.mark.parametrize("n_inf", [1e11, 1e13, 1e15])
def test_inference_aware_is_smaller_longer_cheaper_and_optimal(n_inf):
    base, aware = cp.chinchilla(GOPHER_BUDGET, n_inf), cp.inference_aware(GOPHER_BUDGET, n_inf)
    assert aware.params < base.params and aware.tokens > base.tokens
    assert aware.tokens_per_param > 20
    assert aware.total_flops < base.total_flops
    # on the same iso-loss curve: n^-a + (a/b) d^-b = 1 + a/b
    a, b = cp.CHINCHILLA_FIT.alpha, cp.CHINCHILLA_FIT.beta
    n, d = aware.params / base.params, aware.tokens / base.tokens
    assert n**-a + (a / b) * d**-b == pytest.approx(1 + a / b, rel=1e-9)
    # a brute-force scan of the whole curve finds nothing cheaper
    n_min = cp.smallest_params_ratio(a, b)
    grid = np.exp(np.linspace(math.log(n_min) + 1e-6, 0.0, 200_001))
    assert aware.total_flops <= _total_on_curve(grid, base, n_inf).min() * (1 + 1e-7)


def test_more_inference_means_a_smaller_model():
    sizes = [cp.inference_aware(1e23, n).params for n in (0, 1e11, 1e12, 1e13, 1e14)]
    assert all(b < a for a, b in zip(sizes, sizes[1:]))


def test_overrides_reproduce_n_through_the_real_experiment_file():
    plan = cp.make_plan("5.76e23", "1e13", experiment=str(REPO / "experiments/pretrain.py"))
    assert set(plan.matches) == {"chinchilla", "inference-aware"}
    for name, choice in (("chinchilla", plan.chinchilla),
                         ("inference-aware", plan.inference_aware)):
        m = plan.matches[name]
        cfg = load_experiment(m.spec).config  # the printed arguments, through the loader
        assert flops.param_counts(cfg.model)["total"] == m.params
        assert m.params == pytest.approx(choice.params, rel=cp.MATCH_TOLERANCE)
        tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
        assert choice.tokens <= tokens < choice.tokens + cfg.train.batch_size * cfg.data.seq_len
        assert cfg.data.tokenizer.vocab_size == plan.data_shape["vocab"]


def test_printed_command_dry_run_reports_n(capsys, monkeypatch):
    # 1e21 rather than the Gopher budget: its dry run counts 14k steps' domain draws, not 330k
    out = _cli("plan", "--compute", "1e21", "--size", "nano")
    assert out.returncode == 0, out.stderr
    assert "Chinchilla (D = 20·N)" in out.stdout and "loss (fit)" in out.stdout
    command = re.search(r"^\s+(gx run experiments/pretrain\.py:\S+ --dry-run)$", out.stdout,
                        re.M).group(1)
    from gx import cli  # the pasted command, through gx's own main (in-process)
    monkeypatch.chdir(REPO)
    assert cli.main(command.split()[1:]) == 0
    dry = capsys.readouterr()
    params = int(re.search(r"^params\s+([\d,]+) total", dry.out, re.M).group(1).replace(",", ""))
    n_opt = math.sqrt(1e21 / 120)  # 2.89B
    assert params == pytest.approx(n_opt, rel=0.03)
    tokens = int(re.search(r"= ([\d,]+) tokens", dry.out).group(1).replace(",", ""))
    assert tokens == pytest.approx(20 * n_opt, rel=0.01)


def test_bad_compute_exits_2_with_a_clear_message():
    out = _cli("plan", "--compute", "lots")
    assert out.returncode == 2
    assert "gx: error: --compute='lots': expected a number such as 1e21" in out.stderr
    assert "Traceback" not in out.stderr and not out.stdout


@pytest.mark.parametrize("args, message", [
    (["--compute=-1e20"], "--compute='-1e20': expected a finite number > 0"),
    (["--compute", "nan"], "--compute='nan': expected a finite number > 0"),
    (["--compute", "1e20", "--inference-tokens", "x"], "--inference-tokens='x'"),
    (["--compute", "1e10"], "below the smallest model"),
    (["--compute", "1e35"], "above the largest width searched"),
    (["--compute", "1e20", "--size", "mega"], "--size='mega'"),
])
def test_bad_input_messages(args, message, capsys):
    from gx import cli
    assert cli.main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_parse_amount_accepts_the_usual_spellings():
    assert cp.parse_amount("1e21", "--compute") == 1e21
    assert cp.parse_amount(" 3.5E20 ", "--compute") == 3.5e20
    assert cp.parse_amount("1_000", "--compute") == 1000
    assert cp.parse_amount("0", "--inference-tokens", allow_zero=True) == 0
    with pytest.raises(UserError, match="> 0"):
        cp.parse_amount("0", "--compute")
