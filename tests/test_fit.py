"""Mixture regression fits, the choice of the winner, and `gx fit TABLE`, on synthetic laws.

Every law here is known in closed form, so each regressor is judged on recovering it (held-out
rank correlation, parameters) and `choose` on finding its true optimum (scipy's SLSQP on the
law itself).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import optimize

from gemini_core.data.mixture import MixtureSchedule
from gemini_core.errors import UserError
from sweeps import fit as fitmod
from sweeps.fit import (
    Objective,
    evaluate_holdout,
    features,
    fit,
    objective_values,
    regret,
    spearman,
)
from sweeps.optimize import choose, project_capped_simplex, write_winner
from sweeps.regressors import (
    LightGBMRegressor,
    LinearRegressor,
    LogLinearRegressor,
    LogWeightRegressor,
    token_shares,
)
from sweeps.table import fit_table, format_fit_report, load_table, parse_columns, read_table

DOMAINS = ("web", "code", "math")
# a Data Mixing Laws law per domain: L_d = c_d + k_d exp(t_d . w); more of a domain lowers its
# own loss (t_dd < 0), so the mean loss is convex in w with an interior optimum
C_D = np.array([2.0, 1.0, 1.5])
K_D = np.array([1.0, 1.5, 2.0])
T_DxD = np.array([[-3.0, 0.5, 0.2], [0.3, -2.0, 0.1], [0.2, 0.6, -4.0]])


def law(W_NxD: np.ndarray) -> np.ndarray:
    return C_D + K_D * np.exp(W_NxD @ T_DxD.T)


def dirichlet(n: int, d: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(d), n)


def true_optimum(objective_D: np.ndarray, upper_D=(1.0, 1.0, 1.0), lower: float = 0.0
                 ) -> np.ndarray:
    res = optimize.minimize(lambda w: law(w[None])[0] @ objective_D, np.full(3, 1 / 3),
                            method="SLSQP", bounds=[(lower, u) for u in upper_D],
                            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                            options={"ftol": 1e-12})
    assert res.success
    return res.x


@pytest.fixture(scope="module")
def law_fit() -> fitmod.FitResult:
    X_NxF = dirichlet(40, seed=1)
    Y_NxD = law(X_NxF) + np.random.default_rng(2).normal(0, 0.002, (40, 3))
    return fit(X_NxF, Y_NxD, DOMAINS, regressors=("loglinear",))


# ---------------------------------------------------------------------------------------------
# features and the objective


def test_features_are_stage_weights_then_starts():
    sched = MixtureSchedule.from_stage_weights([
        (0.0, {"web": 0.5, "code": 0.3, "math": 0.2}), (0.9, {"web": 0.3, "math": 0.7})])
    np.testing.assert_array_equal(features(sched, DOMAINS),
                                  [0.5, 0.3, 0.2, 0.3, 0.0, 0.7, 0.9])
    assert features(MixtureSchedule.constant({"code": 1.0}), DOMAINS).tolist() == [0, 1, 0]


def test_objective_mean_targets_and_errors():
    Y = np.array([[1.0, 2.0, 3.0], [3.0, 0.0, 3.0]])
    np.testing.assert_allclose(objective_values(Y, DOMAINS, Objective()), [2.0, 2.0])
    np.testing.assert_allclose(objective_values(Y, DOMAINS, Objective({"web": 3, "code": 1})),
                               [1.25, 2.25])
    with pytest.raises(UserError, match=r"objective.targets.wiki: no such metric "
                       r"\(available: loss/web, loss/code"):
        Objective({"wiki": 1.0}).check(DOMAINS)
    with pytest.raises(UserError, match=r"objective.targets.web=-1"):
        Objective({"web": -1}).check(DOMAINS)
    with pytest.raises(UserError, match=r"max_worse_than_baseline=-0.1"):
        Objective(max_worse_than_baseline=-0.1).check(DOMAINS)


def test_spearman_and_regret():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    # the model ranks row 2 best; it actually scores 0.5 against the best 0.1
    assert regret([3.0, 2.0, 1.0], [0.1, 0.3, 0.5]) == pytest.approx(0.4)
    assert regret([1.0, 2.0], [0.1, 0.3]) == 0.0


# ---------------------------------------------------------------------------------------------
# each regressor recovers a known law


def test_linear_recovers_linear_law():
    X = dirichlet(80, d=4, seed=3)
    b_F = np.array([0.4, -0.2, 1.0, 0.1])
    y = 2.0 + X @ b_F + np.random.default_rng(4).normal(0, 0.005, 80)
    model = LinearRegressor().fit(X[:50], y[:50])
    pred = model.predict(X[50:])
    assert np.mean((pred - y[50:]) ** 2) < 1e-4
    assert spearman(pred, y[50:]) > 0.95
    # within a stage only differences of coefficients are identified (weights sum to 1)
    np.testing.assert_allclose(model.coef_F - model.coef_F.mean(), b_F - b_F.mean(), atol=0.02)


def test_loglinear_recovers_data_mixing_law():
    X = dirichlet(60, seed=5)
    c, k, t_F = 2.0, 1.5, np.array([-2.0, 0.5, -1.0])
    y = c + k * np.exp(X @ t_F) + np.random.default_rng(6).normal(0, 0.002, 60)
    model = LogLinearRegressor().fit(X[:40], y[:40])
    assert model.fallback is None
    c_hat, k_hat, t_hat = model.params
    # t is identified up to a constant (absorbed by k): compare the zero-mean representative
    assert c_hat == pytest.approx(c, abs=0.03)
    np.testing.assert_allclose(t_hat, t_F - t_F.mean(), atol=0.05)
    assert k_hat == pytest.approx(k * np.exp(t_F.mean()), rel=0.03)
    pred = model.predict(X[40:])
    assert spearman(pred, y[40:]) > 0.99
    assert np.max(np.abs(pred - y[40:])) < 0.01


def test_loglinear_falls_back_to_linear_and_says_so():
    X = dirichlet(10, seed=7)
    model = LogLinearRegressor().fit(X, np.full(10, 3.0))
    assert model.fallback and "fell back to linear" in model.fallback
    np.testing.assert_allclose(model.predict(X[:3]), 3.0)
    with pytest.raises(ValueError, match="no law"):
        model.params


def test_logweight_recovers_power_law_in_token_shares_across_stages():
    """L = c + b . log(share of all tokens): a two-stage schedule's shares are the stages'
    weights averaged by how much of training each covers."""
    rng = np.random.default_rng(12)
    base, anneal = dirichlet(60, seed=13), dirichlet(60, seed=14)
    start = rng.uniform(0.7, 0.95, (60, 1))
    X = np.hstack([base, anneal, start])
    shares = start * base + (1 - start) * anneal
    np.testing.assert_allclose(token_shares(X, 3), shares)
    b_D = np.array([-0.3, -0.1, 0.05])
    y = 3.0 + np.log(shares) @ b_D + rng.normal(0, 0.002, 60)
    model = LogWeightRegressor(3).fit(X[:40], y[:40])
    np.testing.assert_allclose(model.linear.coef_F, b_D, atol=0.01)
    assert spearman(model.predict(X[40:]), y[40:]) > 0.99
    with pytest.raises(ValueError, match="not S stages of 4 domains"):
        token_shares(X, 4)


def test_lightgbm_recovers_smooth_nonlinear_law():
    X = dirichlet(100, seed=8)
    y = 1.0 + np.sin(4 * X[:, 0]) + 5 * (X[:, 1] - 0.3) ** 2
    model = LightGBMRegressor().fit(X[:60], y[:60])
    assert spearman(model.predict(X[60:]), y[60:]) > 0.8
    again = LightGBMRegressor().fit(X[:60], y[:60])
    np.testing.assert_array_equal(model.predict(X[60:]), again.predict(X[60:]))  # deterministic


def test_cv_picks_loglinear_for_curved_law_and_linear_for_linear_law():
    X = dirichlet(40, seed=9)
    rng = np.random.default_rng(10)
    Y = np.column_stack([1.0 + 2.0 * np.exp(-4 * X[:, 0] + 1.5 * X[:, 1]),
                         0.5 + X @ np.array([0.3, 0.9, -0.4]),
                         1.0 + np.sin(6 * X[:, 0]) * np.cos(5 * X[:, 1])])
    Y += rng.normal(0, 0.003, Y.shape)
    result = fit(X, Y, ("curved", "flat", "wavy"), folds=5)
    assert result.chosen["curved"] == "loglinear"
    assert result.chosen["flat"] == "linear"
    assert result.cv_mse["curved"]["loglinear"] < result.cv_mse["curved"]["linear"] / 10
    assert set(result.cv_mse["wavy"]) == {"linear", "logweight", "loglinear", "lightgbm"}
    assert result.predict(X[:5]).shape == (5, 3)


def power_law_trials(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-stage trials (end stage from 0.8) whose every domain's loss is a power law in the
    domains' shares of all tokens: L_d = c_d + sum_j b_dj log(share_j), plus noise."""
    rng = np.random.default_rng(seed)
    W = rng.dirichlet(np.full(3, 2.0), (n, 2))
    X = np.concatenate([W.reshape(n, 6), np.full((n, 1), 0.8)], 1)
    b_DxD = np.array([[-0.30, -0.05, 0.02], [-0.04, -0.20, -0.03], [0.01, -0.06, -0.25]])
    shares = 0.8 * W[:, 0] + 0.2 * W[:, 1]
    Y = np.array([3.0, 2.0, 2.5]) + np.log(shares) @ b_DxD.T + rng.normal(0, 0.003, (n, 3))
    return X, Y, b_DxD


