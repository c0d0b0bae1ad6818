"""Scaling-law toolkit: every fit is checked against the law that generated its data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from helpers import read_summary
from llmtrain.config import ConfigError, load_config, save_config
from llmtrain.scaling import budget, cli
from llmtrain.scaling.data import Curve, exclude, make_points, read_csv, read_runs
from llmtrain.scaling.fit import Objective, approach1, approach2, fit_all, fit_law, multistart
from llmtrain.scaling.laws import LAWS, PUBLISHED

ROOT = Path(__file__).resolve().parent.parent
HOFF = {k: v for k, v in PUBLISHED["hoffmann2022"].items() if k != "cite"}
FAST = {"top_k": 30, "n_boot": 40}
NOISE = 0.003  # multiplicative noise on the loss (0.3%)


def chinchilla_points(n=80, seed=0, p=HOFF, noise=NOISE):
    rng = np.random.default_rng(seed)
    N = 10 ** rng.uniform(7, 10, n)
    D = 10 ** rng.uniform(8, 12, n)
    L = LAWS["chinchilla_approach3"].predict(p, N=N, D=D) * np.exp(rng.normal(0, noise, n))
    return make_points(N, D, L)


TRUTH = {
    "kaplan_LN": {"E": 1.8, "N_c": 1e8, "alpha_N": 0.3},
    "kaplan_LD": {"E": 1.7, "D_c": 3e9, "alpha_D": 0.25},
    "kaplan_LC": {"E": 1.9, "C_c": 1e18, "alpha_C": 0.15},
    "kaplan_LND": {"E": 1.7, "N_c": 1e8, "D_c": 1e9, "alpha_N": 0.34, "alpha_D": 0.28},
    "chinchilla_approach3": HOFF,
}


def law_points(name, n=80, seed=1):
    if name == "chinchilla_approach3":
        return chinchilla_points(n, seed)
    rng = np.random.default_rng(seed)
    N, D = 10 ** rng.uniform(6, 10, n), 10 ** rng.uniform(8, 12, n)
    if name == "kaplan_LC":  # C = 6ND spans 1e15..1e21
        D = 10 ** rng.uniform(15, 21, n) / (6 * N)
    law = LAWS[name]
    pts = make_points(N, D, np.ones(n))
    data = {v: getattr(pts, v) for v in law.variables}
    pts.loss = law.predict(TRUTH[name], **data) * np.exp(rng.normal(0, NOISE, n))
    return pts


# ----------------------------------------------------------------------------------------------
# Laws and the optimiser


@pytest.mark.parametrize("name", sorted(LAWS))
def test_jacobian_matches_finite_differences(name):
    law, rng = LAWS[name], np.random.default_rng(0)
    logs = {"N": rng.uniform(15, 22, 20), "D": rng.uniform(18, 26, 20), "C": rng.uniform(35, 50, 20)}
    theta = law.theta(TRUTH[name])[None, :] + rng.normal(0, 0.05, (1, law.n_params))
    _, J = law.log_pred(theta, logs, jac=True)
    for k in range(law.n_params):
        h = np.zeros_like(theta)
        h[0, k] = 1e-6
        fd = (law.log_pred(theta + h, logs) - law.log_pred(theta - h, logs)) / 2e-6
        np.testing.assert_allclose(J[..., k], fd, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(TRUTH))
def test_law_recovers_known_parameters_and_ci_covers_truth(name):
    r = fit_law(LAWS[name], law_points(name), **FAST)
    truth = TRUTH[name]
    for k, v in truth.items():
        got, ci = r["params"][k]["value"], r["params"][k]["ci95"]
        if k.startswith("alpha") or k == "beta":
            assert abs(got - v) < 0.02, (k, got, v)
        elif k == "E":
            assert abs(got / v - 1) < 0.02, (k, got, v)
        assert ci[0] <= v <= ci[1], (k, ci, v)
    if name in ("chinchilla_approach3", "kaplan_LND"):
        want = LAWS[name].derived(truth)
        for k in ("a", "b"):
            assert abs(r["derived"][k]["value"] - want[k]) < 0.02
            assert r["derived"][k]["ci95"][0] <= want[k] <= r["derived"][k]["ci95"][1]
    assert r["residuals"]["rmse_log"] < 2 * NOISE


def test_pruned_grid_finds_the_full_grid_optimum():
    pts = chinchilla_points(60, seed=3, noise=0.01)
    law = LAWS["chinchilla_approach3"]
    obj = Objective(law, pts.logs(), np.log(pts.loss), 1e-3)
    grid = law.grid(pts.logs())[::9]  # every 9th start of Hoffmann's 4500 (refining all is slow)
    full = multistart(obj, grid, top_k=None)
    pruned = multistart(obj, grid, top_k=25)
    assert len(full) == len(grid) and len(pruned) == 25
    assert pruned[0][0] == pytest.approx(full[0][0], rel=1e-7)
    np.testing.assert_allclose(pruned[0][1], full[0][1], atol=1e-3)


def test_huber_resists_a_diverged_run_far_better_than_least_squares():
    pts = chinchilla_points(60, seed=4)
    worst = np.argsort(pts.N / pts.D)[-3:]  # three runs diverge: loss far above the law
    pts.loss[worst] *= 1.6
    err = {}
    for delta in (1e-3, None):
        p = fit_law(LAWS["chinchilla_approach3"], pts, delta=delta, top_k=30, n_boot=0)["params"]
        err[delta] = max(abs(p["alpha"]["value"] - HOFF["alpha"]),
                         abs(p["beta"]["value"] - HOFF["beta"]),
                         abs(p["E"]["value"] / HOFF["E"] - 1))
    assert err[1e-3] < 0.02
    assert err[1e-3] < 0.25 * err[None], err


# ----------------------------------------------------------------------------------------------
# Approaches 1 and 2


def isoflop_points(budgets=(1e18, 3e18, 1e19, 3e19, 1e20, 3e20, 1e21), sizes=9, seed=5):
    law, rng = LAWS["chinchilla_approach3"], np.random.default_rng(seed)
    N_opt, _ = law.frontier(HOFF, np.array(budgets))
    N, C = [], []
    for c, n in zip(budgets, N_opt):
        for f in np.logspace(-0.5, 0.5, sizes):
            N.append(n * f)
            C.append(c)
    N, C = np.array(N), np.array(C)
    L = law.predict(HOFF, N=N, D=C / (6 * N)) * np.exp(rng.normal(0, 0.001, len(N)))
    return make_points(N, C / (6 * N), L, C)


def test_approach2_isoflop_recovers_frontier_exponent():
    r = approach2(isoflop_points(), n_boot=40)
    a_true = LAWS["chinchilla_approach3"].derived(HOFF)["a"]
    assert r["status"] == "ok" and len(r["groups"]) == 7
    assert abs(r["params"]["a"]["value"] - a_true) < 0.02
    lo, hi = r["params"]["a"]["ci95"]
    assert lo <= a_true <= hi
    for g in r["groups"]:  # each vertex near the analytic optimum of its budget
        n_true = LAWS["chinchilla_approach3"].frontier(HOFF, np.array([g["C"]]))[0][0]
        assert abs(np.log(g["N_opt"] / n_true)) < 0.15


def test_approach1_envelope_recovers_frontier_exponent():
    law = LAWS["chinchilla_approach3"]
    curves = []
    for n in np.logspace(7, 10, 31):
        tokens = np.logspace(8, 12, 60)
        curves.append(Curve(n, tokens, law.predict(HOFF, N=np.full(60, n), D=tokens)))
    pts = make_points([c.N for c in curves], [c.tokens[-1] for c in curves],
                      [c.loss[-1] for c in curves], curves=curves)
    r = approach1(pts, n_boot=20)
    assert r["status"] == "ok"
    assert abs(r["params"]["a"]["value"] - law.derived(HOFF)["a"]) < 0.03


def test_approaches_1_and_2_say_when_data_is_insufficient():
    pts = chinchilla_points(12, seed=6)  # all sizes distinct, budgets scattered
    r1 = approach1(pts, n_boot=0)
    assert r1["status"] == "insufficient" and "approach 1 needs" in r1["reason"]
    one_budget = make_points(pts.N[:3], 1e20 / (6 * pts.N[:3]), pts.loss[:3])
    r2 = approach2(one_budget, n_boot=0)
    assert r2["status"] == "insufficient" and "approach 2 needs" in r2["reason"]


# ----------------------------------------------------------------------------------------------
# Inputs: run directories, CSV, exclusions, errors


def write_run(d: Path, n_layers, d_model, tokens, loss_at, summary=True, steps=10):
    d.mkdir(parents=True)
    cfg = load_config(None)
    cfg.model.n_layers, cfg.model.d_model = n_layers, d_model
    save_config(cfg, d / "config.yaml")
    N = 12.0 * n_layers * d_model ** 2
    ts = np.linspace(tokens / steps, tokens, steps)
    (d / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "loss": loss_at(N, t) + 0.05, "lr": 1e-3, "grad_norm": 1.0,
                    "tokens": t, "tokens_per_s": 1e4}) + "\n" for i, t in enumerate(ts)))
    (d / "eval.jsonl").write_text("".join(
        json.dumps({"step": i, "tokens": t, "val_loss": loss_at(N, t)}) + "\n"
        for i, t in enumerate(ts)))
    if summary:
        (d / "summary.json").write_text(json.dumps({
            "n_params": N + 4096 * d_model, "n_params_nonembedding": N,
            "flops_per_token": 6 * N, "tokens": tokens, "final_val_loss": loss_at(N, tokens)}))
    return N


def test_damaged_run_files_are_read_or_refused_in_one_line(tmp_path):
    """A last metrics line cut short by a kill is skipped (as a resumed run drops it); a bad
    line inside, a non-object line or a summary.json that is not an object is one line."""
    f = (lambda N, D: float(LAWS["chinchilla_approach3"].predict(HOFF, N=[N], D=[D])[0]))
    write_run(tmp_path / "a", 2, 64, 1e6, f, summary=False)
    metrics = tmp_path / "a" / "metrics.jsonl"
    with open(metrics, "a") as fh:
        fh.write('{"step": 11, "lo')
    assert len(read_runs([tmp_path / "a"]).curves[0].tokens) == 10
    metrics.write_bytes(b'[1, 2]\n\xff\xfe\n' + metrics.read_bytes())
    with pytest.raises(ConfigError, match="metrics.jsonl: line 1 is not a JSON object"):
        read_runs([tmp_path / "a"])
    write_run(tmp_path / "b", 2, 64, 1e6, f, summary=False)
    (tmp_path / "b" / "summary.json").write_text('"n_params"')
    with pytest.raises(ConfigError, match="summary.json is not a JSON object"):
        read_runs([tmp_path / "b"])


def test_read_runs_prefers_summary_and_falls_back_to_config(tmp_path):
    f = (lambda N, D: float(LAWS["chinchilla_approach3"].predict(HOFF, N=[N], D=[D])[0]))
    write_run(tmp_path / "a", 2, 64, 1e6, f, summary=True)
    (tmp_path / "a" / "summary.json").write_text(json.dumps({
        "n_params": 500000, "n_params_nonembedding": 123456, "flops_per_token": 9e5,
        "tokens": 2e6, "final_val_loss": 3.25}))
    N_b = write_run(tmp_path / "b", 4, 128, 5e6, f, summary=False)
    pts = read_runs([tmp_path / "a", tmp_path / "b"])
    assert pts.N.tolist() == [123456, N_b] and N_b == 12 * 4 * 128 ** 2
    assert pts.D.tolist() == [2e6, 5e6]
    assert pts.loss[0] == 3.25 and pts.loss[1] == pytest.approx(f(N_b, 5e6))
    assert pts.C[1] == pytest.approx(6 * N_b * 5e6)
    assert len(pts.curves[1].tokens) == 10
    total = read_runs([tmp_path / "a", tmp_path / "b"], total=True)
    assert total.N[0] == 500000
    assert total.N[1] == N_b + 4096 * 128  # tied embeddings: vocab_size * d_model
    assert read_runs([tmp_path / "a"], flops="logged").C[0] == 9e5 * 2e6
    with pytest.raises(ConfigError, match="flops_per_token"):
        read_runs([tmp_path / "b"], flops="logged")
    smooth = read_runs([tmp_path / "b"], loss_source="smoothed", smooth=3)
    ev = [f(N_b, t) for t in np.linspace(5e5, 5e6, 10)[-3:]]
    assert smooth.loss[0] == pytest.approx(np.mean(ev))


def hoff_loss(N, D):
    return float(LAWS["chinchilla_approach3"].predict(HOFF, N=[N], D=[D])[0])


def write_run_grid(tmp_path) -> list[str]:
    """18 runs: 6 model sizes x 3 token counts, losses from Hoffmann et al.'s law."""
    dirs = []
    for i, (L, d) in enumerate([(2, 64), (3, 96), (4, 128), (6, 192), (8, 256), (12, 384)]):
        for j, tok in enumerate((2e8, 1e9, 5e9)):
            write_run(tmp_path / f"r{i}_{j}", L, d, tok, hoff_loss)
            dirs.append(str(tmp_path / f"r{i}_{j}"))
    return dirs


