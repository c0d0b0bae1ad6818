"""Fitting: Huber loss on log residuals, a vectorised multi-start L-BFGS, bootstrap intervals,
and Chinchilla approaches 1 (minimum-loss envelope) and 2 (IsoFLOP parabolas).

The multi-start search follows Hoffmann et al. 2022 (D.2) and Besiroglu et al. 2024: minimise
sum_i Huber_delta(log L_hat_i - log L_i) with delta = 1e-3 by L-BFGS from every point of a grid
and keep the best. A plain loop of scipy.optimize.minimize over 4500 starts takes minutes; here
the objective is evaluated for the whole grid at once (one broadcast numpy expression), only the
`top_k` best starts are refined with L-BFGS-B using analytic gradients, and the best refined
optimum is kept (`test_pruned_equals_full_grid` shows that pruning finds the same optimum).

Degenerate data and fits never crash and never put NaN/Infinity into the result: a law the data
cannot determine (too few points, model sizes or token counts) is "insufficient"; a fitted law
with a negative exponent or a non-finite frontier is reported; every non-finite value becomes
None (JSON null); each of these is one line of `warnings`. Only when no law asked for can be
fitted at all is it a ConfigError, saying how many runs and sizes are needed.

The optimiser sees the objective divided by n * delta. This does not move the optimum, but it
makes the stopping tolerances mean the same thing for any data set: with residuals far larger
than delta the raw objective and its gradient are ~1e-3 and L-BFGS's default tolerances stop
early (the problem Besiroglu et al. 2024 found in the original fit).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
from scipy.optimize import minimize

from llmtrain.config import ConfigError
from llmtrain.scaling.data import Curve, Points, check
from llmtrain.scaling.laws import KAPLAN, LAWS, MIN_EXPONENT, Law, powerlaw_frontier

Progress = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


def huber(r: np.ndarray, delta: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss and its derivative; delta=None (or 0) is least squares 0.5 r^2."""
    if not delta:
        return 0.5 * r * r, r
    a = np.abs(r)
    small = a <= delta
    return (np.where(small, 0.5 * r * r, delta * (a - 0.5 * delta)),
            np.where(small, r, delta * np.sign(r)))


class Objective:
    """sum_i rho(log L_hat(theta; x_i) - log L_i), for one theta or a batch of them."""

    def __init__(self, law: Law, logs: dict[str, np.ndarray], log_loss: np.ndarray,
                 delta: float | None):
        self.law, self.logs, self.y, self.delta = law, logs, log_loss, delta
        self.scale = 1.0 / (len(log_loss) * (delta or 1.0))

    def batch(self, theta: np.ndarray, chunk: int = 1000) -> np.ndarray:
        out = np.empty(len(theta))
        with np.errstate(over="ignore", invalid="ignore"):
            for s in range(0, len(theta), chunk):
                pred = self.law.log_pred(theta[s:s + chunk], self.logs)
                out[s:s + chunk] = huber(pred - self.y, self.delta)[0].sum(axis=1)
        return np.where(np.isfinite(out), out, np.inf)

    def scaled_value_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        with np.errstate(over="ignore", invalid="ignore"):
            pred, J = self.law.log_pred(theta[None, :], self.logs, jac=True)
            val, dval = huber(pred[0] - self.y, self.delta)
            f, g = val.sum() * self.scale, (dval[:, None] * J[0]).sum(axis=0) * self.scale
        if not np.isfinite(f) or not np.all(np.isfinite(g)):
            return 1e300, np.zeros_like(theta)
        return float(f), g

    def refine(self, theta0: np.ndarray) -> tuple[float, np.ndarray]:
        res = minimize(self.scaled_value_grad, theta0, jac=True, method="L-BFGS-B",
                       bounds=self.law.bounds,
                       options={"maxiter": 3000, "ftol": 1e-13, "gtol": 1e-9, "maxcor": 20})
        return float(res.fun) / self.scale, res.x