def test_objective_selection_gives_every_domain_the_regressor_best_on_the_objective():
    X, Y, _ = power_law_trials(48, seed=21)
    per_domain = fit(X, Y, DOMAINS, folds=4)
    joint = fit(X, Y, DOMAINS, folds=4, objective=Objective())
    assert "objective" not in per_domain.cv_mse
    assert set(joint.chosen.values()) == {"logweight"}  # the law's own form, for all three
    cv = joint.cv_mse["objective"]
    assert set(cv) == set(fitmod.REGRESSORS) and cv["logweight"] < cv["linear"] / 3
    # objective-weighted: only math counts, and the choice is made on math's errors
    math_only = fit(X, Y, DOMAINS, folds=4, objective=Objective({"math": 1.0}))
    assert math_only.cv_mse["objective"] == pytest.approx(math_only.cv_mse["math"])


def test_choose_with_a_stage_blind_fit_gives_every_stage_the_closed_form_optimum():
    """logweight sees only the token shares, so it is indifferent to how an end stage differs
    from the base: the winner repeats one mixture, the optimum of sum_j B_j log w_j
    (B_j = mean_d b_dj < 0), which is w_j = B_j / sum B."""
    X, Y, b_DxD = power_law_trials(48, seed=22)
    result = fit(X, Y, DOMAINS, folds=4, regressors=("logweight",), objective=Objective())
    template = MixtureSchedule.from_stage_weights([
        (0.0, dict.fromkeys(DOMAINS, 1 / 3)), (0.8, dict.fromkeys(DOMAINS, 1 / 3))])
    for method in ("search", "topk"):
        sched, _ = choose(result, DOMAINS, template, {}, 0.0, Objective(), samples=20_000,
                          refine_steps=60, method=method)
        W_SxD = sched.weight_matrix(DOMAINS)
        assert [st.start for st in sched.stages] == [0.0, 0.8]
        np.testing.assert_array_equal(W_SxD[0], W_SxD[1])
        B_D = b_DxD.mean(0)
        assert np.abs(W_SxD[0] - B_D / B_D.sum()).sum() < (0.03 if method == "search" else 0.1)


