"""`llmtrain ablate`: a 2-variant x 2-seed study of a few steps (plus a variant that fails),
its reports checked against the runs' own files; skipping finished runs; bad specs."""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from helpers import (FORK_RANKS, read_evals, read_metrics, read_summary, subprocess_env,
                     tiny_overrides)
from llmtrain import ablate
from llmtrain.ablate import load_spec
from llmtrain.cli import main
from llmtrain.config import ConfigError


@pytest.fixture(autouse=True)
def forked_runs(monkeypatch):
    """Each run forked from the test session's fork server (tests/fork_ranks.py: the same
    `llmtrain.cli.main` as `python -m llmtrain`, without importing torch again per run). The
    runs' OMP_NUM_THREADS is the server's (subprocess_env): ablate passes this process's
    environment on, and the server refuses a job whose OMP_* differs (fork_ranks.STARTUP_ENV),
    which then imported torch and llmtrain itself."""
    monkeypatch.setattr(ablate, "LLMTRAIN", [sys.executable, str(FORK_RANKS), "0"])
    monkeypatch.setenv("OMP_NUM_THREADS", subprocess_env()["OMP_NUM_THREADS"])


def write_spec(path: Path, **kw) -> Path:
    common = [s for s in tiny_overrides(path.parent / "unused", **{"train.log_every": 1})
              if not s.startswith(("logging.run_dir", "train.steps"))]
    spec = {"set": common, "seeds": 2, "budget": {"steps": 3},
            "variants": [{"name": "base"}, {"name": "gelu", "set": ["model.activation=gelu"]}]}
    spec.update(kw)
    path.write_text(yaml.safe_dump(spec))
    return path


