"""`llmtrain scaling fit|plan|sweep`: argument parsing and the terminal tables.

The main CLI calls `add_parser(subparsers)` and then `args.func(args)`; user errors are raised
as `ConfigError` (printed as one line, exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmtrain.config import ConfigError
from llmtrain.scaling.data import fmt_si, parse_count

LAW_CHOICES = ("kaplan", "chinchilla", "all")


def _progress(quiet: bool):
    return (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _g(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _ci(ci, fmt=_g) -> str:
    return "" if not ci else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


# ----------------------------------------------------------------------------------------------
# fit


def add_fit_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `llmtrain scaling fit` (shared with tools/fit_scaling_laws.py)."""
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help="run directories (summary.json / config.yaml, metrics.jsonl, eval.jsonl)")
    src = p.add_argument_group("CSV input (instead of run directories)")
    src.add_argument("--csv", metavar="FILE", help="a CSV with one row per training run")
    src.add_argument("--n-col", metavar="COL", help="column of model sizes N (parameters)")
    src.add_argument("--d-col", metavar="COL", help="column of training tokens D")
    src.add_argument("--c-col", metavar="COL",
                     help="column of training FLOPs C, instead of --d-col (D = C / 6N)")
    src.add_argument("--loss-col", metavar="COL", help="column of final losses")
    rd = p.add_argument_group("run-directory input")
    rd.add_argument("--n-total", action="store_true",
                    help="N = all parameters (default: non-embedding parameters)")
    rd.add_argument("--loss", choices=("final", "smoothed"), default="final",
                    help="final validation loss, or the mean of the last --smooth evaluations")
    rd.add_argument("--smooth", type=int, default=3, metavar="K", help="evaluations to average")
    rd.add_argument("--flops", choices=("6nd", "logged"), default="6nd",
                    help="C = 6 N D, or summary.json flops_per_token * tokens")
    ex = p.add_argument_group("excluding points (recorded in the output)")
    ex.add_argument("--drop-highest-loss", type=int, default=0, metavar="K",
                    help="leave out the K points with the highest loss (e.g. diverged runs; "
                         "Besiroglu et al. 2024 leave out 5)")
    ex.add_argument("--max-loss", type=float, metavar="X", help="leave out points with loss > X")
    ex.add_argument("--drop-nonfinite", action="store_true",
                    help="leave out points with a NaN/inf value instead of failing")
    f = p.add_argument_group("fitting")
    f.add_argument("--law", choices=LAW_CHOICES, default="all",
                   help="kaplan: L(N), L(D), L(C), L(N,D); chinchilla: approaches 1, 2, 3")
    f.add_argument("--huber-delta", type=float, default=1e-3,
                   help="Huber delta on log residuals (0 = least squares)")
    f.add_argument("--bootstrap", type=int, default=200, metavar="B",
                   help="bootstrap resamples for the 95%% intervals (0 = none)")
    f.add_argument("--top-k", type=int, default=200, metavar="K",
                   help="grid starts refined by L-BFGS after evaluating the whole grid "
                        "(0 = refine every start)")
    f.add_argument("--isoflop-width", type=float, default=0.1, metavar="DECADES",
                   help="approach 2: budgets within this many decades form one IsoFLOP group")
    f.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="OUT", help="write parameters, intervals, residuals, frontier")
    o.add_argument("--plot", metavar="OUT.png", help="write the figure")
    o.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def load_points(args):
    from llmtrain.scaling.data import exclude, read_csv, read_runs
    if args.csv and args.runs:
        raise ConfigError("give run directories or --csv, not both")
    if args.csv:
        missing = [o for o, v in (("--n-col", args.n_col), ("--loss-col", args.loss_col))
                   if not v]
        if missing:
            raise ConfigError(f"--csv needs {' and '.join(missing)}")
        pts = read_csv(args.csv, args.n_col, args.loss_col, args.d_col, args.c_col)
    elif args.runs:
        pts = read_runs(args.runs, args.n_total, args.loss, args.smooth, args.flops)
    else:
        raise ConfigError("nothing to fit: give run directories or --csv FILE")
    if args.drop_highest_loss < 0:
        raise ConfigError(f"--drop-highest-loss {args.drop_highest_loss} must be >= 0")
    return exclude(pts, args.drop_nonfinite, args.drop_highest_loss, args.max_loss)


