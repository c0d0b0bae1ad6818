"""Points to fit: read from run directories or a CSV, checked, with explicit exclusions.

A point is (N, D, C, loss). From a run directory (what `llmtrain train` leaves behind):
  * `summary.json` is preferred: n_params_nonembedding (or n_params with `total=True`), tokens,
    final_val_loss, flops_per_token;
  * otherwise N comes from `config.yaml` with the standard non-embedding count
    N = 12 * n_layers * d_model^2 (Kaplan et al. 2020, Table 1: attention 4 d^2 + MLP 8 d^2 per
    layer, biases and norms neglected); total adds the embedding vocab_size * d_model (twice when
    embeddings are untied, plus max_seq_len * d_model for learned positions);
  * D is the tokens seen (summary, else the last `tokens` in metrics.jsonl / eval.jsonl, else
    train.steps * global_batch_size * seq_len); the loss is the final validation loss (or the
    mean of the last k evaluations, "smoothed"); the training loss is used, and said so, only
    when a run has no evaluation at all;
  * C = 6 N D (Kaplan et al. 2020, eq. 2.1), or flops_per_token * tokens ("logged").
Each run also yields its training curve (tokens, loss), which approach 1 needs.
A run whose loss is null or not finite (diverged, or stopped before an evaluation), or that
logged no loss at all (died early), is skipped: recorded in `excluded` and in one warning.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmtrain.config import ConfigError, read_yaml_file


@dataclass
class Curve:
    """One run's loss against tokens seen (N fixed), for the approach-1 envelope."""
    N: float
    tokens: np.ndarray
    loss: np.ndarray


@dataclass
class Points:
    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray
    C: np.ndarray
    labels: list[str]
    source: str = "csv"
    curves: list[Curve] | None = None
    notes: list[str] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.N)

    def subset(self, keep: np.ndarray) -> "Points":
        idx = np.flatnonzero(keep)
        curves = None if self.curves is None else [self.curves[i] for i in idx]
        return Points(self.N[idx], self.D[idx], self.loss[idx], self.C[idx],
                      [self.labels[i] for i in idx], self.source, curves, list(self.notes),
                      list(self.excluded), list(self.warnings))

    def logs(self) -> dict[str, np.ndarray]:
        return {"N": np.log(self.N), "D": np.log(self.D), "C": np.log(self.C)}


def make_points(N, D, loss, C=None, labels=None, source="arrays", curves=None) -> Points:
    N, D, loss = (np.asarray(x, dtype=float) for x in (N, D, loss))
    C = 6.0 * N * D if C is None else np.asarray(C, dtype=float)
    labels = labels or [f"point {i}" for i in range(len(N))]
    return Points(N, D, loss, C, list(labels), source, curves)


# ----------------------------------------------------------------------------------------------
# CSV


def _number(text: str, col: str, row: int, path: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: row {row} column {col!r} is {text!r}, not a number") from None


def read_csv(path: str | Path, n_col: str, loss_col: str, d_col: str | None = None,
             c_col: str | None = None) -> Points:
    """Points from the named CSV columns; `c_col` (training FLOPs) may stand in for `d_col`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--csv {str(path)!r} does not exist")
    if (d_col is None) == (c_col is None):
        raise ConfigError("--csv needs exactly one of --d-col (tokens) or --c-col (training FLOPs,"
                          " D = C / 6N)")
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        for opt, col in (("--n-col", n_col), ("--loss-col", loss_col), ("--d-col", d_col),
                         ("--c-col", c_col)):
            if col is not None and col not in header:
                raise ConfigError(f"{opt} {col!r} is not a column of {str(path)!r}; columns are: "
                                  + ", ".join(repr(h) for h in header))
        rows = list(reader)
    N, X, L = [], [], []
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        N.append(_number(r[n_col], n_col, i, str(path)))
        X.append(_number(r[d_col or c_col], d_col or c_col, i, str(path)))
        L.append(_number(r[loss_col], loss_col, i, str(path)))
    N, X, L = (np.array(v, dtype=float) for v in (N, X, L))
    with np.errstate(invalid="ignore", divide="ignore"):
        D, C = (X, 6.0 * N * X) if d_col else (X / (6.0 * N), X)
    return Points(N, D, L, C, [f"row {i}" for i in range(2, len(rows) + 2)], "csv")


# ----------------------------------------------------------------------------------------------
# Run directories


def _jsonl(path: Path) -> list[dict]:
    """The JSON objects of a run's metrics.jsonl / eval.jsonl (a last line cut short by a kill
    is skipped, as a resumed run drops it; any other bad line is a one-line error)."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    out = []
    for k, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        elif k < len(lines):
            raise ConfigError(f"{path}: line {k} is not a JSON object")
    return out