def multistart(obj: Objective, grid: np.ndarray, top_k: int | None = 200,
               progress: Progress = _quiet) -> list[tuple[float, np.ndarray]]:
    """Refine the `top_k` best grid points (all of them when top_k is None); return the refined
    optima sorted by objective, best first."""
    values = obj.batch(grid)
    order = np.argsort(values, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    out = []
    step = max(1, len(order) // 10)
    for k, i in enumerate(order):
        out.append(obj.refine(grid[i]))
        if (k + 1) % step == 0:
            progress(f"  {obj.law.name}: refined {k + 1}/{len(order)} starts "
                     f"(best objective {min(v for v, _ in out):.6g})")
    out.sort(key=lambda t: t[0])
    return out


def _distinct(optima, k: int) -> list[np.ndarray]:
    picked: list[np.ndarray] = []
    for _, th in optima:
        if all(np.max(np.abs(th - p)) > 1e-3 for p in picked):
            picked.append(th)
        if len(picked) == k:
            break
    return picked


def interval(samples: np.ndarray) -> list[float] | None:
    """The 95% interval (2.5th, 97.5th percentiles) of the real, finite bootstrap samples; None
    with fewer than two."""
    s = np.asarray(samples)
    if np.iscomplexobj(s):  # a derived value of a degenerate resample (negative ** fraction)
        s = np.where(s.imag == 0, s.real, np.nan)
    s = s[np.isfinite(s)]
    if len(s) < 2:
        return None
    return [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))]


def _named(values: dict[str, float], samples: dict[str, np.ndarray] | None):
    return {k: {"value": v, "ci95": None if samples is None else interval(samples[k])}
            for k, v in values.items()}


def frontier_grid(C: np.ndarray, n: int = 25) -> np.ndarray:
    """Budgets from a decade below the data to two decades above it."""
    return np.logspace(np.log10(C.min()) - 1, np.log10(C.max()) + 2, n)


def _frontier_rows(fn, point: dict, samples: list[dict], C: np.ndarray, loss_fn=None):
    N, D = fn(point, C)
    rows = []
    bN = np.array([fn(s, C)[0] for s in samples]) if samples else None
    for j, c in enumerate(C):
        row = {"C": float(c), "N_opt": float(N[j]), "D_opt": float(D[j])}
        if bN is not None:
            ci = interval(bN[:, j])
            row["N_ci95"] = ci
            row["D_ci95"] = None if ci is None else [float(c / (6 * ci[1])), float(c / (6 * ci[0]))]
        if loss_fn is not None:
            row["L_opt"] = float(loss_fn(N[j:j + 1], D[j:j + 1])[0])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Parametric laws (Kaplan L(N), L(D), L(C), L(N, D); Chinchilla approach 3)


