"""`llmtrain ablate SPEC.yaml`: a variants x seeds study at one shared budget (as Narang et al.
2021, "Do Transformer Modifications Transfer Across Implementations and Applications?").

A spec (YAML):

    base: ../tiny.yaml          # run config, relative to the spec file (null: the embedded default)
    set: [train.eval_every=0]   # overrides every variant gets (optional)
    seeds: 3                    # a count (seeds 0, 1, 2) or a list of train.seed values
    budget: {steps: 50}         # exactly one of steps, tokens, flops, shared by every variant
    early_fraction: 0.1         # where "early loss" is read (optional, default 0.1)
    variants:                   # the first one is the baseline
      - {name: baseline}
      - {name: gelu, set: [model.activation=gelu]}
    sizes:                      # used with --sizes only: 2-3 model sizes (optional per-size budget)
      - {name: s, set: [model.d_model=64, model.n_heads=4]}
      - {name: m, set: [model.d_model=128, model.n_heads=4]}

Budgets: `steps` runs every variant that many steps; `tokens` gives each variant
round(tokens / (global_batch_size x seq_len)) steps; `flops` (training FLOPs) gives each
round(flops / (flops_per_token x tokens per step)) steps, with the model's own flops_per_token.
A variant may not set train.steps itself (the budget decides it).

`--sizes` runs every variant at every size of `sizes` (overrides: spec.set, then the size's, then
the variant's) and adds each variant's compute multiplier against the baseline (the compute the
baseline needs to reach the variant's loss over the compute the variant spent; see
llmtrain/scaling/multiplier.py), from a power law fitted to the baseline's final validation loss
against training compute (flops_per_token x tokens) over its sizes and seeds. Steps and tokens
budgets apply to each size as they are (so compute grows with the model); a flops budget would
give every size the same compute, so with --sizes every size then needs its own `budget`.

Every variant x seed is one subprocess `python -m llmtrain train BASE --set ...` with run dir
`<out>/runs/<variant>/seed<k>` (`<out>/runs/<variant>/<size>/seed<k>` with --sizes; its stdout/stderr in stdout.log/stderr.log there), `--jobs` at
a time. A run whose summary.json exists is skipped; an interrupted one is started again in its
run dir and the trainer resumes from its last checkpoint. A failed run (non-zero exit) is
reported with status failed and its stderr tail, never dropped.

Reported per variant (report.md, report.csv, report.json, loss_curves.png in `<out>`), each
over the seeds that finished as mean and sample standard deviation (ddof 1):
  n_params, flops_per_token  from the runs' summary.json
  tokens_per_s               median of the logged tokens_per_s after the first logged step
  early_loss                 the training loss of the first logged step >= early_fraction x steps
  final_val_loss             summary.json's final validation loss
  delta                      final_val_loss mean minus the baseline's (at the same size), with
                             Welch's t-test (scipy.stats.ttest_ind, equal_var=False); `*` marks
                             p < 0.05
  multiplier (--sizes)       compute multiplier against the baseline's law, per size, and the
                             geometric mean over sizes
  best lr per width          with --sizes, for each family of variants that differ only in
                             optim.lr: every size's loss per lr, its best lr, and how many grid
                             steps the best lr moves across sizes (muP transfer, docs/mup.md)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from llmtrain.config import Config, ConfigError, load_config, parse_override, read_yaml_file

_SPEC_KEYS = ("base", "set", "seeds", "budget", "early_fraction", "variants", "sizes")
_BUDGETS = ("steps", "tokens", "flops")


@dataclass
class Variant:
    """A variant; after `load_spec`, one cell of the study: the variant at one size (or at the
    base config's size without --sizes), with the steps its budget gives it."""
    name: str
    overrides: list[str]
    steps: int = 0
    flops_per_token: int = 0
    size: str | None = None

    @property
    def label(self) -> str:
        return self.name if self.size is None else f"{self.name}@{self.size}"


@dataclass
class Size:
    name: str
    overrides: list[str]
    budget: tuple[str, float] | None = None


@dataclass
class Spec:
    path: Path
    base: Path | None
    overrides: list[str]
    seeds: list[int]
    budget: tuple[str, float]
    variants: list[Variant]
    early_fraction: float = 0.1
    sizes: list[Size] = field(default_factory=list)  # non-empty with --sizes only
    cells: list[Variant] = field(default_factory=list)  # variant-major: every variant x size


@dataclass
class Run:
    variant: str
    seed: int
    run_dir: Path
    cmd: list[str]
    size: str | None = None
    status: str = "pending"  # ok | failed | skipped (complete before this call)
    seconds: float = 0.0
    stderr_tail: str = ""
    summary: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Spec


def _string_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of KEY=VALUE strings, got {value!r}")
    for item in value:
        parse_override(item)
    return value


def flops_per_token(cfg: Config) -> int:
    """Training FLOPs per token of the model `cfg` describes (built on the meta device)."""
    import torch
    from llmtrain.model import EncoderDecoder, Transformer
    with torch.device("meta"):
        model = (EncoderDecoder(cfg.model) if cfg.model.arch == "encoder_decoder"
                 else Transformer(cfg.model))
    return int(model.flops_per_token(cfg.train.seq_len))


def _budget(budget: Any, where: str) -> tuple[str, float]:
    if (not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in _BUDGETS):
        raise ConfigError(f"{where}={budget!r} must name exactly one of steps, tokens or "
                          f"flops, e.g. {{steps: 100}}")
    kind, amount = next(iter(budget.items()))
    if isinstance(amount, str):
        try:
            amount = float(amount)
        except ValueError:
            pass
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
        raise ConfigError(f"{where}.{kind}={amount!r} must be a positive number")
    return kind, float(amount)


def _dir_name(name: str, where: str, taken: set[str]) -> str:
    if not name or "/" in name or name in taken or name.startswith("."):
        raise ConfigError(f"{where}.name={name!r} must be a unique, non-empty directory name")
    taken.add(name)
    return name


def _check_entry(item: Any, where: str, keys: tuple[str, ...],
                 hints: dict[str, str] | None = None) -> None:
    """A variant or size entry: a mapping with a name and no keys but `keys`."""
    if not isinstance(item, dict) or "name" not in item:
        raise ConfigError(f"{where} must be a mapping with a name (and optional "
                          f"{', '.join(keys[1:])}), got {item!r}")
    bad = [k for k in item if k not in keys]
    if bad:
        raise ConfigError(f"{where} ({item['name']}) has unknown key {bad[0]!r}; valid keys: "
                          f"{', '.join(keys)}{(hints or {}).get(bad[0], '')}")


def _sizes(raw: Any, budget: tuple[str, float]) -> list[Size]:
    if not isinstance(raw, list) or len(raw) < 2:
        raise ConfigError(f"spec.sizes={raw!r} must list two or more model sizes, e.g. "
                          f"[{{name: s, set: [model.d_model=64]}}, {{name: m, set: "
                          f"[model.d_model=128]}}]")
    sizes, names = [], set()
    for i, s in enumerate(raw):
        where = f"spec.sizes[{i}]"
        _check_entry(s, where, ("name", "set", "budget"))
        name = _dir_name(str(s["name"]), where, names)
        own = _budget(s["budget"], f"{where}.budget") if "budget" in s else None
        if own is None and budget[0] == "flops":
            raise ConfigError(f"{where} ({name}) has no budget of its own, and spec.budget.flops "
                              f"would give every size the same compute; give each size a "
                              f"budget or use a steps or tokens budget")
        sizes.append(Size(name, _string_list(s.get("set"), f"{where}.set"), own))
    return sizes


def _read_spec(p: Path, path: str | Path) -> dict:
    """The spec file's mapping, with no key but `_SPEC_KEYS`."""
    data = read_yaml_file(p, "ablation spec")
    if not isinstance(data, dict):
        raise ConfigError(f"ablation spec {str(path)!r} must be a mapping with keys "
                          f"{', '.join(_SPEC_KEYS)}")
    unknown = [k for k in data if k not in _SPEC_KEYS]
    if unknown:
        raise ConfigError(f"unknown ablation spec key {unknown[0]!r}; valid keys: "
                          f"{', '.join(_SPEC_KEYS)}")
    return data


def _base(data: dict, p: Path) -> Path | None:
    """spec.base, relative to the spec file; None for the embedded default config."""
    base = data.get("base")
    base = None if base is None else (p.parent / str(base)).resolve()
    if base is not None and not base.is_file():
        raise ConfigError(f"spec.base={data['base']!r} does not exist (relative to the spec)")
    return base


def _seeds(data: dict) -> list[int]:
    seeds = data.get("seeds", 1)
    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1:
        seeds = list(range(seeds))
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"spec.seeds={data.get('seeds')!r} must be a count >= 1 or a list of "
                          f"distinct integers >= 0")
    return seeds