def test_ablate_reports_and_skips(tmp_path, capsys):
    variants = [{"name": "base"}, {"name": "gelu", "set": ["model.activation=gelu"]},
                {"name": "broken", "set": ["data.source=indexed", "data.paths=[/nonexistent]"]}]
    spec = write_spec(tmp_path / "spec.yaml", variants=variants)
    out = tmp_path / "out"
    assert main(["ablate", str(spec), "--out", str(out), "--jobs", "2"]) == 1  # one failed
    progress = capsys.readouterr().out
    assert progress.count("seed") >= 6 and "FAILED" in progress
    for name in ("report.md", "report.csv", "report.json", "loss_curves.png"):
        assert (out / name).is_file(), name

    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    assert list(rows) == ["base", "gelu", "broken"] and report["baseline"] == "base"
    for name in ("base", "gelu"):
        row = rows[name]
        runs = [out / "runs" / name / f"seed{k}" for k in (0, 1)]
        finals = [read_summary(r)["final_val_loss"] for r in runs]
        assert finals == [read_evals(r)[-1]["val_loss"] for r in runs]
        assert row["final_val_loss_mean"] == pytest.approx(statistics.mean(finals))
        assert row["final_val_loss_std"] == pytest.approx(statistics.stdev(finals))
        early = [read_metrics(r)[0]["loss"] for r in runs]  # ceil(0.1 x 3) = step 1
        assert row["early_loss_mean"] == pytest.approx(statistics.mean(early))
        assert row["early_loss_std"] == pytest.approx(statistics.stdev(early))
        summary = read_summary(runs[0])
        assert row["n_params"] == summary["n_params"]
        assert row["flops_per_token"] == summary["flops_per_token"]
        assert row["status"] == "ok" and row["seeds_ok"] == 2 and row["steps"] == 3
        assert math.isfinite(row["tokens_per_s_mean"])
    gelu, base = rows["gelu"], rows["base"]
    assert gelu["delta"] == pytest.approx(gelu["final_val_loss_mean"] - base["final_val_loss_mean"])
    from scipy.stats import ttest_ind
    p = ttest_ind(gelu["final_val_losses"], base["final_val_losses"], equal_var=False).pvalue
    assert gelu["p_value"] == pytest.approx(p) and gelu["significant"] == (p < 0.05)
    broken = rows["broken"]
    assert broken["status"] == "failed 2/2" and broken["final_val_loss_mean"] is None
    assert all(r["status"] == "failed" and "data.paths" in r["stderr_tail"]
               for r in broken["runs"])

    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == ["base", "gelu", "broken"]
    assert float(table[1]["final_val_loss_mean"]) == pytest.approx(gelu["final_val_loss_mean"])
    md = (out / "report.md").read_text()
    assert "| gelu | ok |" in md and "| broken | failed 2/2 |" in md and "Failed runs" in md

    # second call: the four finished runs are skipped, the report is the same
    spec = write_spec(tmp_path / "spec.yaml", variants=variants[:2])
    assert main(["ablate", str(spec), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("complete already, skipped") == 4
    again = {r["name"]: r for r in json.loads((out / "report.json").read_text())["variants"]}
    assert again["gelu"]["final_val_loss_mean"] == gelu["final_val_loss_mean"]


def test_budgets_resolve_to_steps(tmp_path):
    spec = load_spec(write_spec(tmp_path / "a.yaml", budget={"tokens": 8 * 32 * 10}))
    assert [v.steps for v in spec.variants] == [10, 10]
    fpt = spec.variants[0].flops_per_token
    deeper = [{"name": "base"}, {"name": "deeper", "set": ["model.n_layers=4"]}]
    spec = load_spec(write_spec(tmp_path / "b.yaml", budget={"flops": fpt * 8 * 32 * 7},
                                variants=deeper))
    base, deep = spec.variants
    assert base.steps == 7 and base.flops_per_token == fpt
    # twice the layers: more FLOPs per token, so fewer steps for the same training FLOPs
    assert deep.flops_per_token > fpt and deep.steps == round(7 * fpt / deep.flops_per_token) < 7


def test_dry_run_starts_nothing(tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml")
    assert main(["ablate", str(spec), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "4 runs" in capsys.readouterr().out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"variants": []}, "spec.variants is empty"),
    ({"variants": [{"name": "a", "sett": ["model.norm=none"]}]}, "has unknown key 'sett'"),
    ({"variants": [{"name": "a", "set": ["model.n_layer=2"]}]},
     r"spec.variants\[0\] \(a\): unknown config key model.n_layer"),
    ({"variants": [{"name": "a"}, {"name": "b", "budget": {"steps": 5}}]},
     "one budget .* is shared by every variant"),
    ({"variants": [{"name": "a"}, {"name": "b", "set": ["train.steps=9"]}]},
     "sets train.steps, but spec.budget.steps decides"),
    ({"budget": {"steps": 3, "tokens": 100}}, "must name exactly one of steps, tokens or flops"),
    ({"budget": {"steps": 0}}, "must be a positive number"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "must be a unique"),
    ({"seeds": 0}, "spec.seeds=0"),
    ({"flavour": 1}, "unknown ablation spec key 'flavour'"),
])
def test_bad_specs_are_one_line_errors(change, message, tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", **change)
    with pytest.raises(ConfigError, match=message) as e:
        load_spec(spec)
    assert "\n" not in str(e.value)
    assert main(["ablate", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


# ----------------------------------------------------------------------------------------------
# --sizes: compute multipliers


def test_compute_multiplier_recovers_a_known_factor():
    """A variant whose loss at compute C is the baseline's at k x C is worth k x compute."""
    from llmtrain.scaling.multiplier import compute_multiplier, fit_loss_compute, geometric_mean
    alpha, c0, k = 0.07, 3e8, 1.7

    def base_loss(c):
        return (c0 / c) ** alpha
    cs = [1e12, 4e12, 1.6e13]
    law = fit_loss_compute(cs, [base_loss(c) for c in cs])
    assert law.alpha == pytest.approx(alpha)
    assert math.exp(law.log_compute_for(base_loss(2e12))) == pytest.approx(2e12)
    ms = [compute_multiplier(law, c, base_loss(k * c)) for c in cs]
    assert [m["multiplier"] for m in ms] == pytest.approx([k] * 3)
    # the largest size's variant loss is below every baseline loss: extrapolated
    assert [m["extrapolated"] for m in ms] == [False, False, True]
    assert geometric_mean([2.0, 8.0, None]) == pytest.approx(4.0)
    # a nearly flat baseline (alpha ~ 0.0014): C0 = e^1142 overflows a float, logs do not
    flat = fit_loss_compute([1e12, 4e12], [5.0, 4.99])
    assert flat.as_dict()["log10_C0"] > 300
    assert compute_multiplier(flat, 1e12, 4.995)["multiplier"] == pytest.approx(2.0, rel=0.01)
    with pytest.raises(ValueError, match="does not fall"):
        fit_loss_compute(cs, [3.0, 3.1, 3.2])
    with pytest.raises(ValueError, match="two or more different compute"):
        fit_loss_compute([1e12, 1e12], [3.0, 2.9])


def test_sizes_study_reports_compute_multipliers(tmp_path, capsys):
    """2 variants x 2 sizes x 1 seed (the larger size with its own, longer budget): every
    multiplier equals the one recomputed from the runs' summary.json files."""
    sizes = [{"name": "s", "set": ["model.d_model=32", "model.n_heads=2"]},
             {"name": "m", "set": ["model.d_model=64"], "budget": {"steps": 30}}]
    spec = write_spec(tmp_path / "spec.yaml", seeds=1, budget={"steps": 10}, sizes=sizes)
    out = tmp_path / "out"
    assert main(["ablate", str(spec), "--out", str(out), "--sizes"]) == 0
    assert "2 variants x 2 sizes x 1 seeds = 4 runs" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    rows = {(r["name"], r["size"]): r for r in report["variants"]}
    assert list(rows) == [("base", "s"), ("base", "m"), ("gelu", "s"), ("gelu", "m")]
    point = {}
    for (name, size), row in rows.items():
        summary = read_summary(out / "runs" / name / size / "seed0")
        assert row["steps"] == summary["steps"] == (10 if size == "s" else 30)
        point[name, size] = (summary["flops_per_token"] * summary["tokens"],
                             summary["final_val_loss"])
        assert row["compute"] == point[name, size][0]
    # the baseline's law through its two points, in closed form
    (c1, l1), (c2, l2) = point["base", "s"], point["base", "m"]
    alpha = -(math.log(l2) - math.log(l1)) / (math.log(c2) - math.log(c1))
    assert report["scaling"]["baseline_law"]["alpha"] == pytest.approx(alpha)
    for (name, size), row in rows.items():
        c, loss = point[name, size]
        expected = c1 * (loss / l1) ** (-1 / alpha) / c
        assert row["multiplier"] == pytest.approx(expected, rel=1e-6)
        assert row["extrapolated"] == (not min(l1, l2) <= loss <= max(l1, l2))
        if name == "base":  # two points: the baseline lies on its own law
            assert row["multiplier"] == pytest.approx(1.0)
    gelu = report["scaling"]["variants"]["gelu"]
    assert gelu["multiplier_geomean"] == pytest.approx(
        math.sqrt(rows["gelu", "s"]["multiplier"] * rows["gelu", "m"]["multiplier"]))
    md = (out / "report.md").read_text()
    assert "## Compute multiplier against the baseline" in md and "| gelu @ m | ok |" in md
    assert (out / "loss_vs_compute.png").is_file()
    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["name"], r["size"]) for r in table] == list(rows)
    assert float(table[3]["multiplier"]) == pytest.approx(rows["gelu", "m"]["multiplier"])


@pytest.mark.parametrize("change, message", [
    ({}, "--sizes needs spec.sizes"),
    ({"sizes": [{"name": "s"}]}, "must list two or more model sizes"),
    ({"sizes": [{"name": "s"}, {"name": "s"}]}, r"spec.sizes\[1\].name='s' must be a unique"),
    ({"sizes": [{"name": "s"}, {"name": "m", "sett": []}]}, "has unknown key 'sett'"),
    ({"sizes": [{"name": "s"}, {"name": "m", "set": ["model.d_model=65"]}]},
     r"spec.variants\[0\] \(base\) at size m: .*model.d_model"),
    ({"budget": {"flops": 1e12}, "sizes": [{"name": "s"}, {"name": "m"}]},
     r"spec.sizes\[0\] \(s\) has no budget of its own"),
])
def test_bad_sizes_are_one_line_errors(change, message, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", **change)
    with pytest.raises(ConfigError, match=message) as e:
        load_spec(spec, sizes=True)
    assert "\n" not in str(e.value)