def _bootstrap(law: Law, logs: dict[str, np.ndarray], y: np.ndarray, delta: float | None,
               starts: list[np.ndarray], n_boot: int, seed: int,
               progress: Progress) -> list[np.ndarray]:
    """The best parameters of `n_boot` refits, each on the points resampled with replacement and
    started from each of `starts`."""
    rng = np.random.default_rng(seed)
    n = len(y)
    thetas = []
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        bobj = Objective(law, {k: v[idx] for k, v in logs.items()}, y[idx], delta)
        thetas.append(min((bobj.refine(s) for s in starts), key=lambda t: t[0])[1])
        if n_boot >= 10 and (b + 1) % max(1, n_boot // 5) == 0:
            progress(f"  {law.name}: bootstrap {b + 1}/{n_boot}")
    return thetas


def _residuals(law: Law, theta: np.ndarray, pts: Points, logs: dict[str, np.ndarray],
               y: np.ndarray) -> dict:
    """How far the law at `theta` lies from each point, in log loss."""
    pred = np.exp(law.log_pred(theta[None, :], logs)[0])
    resid = y - np.log(pred)
    return {
        "rmse_log": float(np.sqrt(np.mean(resid ** 2))),
        "max_abs_log": float(np.max(np.abs(resid))),
        "points": [{"label": pts.labels[i], "N": float(pts.N[i]), "D": float(pts.D[i]),
                    "loss": float(pts.loss[i]), "pred": float(pred[i]),
                    "log_residual": float(resid[i])} for i in range(len(pts))]}


def fit_law(law: Law, pts: Points, delta: float | None = 1e-3, top_k: int | None = 200,
            n_boot: int = 200, boot_starts: int = 2, seed: int = 0, grid: np.ndarray | None = None,
            progress: Progress = _quiet) -> dict:
    """Fit one law by multi-start Huber/L-BFGS; bootstrap (resampling points) for intervals.

    Each bootstrap refit starts from the `boot_starts` best distinct optima of the full fit.
    """
    if len(pts) < law.n_params:
        raise ConfigError(f"{law.name} has {law.n_params} parameters but only {len(pts)} "
                          "point(s) were given; add points or fit a smaller law")
    logs = pts.logs()
    y = np.log(pts.loss)
    grid = law.grid(logs) if grid is None else grid
    t0 = time.perf_counter()
    progress(f"{law.name}: {len(grid)} starts on {len(pts)} points, refining the best "
             f"{len(grid) if top_k is None else min(top_k, len(grid))}")
    obj = Objective(law, logs, y, delta)
    optima = multistart(obj, grid, top_k, progress)
    best_val, best = optima[0]
    fit_s = time.perf_counter() - t0
    p = law.params(best)

    starts = _distinct(optima, boot_starts)
    thetas = _bootstrap(law, logs, y, delta, starts, n_boot, seed, progress)
    boot = [law.params(t) for t in thetas]
    boot_d = [law.derived(q) for q in boot]
    ps = {k: np.array([q[k] for q in boot]) for k in p} if boot else None
    d = law.derived(p)
    ds = {k: np.array([q[k] for q in boot_d]) for k in d} if boot else None

    out = {
        "law": law.name, "status": "ok", "formula": law.formula,
        "params": _named(p, ps), "derived": _named(d, ds),
        "objective": best_val,
        "loss_fn": (f"Huber(delta={delta:g}) of log residuals" if delta
                    else "least squares of log residuals"),
        "optimizer": {"method": "L-BFGS-B, analytic gradient", "grid_starts": len(grid),
                      "refined": len(optima), "seconds": round(fit_s, 3),
                      "best_found_by": int(sum(1 for v, _ in optima
                                               if v <= best_val * (1 + 1e-6) + 1e-12))},
        "residuals": _residuals(law, best, pts, logs, y),
        "bootstrap": {"n": n_boot, "resample": "points", "starts_per_refit": len(starts),
                      "samples": {k: v.tolist() for k, v in (ps or {}).items()}},
    }
    if law.frontier(p, pts.C[:1]) is not None:
        loss_fn = (lambda N, D: law.predict(p, N=N, D=D))
        out["frontier"] = _frontier_rows(law.frontier, p, boot, frontier_grid(pts.C), loss_fn)
    progress(f"{law.name}: done in {time.perf_counter() - t0:.1f}s "
             f"(fit {fit_s:.1f}s, {n_boot} bootstrap refits)")
    return out


# ----------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP parabolas


def isoflop_groups(C: np.ndarray, width: float = 0.1) -> list[np.ndarray]:
    """Group points whose budgets lie within `width` decades of the group's smallest budget."""
    order = np.argsort(C)
    lc = np.log10(C[order])
    groups, start = [], 0
    for i in range(1, len(lc) + 1):
        if i == len(lc) or lc[i] - lc[start] > width:
            groups.append(order[start:i])
            start = i
    return groups


def _parabola(lnN: np.ndarray, L: np.ndarray):
    """(c2, c1, c0, vertex log N or None, why-not) of L ≈ c2 x^2 + c1 x + c0, x = log N."""
    c2, c1, c0 = np.polyfit(lnN, L, 2)
    if c2 <= 0:
        return c2, c1, c0, None, "not convex"
    xv = -c1 / (2 * c2)
    if not lnN.min() <= xv <= lnN.max():
        return c2, c1, c0, None, "minimum outside the sampled model sizes"
    return c2, c1, c0, xv, ""


def _power_fit(C: np.ndarray, N: np.ndarray) -> dict[str, float]:
    a, logk = np.polyfit(np.log(C), np.log(N), 1)
    return {"a": float(a), "b": float(1 - a), "k_N": float(np.exp(logk)),
            "k_D": float(np.exp(-logk) / 6.0)}


def _isoflop_optima(pts: Points, groups, min_points: int):
    rows, skipped = [], []
    for g in groups:
        Cg = float(np.exp(np.mean(np.log(pts.C[g]))))
        if len(np.unique(np.round(np.log(pts.N[g]), 6))) < min_points:
            skipped.append({"C": Cg, "points": len(g),
                            "reason": f"fewer than {min_points} distinct model sizes"})
            continue
        c2, c1, c0, xv, why = _parabola(np.log(pts.N[g]), pts.loss[g])
        if xv is None:
            skipped.append({"C": Cg, "points": len(g), "reason": why})
            continue
        rows.append({"C": Cg, "points": len(g), "N_opt": float(np.exp(xv)),
                     "D_opt": float(Cg / (6 * np.exp(xv))), "L_opt": float(c0 - c1 * c1 / (4 * c2)),
                     "parabola": [float(c2), float(c1), float(c0)]})
    return rows, skipped


def approach2(pts: Points, width: float = 0.1, min_points: int = 3, n_boot: int = 200,
              seed: int = 0, progress: Progress = _quiet) -> dict:
    """Hoffmann et al. 2022 approach 2: per IsoFLOP group a parabola of loss in log N; its
    vertex is N_opt(C); then N_opt ∝ C^a by least squares in log-log space."""
    groups = isoflop_groups(pts.C, width)
    rows, skipped = _isoflop_optima(pts, groups, min_points)
    base = {"law": "chinchilla_approach2", "formula": "N_opt = k_N C^a, D_opt = k_D C^b "
            "(vertices of IsoFLOP parabolas L = c2 (log N)^2 + c1 log N + c0)",
            "isoflop_width_decades": width, "groups": rows, "skipped_groups": skipped}
    if len(rows) < 2:
        return {**base, "status": "insufficient",
                "reason": f"approach 2 needs >= 2 IsoFLOP groups (budgets within {width} decades)"
                          f" with >= {min_points} model sizes and an interior loss minimum; found "
                          f"{len(rows)} of {len(groups)} group(s)"}
    p = _power_fit(np.array([r["C"] for r in rows]), np.array([r["N_opt"] for r in rows]))
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
        sub = Points(pts.N[idx], pts.D[idx], pts.loss[idx], pts.C[idx],
                     [pts.labels[i] for i in idx])
        r, _ = _isoflop_optima(sub, isoflop_groups(sub.C, width), min_points)
        if len(r) >= 2:
            boot.append(_power_fit(np.array([x["C"] for x in r]),
                                   np.array([x["N_opt"] for x in r])))
    samples = {k: np.array([q[k] for q in boot]) for k in p} if boot else None
    progress(f"chinchilla_approach2: {len(rows)} IsoFLOP groups, a={p['a']:.3f}")
    return {**base, "status": "ok", "params": _named(p, samples),
            "bootstrap": {"n": n_boot, "ok": len(boot), "resample": "points within each group",
                          "samples": {k: v.tolist() for k, v in (samples or {}).items()}},
            "frontier": _frontier_rows(powerlaw_frontier, p, boot, frontier_grid(pts.C))}


# ----------------------------------------------------------------------------------------------
# Approach 1: minimum-loss envelope of training curves


def curves_from_points(pts: Points, rel_tol: float = 1e-3) -> list[Curve]:
    """Final points of equal model size (within rel_tol) as one loss-vs-tokens curve."""
    order = np.argsort(pts.N)
    curves, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or np.log(pts.N[order[i]] / pts.N[order[start]]) > rel_tol:
            g = order[start:i]
            g = g[np.argsort(pts.D[g])]
            curves.append(Curve(float(np.exp(np.mean(np.log(pts.N[g])))), pts.D[g], pts.loss[g]))
            start = i
    return curves


def envelope(curves: list[Curve], n_grid: int = 40):
    """For each budget on a log grid, the run with the lowest (log-C interpolated) loss among
    the runs whose curve covers that budget (at least two must). Returns C, N_opt, L_min."""
    cs = [(np.log(6 * c.N * c.tokens), c.loss, c.N) for c in curves
          if len(c.tokens) >= 2 and np.all(c.tokens > 0)]
    if len(cs) < 2:
        return np.array([]), np.array([]), np.array([])
    lo, hi = min(x[0][0] for x in cs), max(x[0][-1] for x in cs)
    grid = np.linspace(lo, hi, n_grid)
    C, N, L = [], [], []
    for lc in grid:
        cand = [(np.interp(lc, x, y), n) for x, y, n in cs if x[0] <= lc <= x[-1]]
        if len(cand) >= 2:
            best = min(cand)
            C.append(np.exp(lc))
            N.append(best[1])
            L.append(best[0])
    return np.array(C), np.array(N), np.array(L)


def approach1(pts: Points, n_grid: int = 40, n_boot: int = 200, seed: int = 0,
              progress: Progress = _quiet) -> dict:
    """Hoffmann et al. 2022 approach 1: N_opt(C) from the minimum-loss envelope over runs."""
    base = {"law": "chinchilla_approach1",
            "formula": "N_opt = k_N C^a, D_opt = k_D C^b (minimum-loss envelope of curves)"}
    if pts.curves is not None:
        curves, origin = [c for c in pts.curves if len(c.tokens) >= 2], "training curves"
        # A curve is log-interpolated in C; points must be sorted by tokens.
        curves = [Curve(c.N, c.tokens[np.argsort(c.tokens)], c.loss[np.argsort(c.tokens)])
                  for c in curves if np.all(np.isfinite(c.loss))]
    else:
        curves = [c for c in curves_from_points(pts) if len(c.tokens) >= 2]
        origin = "final points grouped by equal model size (CSV has no training curves)"
    C, N, L = envelope(curves, n_grid)
    base.update({"curves_from": origin, "curves": len(curves)})
    if len(C) < 3 or len(np.unique(N)) < 2:
        return {**base, "status": "insufficient",
                "reason": f"approach 1 needs >= 2 runs of different size whose loss curves "
                          f"overlap in compute; {len(curves)} usable curve(s) gave "
                          f"{len(np.unique(N))} distinct envelope size(s)"}
    p = _power_fit(C, N)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        pick = [curves[i] for i in rng.integers(0, len(curves), len(curves))]
        c, n, _ = envelope(pick, n_grid)
        if len(c) >= 3 and len(np.unique(n)) >= 2:
            boot.append(_power_fit(c, n))
    samples = {k: np.array([q[k] for q in boot]) for k in p} if boot else None
    progress(f"chinchilla_approach1: envelope of {len(curves)} curves, a={p['a']:.3f}")
    return {**base, "status": "ok", "params": _named(p, samples),
            "envelope": [{"C": float(c), "N_opt": float(n), "L": float(l)}
                         for c, n, l in zip(C, N, L)],
            "bootstrap": {"n": n_boot, "ok": len(boot), "resample": "curves",
                          "samples": {k: v.tolist() for k, v in (samples or {}).items()}},
            "frontier": _frontier_rows(powerlaw_frontier, p, boot, frontier_grid(pts.C))}


# ----------------------------------------------------------------------------------------------
# What a data set can determine, and what a fit says about itself

COUNTED = {"N": "model size", "D": "token count", "C": "compute budget"}


def n_distinct(x: np.ndarray, rel_tol: float = 1e-3) -> int:
    """Distinct values of x, counting values within rel_tol (relative) of each other as one."""
    lx = np.sort(np.log(x))
    return int(len(lx) and 1 + np.sum(np.diff(lx) > rel_tol))


def requirements(name: str) -> tuple[int, dict[str, int]]:
    """(points, {variable: distinct values}) a law needs: one point per parameter, and for each
    variable it depends on, 3 values (its term has an offset, a scale and an exponent)."""
    if name == "chinchilla_approach1":
        return 2, {"N": 2}  # two run sizes whose curves overlap in compute
    if name == "chinchilla_approach2":
        return 6, {"N": 3}  # two IsoFLOP groups with three sizes each
    law = LAWS[name]
    return law.n_params, {v: 3 for v in law.variables}


def shortfall(name: str, pts: Points) -> str:
    """Why the data are too few for the law ("" when they are enough)."""
    n_min, distinct = requirements(name)
    missing = [f"at least {n_min} points" + (" (one per parameter)" if name in LAWS else "")] \
        if len(pts) < n_min else []
    missing += [f"{k} {COUNTED[v]}s" for v, k in distinct.items()
                if n_distinct(getattr(pts, v)) < k]
    return f"needs {' and '.join(missing)}" if missing else ""


def describe(pts: Points) -> str:
    unit = "run(s)" if pts.source == "runs" else "point(s)"
    return (f"{len(pts)} {unit} of " + ", ".join(f"{n_distinct(getattr(pts, v))} {word}(s)"
                                                 for v, word in COUNTED.items()))


EXPONENT_OF = {"alpha_N": "N", "alpha_D": "D", "alpha_C": "C", "alpha": "N", "beta": "D"}


def degeneracies(name: str, r: dict) -> list[str]:
    """Warnings about a fitted law; a frontier that is not a minimum or not finite becomes None.

    A parametric law with an exponent <= 0 (or at its MIN_EXPONENT bound) does not fall with that
    variable, so it has no compute-optimal frontier. Approaches 1 and 2 fit N_opt = k_N C^a
    directly: a or b < 0 is reported, and their frontier kept (it is what the data say)."""
    out = []
    params = {k: v["value"] for k, v in r["params"].items()}
    if name in LAWS:
        for k, var in EXPONENT_OF.items():
            v = params.get(k)
            if v is not None and v <= MIN_EXPONENT * (1 + 1e-6):
                state = "negative" if v < 0 else f"at its lower bound {MIN_EXPONENT:g}"
                out.append(f"{name}: exponent {k}={v:.3g} is {state}: the fitted loss does not "
                           f"fall with {var}")
    else:
        for k, grows in (("a", "N_opt"), ("b", "D_opt")):
            if params[k] < 0:
                out.append(f"{name}: exponent {k}={params[k]:.3g} is negative: {grows} shrinks "
                           "as compute grows")
    if r.get("frontier") is not None:
        finite = all(math.isfinite(row[k]) and row[k] > 0 for row in r["frontier"]
                     for k in ("N_opt", "D_opt"))
        if (out and name in LAWS) or not finite:
            why = ("it needs a loss that falls with both N and D" if out and name in LAWS
                   else "non-finite N_opt or D_opt")
            out.append(f"{name}: no compute-optimal frontier ({why}); written as null")
            r["frontier"] = None
    return out


def finite_json(obj, path: str = ""):
    """(obj with every NaN, infinity or complex number replaced by None, the paths replaced)."""
    if isinstance(obj, dict):
        pairs = [(k, finite_json(v, f"{path}.{k}" if path else str(k))) for k, v in obj.items()]
        return {k: v for k, (v, _) in pairs}, [p for _, (_, ps) in pairs for p in ps]
    if isinstance(obj, (list, tuple)):
        items = [finite_json(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return [v for v, _ in items], [p for _, ps in items for p in ps]
    if isinstance(obj, (complex, np.complexfloating)):
        return None, [path]
    if isinstance(obj, (float, np.floating)):
        return (float(obj), []) if math.isfinite(obj) else (None, [path])
    if isinstance(obj, np.integer):
        return int(obj), []
    return obj, []


def _clean(name: str, r: dict, warnings: list[str]) -> dict:
    """r with nulls for non-finite values; a warning about them unless one already explains
    them (a degenerate fit's derived values and bootstrap samples go with its exponents)."""
    r, bad = finite_json(r)
    if bad and not any(w.startswith(f"{name}:") for w in warnings):
        shown = ", ".join(bad[:3]) + (f", ... ({len(bad)} in all)" if len(bad) > 3 else "")
        warnings.append(f"{name}: non-finite values written as null: {shown}")
    return r


# ----------------------------------------------------------------------------------------------


def laws_for(which: str) -> list[str]:
    if which == "kaplan":
        return list(KAPLAN)
    if which == "chinchilla":
        return ["chinchilla_approach1", "chinchilla_approach2", "chinchilla_approach3"]
    if which == "all":
        return laws_for("kaplan") + laws_for("chinchilla")
    raise ConfigError(f"--law {which!r} is not valid; use kaplan, chinchilla or all")


def fit_all(pts: Points, which: str = "all", delta: float | None = 1e-3,
            top_k: int | None = 200, n_boot: int = 200, seed: int = 0,
            isoflop_width: float = 0.1, progress: Progress = _quiet) -> dict:
    """Every law asked for that the data can determine; see the module docstring for what
    degenerate data and fits give. The result holds no NaN or infinity (json allow_nan=False)."""
    names = laws_for(which)
    check(pts)
    short = {n: shortfall(n, pts) for n in names}
    if all(short.values()):
        raise ConfigError(f"{describe(pts)}: too few for every law asked for ("
                          + "; ".join(f"{n} {why}" for n, why in short.items()) + ")")
    warnings = list(pts.warnings)
    results = {}
    for n in names:
        if short[n]:
            r = {"law": n, "status": "insufficient", "reason": f"{short[n]}; has {describe(pts)}"}
        elif n == "chinchilla_approach1":
            r = approach1(pts, n_boot=n_boot, seed=seed, progress=progress)
        elif n == "chinchilla_approach2":
            r = approach2(pts, isoflop_width, n_boot=n_boot, seed=seed, progress=progress)
        else:
            r = fit_law(LAWS[n], pts, delta, top_k, n_boot, seed=seed, progress=progress)
        if r["status"] != "ok":
            warnings.append(f"{n} not fitted: {r['reason']}")
        else:
            warnings += degeneracies(n, r)
        results[n] = _clean(n, r, warnings)
    data = {"source": pts.source, "points": len(pts), "excluded": pts.excluded,
            "notes": pts.notes,
            "range": {k: [float(v.min()), float(v.max())]
                      for k, v in (("N", pts.N), ("D", pts.D), ("C", pts.C), ("loss", pts.loss))}}
    return {"data": finite_json(data)[0], "laws": results, "warnings": warnings}