def test_fit_refuses_too_few_trials_and_unknown_regressors():
    X = dirichlet(4, seed=11)
    with pytest.raises(UserError, match=r"4 trials are fewer trials than the fit needs \(5"):
        fit(X, law(X), DOMAINS, folds=5)
    with pytest.raises(UserError, match=r"3 trials are fewer trials than the fit needs \(4"):
        fit(X[:3], law(X[:3]), DOMAINS, folds=2)
    with pytest.raises(UserError, match=r"regressor 'xgb': unknown"):
        fit(X, law(X), DOMAINS, folds=2, regressors=("xgb",))


def test_evaluate_holdout_reports_spearman_and_regret(law_fit):
    X = dirichlet(30, seed=12)
    report = evaluate_holdout(law_fit, X, law(X), Objective())
    assert report["n"] == 30
    assert report["spearman"] > 0.95
    assert 0 <= report["regret"] < 0.01
    assert set(report["per_domain_spearman"]) == set(DOMAINS)
    pred_M = law_fit.predict(X).mean(1)
    assert report["objective_rmse"] == pytest.approx(
        np.sqrt(np.mean((pred_M - law(X).mean(1)) ** 2)))
    assert 0 < report["objective_rmse"] < 0.01


# ---------------------------------------------------------------------------------------------
# choose