def test_fit_from_run_dirs_end_to_end(tmp_path):
    dirs = write_run_grid(tmp_path)
    out = tmp_path / "fit.json"
    assert cli.main(["scaling", "fit", *dirs, "--law", "chinchilla", "--bootstrap", "5",
                     "--top-k", "20", "--json", str(out), "--plot", str(tmp_path / "f.png"),
                     "--quiet"]) == 0
    res = json.loads(out.read_text())
    a3 = res["laws"]["chinchilla_approach3"]
    assert abs(a3["params"]["alpha"]["value"] - HOFF["alpha"]) < 0.02
    assert res["laws"]["chinchilla_approach1"]["status"] == "ok"
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(a3["frontier"]) == 25 and a3["residuals"]["points"]


def test_csv_with_flops_column_and_exclusions_recorded(tmp_path):
    pts = chinchilla_points(40, seed=7)
    pts.loss[5] = 50.0  # a diverged run
    path = tmp_path / "p.csv"
    path.write_text("size,flop,final\n" + "".join(
        f"{n},{c},{l}\n" for n, c, l in zip(pts.N, pts.C, pts.loss)))
    got = read_csv(path, "size", "final", c_col="flop")
    np.testing.assert_allclose(got.D, pts.D, rtol=1e-12)
    kept = exclude(got, drop_highest_loss=1)
    assert len(kept) == 39 and kept.excluded[0]["loss"] == 50.0
    assert "--drop-highest-loss" in kept.excluded[0]["reason"]
    res = fit_all(kept, "chinchilla", top_k=20, n_boot=0)
    assert res["data"]["excluded"][0]["label"] == "row 7"
    assert abs(res["laws"]["chinchilla_approach3"]["params"]["beta"]["value"] - HOFF["beta"]) < 0.02


