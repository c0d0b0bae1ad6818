"""`llmtrain ablate`: a 2-variant x 2-seed study of a few steps (plus a variant that fails),
its reports checked against the runs' own files; skipping finished runs; bad specs."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from conftest import tiny_overrides
from llmtrain.ablate import load_spec
from llmtrain.cli import main
from llmtrain.config import ConfigError


def write_spec(path: Path, **kw) -> Path:
    common = [s for s in tiny_overrides(path.parent / "unused", **{"train.log_every": 1})
              if not s.startswith(("logging.run_dir", "train.steps"))]
    spec = {"set": common, "seeds": 2, "budget": {"steps": 3},
            "variants": [{"name": "base"}, {"name": "gelu", "set": ["model.activation=gelu"]}]}
    spec.update(kw)
    path.write_text(yaml.safe_dump(spec))
    return path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


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
        finals = [json.loads((r / "summary.json").read_text())["final_val_loss"] for r in runs]
        assert finals == [jsonl(r / "eval.jsonl")[-1]["val_loss"] for r in runs]
        assert row["final_val_loss_mean"] == pytest.approx(statistics.mean(finals))
        assert row["final_val_loss_std"] == pytest.approx(statistics.stdev(finals))
        early = [jsonl(r / "metrics.jsonl")[0]["loss"] for r in runs]  # ceil(0.1 x 3) = step 1
        assert row["early_loss_mean"] == pytest.approx(statistics.mean(early))
        assert row["early_loss_std"] == pytest.approx(statistics.stdev(early))
        summary = json.loads((runs[0] / "summary.json").read_text())
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