def _early_fraction(data: dict) -> float:
    early = data.get("early_fraction", 0.1)
    if isinstance(early, bool) or not isinstance(early, (int, float)) or not 0 < early <= 1:
        raise ConfigError(f"spec.early_fraction={early!r} must be in (0, 1]")
    return float(early)


def _variants(raw: Any, kind: str) -> list[Variant]:
    """spec.variants; none may set train.steps, which the budget (of `kind`) decides."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("spec.variants is empty; list at least one {name: ..., set: [...]} "
                          "(the first is the baseline)")
    variants, names = [], set()
    for i, v in enumerate(raw):
        where = f"spec.variants[{i}]"
        _check_entry(v, where, ("name", "set"),
                     {"budget": "; one budget (spec.budget) is shared by every variant"})
        name = _dir_name(str(v["name"]), where, names)
        sets = _string_list(v.get("set"), f"{where}.set")
        if any(parse_override(s)[0] == "train.steps" for s in sets):
            raise ConfigError(f"{where} ({name}) sets train.steps, but spec.budget.{kind} "
                              f"decides every variant's steps; remove it")
        variants.append(Variant(name, sets))
    return variants


def _spec_sizes(data: dict, sizes: bool, budget: tuple[str, float],
                path: str | Path) -> list[Size]:
    """spec.sizes with --sizes, else none; checked either way, so that a bad entry is found
    before a later --sizes run."""
    if sizes:
        if "sizes" not in data:
            raise ConfigError(f"--sizes needs spec.sizes in {str(path)!r}: a list of 2-3 "
                              f"{{name: ..., set: [...]}} model sizes")
        return _sizes(data["sizes"], budget)
    if "sizes" in data:
        _sizes(data["sizes"], budget)
    return []


def _budget_steps(kind: str, amount: float, tokens_per_step: int, flops_per_token: int) -> int:
    if kind == "steps":
        return int(amount)
    if kind == "tokens":
        return round(amount / tokens_per_step)
    return round(amount / (flops_per_token * tokens_per_step))


def _cell(spec: Spec, i: int, v: Variant, size: Size | None) -> Variant:
    """Variant `v` (spec.variants[i]) at `size` (None: the base config's), with its steps."""
    cell = Variant(v.name, v.overrides, size=size.name if size else None)
    size_sets = size.overrides if size else []
    try:
        cfg = load_config(spec.base, [*spec.overrides, *size_sets, *v.overrides])
    except ConfigError as e:
        at = f" at size {size.name}" if size else ""
        raise ConfigError(f"spec.variants[{i}] ({v.name}){at}: {e}") from None
    cell.flops_per_token = flops_per_token(cfg)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    b_kind, b_amount = size.budget if size and size.budget else spec.budget
    cell.steps = _budget_steps(b_kind, b_amount, tokens_per_step, cell.flops_per_token)
    if cell.steps < 1:
        raise ConfigError(f"budget {b_kind}={b_amount:g} is less than one step of "
                          f"{cell.label} ({tokens_per_step} tokens, "
                          f"{cell.flops_per_token:,} FLOPs per token)")
    cell.overrides = [*size_sets, *v.overrides]
    return cell


def load_spec(path: str | Path, sizes: bool = False) -> Spec:
    """Read and check a spec; resolve every cell's config (each variant, at each size with
    `sizes`) and its steps under the budget."""
    p = Path(path)
    data = _read_spec(p, path)
    base = _base(data, p)
    common = _string_list(data.get("set"), "spec.set")
    seeds = _seeds(data)
    budget = _budget(data.get("budget"), "spec.budget")
    early = _early_fraction(data)
    variants = _variants(data.get("variants"), budget[0])
    size_list = _spec_sizes(data, sizes, budget, path)

    spec = Spec(p, base, common, seeds, budget, variants, early, size_list)
    for i, v in enumerate(spec.variants):
        for size in size_list or [None]:
            spec.cells.append(_cell(spec, i, v, size))
    if not size_list:  # one cell per variant: the variants carry their steps, as before
        spec.variants = spec.cells
    return spec


# How a run is started: a fresh interpreter per run, so that runs share no state. (The tests
# swap in their fork server, which starts the same `llmtrain.cli.main` without re-importing.)
LLMTRAIN = [sys.executable, "-m", "llmtrain"]


def plan_runs(spec: Spec, out: Path) -> list[Run]:
    runs = []
    for v in spec.cells:
        for seed in spec.seeds:
            run_dir = out / "runs" / v.name / (v.size or "") / f"seed{seed}"
            sets = [*spec.overrides, *v.overrides, f"train.steps={v.steps}",
                    f"train.seed={seed}", f"logging.run_dir={run_dir}", "logging.progress=false"]
            cmd = [*LLMTRAIN, "train",
                   *([str(spec.base)] if spec.base else []),
                   *sum((["--set", s] for s in sets), [])]
            runs.append(Run(v.name, seed, run_dir, cmd, v.size))
    return runs


# ----------------------------------------------------------------------------------------------
# Running


def _execute(run: Run, env: dict[str, str]) -> Run:
    summary = run.run_dir / "summary.json"
    if summary.is_file():
        run.status = "skipped"
        run.summary = json.loads(summary.read_text())
        return run
    run.run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run.run_dir / "stdout.log", "a") as out, open(run.run_dir / "stderr.log", "a") as err:
        rc = subprocess.call(run.cmd, stdout=out, stderr=err, env=env)
    run.seconds = time.perf_counter() - t0
    if rc == 0 and summary.is_file():
        run.status = "ok"
        run.summary = json.loads(summary.read_text())
    else:
        run.status = "failed"
        text = (run.run_dir / "stderr.log").read_text(errors="replace")
        run.stderr_tail = f"exit code {rc}; " + text[-2000:]
    return run