def run_fit(args) -> int:
    from llmtrain.scaling.fit import finite_json, fit_all
    for opt, v, lo in (("--bootstrap", args.bootstrap, 0), ("--top-k", args.top_k, 0),
                       ("--smooth", args.smooth, 1)):
        if v < lo:
            raise ConfigError(f"{opt} {v} must be >= {lo}")
    if args.huber_delta < 0 or args.isoflop_width <= 0:
        raise ConfigError("--huber-delta must be >= 0 and --isoflop-width > 0")
    pts = load_points(args)
    # Warnings print also with --quiet (they say what the numbers are worth); the data's first,
    # as the fit may fail for want of the runs they name.
    for w in pts.warnings:
        _warn(w)
    result = fit_all(pts, args.law, args.huber_delta or None, args.top_k or None,
                     args.bootstrap, args.seed, args.isoflop_width, _progress(args.quiet))
    result["options"] = finite_json({k: v for k, v in vars(args).items() if k != "func"})[0]
    for w in result["warnings"][len(pts.warnings):]:
        _warn(w)
    print(format_fit(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, allow_nan=False))
        print(f"wrote {args.json}")
    if args.plot:
        from llmtrain.scaling.plot import plot_fit
        print(f"wrote {plot_fit(result, pts, args.plot)}")
    return 0