def _document(path: Path) -> dict:
    """summary.json as a dict ({} when absent)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(errors="replace"))
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object; fix or remove it")
    return data


def _num(value) -> float:
    """A logged number; null (the trainer's loss it never computed) or junk is NaN, which
    skips the run with the value named."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def params_from_config(cfg: dict, total: bool = False) -> float:
    """N from a resolved config.yaml: 12 * n_layers * d_model^2 (+ embeddings when total)."""
    m = cfg.get("model") or {}
    try:
        L, d = int(m["n_layers"]), int(m["d_model"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError("config.yaml has no model.n_layers / model.d_model to count "
                          "parameters from") from None
    n = 12.0 * L * d * d
    if total:
        n += int(m.get("vocab_size", 0)) * d * (1 if m.get("tie_embeddings", True) else 2)
        if m.get("position") == "learned":
            n += int(m.get("max_seq_len", 0)) * d
    return n


@dataclass
class Run:
    """One run directory's point; `skip` says why it cannot be fitted ("" when it can)."""
    N: float
    D: float
    C: float
    loss: float
    curve: Curve
    note: str = ""
    skip: str = ""


def _final_loss(summary: dict, ev: list, tr: list, loss_source: str, smooth: int):
    """(loss, what it is, note): by the rules of the module docstring; NaN when there is none."""
    if loss_source == "final" and "final_val_loss" in summary:
        raw = summary["final_val_loss"]
        return _num(raw), f"summary.json final_val_loss is {'null' if raw is None else raw}", ""
    if ev:
        k = smooth if loss_source == "smoothed" else 1
        loss = float(np.mean([v for _, v in ev[-k:]]))
        return loss, f"eval.jsonl val_loss is {loss:g}", ""
    if tr:
        loss = float(np.mean([v for _, v in tr[-smooth:]]))
        return loss, f"metrics.jsonl loss is {loss:g}", (
            f"no evaluation logged; used the training loss (mean of last {smooth})")
    return math.nan, "no loss logged (no final_val_loss, eval.jsonl or metrics.jsonl)", ""


def read_run(run_dir: str | Path, total: bool = False, loss_source: str = "final",
             smooth: int = 3, flops: str = "6nd") -> Run:
    rd = Path(run_dir)
    if not rd.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist")
    summary = _document(rd / "summary.json")
    cfg = (read_yaml_file(rd / "config.yaml", "run config") or {}) \
        if (rd / "config.yaml").is_file() else {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{rd / 'config.yaml'} must hold a mapping of sections")
    metrics, evals = _jsonl(rd / "metrics.jsonl"), _jsonl(rd / "eval.jsonl")
    if not (summary or cfg or metrics or evals):
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no summary.json, config.yaml,"
                          " metrics.jsonl or eval.jsonl)")
    key = "n_params" if total else "n_params_nonembedding"
    N = _num(summary[key]) if key in summary else params_from_config(cfg, total)

    logged = [t for t in (_num(r.get("tokens")) for r in metrics + evals) if math.isfinite(t)]
    if "tokens" in summary:
        D = _num(summary["tokens"])
    elif logged:
        D = max(logged)
    else:
        t = cfg.get("train") or {}
        D = float(t.get("steps", 0) * t.get("global_batch_size", 0) * t.get("seq_len", 0))

    ev = [(_num(r["tokens"]), _num(r["val_loss"])) for r in evals
          if "tokens" in r and "val_loss" in r]
    tr = [(_num(r["tokens"]), _num(r["loss"])) for r in metrics if "tokens" in r and "loss" in r]
    loss, loss_is, note = _final_loss(summary, ev, tr, loss_source, max(1, smooth))
    if flops == "logged":
        if "flops_per_token" not in summary:
            raise ConfigError(f"--flops logged: {str(run_dir)!r} has no summary.json "
                              "flops_per_token; use --flops 6nd")
        C = _num(summary["flops_per_token"]) * D
    else:
        C = 6.0 * N * D
    curve_pts = [(t, v) for t, v in (ev if len(ev) >= 2 else tr)
                 if math.isfinite(t) and math.isfinite(v)]
    curve = Curve(N, np.array([t for t, _ in curve_pts]), np.array([v for _, v in curve_pts]))
    bad = [what for what, v in ((loss_is, loss), (f"N={N:g}", N), (f"D={D:g}", D),
                                (f"C={C:g}", C)) if not (math.isfinite(v) and v > 0)]
    return Run(N, D, C, loss, curve, note and f"{rd.name}: {note}", bad[0] if bad else "")


def read_runs(run_dirs, total: bool = False, loss_source: str = "final", smooth: int = 3,
              flops: str = "6nd") -> Points:
    """The runs' points; runs that cannot be fitted are left out, recorded and warned about."""
    runs = [read_run(d, total, loss_source, smooth, flops) for d in run_dirs]
    ok = [r for r in runs if not r.skip]
    pts = Points(np.array([r.N for r in ok]), np.array([r.D for r in ok]),
                 np.array([r.loss for r in ok]), np.array([r.C for r in ok]),
                 [str(d) for d, r in zip(run_dirs, runs) if not r.skip], "runs",
                 [r.curve for r in ok], [r.note for r in ok if r.note])
    skipped = [(str(d), r) for d, r in zip(run_dirs, runs) if r.skip]
    pts.excluded = [{"label": d, "N": r.N, "D": r.D, "loss": r.loss,
                     "reason": f"skipped: {r.skip}"} for d, r in skipped]
    if skipped:
        named = ", ".join(f"{d} ({r.skip})" for d, r in skipped[:5])
        more = f", and {len(skipped) - 5} more (see data.excluded)" if len(skipped) > 5 else ""
        pts.warnings.append(f"skipped {len(skipped)} of {len(runs)} run(s) that cannot be "
                            f"fitted: {named}{more}")
    return pts


# ----------------------------------------------------------------------------------------------
# Checks and exclusions


def exclude(pts: Points, drop_nonfinite: bool = False, drop_highest_loss: int = 0,
            max_loss: float | None = None) -> Points:
    """Leave out points explicitly; each left-out point is recorded with its reason."""
    keep = np.ones(len(pts), dtype=bool)
    reasons: dict[int, str] = {}
    bad = ~np.isfinite(pts.loss) | ~np.isfinite(pts.N) | ~np.isfinite(pts.D)
    if drop_nonfinite:
        for i in np.flatnonzero(bad):
            reasons[int(i)] = "non-finite value (--drop-nonfinite)"
        keep &= ~bad
    if max_loss is not None:
        for i in np.flatnonzero(keep & (pts.loss > max_loss)):
            reasons[int(i)] = f"loss > {max_loss} (--max-loss)"
        keep &= ~(pts.loss > max_loss)
    if drop_highest_loss:
        order = [i for i in np.argsort(-np.where(np.isfinite(pts.loss), pts.loss, -np.inf))
                 if keep[i]][:drop_highest_loss]
        for i in order:
            reasons[int(i)] = f"one of the {drop_highest_loss} highest losses (--drop-highest-loss)"
            keep[i] = False
    out = pts.subset(keep)
    out.excluded = pts.excluded + [
        {"label": pts.labels[i], "N": float(pts.N[i]), "D": float(pts.D[i]),
         "loss": float(pts.loss[i]), "reason": reasons[i]} for i in sorted(reasons)]
    return out


def check(pts: Points) -> None:
    """One-line errors for values no law can be fitted to (how many are needed: fit.py)."""
    for name, arr in (("loss", pts.loss), ("N", pts.N), ("D", pts.D)):
        bad = np.flatnonzero(~np.isfinite(arr))
        if len(bad):
            raise ConfigError(f"{pts.labels[bad[0]]}: {name}={arr[bad[0]]} is not finite "
                              f"({len(bad)} such point(s)); fix the data or pass --drop-nonfinite")
        bad = np.flatnonzero(arr <= 0)
        if len(bad):
            raise ConfigError(f"{pts.labels[bad[0]]}: {name}={arr[bad[0]]:g} must be positive "
                              f"({len(bad)} such point(s))")


def fmt_si(x: float) -> str:
    """12.3M, 4.5B, 1.2T: parameter and token counts as people write them."""
    if not math.isfinite(x):
        return str(x)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def parse_count(text: str, what: str) -> float:
    """'25M', '1.5B', '3e20' -> float; ConfigError naming `what` otherwise."""
    t = text.strip()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(t[-1:].upper(), None)
    try:
        v = float(t[:-1]) * mult if mult else float(t)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a number (examples: 25M, 1.5B, 3e20)") from None
    if not (v > 0 and math.isfinite(v)):
        raise ConfigError(f"{what} {text!r} must be a positive number")
    return v