def execute(runs: list[Run], jobs: int = 1, log=print) -> list[Run]:
    """Run (or skip) every run, `jobs` at a time, printing one progress line per run."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    done = 0

    def one(run: Run) -> Run:
        nonlocal done
        _execute(run, env)
        done += 1
        what = {"skipped": "complete already, skipped", "ok": f"done in {run.seconds:.1f} s",
                "failed": f"FAILED after {run.seconds:.1f} s (see {run.run_dir / 'stderr.log'})"}
        val = run.summary.get("final_val_loss")
        loss = f", final validation loss {val:.4f}" if isinstance(val, float) else ""
        at = f" at size {run.size}" if run.size else ""
        log(f"[{done}/{len(runs)}] {run.variant}{at} seed {run.seed}: {what[run.status]}"
            f"{loss if run.status != 'failed' else ''}", flush=True)
        return run

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, runs))


# ----------------------------------------------------------------------------------------------
# Reading runs and reporting


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_metrics(run_dir: Path, steps: int, early_fraction: float) -> dict[str, Any]:
    """early_loss, tokens_per_s and the loss curve of one run, from its metrics.jsonl."""
    recs = [r for r in _jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    by_step = {r["step"]: r for r in recs}  # a resumed run may log a step twice: keep the last
    recs = [by_step[s] for s in sorted(by_step)]
    target = math.ceil(early_fraction * steps)
    early = next((r["loss"] for r in recs if r["step"] >= target), None)
    tps = [r["tokens_per_s"] for r in recs[1:] if "tokens_per_s" in r] or \
          [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    tps.sort()
    median = None
    if tps:
        mid = len(tps) // 2
        median = tps[mid] if len(tps) % 2 else 0.5 * (tps[mid - 1] + tps[mid])
    return {"early_loss": early, "tokens_per_s": median,
            "curve": [(r["step"], r.get("tokens", 0), r["loss"]) for r in recs]}


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; 0 for one value); None for no values."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p of Welch's t-test (None with fewer than 2 values a side or no variance)."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import ttest_ind
    p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def summarize(spec: Spec, runs: list[Run]) -> dict[str, Any]:
    rows = []
    for v in spec.cells:
        mine = [r for r in runs if r.variant == v.name and r.size == v.size]
        per_run = []
        for r in mine:
            m = run_metrics(r.run_dir, v.steps, spec.early_fraction)
            rec = {"seed": r.seed, "status": "ok" if r.status in ("ok", "skipped") else "failed",
                   "run_dir": str(r.run_dir), "final_val_loss": r.summary.get("final_val_loss"),
                   "early_loss": m["early_loss"], "tokens_per_s": m["tokens_per_s"],
                   "seconds": round(r.seconds, 2), "curve": m["curve"]}
            if r.status == "failed":
                rec["stderr_tail"] = r.stderr_tail
            per_run.append(rec)
        ok = [p for p, r in zip(per_run, mine) if p["status"] == "ok"]
        summ = next((r.summary for r in mine if r.summary), {})
        row = {"name": v.name, "size": v.size, "overrides": v.overrides, "steps": v.steps,
               "status": "ok" if len(ok) == len(mine) else f"failed {len(mine) - len(ok)}/"
                                                           f"{len(mine)}",
               "seeds_ok": len(ok), "n_params": summ.get("n_params"),
               "flops_per_token": summ.get("flops_per_token", v.flops_per_token),
               "tokens": summ.get("tokens")}
        for key in ("tokens_per_s", "early_loss", "final_val_loss"):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([p[key] for p in ok])
        row["final_val_losses"] = [p["final_val_loss"] for p in ok]
        fpt, tokens = row["flops_per_token"], row["tokens"]
        row["compute"] = fpt * tokens if fpt and tokens else None  # training FLOPs of one run
        row["runs"] = per_run
        rows.append(row)
    baseline = spec.cells[0].name
    for row in rows:
        base = next(b for b in rows if b["name"] == baseline and b["size"] == row["size"])
        if row is base or row["final_val_loss_mean"] is None or base["final_val_loss_mean"] is None:
            row["delta"], row["p_value"], row["significant"] = None, None, False
            continue
        row["delta"] = row["final_val_loss_mean"] - base["final_val_loss_mean"]
        row["p_value"] = welch_p(row["final_val_losses"], base["final_val_losses"])
        row["significant"] = row["p_value"] is not None and row["p_value"] < 0.05
    kind, amount = spec.budget
    report = {"spec": str(spec.path), "base": str(spec.base) if spec.base else None,
              "budget": {kind: amount}, "seeds": spec.seeds,
              "early_fraction": spec.early_fraction, "baseline": baseline, "variants": rows}
    if spec.sizes:
        report["sizes"] = [{"name": z.name, "set": z.overrides,
                            "budget": dict([z.budget]) if z.budget else None} for z in spec.sizes]
        report["scaling"] = scaling_summary(spec, rows)
        sweep = lr_sweep(spec, rows)
        if sweep:
            report["lr_sweep"] = sweep
    return report


def lr_sweep(spec: Spec, rows: list[dict]) -> list[dict]:
    """The best lr per size of each family of variants that differ only in optim.lr (a family
    with two or more lrs; its label: the variants' other overrides, less the sizes'). Per
    family: the lr grid (ascending), each size's final validation loss per lr and its best lr,
    and `moved`: how many grid steps apart the best lrs of the sizes lie (0: the same lr at
    every size). [] when no family sweeps lr."""
    families: dict[str, dict] = {}
    size_keys = {parse_override(o)[0] for z in spec.sizes for o in z.overrides}
    for row in rows:
        sets = dict(parse_override(o) for o in row["overrides"])
        if "optim.lr" not in sets:
            continue
        lr = float(sets.pop("optim.lr"))
        label = " ".join(f"{k}={v}" for k, v in sets.items() if k not in size_keys) \
            or "(base config)"
        fam = families.setdefault(label, {"family": label, "lrs": set(), "sizes": {}})
        fam["lrs"].add(lr)
        loss = row["final_val_loss_mean"]
        fam["sizes"].setdefault(row["size"], {})[lr] = loss
    out = []
    for fam in families.values():
        if len(fam["lrs"]) < 2:
            continue
        grid = sorted(fam["lrs"])
        sizes = {}
        for size, losses in fam["sizes"].items():
            finite = {lr: v for lr, v in losses.items() if v is not None and math.isfinite(v)}
            best = min(finite, key=finite.get) if finite else None
            sizes[size] = {"losses": {str(lr): losses.get(lr) for lr in grid}, "best_lr": best}
        idx = [grid.index(z["best_lr"]) for z in sizes.values() if z["best_lr"] is not None]
        out.append({"family": fam["family"], "lrs": grid, "sizes": sizes,
                    "moved": max(idx) - min(idx) if idx else None})
    return out


def _fit(rows: list[dict]):
    """The loss-compute law through the finished runs of `rows`, or the reason there is none."""
    from llmtrain.scaling.multiplier import fit_loss_compute
    pts = [(row["compute"], loss) for row in rows if row["compute"]
           for loss in row["final_val_losses"] if loss is not None]
    try:
        return fit_loss_compute([c for c, _ in pts], [y for _, y in pts]), None
    except ValueError as e:
        return None, str(e)


def scaling_summary(spec: Spec, rows: list[dict]) -> dict[str, Any]:
    """Each cell's compute multiplier against the baseline's law (set on the rows), each
    variant's own exponent and geometric-mean multiplier."""
    from llmtrain.scaling.multiplier import compute_multiplier, geometric_mean
    baseline = spec.cells[0].name
    law, why = _fit([r for r in rows if r["name"] == baseline])
    out: dict[str, Any] = {"baseline_law": law.as_dict() if law else None,
                           "note": None if law else f"no baseline law: {why}", "variants": {}}
    for v in spec.variants:
        mine = [r for r in rows if r["name"] == v.name]
        for row in mine:
            row["multiplier"], row["extrapolated"] = None, None
            if law and row["compute"] and row["final_val_loss_mean"] is not None:
                m = compute_multiplier(law, row["compute"], row["final_val_loss_mean"])
                row["multiplier"], row["extrapolated"] = m["multiplier"], m["extrapolated"]
        own, own_why = _fit(mine)
        out["variants"][v.name] = {
            "alpha": own.alpha if own else None, "alpha_note": own_why,
            "multiplier_geomean": geometric_mean(r["multiplier"] for r in mine),
            "multipliers": {r["size"]: r["multiplier"] for r in mine}}
    return out


