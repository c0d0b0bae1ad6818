"""Compute multipliers: how much compute the baseline would need to reach a variant's loss.

The comparison a single-size ablation cannot make (`llmtrain ablate --sizes`): a variant that is
0.05 nats better at one size may be worth 1.1x or 3x compute depending on how fast the baseline's
loss falls with compute. With the baseline's loss-compute law L_b(C) and a variant that reaches
loss L_v with compute C_v,

    multiplier = C_b(L_v) / C_v,    C_b = L_b^-1 (the compute the baseline needs for L_v)

> 1: the variant is worth that factor of extra baseline compute (it is better); < 1: worse.

The baseline law is the pure power law L(C) = (C0 / C)^alpha (Kaplan et al. 2020, eq. 1.3, without
the irreducible term), fitted by least squares in log-log space. Why not the toolkit's
`kaplan_LC` with its irreducible loss E: an ablation runs 2-3 sizes, and three parameters through
2-3 compute values are not identified (E trades off against alpha exactly); over the narrow
compute range of the study the pure power law is the local slope, which is all the multiplier
needs. A variant loss outside the baseline's loss range is extrapolated, and reported as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LossComputeLaw:
    """L(C) = (C0 / C)^alpha, fitted to (C, L) points."""

    alpha: float
    log_c0: float
    loss_range: tuple[float, float]  # the fitted points' losses: inside = interpolation
    n_points: int

    def loss(self, compute: float) -> float:
        return math.exp(self.alpha * (self.log_c0 - math.log(compute)))

    def log_compute_for(self, loss: float) -> float:
        """ln of the compute at which the law reaches `loss` (in logs: with a small alpha the
        compute itself overflows a float)."""
        return self.log_c0 - math.log(loss) / self.alpha

    def as_dict(self) -> dict:
        return {"formula": "L(C) = (C0 / C)^alpha", "alpha": self.alpha,
                "log10_C0": self.log_c0 / math.log(10), "loss_range": list(self.loss_range),
                "n_points": self.n_points}


def fit_loss_compute(compute, loss) -> LossComputeLaw:
    """Least squares of log L on log C. ValueError when the points span fewer than two compute
    values or the loss does not fall with compute (no law to invert)."""
    c, y = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    ok = np.isfinite(c) & np.isfinite(y) & (c > 0) & (y > 0)
    c, y = c[ok], y[ok]
    if len(np.unique(np.round(np.log(c), 9))) < 2:
        raise ValueError("needs finite losses at two or more different compute values")
    slope, intercept = np.polyfit(np.log(c), np.log(y), 1)
    alpha = -float(slope)
    if not alpha > 0:
        raise ValueError(f"loss does not fall with compute (fitted exponent {alpha:.3g})")
    # log L = intercept - alpha log C = alpha (log C0 - log C)
    return LossComputeLaw(alpha, float(intercept) / alpha, (float(y.min()), float(y.max())),
                          int(len(y)))


def compute_multiplier(baseline: LossComputeLaw, compute: float, loss: float) -> dict:
    """The multiplier of a variant that reached `loss` with `compute`, against `baseline`."""
    lo, hi = baseline.loss_range
    log_m = baseline.log_compute_for(loss) - math.log(compute)
    return {"multiplier": math.exp(min(log_m, 700.0)),  # beyond e^700: inf in all but name
            "extrapolated": not lo <= loss <= hi}


def geometric_mean(values) -> float | None:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None