def test_projection_onto_capped_simplex():
    rng = np.random.default_rng(13)
    lower, upper = np.full(4, 0.05), np.array([0.5, 0.3, 1.0, 0.2])
    W = project_capped_simplex(rng.normal(0, 1, (500, 4)), lower, upper)
    assert np.all(W >= lower - 1e-12) and np.all(W <= upper + 1e-12)
    np.testing.assert_allclose(W.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(project_capped_simplex(W, lower, upper), W, atol=1e-12)


@pytest.mark.parametrize("method,tol", [("search", 0.05), ("topk", 0.1)])
def test_choose_finds_the_true_optimum(law_fit, method, tol):
    sched, predicted = choose(law_fit, DOMAINS, None, {}, 0.0, Objective(), samples=20_000,
                              refine_steps=60, method=method)
    w = sched.weight_matrix(DOMAINS)[0]
    best = true_optimum(np.full(3, 1 / 3))
    assert np.abs(w - best).sum() < tol
    np.testing.assert_allclose([predicted[d] for d in DOMAINS], law(w[None])[0], atol=0.01)


def test_choose_respects_caps_and_min_weight(law_fit):
    caps = {"math": 0.2, "code": 0.35}
    sched, _ = choose(law_fit, DOMAINS, None, caps, 0.1, Objective(), samples=20_000,
                      refine_steps=60)
    w = sched.weight_matrix(DOMAINS)[0]
    assert w[2] <= 0.2 + 1e-9 and w[1] <= 0.35 + 1e-9 and w.min() >= 0.1 - 1e-9
    best = true_optimum(np.full(3, 1 / 3), upper_D=(1.0, 0.35, 0.2), lower=0.1)
    assert np.abs(w - best).sum() < 0.05
    with pytest.raises(UserError, match=r"caps: sum to 0.6 < 1"):
        choose(law_fit, DOMAINS, None, {"web": 0.2, "code": 0.2, "math": 0.2}, 0.0, Objective())
    with pytest.raises(UserError, match=r"caps.wiki: unknown domain"):
        choose(law_fit, DOMAINS, None, {"wiki": 0.2}, 0.0, Objective())


def test_choose_respects_the_baseline_constraint(law_fit):
    uniform = np.full((1, 3), 1 / 3)
    baseline = dict(zip(DOMAINS, law_fit.predict(uniform)[0]))
    target_math = Objective({"math": 1.0})
    free, free_pred = choose(law_fit, DOMAINS, None, {}, 0.0, target_math, samples=10_000,
                             refine_steps=40)
    assert max(free_pred[d] / baseline[d] for d in DOMAINS) > 1.05  # the constraint will bind
    bound = Objective({"math": 1.0}, max_worse_than_baseline=0.05)
    sched, pred = choose(law_fit, DOMAINS, None, {}, 0.0, bound, baseline, samples=10_000,
                         refine_steps=40)
    assert all(pred[d] <= baseline[d] * 1.05 + 1e-9 for d in DOMAINS)
    assert pred["math"] < baseline["math"] - 0.05  # and it still improves the target
    assert pred["math"] > free_pred["math"]
    with pytest.raises(UserError, match="need the baseline"):
        choose(law_fit, DOMAINS, None, {}, 0.0, bound)


def test_two_stage_winner_json_loads_and_validates(tmp_path):
    rng = np.random.default_rng(14)
    W = rng.dirichlet(np.ones(3), (40, 2))
    # the end-of-training stage counts for less: the law sees a 0.8/0.2 time average
    X = np.concatenate([W.reshape(40, 6), np.full((40, 1), 0.8)], 1)
    Y = law(0.8 * W[:, 0] + 0.2 * W[:, 1]) + rng.normal(0, 0.002, (40, 3))
    result = fit(X, Y, DOMAINS, regressors=("linear", "loglinear"))
    template = MixtureSchedule.from_stage_weights([
        (0.0, dict.fromkeys(DOMAINS, 1 / 3)), (0.8, dict.fromkeys(DOMAINS, 1 / 3))])
    sched, predicted = choose(result, DOMAINS, template, {}, 0.0, Objective(), samples=5_000,
                              refine_steps=20)
    assert [st.start for st in sched.stages] == [0.0, 0.8]
    write_winner(tmp_path / "out" / "winner.json", sched, predicted,
                 {"chosen": result.chosen, "cv_mse": result.cv_mse, "nan": np.float64("nan")})
    loaded = MixtureSchedule.load(tmp_path / "out" / "winner.json").validate(DOMAINS)
    assert loaded == sched
    obj = json.loads((tmp_path / "out" / "winner.json").read_text())
    assert obj["predicted"] == predicted and obj["fit"]["chosen"] == result.chosen
    assert obj["fit"]["nan"] is None
    # the time-averaged mixture is what matters here; its loss is near the law's optimum
    avg = sched.time_average(DOMAINS)
    best = law(true_optimum(np.full(3, 1 / 3))[None]).mean()
    assert law(np.array([[avg[d] for d in DOMAINS]])).mean() < best + 0.01


# ---------------------------------------------------------------------------------------------
# tables: `gx fit TABLE`


def law_table(n: int, seed: int, stages: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    W = rng.dirichlet(np.ones(3), (n, 2))
    Y = law(0.85 * W[:, 0] + 0.15 * W[:, 1]) + rng.normal(0, 0.002, (n, 3))
    cols = {}
    for s, name in enumerate(("anneal", "base") if stages else ()):  # out of order on purpose
        for d, dom in enumerate(DOMAINS):
            cols[f"weight/{name}/{dom}"] = W[:, 1 - s, d]
    if stages:
        cols["start/anneal"] = np.full(n, 0.85)
    else:
        cols.update({f"weight/{dom}": W[:, 0, d] for d, dom in enumerate(DOMAINS)})
        Y = law(W[:, 0])
    cols.update({f"loss/{dom}": Y[:, d] for d, dom in enumerate(DOMAINS)})
    cols["loss/mean"] = Y.mean(1)
    cols["run"] = [f"r{i}" for i in range(n)]
    return pd.DataFrame(cols)


def test_read_table_csv_and_parquet(tmp_path):
    df = law_table(8, seed=15)
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        got = read_table(tmp_path / name)
        assert parse_columns(got) == (("base", "anneal"), DOMAINS)
        np.testing.assert_allclose(got["loss/web"], df["loss/web"])
    law_table(8, seed=15, stages=False).to_csv(tmp_path / "one.csv", index=False)
    assert parse_columns(read_table(tmp_path / "one.csv")) == (("",), DOMAINS)


def _break(df: pd.DataFrame, how: str) -> pd.DataFrame:
    df = df.copy()
    if how == "no weights":
        return df.drop(columns=[c for c in df.columns if c.startswith("weight/")])
    if how == "no loss":
        return df.drop(columns=[c for c in df.columns if c.startswith("loss/")])
    if how == "text":
        df["loss/math"] = df["loss/math"].astype(object)
        df.loc[2, "loss/math"] = "oops"
        return df
    if how == "nan":
        df.loc[3, "weight/base/web"] = np.nan
        return df
    if how == "sum":
        df.loc[4, "weight/anneal/code"] += 0.1
        return df
    if how == "no start":
        return df.drop(columns=["start/anneal"])
    if how == "stage lacks domain":
        return df.drop(columns=["weight/anneal/math"])
    if how == "mixed":
        return df.assign(**{"weight/web": 1.0})
    raise AssertionError(how)


@pytest.mark.parametrize("how,match", [
    ("no weights", r"no weight columns"),
    ("no loss", r"nothing to predict: no loss/<domain> column"),
    ("text", r"column loss/math, row 3 \(line 4\): 'oops' is not a number"),
    ("nan", r"column weight/base/web, row 4 \(line 5\): missing"),
    ("sum", r"row 5 \(line 6\): stage 'anneal' weights weight/anneal/\* sum to"),
    ("no start", r"missing column\(s\) start/(anneal|base)"),
    ("stage lacks domain", r"missing column\(s\) weight/anneal/math"),
    ("mixed", r"mixes per-stage and single-stage weight columns"),
])
def test_table_errors_name_file_and_column_or_row(tmp_path, how, match):
    path = tmp_path / "bad.csv"
    _break(law_table(8, seed=16), how).to_csv(path, index=False)
    with pytest.raises(UserError, match=match) as err:
        load_table(path)
    assert str(path) in str(err.value)


def test_table_file_errors(tmp_path):
    with pytest.raises(UserError, match=r"t.xlsx: unsupported table format '.xlsx'"):
        read_table(tmp_path / "t.xlsx")
    with pytest.raises(UserError, match=r"gone.csv: table file not found"):
        read_table(tmp_path / "gone.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match=r"empty.csv: the table is empty"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "fake.parquet").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match=r"fake.parquet: not a readable parquet table"):
        read_table(tmp_path / "fake.parquet")
    law_table(10, seed=17).to_csv(tmp_path / "train.csv", index=False)
    law_table(6, seed=18, stages=False).to_csv(tmp_path / "hold.csv", index=False)
    with pytest.raises(UserError, match=r"hold.csv: holdout table has stages \[''\]"):
        fit_table(tmp_path / "train.csv", tmp_path / "hold.csv", folds=2)
    with pytest.raises(UserError, match=r"train.csv: 10 trials are fewer trials"):
        fit_table(tmp_path / "train.csv", folds=12)


def test_fit_table_end_to_end_with_holdout(tmp_path):
    law_table(40, seed=19).to_csv(tmp_path / "train.csv", index=False)
    hold = law_table(20, seed=20)
    hold = hold[list(reversed(hold.columns))]  # column order does not matter
    hold.to_parquet(tmp_path / "hold.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fit_table(tmp_path / "train.csv", tmp_path / "hold.parquet", folds=4,
                        regressors=("linear", "loglinear"), samples=5_000, refine_steps=20)
    assert out["holdout"]["n"] == 20
    assert out["holdout"]["spearman"] > 0.9
    assert 0 <= out["holdout"]["regret"] < 0.01
    assert set(out["chosen"].values()) == {"loglinear"}
    assert out["ignored_columns"] == ["loss/mean"]
    winner = MixtureSchedule.from_dict(out["winner"]).validate(DOMAINS)
    assert [st.start for st in winner.stages] == [0.0, 0.85]
    assert out["predicted_objective"] <= out["best_observed_objective"] + 0.01
    json.dumps(out)  # JSON-ready for the CLI
    text = format_fit_report(out)
    rows = [line for line in text.splitlines() if line.split(" ")[0] in
            [f"loss/{d}" for d in DOMAINS]]
    assert len(rows) == 3 and all(r.endswith("loglinear") and "*" in r for r in rows)
    for needle in ("Spearman", "regret", "chosen mixture", "stage anneal (start "
                   "0.850)", "predicted: loss/web"):
        assert needle in text


def log_share_table(path, n: int, seed: int, beta_D: np.ndarray, exact_row: int | None = None,
                    noise: float = 0.005) -> None:
    """Single-stage runs whose losses follow L_d = 3 - beta_d log(w_d) (+ seeded noise): the
    mean loss is lowest at w proportional to beta. Row `exact_row` is the uniform mixture,
    measured without noise."""
    rng = np.random.default_rng(seed)
    W_NxD = rng.dirichlet(np.ones(3), n)
    Y_NxD = 3 - beta_D * np.log(W_NxD) + noise * rng.standard_normal((n, 3))
    if exact_row is not None:
        W_NxD[exact_row] = 1 / 3
        Y_NxD[exact_row] = 3 - beta_D * np.log(1 / 3)
    pd.DataFrame({**{f"weight/{d}": W_NxD[:, i] for i, d in enumerate(DOMAINS)},
                  **{f"loss/{d}": Y_NxD[:, i] for i, d in enumerate(DOMAINS)}}).to_csv(
        path, index=False)


def test_gx_fit_says_when_it_has_no_more_runs_than_features(tmp_path, capsys):
    from gx import cli

    log_share_table(tmp_path / "few.csv", 5, seed=24, beta_D=np.full(3, 0.1))
    table = pd.read_csv(tmp_path / "few.csv")
    table["weight/base/web"] = table.pop("weight/web")  # two stages: 3 + 3 weights and a start
    for d in ("code", "math"):
        table[f"weight/base/{d}"] = table.pop(f"weight/{d}")
    for d in DOMAINS:
        table[f"weight/end/{d}"] = 1 / 3
    table["start/end"] = 0.8
    table.to_csv(tmp_path / "few.csv", index=False)
    assert cli.main(["fit", str(tmp_path / "few.csv"), "--folds", "2", "--regressors",
                     "linear"]) == 0
    assert "warning: 5 fitted runs for 7 features: the fit can match them all" in \
        capsys.readouterr().out
    log_share_table(tmp_path / "many.csv", 12, seed=24, beta_D=np.full(3, 0.1))
    assert cli.main(["fit", str(tmp_path / "many.csv"), "--regressors", "linear"]) == 0
    assert "warning:" not in capsys.readouterr().out


def test_gx_fit_keeps_a_measured_row_the_fit_cannot_beat(tmp_path, capsys):
    from gx import cli
    # every domain alike: the optimum is uniform, and the holdout table's row 3 measured it
    log_share_table(tmp_path / "train.csv", 30, seed=21, beta_D=np.full(3, 0.1))
    log_share_table(tmp_path / "hold.csv", 8, seed=22, beta_D=np.full(3, 0.1), exact_row=2)
    args = ["fit", str(tmp_path / "train.csv"), "--holdout", str(tmp_path / "hold.csv"),
            "--regressors", "logweight", "--folds", "4"]
    assert cli.main([*args, "--out", str(tmp_path / "winner.json")]) == 0
    out = capsys.readouterr().out
    assert "choice: hold.csv row 3 (line 4): the fit's mixture was predicted" in out
    assert "within the fit's error" in out and "fold models' spread" in out
    assert "chosen mixture (hold.csv row 3 (line 4), measured)" in out
    winner = json.loads((tmp_path / "winner.json").read_text())
    assert winner["stages"][0]["weights"] == pytest.approx(dict.fromkeys(DOMAINS, 1 / 3))
    c = winner["fit"]["choice"]
    assert c["predicted_gain"] < c["margin"] and c["measured"] == pytest.approx(3 + 0.1 * np.log(3))
    # switched off: the fit's own mixture (near uniform, but not that row)
    assert cli.main([*args, "--no-prefer-measured", "--out", str(tmp_path / "fit.json")]) == 0
    assert "chosen mixture (the fit's)" in capsys.readouterr().out
    mine = json.loads((tmp_path / "fit.json").read_text())
    assert mine["fit"]["choice"]["from"] == "fit" and mine["stages"] != winner["stages"]
    assert mine["stages"][0]["weights"] == pytest.approx(dict.fromkeys(DOMAINS, 1 / 3), abs=0.05)


def test_fit_table_chooses_the_fits_mixture_when_it_is_clearly_better(tmp_path):
    # web matters 12x more than the others: the optimum (web 12/14) is far from every row
    beta_D = np.array([0.6, 0.05, 0.05])
    log_share_table(tmp_path / "t.csv", 30, seed=23, beta_D=beta_D, exact_row=0)
    out = fit_table(tmp_path / "t.csv", folds=4, regressors=("logweight",), samples=5_000)
    c = out["choice"]
    assert c["from"] == "fit" and c["predicted_gain"] > c["margin"] > 0
    assert out["winner"]["stages"][0]["weights"] == pytest.approx(
        dict(zip(DOMAINS, beta_D / beta_D.sum())), abs=0.03)


# ---------------------------------------------------------------------------------------------
# the sweep's choice: the fit's mixture, or a measured trial the fit cannot tell it from


def _choice(beta_D: np.ndarray, noise: float, log: list[str], prefer_measured: bool = True):
    """fit_and_choose on a sweep setup whose trials' losses follow L_d = 3 - beta_d log(share_d)
    (+ seeded noise): the mean loss is lowest at shares proportional to beta."""
    from sweeps.config import FitConfig, SweepConfig
    from sweeps.runner import fit_and_choose, trials_table
    from sweeps.space import SpaceConfig, sample_space
    from sweeps.sweep_setup import SweepSetup

    domains = ("web", "code", "math", "books")
    tokens = {"web": 4 * 10**8, "code": 2 * 10**8, "math": 10**8, "books": 10**8}
    sweep = SweepConfig(name="t", proxy=None, space=SpaceConfig(trials=40, min_weight=0.02),
                        fit=FitConfig(folds=4, regressors=("logweight",), samples=5000,
                                      prefer_measured=prefer_measured))
    schedules, fixed = sample_space(sweep.space, domains, tokens, 10**8)
    setup = SweepSetup(sweep, None, None, domains, tokens, 10**8, schedules, None, None, fixed)
    rng = np.random.default_rng(0)
    rows = []
    for i, s in enumerate(schedules):
        share_D = token_shares(features(s, domains)[None], len(domains))[0]
        loss_D = 3 - beta_D * np.log(share_D) + noise * rng.standard_normal(len(domains))
        rows.append({"trial": i, "run_id": f"r{i}", "failed": "",
                     **{f"loss/{d}": v for d, v in zip(domains, loss_D)},
                     "loss/mean": float(loss_D.mean())})
    return setup, fit_and_choose(setup, trials_table(setup, rows), log.append)


def test_sweep_keeps_a_measured_trial_the_fit_cannot_beat():
    # every domain alike: the optimum is uniform, one of the anchors; no mixture the fit finds
    # is better than the best measured trial by more than the fit's own error
    log = []
    setup, result = _choice(np.full(4, 0.1), 0.01, log)
    c, best = result["choice"], result["best_trial"]["trial"]
    assert c["from"].startswith(f"trial {best}") and c["predicted_gain"] < c["margin"]
    assert result["winner"] == setup.schedules[best].to_dict()
    assert any("the winner is trial" in line for line in log)
    assert set(result["objective_predicted"]) == {"winner", "natural", "uniform", "best_trial"}
    assert {setup.fixed["natural"], setup.fixed["uniform"]} <= {
        t["trial"] for t in result["per_trial_predicted"] if not t["held_out"]}
    # switched off: the fit's own mixture, whatever its margin
    _, off = _choice(np.full(4, 0.1), 0.01, [], prefer_measured=False)
    assert off["choice"]["from"] == "fit" and off["choice"]["predicted_gain"] == c["predicted_gain"]
    assert off["winner"] != result["winner"]


def test_sweep_chooses_the_fits_mixture_when_it_is_clearly_better():
    # web matters 12x more than any other domain: the fit's optimum (web 0.8, the rest 1/15)
    # beats every measured trial by more than the fit's error
    setup, result = _choice(np.array([0.6, 0.05, 0.05, 0.05]), 0.01, [])
    c = result["choice"]
    assert c["from"] == "fit" and c["predicted_gain"] > c["margin"] > 0
    got = result["winner"]["stages"][0]["weights"]
    assert got == pytest.approx({"web": 0.8, "code": 1 / 15, "math": 1 / 15, "books": 1 / 15},
                                abs=0.03)


def narrow_runs() -> tuple[np.ndarray, np.ndarray]:
    """12 runs that gave math 0.2 to 0.4 of the tokens, where its loss falls as 4 - 6 w."""
    rng = np.random.default_rng(5)
    math_N = rng.uniform(0.2, 0.4, 12)
    rest_Nx2 = rng.dirichlet(np.ones(2), 12) * (1 - math_N)[:, None]
    X_NxF = np.column_stack([rest_Nx2, math_N])
    Y_NxD = np.column_stack([3 - X_NxF[:, 0], 3 - X_NxF[:, 1], 4 - 6 * math_N])
    return X_NxF, Y_NxD + rng.normal(0, 0.001, Y_NxD.shape)


def test_choose_stays_where_the_fitted_runs_were():
    import dataclasses

    X_NxF, Y_NxD = narrow_runs()
    result = fit(X_NxF, Y_NxD, DOMAINS, folds=3, regressors=("linear",))
    seen = result.seen
    assert seen.weight_lo_D[2] == pytest.approx(X_NxF[:, 2].min())
    assert seen.loss_hi_K[2] == pytest.approx(Y_NxD[:, 2].max())
    math_only = Objective({"math": 1.0})

    def math_weight_and_loss(r):
        sched, pred = choose(r, DOMAINS, None, {}, 0.0, math_only, samples=5000, refine_steps=40)
        return sched.weight_matrix(DOMAINS)[0][2], pred["math"]

    # unbounded, the linear law runs math to all of the tokens and a loss of -2 nats
    w, loss = math_weight_and_loss(dataclasses.replace(result, seen=None))
    assert w > 0.99 and loss < -1.9
    # the measured losses alone (1.6 to 2.8, widened by their range: >= 0.4) stop it at 0.6
    losses_only = dataclasses.replace(seen, weight_lo_D=np.zeros(3), weight_hi_D=np.ones(3))
    w, loss = math_weight_and_loss(dataclasses.replace(result, seen=losses_only))
    assert w == pytest.approx(0.6, abs=0.01) and loss == pytest.approx(0.4, abs=0.06)
    # the fit as it is: no more math than a run gave it
    w, loss = math_weight_and_loss(result)
    assert w == pytest.approx(X_NxF[:, 2].max(), abs=1e-6)


def test_a_measured_run_beats_an_extrapolated_prediction():
    import dataclasses

    from sweeps.optimize import describe_choice, prefer_measured

    X_NxF, Y_NxD = narrow_runs()
    result = fit(X_NxF, Y_NxD, DOMAINS, folds=3, regressors=("linear",), objective=Objective())
    unbounded = choose(dataclasses.replace(result, seen=None), DOMAINS, None, {}, 0.0,
                       Objective(), samples=5000, refine_steps=40)
    best = MixtureSchedule.from_stage_weights([(0.0, dict(zip(DOMAINS, X_NxF[0])))])
    measured = (best, float(Y_NxD[0].mean()))
    chosen, _, choice = prefer_measured(result, Objective(), unbounded, measured, "run 0")
    assert chosen is best and choice["from"] == "run 0"
    assert choice["predicted_gain"] > choice["margin"]  # a large gain, and not believed
    assert set(choice["extrapolated"]) == {"math"}
    assert "math -" in describe_choice(choice) and "an extrapolation" in describe_choice(choice)
    # inside what the runs measured, the same rule as before
    inside = choose(result, DOMAINS, None, {}, 0.0, Objective(), samples=5000, refine_steps=40)
    assert prefer_measured(result, Objective(), inside, measured, "run 0")[2]["extrapolated"] == {}


def test_choose_searches_the_end_stage_start_the_runs_varied():
    # two stages, the end stage starting at 0.8 to 0.9; every loss falls as the end stage
    # starts later, and web's as the end stage gives it more
    rng = np.random.default_rng(7)
    W_NxSxD = rng.dirichlet(np.ones(3), (30, 2))
    start_N = rng.uniform(0.8, 0.9, 30)
    X_NxF = np.column_stack([W_NxSxD.reshape(30, -1), start_N])
    Y_NxD = (3 - 2 * (start_N[:, None] - 0.85) - 0.3 * W_NxSxD[:, 1, :1]
             + rng.normal(0, 0.001, (30, 3)))
    template = MixtureSchedule.from_stage_weights(
        [(0.0, dict.fromkeys(DOMAINS, 1 / 3)), (0.85, dict.fromkeys(DOMAINS, 1 / 3))])

    def end_start(regressor: str) -> float:
        result = fit(X_NxF, Y_NxD, DOMAINS, folds=3, regressors=(regressor,))
        sched, _ = choose(result, DOMAINS, template, {}, 0.0, Objective(), samples=2000,
                          refine_steps=20)
        return sched.stages[1].start

    assert end_start("linear") == pytest.approx(start_N.max())
    # a fit that sees only token shares cannot tell one start from another: the template's
    assert end_start("logweight") == 0.85


def test_the_folds_spread_far_from_the_runs_widens_the_margin():
    from sweeps.optimize import predict_schedule, prefer_measured

    # 16 noisy runs near uniform: the CV folds' linear models agree there and not far away
    rng = np.random.default_rng(9)
    X_NxF = rng.dirichlet(np.full(3, 100.0), 16)
    Y_NxD = 3 - np.array([0.8, 0.4, 0.2]) * X_NxF + rng.normal(0, 0.02, X_NxF.shape)
    result = fit(X_NxF, Y_NxD, DOMAINS, folds=4, regressors=("linear",), objective=Objective())
    assert result.fold_predict(X_NxF[:5]).shape == (4, 5, 3)
    near, far = np.full(3, 1 / 3), np.array([0.9, 0.05, 0.05])
    spread_2 = result.fold_predict(np.stack([near, far])).mean(2).std(0, ddof=1)
    assert spread_2[1] > 5 * spread_2[0]

    far_schedule = MixtureSchedule.from_stage_weights([(0.0, dict(zip(DOMAINS, far)))])
    predicted = predict_schedule(result, far_schedule)
    cv_error = float(np.sqrt(result.cv_mse["objective"]["linear"]))
    margin = float(np.hypot(cv_error, spread_2[1]))
    # a measured run the fit's mixture beats by more than its CV error, less than the margin
    best = MixtureSchedule.from_stage_weights([(0.0, dict(zip(DOMAINS, X_NxF[0])))])
    measured = float(np.mean(list(predicted.values()))) + (cv_error + margin) / 2
    chosen, _, choice = prefer_measured(result, Objective(), (far_schedule, predicted),
                                        (best, measured), "run 0")
    assert choice["fold_spread"] == pytest.approx(spread_2[1])
    assert choice["margin"] == pytest.approx(margin) and choice["cv_error"] == pytest.approx(cv_error)
    assert cv_error < choice["predicted_gain"] < margin
    assert chosen is best and choice["from"] == "run 0"


# ---------------------------------------------------------------------------------------------
# objectives over any metric column (downstream tasks), constraints, more weights than losses


def task_table(path, n: int, seed: int) -> None:
    """4 weighted domains, losses for 3 (books is trained on, never evaluated), a task whose
    gold bpb falls with the math share and an accuracy that rises with it; row 1 is uniform."""
    rng = np.random.default_rng(seed)
    doms = ("web", "code", "math", "books")
    W = np.vstack([np.full(4, 0.25), rng.dirichlet(np.ones(4), n - 1)])
    cols = {f"weight/{d}": W[:, i] for i, d in enumerate(doms)}
    cols.update({f"loss/{d}": 3.0 - 0.1 * np.log(W[:, i]) for i, d in enumerate(doms[:3])})
    cols["downstream/gsm8k/bpb"] = 1.5 - 0.3 * np.log(W[:, 2]) - 0.05 * np.log(W[:, 1])
    cols["downstream/gsm8k/exact_match"] = 0.1 * W[:, 2]
    cols["downstream/arc_easy/bpb"] = 1.2 - 0.1 * np.log(W[:, 0])
    cols["downstream/mean/bpb"] = (cols["downstream/gsm8k/bpb"]
                                   + cols["downstream/arc_easy/bpb"]) / 2
    pd.DataFrame(cols).to_csv(path, index=False)


def test_objective_over_task_metrics_with_signs_patterns_and_parse():
    metrics = ("web", "math", "downstream/gsm8k/bpb", "downstream/gsm8k/exact_match",
               "downstream/arc_easy/bpb")
    o = Objective({"downstream/*/bpb": 1.0})
    np.testing.assert_allclose(o.weight_vector(metrics), [0, 0, 0.5, 0, 0.5])
    acc = Objective({"downstream/gsm8k/exact_match": 1.0, "loss/math": 1.0})
    np.testing.assert_allclose(acc.weight_vector(metrics), [0, 0.5, 0, -0.5, 0])  # higher: better
    np.testing.assert_allclose(Objective().weight_vector(metrics), [0.5, 0.5, 0, 0, 0])
    parsed = Objective.parse("downstream/*/bpb=2,math",
                             ["loss/*=0.01", "downstream/arc_easy/bpb=0.05"])
    assert dict(parsed.targets) == {"downstream/*/bpb": 2.0, "math": 1.0}
    np.testing.assert_allclose(parsed.bounds(metrics), [0.01, 0.01, np.nan, np.nan, 0.05])
    assert "subject to loss/* no more than 1.0% worse" in parsed.describe()
    # a constraint on a metric better when higher: falling more than x below the baseline
    base_K = np.array([3.0, 3.0, 2.0, 0.5, 1.0])
    rows = np.array([base_K, base_K * [1.005, 1, 1, 1, 1], base_K * [1, 1.02, 1, 1, 1],
                     base_K * [1, 1, 1, 0.9, 1]])
    guard = Objective({"math": 1}, constraints={"loss/*": 0.01, "*/exact_match": 0.05})
    np.testing.assert_allclose(fitmod.violations(rows, base_K, guard.signs(metrics),
                                                 guard.bounds(metrics)),
                               [0, 0, 0.01, 0.05], atol=1e-12)
    with pytest.raises(UserError, match=r"objective.targets.downstream/gsm8k/pass@1: no such "
                       r"metric \(available: loss/web, loss/math, downstream/gsm8k/bpb"):
        Objective({"downstream/gsm8k/pass@1": 1}).check(metrics)
    with pytest.raises(UserError, match=r"--constraint 'loss/\*': expected METRIC=FRACTION"):
        Objective.parse("", ["loss/*"])
    with pytest.raises(UserError, match=r"no domain loss to average"):
        Objective().check(("downstream/gsm8k/bpb",))


def test_gx_fit_objective_on_a_task_with_constraints_and_unevaluated_domains(tmp_path, capsys):
    from gx import cli
    task_table(tmp_path / "t.csv", 40, seed=31)
    free = fit_table(tmp_path / "t.csv", objective=Objective({"downstream/gsm8k/bpb": 1}),
                     folds=4, regressors=("logweight",), samples=5_000, prefer_measured=False)
    assert free["domains"] == ["web", "code", "math", "books"]  # books: a feature, no loss
    assert free["metrics"] == ["web", "code", "math", "downstream/gsm8k/bpb"]
    bound = fit_table(tmp_path / "t.csv", objective=Objective(
        {"downstream/gsm8k/bpb": 1}, constraints={"loss/*": 0.01}), baseline_row=1, folds=4,
        regressors=("logweight",), samples=5_000, prefer_measured=False)
    suite = fit_table(tmp_path / "t.csv", objective=Objective({"downstream/*/bpb": 1}), folds=4,
                      regressors=("logweight",), samples=2_000)
    assert suite["metrics"][3:] == ["downstream/gsm8k/bpb", "downstream/arc_easy/bpb"]  # no mean
    w_free, w = free["winner"]["stages"][0]["weights"], bound["winner"]["stages"][0]["weights"]
    assert w_free["math"] > w["math"] > 0.4  # the constraint binds, math still raised
    uniform_loss = 3.0 - 0.1 * np.log(0.25)
    for d in ("web", "code", "math"):
        assert bound["predicted"][d] <= uniform_loss * 1.01 + 1e-3
    assert bound["predicted"]["downstream/gsm8k/bpb"] < 1.5 - 0.35 * np.log(0.25) - 0.2
    assert w["books"] < 0.05  # weighted but in no metric: the search gives it nothing
    # declared as a penalty instead: a light one trades a little excess for more math
    soft = fit_table(tmp_path / "t.csv", objective=Objective(
        {"downstream/gsm8k/bpb": 1}, constraints={"loss/*": 0.01}, penalty=0.5), baseline_row=1,
        folds=4, regressors=("logweight",), samples=5_000, prefer_measured=False)
    assert soft["winner"]["stages"][0]["weights"]["math"] > w["math"] + 0.01
    assert "(a penalty of 0.5 x the excess)" in soft["objective"]
    # the same from the command line
    assert cli.main(["fit", str(tmp_path / "t.csv"), "--objective", "downstream/gsm8k/bpb",
                     "--constraint", "loss/*=0.02", "--baseline", "1", "--regressors",
                     "logweight", "--folds", "4", "--no-prefer-measured"]) == 0
    out = capsys.readouterr().out
    assert "objective: downstream/gsm8k/bpb; subject to loss/* no more than 2.0% worse" in out
    assert any(line.startswith("downstream/gsm8k/bpb ") and line.endswith("logweight")
               for line in out.splitlines())  # a CV row of its own
    # mistakes: one line each, exit 2
    for args, says in (
            (["--objective", "downstream/mbpp/bpb"], "objective targets 'downstream/mbpp/bpb': "
             "no such column (loss columns: loss/web, loss/code, loss/math; other numeric "
             "columns: downstream/gsm8k/bpb, downstream/gsm8k/exact_match"),
            (["--objective", "math", "--constraint", "loss/*=0.02"], "name its row with "
             "--baseline ROW"),
            (["--constraint", "loss/*=0.02", "--baseline", "99"], "--baseline 99: not a row"),
            (["--objective", "math=x"], "--objective 'math=x': 'x' is not a number")):
        assert cli.main(["fit", str(tmp_path / "t.csv"), *args]) == 2
        assert says in capsys.readouterr().err


def test_prefer_baseline_keeps_natural_unless_the_choice_leads_it_beyond_the_fits_error(law_fit):
    from sweeps.optimize import describe_choice, prefer_baseline

    natural = MixtureSchedule.constant({"web": 0.5, "code": 0.3, "math": 0.2})
    trial = MixtureSchedule.constant({"web": 0.2, "code": 0.3, "math": 0.5})
    choice = {"from": "trial 3", "measured": 3.00, "margin": 0.10}
    kept, _, why = prefer_baseline(law_fit, Objective(), (trial, {}, choice), (natural, 3.05),
                                   "trial 1 (natural)")
    assert kept is natural and why["from"] == "trial 1 (natural)" and why["kept_baseline"]
    assert why["lead_over_baseline"] == pytest.approx(0.05)
    assert "the baseline is kept (fit.prefer_baseline)" in describe_choice(
        {**why, "predicted_gain": 0.0, "best_measured": "trial 3"})
    moved, _, why = prefer_baseline(law_fit, Objective(), (trial, {}, choice), (natural, 3.2),
                                    "trial 1 (natural)")
    assert moved is trial and why["from"] == "trial 3" and not why.get("kept_baseline")