def _fmt(m: float | None, s: float | None, digits: int = 4) -> str:
    if m is None:
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _fmt_delta(row: dict) -> str:
    if row["delta"] is None:
        return "-"
    p = "" if row["p_value"] is None else f" (p={row['p_value']:.3f})"
    return f"{row['delta']:+.4f}{' *' if row['significant'] else ''}{p}"


def write_reports(report: dict[str, Any], out: Path) -> None:
    rows = report["variants"]
    (out / "report.json").write_text(json.dumps(report, indent=1))
    sized = "sizes" in report
    cols = ["name", *(["size"] if sized else []), "status", "seeds_ok", "steps", "tokens",
            "n_params", "flops_per_token", "compute", "tokens_per_s_mean", "tokens_per_s_std",
            "early_loss_mean", "early_loss_std", "final_val_loss_mean", "final_val_loss_std",
            "delta", "p_value", "significant", *(["multiplier", "extrapolated"] if sized else [])]
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row in rows:
            w.writerow(["" if row.get(c) is None else row[c] for c in cols])
    kind, amount = next(iter(report["budget"].items()))
    lines = [f"# Ablation: {Path(report['spec']).name}", "",
             f"Budget {kind} = {amount:g} per run, seeds {report['seeds']}; baseline "
             f"`{report['baseline']}`. Mean ± sample std over the seeds that finished; early "
             f"loss = training loss at the first logged step >= {report['early_fraction']:g} x "
             f"steps; Δ = final validation loss minus the baseline's"
             f"{' at the same size' if sized else ''}, * = Welch's t-test p < 0.05.", "",
             "| variant | status | params | FLOPs/token | steps | tokens/s | early loss | "
             "final val loss | Δ vs baseline |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        label = row["name"] if row["size"] is None else f"{row['name']} @ {row['size']}"
        params = f"{row['n_params']:,}" if row["n_params"] else "-"
        fpt = f"{row['flops_per_token']:,}" if row["flops_per_token"] else "-"
        tps = "-" if row["tokens_per_s_mean"] is None else \
            f"{row['tokens_per_s_mean']:,.0f} ± {row['tokens_per_s_std']:,.0f}"
        lines.append(f"| {label} | {row['status']} | {params} | {fpt} | {row['steps']} | "
                     f"{tps} | {_fmt(row['early_loss_mean'], row['early_loss_std'])} | "
                     f"{_fmt(row['final_val_loss_mean'], row['final_val_loss_std'])} | "
                     f"{_fmt_delta(row)} |")
    if sized:
        lines += _multiplier_lines(report)
    if report.get("lr_sweep"):
        lines += lr_sweep_lines(report["lr_sweep"])
    failed = [(row["name"], r) for row in rows for r in row["runs"] if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""]
        for name, r in failed:
            tail = r["stderr_tail"].strip().splitlines()[-1:] or [""]
            lines.append(f"- {name} seed {r['seed']} ({r['run_dir']}): {tail[0][:300]}")
    if plot_curves(report, out / "loss_curves.png"):
        lines += ["", "![training loss curves](loss_curves.png)"]
    if sized and plot_compute(report, out / "loss_vs_compute.png"):
        lines += ["", "![final validation loss against training compute](loss_vs_compute.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _multiplier_lines(report: dict[str, Any]) -> list[str]:
    sc, sizes = report["scaling"], [z["name"] for z in report["sizes"]]
    lines = ["", "## Compute multiplier against the baseline", ""]
    law = sc["baseline_law"]
    if law is None:
        return lines + [f"None: {sc['note']}."]
    lines += [f"Baseline `{report['baseline']}`: L(C) = (C0 / C)^alpha fitted to its "
              f"{law['n_points']} finished runs (final validation loss against training FLOPs): "
              f"alpha = {law['alpha']:.4f}, C0 = 10^{law['log10_C0']:.1f}. Multiplier = the compute the "
              f"baseline needs to reach the variant's loss over the compute the variant spent "
              f"(> 1: the variant is better); † = the variant's loss lies outside the baseline's "
              f"range (extrapolated). alpha = the variant's own fitted exponent.", "",
              "| variant | alpha | " + " | ".join(f"× at {z}" for z in sizes)
              + " | geometric mean |",
              "| --- | ---: | " + " | ".join("---:" for _ in sizes) + " | ---: |"]
    rows = report["variants"]
    for name, v in sc["variants"].items():
        cells = []
        for z in sizes:
            row = next(r for r in rows if r["name"] == name and r["size"] == z)
            m = row.get("multiplier")
            cells.append("-" if m is None else f"{m:.3f}{' †' if row['extrapolated'] else ''}")
        alpha = "-" if v["alpha"] is None else f"{v['alpha']:.4f}"
        gm = "-" if v["multiplier_geomean"] is None else f"{v['multiplier_geomean']:.3f}"
        lines.append(f"| {name} | {alpha} | " + " | ".join(cells) + f" | {gm} |")
    return lines


def lr_sweep_lines(sweep: list[dict]) -> list[str]:
    lines = ["", "## Best lr per width", "",
             "Final validation loss per optim.lr (mean over seeds) at each size; **bold** = the "
             "best lr of that size. Moved = grid steps between the best lrs of the sizes."]
    for fam in sweep:
        grid = fam["lrs"]
        lines += ["", f"`{fam['family']}`: best lr moved {fam['moved']} grid step(s)", "",
                  "| size | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | best lr |",
                  "| --- | " + " | ".join("---:" for _ in grid) + " | ---: |"]
        for size, z in fam["sizes"].items():
            cells = []
            for lr in grid:
                v = z["losses"][str(lr)]
                cell = "-" if v is None else f"{v:.4f}"
                cells.append(f"**{cell}**" if lr == z["best_lr"] else cell)
            best = "-" if z["best_lr"] is None else f"{z['best_lr']:g}"
            lines.append(f"| {size} | " + " | ".join(cells) + f" | {best} |")
    return lines


def plot_compute(report: dict[str, Any], path: Path) -> bool:
    """Final validation loss against training FLOPs per variant (log-log; mean over seeds, every
    seed as a dot) with the baseline's fitted law dashed. False when nothing finished."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for name in report["scaling"]["variants"]:
        mine = [r for r in report["variants"] if r["name"] == name and r["compute"]
                and r["final_val_loss_mean"] is not None]
        if not mine:
            continue
        mine.sort(key=lambda r: r["compute"])
        line, = ax.plot([r["compute"] for r in mine], [r["final_val_loss_mean"] for r in mine],
                        marker="o", lw=1.2, label=name)
        for r in mine:
            ax.scatter([r["compute"]] * len(r["final_val_losses"]), r["final_val_losses"], s=8,
                       color=line.get_color(), alpha=0.5)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    law = report["scaling"]["baseline_law"]
    if law:
        import numpy as np
        cs = [r["compute"] for r in report["variants"] if r["compute"]]
        grid = np.geomspace(min(cs), max(cs), 50)
        ln_c0 = law["log10_C0"] * np.log(10)
        ax.plot(grid, np.exp(law["alpha"] * (ln_c0 - np.log(grid))), "k--", lw=1,
                label=f"baseline fit, alpha={law['alpha']:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter
    for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_formatter(FormatStrFormatter("%.2f"))  # plain losses, not 5.4 x 10^0
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final validation loss")
    return _save(fig, ax, path)


def _save(fig, ax, path: Path) -> bool:
    import matplotlib.pyplot as plt
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_curves(report: dict[str, Any], path: Path) -> bool:
    """Mean training loss per variant against training FLOPs (flops budget) or tokens, with the
    min-max spread over seeds shaded. False when no run logged a loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_flops = "flops" in report["budget"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for row in report["variants"]:
        curves = [r["curve"] for r in row["runs"] if r["status"] == "ok" and r["curve"]]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(s for s, _, _ in c) for c in curves)))
        if not steps:
            continue
        table = [dict((s, (t, loss)) for s, t, loss in c) for c in curves]
        x = [table[0][s][0] * (row["flops_per_token"] if by_flops else 1) for s in steps]
        ys = [[c[s][1] for c in table] for s in steps]
        mean = [sum(y) / len(y) for y in ys]
        label = row["name"] if row["size"] is None else f"{row['name']}@{row['size']}"
        line, = ax.plot(x, mean, label=label, lw=1.2)
        ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2,
                        color=line.get_color())
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("training FLOPs" if by_flops else "tokens")
    ax.set_ylabel("training loss")
    ax.set_title("mean over seeds, shaded: min-max")
    return _save(fig, ax, path)