def format_fit(result: dict) -> str:
    from llmtrain.scaling.laws import PUBLISHED
    d = result["data"]
    lines = [f"{d['points']} points from {d['source']}; N {fmt_si(d['range']['N'][0])}.."
             f"{fmt_si(d['range']['N'][1])}, D {fmt_si(d['range']['D'][0])}.."
             f"{fmt_si(d['range']['D'][1])}, C {d['range']['C'][0]:.3g}..{d['range']['C'][1]:.3g}"]
    lines += [f"  excluded {e['label']} (loss {_g(e['loss'])}): {e['reason']}"
              for e in d["excluded"]]
    lines += [f"  note: {n}" for n in d["notes"]]
    for name, r in result["laws"].items():
        lines.append("")
        if r["status"] != "ok":
            lines.append(f"{name}: not fitted: {r['reason']}")
            continue
        head = f"{name}: {r['formula']}"
        if "optimizer" in r:
            o = r["optimizer"]
            head += (f"  [{r['loss_fn']}; {o['grid_starts']} starts, {o['refined']} refined, "
                     f"{o['seconds']:.1f}s]")
        lines.append(head)
        pub = name == "chinchilla_approach3"
        lines.append(f"  {'param':<8}{'value':>12}  {'95% CI':<26}"
                     + ("".join(f"{k:>14}" for k in PUBLISHED) if pub else ""))
        for k, v in {**r["params"], **r.get("derived", {})}.items():
            row = f"  {k:<8}{_g(v['value']):>12}  {_ci(v['ci95']):<26}"
            if pub:
                ref = [PUBLISHED[s].get(k) for s in PUBLISHED]
                if k in ("a", "b"):
                    ref = [PUBLISHED[s]["beta" if k == "a" else "alpha"]
                           / (PUBLISHED[s]["alpha"] + PUBLISHED[s]["beta"]) for s in PUBLISHED]
                row += "".join(f"{_g(x) if x is not None else '':>14}" for x in ref)
            lines.append(row)
        if "residuals" in r:
            lines.append(f"  residuals: rmse {_g(r['residuals']['rmse_log'])}, max "
                         f"{_g(r['residuals']['max_abs_log'])} (log loss); objective "
                         f"{r['objective']:.6g}")
        if "groups" in r:
            lines.append(f"  IsoFLOP groups used: {len(r['groups'])}, skipped: "
                         f"{len(r['skipped_groups'])}")
        for row in (r.get("frontier") or [])[::6]:
            lines.append(f"  C={row['C']:.3g}: N_opt {fmt_si(row['N_opt'])} "
                         f"{_ci(row.get('N_ci95'), fmt_si)}, D_opt {fmt_si(row['D_opt'])} "
                         f"{_ci(row.get('D_ci95'), fmt_si)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# plan and sweep


def _budgets(text: str, what: str = "--budget") -> list[float]:
    return [parse_count(t, what) for t in text.split(",") if t.strip()]


def run_plan(args) -> int:
    from llmtrain.scaling.budget import plan
    res = plan(_budgets(args.budget), args.fit, args.law)
    print(f"fit: {res['fit']}; " + ", ".join(f"{k}={_g(v)}" for k, v in res["params"].items()))
    if not res["bootstrap_samples"]:
        print("(point estimate: no interval; pass --fit FIT.json from `scaling fit` for "
              "bootstrap intervals)")
    print(f"{'C (FLOPs)':>10}  {'N_opt':>8} {'95% CI':<18} {'D_opt':>8} {'95% CI':<18} "
          f"{'D/N':>6} {'L_opt':>7}")
    for r in res["budgets"]:
        print(f"{r['C']:>10.3g}  {fmt_si(r['N_opt']):>8} {_ci(r['N_ci95'], fmt_si):<18} "
              f"{fmt_si(r['D_opt']):>8} {_ci(r['D_ci95'], fmt_si):<18} "
              f"{r['tokens_per_param']:>6.1f} {_g(r.get('L_opt')):>7}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    return 0


def run_sweep(args) -> int:
    from llmtrain.scaling.budget import sweep
    sizes = _budgets(args.sizes, "--sizes") if args.sizes else None
    rows = sweep(args.base, _budgets(args.budgets, "--budgets"), sizes, args.out, args.points,
                 args.spread, args.fit, args.aspect)
    print(f"{'config':<34} {'N':>8} {'L x d':>9} {'heads':>5} {'steps':>7} {'D':>8} {'C':>9}")
    for r in rows:
        print(f"{r['config']:<34} {fmt_si(r['N']):>8} {r['n_layers']:>3}x{r['d_model']:<5} "
              f"{r['n_heads']:>5} {r['steps']:>7} {fmt_si(r['D']):>8} {r['C']:>9.3g}"
              + (f"  WARNING: {r['warning']}" if "warning" in r else ""))
    print(f"wrote {len(rows)} configs and {Path(args.out) / 'sweep.json'}; run each with "
          f"`llmtrain train CONFIG`, then `llmtrain scaling fit {Path(args.out) / 'runs'}/*`")
    return 0


def add_parser(subparsers) -> None:
    """Register `scaling fit|plan|sweep` on the main CLI's subparsers."""
    sp = subparsers.add_parser("scaling", help="fit scaling laws; plan compute-optimal runs",
                               description="Kaplan / Chinchilla scaling-law fits and budgets.")
    sub = sp.add_subparsers(dest="scaling_command", metavar="{fit,plan,sweep}", required=True)

    fit = sub.add_parser("fit", help="fit scaling laws to run directories or a CSV")
    add_fit_arguments(fit)
    fit.set_defaults(func=run_fit)

    pl = sub.add_parser("plan", help="compute-optimal N, D for a FLOP budget")
    pl.add_argument("--budget", required=True, metavar="FLOPS",
                    help="training FLOPs, e.g. 1e21 (comma-separate several)")
    pl.add_argument("--fit", default="hoffmann2022", metavar="FIT.json",
                    help="a `scaling fit --json` file, or hoffmann2022 (default: E=1.69, "
                         "A=406.4, B=410.7, alpha=0.34, beta=0.28) or besiroglu2024")
    pl.add_argument("--law", help="which fitted law in FIT.json (default: approach 3 if fitted)")
    pl.add_argument("--json", metavar="OUT")
    pl.set_defaults(func=run_plan)

    sw = sub.add_parser("sweep", help="write IsoFLOP sweep run configs")
    sw.add_argument("--budgets", required=True, metavar="C1,C2,...", help="training FLOPs")
    sw.add_argument("--sizes", metavar="N1,N2,...",
                    help="non-embedding model sizes (25M, 1.5B, ...); default: --points sizes "
                         "around the optimum predicted by --fit")
    sw.add_argument("--points", type=int, default=5, help="sizes per budget without --sizes")
    sw.add_argument("--spread", type=float, default=4.0,
                    help="sizes span N_opt/spread .. N_opt*spread without --sizes")
    sw.add_argument("--fit", default="hoffmann2022", metavar="FIT.json")
    sw.add_argument("--aspect", type=float,
                    help="target d_model / n_layers (default: the base config's)")
    sw.add_argument("--base", required=True, metavar="CONFIG", help="base run config YAML")
    sw.add_argument("--out", required=True, metavar="DIR")
    sw.set_defaults(func=run_sweep)


def main(argv=None) -> int:
    """Standalone entry (`python -m llmtrain.scaling.cli`), same contract as the main CLI."""
    parser = argparse.ArgumentParser(prog="llmtrain")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