def _csv(tmp_path, rows, header="N,D,loss"):
    p = tmp_path / "bad.csv"
    p.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return str(p)


@pytest.mark.parametrize("case,rows,extra,msg", [
    ("too few points", [(1e8, 1e9, 3.0)] * 4, [], "at least 5"),
    ("non-positive N", [(1e8, 1e9, 3.0)] * 5 + [(0, 1e9, 3.0)], [], "N=0 must be positive"),
    ("negative loss", [(1e8, 1e9, 3.0)] * 5 + [(1e8, 1e9, -1)], [], "loss=-1 must be positive"),
    ("NaN loss", [(1e8, 1e9, 3.0)] * 5 + [(1e8, 1e9, "nan")], [], "--drop-nonfinite"),
    ("missing column", [(1e8, 1e9, 3.0)] * 6, ["--loss-col", "val"], "'val' is not a column"),
    ("text value", [(1e8, 1e9, 3.0)] * 5 + [(1e8, "x", 3.0)], [], "not a number"),
    ("one model size", [(1e8, 10 ** (8 + k), 4.0 - 0.3 * k) for k in range(8)], [],
     "1 model size(s)"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, case, rows, extra, msg):
    path = _csv(tmp_path, rows)
    args = ["scaling", "fit", "--csv", path, "--n-col", "N", "--d-col", "D", "--loss-col", "loss",
            "--law", "chinchilla", "--quiet", *extra]
    assert cli.main(args) == 2, case
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and msg in err, err


def test_nan_row_dropped_on_request_and_recorded(tmp_path):
    pts = chinchilla_points(20, seed=8)
    rows = [(n, d, l) for n, d, l in zip(pts.N, pts.D, pts.loss)] + [(1e8, 1e9, "nan")]
    kept = exclude(read_csv(_csv(tmp_path, rows), "N", "loss", d_col="D"), drop_nonfinite=True)
    assert len(kept) == 20 and "non-finite" in kept.excluded[0]["reason"]


# ----------------------------------------------------------------------------------------------
# Degenerate inputs and fits: warnings (one line each on stderr) and strict JSON, never a crash


def strict_json(path) -> dict:
    """The file as JSON, failing on NaN/Infinity (what json.dumps(allow_nan=False) rules out)."""
    def reject(token):
        raise AssertionError(f"{path} holds {token}, which is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=reject)


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def test_runs_with_null_or_nonfinite_loss_are_skipped_with_one_counted_warning(tmp_path, capsys):
    dirs = write_run_grid(tmp_path / "ok")
    bad = {"null_loss": "null", "nan_loss": "NaN", "crashed": None}
    for name, loss in bad.items():
        write_run(tmp_path / name, 4, 128, 1e9, hoff_loss, summary=loss is not None)
        if loss is None:  # died before its first log line
            (tmp_path / name / "metrics.jsonl").unlink()
            (tmp_path / name / "eval.jsonl").unlink()
        else:
            summary = read_summary(tmp_path / name)
            text = json.dumps({**summary, "final_val_loss": "LOSS"})
            (tmp_path / name / "summary.json").write_text(text.replace('"LOSS"', loss))
    out = tmp_path / "fit.json"
    args = ["scaling", "fit", *dirs, *(str(tmp_path / n) for n in bad), "--law", "chinchilla",
            "--bootstrap", "0", "--top-k", "20", "--json", str(out), "--quiet"]
    assert cli.main(args) == 0
    warned = warning_lines(capsys.readouterr().err)
    skipped = [w for w in warned if "skipped 3 of 21 run(s)" in w]
    assert len(skipped) == 1 and all(n in skipped[0] for n in bad), warned
    res = strict_json(out)
    assert res["data"]["points"] == 18 and skipped[0][len("warning: "):] in res["warnings"]
    assert sorted(Path(e["label"]).name for e in res["data"]["excluded"]) == sorted(bad)
    assert all(e["loss"] is None for e in res["data"]["excluded"])
    a3 = res["laws"]["chinchilla_approach3"]["params"]
    assert abs(a3["alpha"]["value"] - HOFF["alpha"]) < 0.02  # the 18 good runs, as without them
    assert cli.main(["scaling", "fit", *(str(tmp_path / n) for n in bad), "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()  # why nothing is left, then that it is too few
    assert len(err) == 2 and "skipped 3 of 3 run(s)" in err[0], err
    assert err[1].startswith("error: 0 run(s)"), err


def rising_in_N_points(n=40, seed=0):
    """L = 1 + 0.05 N^0.1 + 400 / D^0.3: loss grows with N, so approach 3's alpha is -0.1 and
    no compute-optimal frontier exists (G = (alpha A / (beta B))^(1/(alpha+beta)) is complex)."""
    rng = np.random.default_rng(seed)
    N, D = 10 ** rng.uniform(7, 10, n), 10 ** rng.uniform(8, 12, n)
    L = (1.0 + 0.05 * N ** 0.1 + 400 / D ** 0.3) * np.exp(rng.normal(0, NOISE, n))
    return make_points(N, D, L)


def test_negative_exponent_warns_and_writes_null_frontier_in_strict_json(tmp_path, capsys):
    pts = rising_in_N_points()
    path = _csv(tmp_path, zip(pts.N, pts.D, pts.loss))
    out = tmp_path / "fit.json"
    args = ["scaling", "fit", "--csv", path, "--n-col", "N", "--d-col", "D", "--loss-col", "loss",
            "--law", "chinchilla", "--bootstrap", "5", "--top-k", "10", "--json", str(out),
            "--plot", str(tmp_path / "f.png"), "--quiet"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    res = strict_json(out)
    a3 = res["laws"]["chinchilla_approach3"]
    assert a3["params"]["alpha"]["value"] < 0 and a3["frontier"] is None
    assert a3["derived"]["G"]["value"] is None
    warned = warning_lines(captured.err)
    assert [w[len("warning: "):] for w in warned] == res["warnings"]
    assert any("chinchilla_approach3" in w and "alpha" in w and "negative" in w for w in warned)
    assert any("chinchilla_approach3" in w and "frontier" in w for w in warned)
    assert (tmp_path / "f.png").is_file()
    with pytest.raises(ConfigError, match="no law with a compute-optimal frontier"):
        budget.plan([1e21], str(out))


def test_one_model_size_fits_the_laws_in_D_and_warns_about_the_others(tmp_path, capsys):
    rng = np.random.default_rng(11)
    D = 10 ** rng.uniform(8, 12, 30)
    L = LAWS["kaplan_LD"].predict(TRUTH["kaplan_LD"], D=D) * np.exp(rng.normal(0, NOISE, 30))
    path = _csv(tmp_path, [(1e8, d, l) for d, l in zip(D, L)])
    out = tmp_path / "fit.json"
    args = ["scaling", "fit", "--csv", path, "--n-col", "N", "--d-col", "D", "--loss-col", "loss",
            "--law", "all", "--bootstrap", "0", "--top-k", "20", "--json", str(out), "--quiet"]
    assert cli.main(args) == 0
    res = strict_json(out)
    ld = res["laws"]["kaplan_LD"]
    assert ld["status"] == "ok" and abs(ld["params"]["alpha_D"]["value"] - 0.25) < 0.02
    need_sizes = ["kaplan_LN", "kaplan_LND", "chinchilla_approach1", "chinchilla_approach2",
                  "chinchilla_approach3"]
    for name in need_sizes:
        assert res["laws"][name]["status"] == "insufficient", name
        assert "model size" in res["laws"][name]["reason"], res["laws"][name]["reason"]
    warned = warning_lines(capsys.readouterr().err)
    assert all(any(w.startswith(f"warning: {n} not fitted") for w in warned) for n in need_sizes)


def test_excluded_nonfinite_points_and_infinite_options_still_give_strict_json(tmp_path):
    pts = chinchilla_points(20, seed=8)
    rows = [(n, d, l) for n, d, l in zip(pts.N, pts.D, pts.loss)] + [(1e8, 1e9, "nan")]
    out = tmp_path / "fit.json"
    args = ["scaling", "fit", "--csv", _csv(tmp_path, rows), "--n-col", "N", "--d-col", "D",
            "--loss-col", "loss", "--law", "kaplan", "--drop-nonfinite", "--max-loss", "inf",
            "--bootstrap", "0", "--top-k", "5", "--json", str(out), "--quiet"]
    assert cli.main(args) == 0
    res = strict_json(out)
    assert res["data"]["excluded"][0]["loss"] is None and res["options"]["max_loss"] is None


def test_scaling_demo_refuses_budgets_below_one_training_step(tmp_path):
    """BUDGETS below one optimizer step of the largest size: a clear message before training."""
    env = {**os.environ, "BUDGETS": "1e9", "SIZES": "400K",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(ROOT / "examples" / "scaling_demo.sh"), str(tmp_path / "d")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "BUDGETS" in r.stderr and "one training step" in r.stderr, r.stderr
    assert not (tmp_path / "d" / "runs").exists()


def test_missing_run_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_runs([tmp_path / "nope"])


# ----------------------------------------------------------------------------------------------
# plan and sweep


@pytest.mark.parametrize("name", ["chinchilla_approach3", "kaplan_LND"])
def test_frontier_matches_numerical_minimisation(name):
    law, p = LAWS[name], TRUTH[name]
    for C in (1e19, 1e22, 1e25):
        N, D = law.frontier(p, np.array([C]))
        f = (lambda x: law.predict(p, N=[np.exp(x)], D=[C / (6 * np.exp(x))])[0])
        best = minimize_scalar(f, bounds=(np.log(1e3), np.log(1e15)), method="bounded",
                               options={"xatol": 1e-10})
        assert np.log(N[0]) == pytest.approx(best.x, abs=1e-3)
        assert N[0] * D[0] * 6 == pytest.approx(C)


def test_plan_default_is_hoffmann_and_fit_json_gives_intervals(tmp_path, capsys):
    res = budget.plan([5.76e23])  # Chinchilla's own budget
    row = res["budgets"][0]
    law = LAWS["chinchilla_approach3"]
    f = (lambda x: law.predict(HOFF, N=[np.exp(x)], D=[5.76e23 / (6 * np.exp(x))])[0])
    best = minimize_scalar(f, bounds=(np.log(1e6), np.log(1e14)), method="bounded")
    assert np.log(row["N_opt"]) == pytest.approx(best.x, abs=1e-3)
    assert row["N_ci95"] is None
    fit = fit_all(chinchilla_points(60, seed=9), "chinchilla", top_k=20, n_boot=30)
    (tmp_path / "fit.json").write_text(json.dumps(fit))
    res = budget.plan([1e21], str(tmp_path / "fit.json"))
    r = res["budgets"][0]
    assert res["law"] == "chinchilla_approach3" and res["bootstrap_samples"] == 30
    assert r["N_ci95"][0] < r["N_opt"] < r["N_ci95"][1]
    n_true = law.frontier(HOFF, np.array([1e21]))[0][0]
    assert r["N_ci95"][0] < n_true < r["N_ci95"][1]
    assert cli.main(["scaling", "plan", "--budget", "1e21,1e22"]) == 0
    assert "hoffmann2022" in capsys.readouterr().out


def test_sweep_writes_configs_the_trainer_accepts(tmp_path):
    base = load_config(None)
    base.model.n_kv_heads = 2
    save_config(base, tmp_path / "base.yaml")
    rows = budget.sweep(str(tmp_path / "base.yaml"), [1e15, 1e16], [1e6, 4e6], tmp_path / "sw")
    assert len(rows) == 4
    tokens_per_step = base.train.global_batch_size * base.train.seq_len
    for r in rows:
        cfg = load_config(r["config"])
        m = cfg.model
        assert m.d_model % m.n_heads == 0 and m.head_dim == base.model.head_dim
        assert m.n_heads % m.kv_heads == 0
        N = 12 * m.n_layers * m.d_model ** 2
        assert abs(np.log(N / r["N_target"])) < np.log(1.3)
        D = cfg.train.steps * tokens_per_step
        assert abs(np.log(6 * N * D / r["C_target"])) < 0.05
        assert cfg.logging.run_dir == str(tmp_path / "sw" / "runs" / r["name"])
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["points"] == rows
    auto = budget.sweep(str(tmp_path / "base.yaml"), [1e16], None, tmp_path / "auto", points=5)
    n_opt = budget.plan([1e16])["budgets"][0]["N_opt"]
    sizes = sorted(r["N_target"] for r in auto)
    assert sizes[2] == pytest.approx(n_opt) and sizes[0] == pytest.approx(n_opt / 4)


def test_cli_contract_and_tools_script(tmp_path):
    import argparse
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["scaling", "plan", "--budget", "1e20"])
    assert args.func is cli.run_plan
    out = subprocess.run([sys.executable, "tools/fit_scaling_laws.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--c-col" in out.stdout and "--drop-highest-loss" in out.stdout
    pts = chinchilla_points(30, seed=10)
    path = tmp_path / "p.csv"
    path.write_text("n,d,l\n" + "".join(f"{a},{b},{c}\n" for a, b, c in
                                        zip(pts.N, pts.D, pts.loss)))
    out = subprocess.run([sys.executable, "tools/fit_scaling_laws.py", "--csv", str(path),
                          "--n-col", "n", "--d-col", "d", "--loss-col", "l", "--law", "kaplan",
                          "--bootstrap", "0", "--top-k", "10", "--quiet"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "kaplan_LND" in out.stdout
    bad = subprocess.run([sys.executable, "tools/fit_scaling_laws.py", "--csv", str(path),
                          "--n-col", "n", "--loss-col", "l"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


def test_interval_ignores_complex_and_nonfinite_bootstrap_samples():
    """A degenerate resample can give a complex derived value (negative ** fraction); the
    interval is taken over the real, finite samples."""
    from llmtrain.scaling.fit import interval
    samples = np.array([1.0, 2.0, 3.0, complex(1, 1), np.nan] * 10, dtype=complex)
    lo, hi = interval(samples)
    assert 1.0 <= lo <= hi <= 3.0
    assert interval(np.array([np.nan, np.inf])) is None