# ----------------------------------------------------------------------------------------------
# CLI


def ablate(spec_path: str | Path, out: str | Path | None = None, jobs: int = 1,
           dry_run: bool = False, sizes: bool = False, log=print) -> int:
    spec = load_spec(spec_path, sizes=sizes)
    out = Path(out) if out else Path("runs") / "ablate" / Path(spec_path).stem
    runs = plan_runs(spec, out)
    kind, amount = spec.budget
    at = f" x {len(spec.sizes)} sizes" if spec.sizes else ""
    log(f"ablation {spec.path.name}: {len(spec.variants)} variants{at} x {len(spec.seeds)} seeds "
        f"= {len(runs)} runs, budget {kind} {amount:g}, output {out}", flush=True)
    if dry_run:
        for v in spec.cells:
            log(f"  {v.label}: {v.steps} steps, {v.flops_per_token:,} FLOPs/token, set "
                f"{' '.join(v.overrides) or '(baseline config)'}")
        for r in runs:
            state = "complete" if (r.run_dir / "summary.json").is_file() else "to run"
            log(f"  {r.run_dir} [{state}]: {' '.join(r.cmd)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    runs = execute(runs, jobs, log)
    report = summarize(spec, runs)
    write_reports(report, out)
    n_failed = sum(r.status == "failed" for r in runs)
    log(f"report: {out / 'report.md'}" + (f"; {n_failed} run(s) failed" if n_failed else ""))
    return 1 if n_failed else 0


def cmd_ablate(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise ConfigError(f"--jobs={args.jobs} must be >= 1")
    return ablate(args.spec, args.out, args.jobs, args.dry_run, args.sizes)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ablate", help="run a variants x seeds study at one shared budget and report it",
        description="Train every variant of SPEC (a YAML file: base config, variants with --set "
                    "overrides, seeds, one budget in steps, tokens or training FLOPs) for every "
                    "seed, skip finished runs, and write report.md/.csv/.json and "
                    "loss_curves.png. See docs/ablations.md.")
    p.add_argument("spec", help="ablation spec YAML")
    p.add_argument("--out", help="output directory (default runs/ablate/<spec name>)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the runs without starting them")
    p.add_argument("--sizes", action="store_true",
                   help="run every variant at each of spec.sizes and report its compute "
                        "multiplier against the baseline's loss-compute power law")
    p.set_defaults(func=cmd_ablate)
