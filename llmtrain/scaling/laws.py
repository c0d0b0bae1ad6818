"""Scaling laws as formulas: loss predictions in log space, their gradients, and frontiers.

Every law is fitted the way Hoffmann et al. 2022 (approach 3) fit theirs: in log space, as a
log-sum-exp of the terms, so that the parameters are log-coefficients and exponents and the
optimiser never sees a negative coefficient. A law here knows
  * `log_pred(theta, logs)`: log L for a batch of parameter vectors theta (S, P) at n points,
    and optionally its Jacobian (S, n, P) — analytic, so that thousands of starts are cheap;
  * `params(theta)`: the parameters named as in the formula (E, A, alpha, ...);
  * `grid(logs)`: the initialisation grid (Hoffmann et al.'s grid for approach 3);
  * `frontier(p, C)`: the compute-optimal (N_opt, D_opt) for a budget C, where the law has one.

References
  Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (eqs. 1.1-1.5).
  Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (eq. 2, 4; D.2).
  Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt".
"""

from __future__ import annotations

import itertools

import numpy as np

# Published approach-3 fits of L = E + A/N^alpha + B/D^beta (N parameters, D tokens).
PUBLISHED = {
    "hoffmann2022": {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28,
                     "cite": "Hoffmann et al. 2022, eq. 10 / D.2"},
    "besiroglu2024": {"E": 1.82, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658,
                      "cite": "Besiroglu et al. 2024, Table 1"},
}

# The Kaplan laws' exponents are bounded below (their fits stay positive); one at the bound is
# a loss that does not fall with that variable.
MIN_EXPONENT = 1e-4


def _softmax_lse(terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log(sum(exp(terms), -1)) and the softmax weights (its gradient w.r.t. each term)."""
    m = terms.max(axis=-1, keepdims=True)
    ex = np.exp(terms - m)
    s = ex.sum(axis=-1, keepdims=True)
    return (m + np.log(s))[..., 0], ex / s


class Law:
    """Base class; see the module docstring for the contract."""

    name = ""
    formula = ""
    variables: tuple[str, ...] = ()
    theta_names: tuple[str, ...] = ()
    param_names: tuple[str, ...] = ()
    derived_names: tuple[str, ...] = ()
    bounds: list[tuple[float | None, float | None]] | None = None

    @property
    def n_params(self) -> int:
        return len(self.theta_names)

    def log_pred(self, theta: np.ndarray, logs: dict[str, np.ndarray], jac: bool = False):
        raise NotImplementedError

    def params(self, theta: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def theta(self, p: dict[str, float]) -> np.ndarray:
        raise NotImplementedError

    def grid(self, logs: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def derived(self, p: dict[str, float]) -> dict[str, float]:
        return {}

    def frontier(self, p: dict[str, float], C: np.ndarray):
        """(N_opt, D_opt) arrays for budgets C, or None if the law has no compute frontier."""
        return None

    def predict(self, p: dict[str, float], **data: np.ndarray) -> np.ndarray:
        """The loss itself (not its log) at the given N / D / C."""
        logs = {k: np.log(np.asarray(v, dtype=float)) for k, v in data.items()}
        return np.exp(self.log_pred(self.theta(p)[None, :], logs)[0])


class PowerLaw1D(Law):
    """Kaplan et al. 2020 eq. 1.1-1.3 with an irreducible term: L(X) = E + (X_c / X)^alpha_X.

    theta = (e, alpha, log X_c): log L = LSE(e, alpha (log X_c - log X)).
    """

    def __init__(self, var: str):
        self.var = var
        self.name = f"kaplan_L{var}"
        self.formula = f"L({var}) = E + ({var}_c / {var})^alpha_{var}"
        self.variables = (var,)
        self.theta_names = ("log_E", f"alpha_{var}", f"log_{var}_c")
        self.param_names = ("E", f"{var}_c", f"alpha_{var}")
        self.bounds = [(None, None), (MIN_EXPONENT, None), (None, None)]

    def log_pred(self, theta, logs, jac=False):
        e, alpha, lxc = (theta[:, i:i + 1] for i in range(3))
        lx = logs[self.var][None, :]
        t = alpha * (lxc - lx)
        val, w = _softmax_lse(np.stack(np.broadcast_arrays(e, t), axis=-1))
        if not jac:
            return val
        J = np.stack([w[..., 0], w[..., 1] * (lxc - lx), w[..., 1] * alpha], axis=-1)
        return val, J

    def params(self, theta):
        e, alpha, lxc = theta
        return {"E": float(np.exp(e)), f"{self.var}_c": float(np.exp(lxc)),
                f"alpha_{self.var}": float(alpha)}

    def theta(self, p):
        v = self.var
        return np.array([np.log(p["E"]), p[f"alpha_{v}"], np.log(p[f"{v}_c"])])

    def grid(self, logs):
        # Place X_c so that the reducible term at the median X spans e^-4 .. e^2 of a nat.
        mid = float(np.median(logs[self.var]))
        rows = []
        for e, alpha, t in itertools.product(np.arange(-1.0, 1.01, 0.5),
                                             (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5),
                                             np.arange(-4.0, 2.01, 1.0)):
            rows.append((e, alpha, mid + t / alpha))
        return np.array(rows)


class KaplanND(Law):
    """Kaplan et al. 2020 eq. 1.5 with an irreducible term:

        L(N, D) = E + [ (N_c / N)^(alpha_N / alpha_D) + D_c / D ]^alpha_D

    theta = (e, log N_c, log D_c, alpha_N, alpha_D). With r = alpha_N / alpha_D the optimum at a
    budget C = 6 N D is N_opt = (r N_c^r C / (6 D_c))^(1 / (r + 1)), so N_opt ∝ C^a with
    a = alpha_D / (alpha_N + alpha_D) (E does not move the optimum).
    """

    name = "kaplan_LND"
    formula = "L(N, D) = E + [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D"
    variables = ("N", "D")
    theta_names = ("log_E", "log_N_c", "log_D_c", "alpha_N", "alpha_D")
    param_names = ("E", "N_c", "D_c", "alpha_N", "alpha_D")
    derived_names = ("a", "b")
    bounds = [(None, None), (None, None), (None, None), (MIN_EXPONENT, None),
              (MIN_EXPONENT, None)]

    def log_pred(self, theta, logs, jac=False):
        e, lnc, ldc, an, ad = (theta[:, i:i + 1] for i in range(5))
        lN, lD = logs["N"][None, :], logs["D"][None, :]
        r = an / ad
        u, v = r * (lnc - lN), ldc - lD
        s, wi = _softmax_lse(np.stack(np.broadcast_arrays(u, v), axis=-1))
        t = ad * s
        val, wo = _softmax_lse(np.stack(np.broadcast_arrays(e, t), axis=-1))
        if not jac:
            return val
        pe, pt, wu, wv = wo[..., 0], wo[..., 1], wi[..., 0], wi[..., 1]
        J = np.stack([pe, pt * wu * an, pt * ad * wv, pt * wu * (lnc - lN), pt * (s - wu * u)],
                     axis=-1)
        return val, J

    def params(self, theta):
        e, lnc, ldc, an, ad = theta
        return {"E": float(np.exp(e)), "N_c": float(np.exp(lnc)), "D_c": float(np.exp(ldc)),
                "alpha_N": float(an), "alpha_D": float(ad)}

    def theta(self, p):
        return np.array([np.log(p["E"]), np.log(p["N_c"]), np.log(p["D_c"]), p["alpha_N"],
                         p["alpha_D"]])

    def grid(self, logs):
        mn, md = float(np.median(logs["N"])), float(np.median(logs["D"]))
        rows = []
        for e, an, ad, tn, td in itertools.product(np.arange(-1.0, 1.01, 0.5),
                                                   (0.1, 0.2, 0.35, 0.5, 0.75),
                                                   (0.1, 0.2, 0.35, 0.5, 0.75),
                                                   (-3.0, -1.5, 0.0, 1.5), (-3.0, -1.5, 0.0, 1.5)):
            # tn, td: each term's log contribution (alpha_X * log(X_c / X)) at the median point
            rows.append((e, mn + tn / an, md + td / ad, an, ad))
        return np.array(rows)

    def derived(self, p):
        s = p["alpha_N"] + p["alpha_D"]
        return {"a": p["alpha_D"] / s, "b": p["alpha_N"] / s}

    def frontier(self, p, C):
        C = np.asarray(C, dtype=float)
        r = p["alpha_N"] / p["alpha_D"]
        logn = (np.log(r) + r * np.log(p["N_c"]) + np.log(C / 6.0) - np.log(p["D_c"])) / (r + 1)
        N = np.exp(logn)
        return N, C / (6.0 * N)


class ChinchillaND(Law):
    """Hoffmann et al. 2022 approach 3 (eq. 2): L(N, D) = E + A / N^alpha + B / D^beta.

    theta = (a, b, e, alpha, beta) with A = e^a, B = e^b, E = e^e, as in their appendix D.2:
    log L = LSE(a - alpha log N, b - beta log D, e). Minimising L at C = 6 N D gives (eq. 4)
    N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, G = (alpha A / (beta B))^(1/(alpha+beta)),
    a = beta / (alpha + beta), b = alpha / (alpha + beta).
    """

    name = "chinchilla_approach3"
    formula = "L(N, D) = E + A/N^alpha + B/D^beta"
    variables = ("N", "D")
    theta_names = ("log_A", "log_B", "log_E", "alpha", "beta")
    param_names = ("E", "A", "B", "alpha", "beta")
    derived_names = ("a", "b", "G")
    bounds = None  # unconstrained, as in the papers

    def log_pred(self, theta, logs, jac=False):
        a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
        lN, lD = logs["N"][None, :], logs["D"][None, :]
        terms = np.stack(np.broadcast_arrays(a - alpha * lN, b - beta * lD, e), axis=-1)
        val, w = _softmax_lse(terms)
        if not jac:
            return val
        J = np.stack([w[..., 0], w[..., 1], w[..., 2], -w[..., 0] * lN, -w[..., 1] * lD], axis=-1)
        return val, J

    def params(self, theta):
        a, b, e, alpha, beta = theta
        return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
                "alpha": float(alpha), "beta": float(beta)}

    def theta(self, p):
        return np.array([np.log(p["A"]), np.log(p["B"]), np.log(p["E"]), p["alpha"], p["beta"]])

    def grid(self, logs):
        # Hoffmann et al. 2022 D.2: alpha, beta in {0, .5, .., 2}, e in {-1, -.5, .., 1},
        # a, b in {0, 5, .., 25}: 5 * 5 * 5 * 6 * 6 = 4500 starts.
        ab = np.arange(0.0, 25.01, 5.0)
        ex = np.arange(0.0, 2.01, 0.5)
        es = np.arange(-1.0, 1.01, 0.5)
        return np.array(list(itertools.product(ab, ab, es, ex, ex)))

    def derived(self, p):
        alpha, beta, A, B = (np.float64(p[k]) for k in ("alpha", "beta", "A", "B"))
        with np.errstate(all="ignore"):  # a degenerate fit gives NaN/inf here, which it reports
            s = alpha + beta
            ratio = alpha * A / (beta * B)
            # A negative exponent makes the ratio negative (G complex): L has no minimum along
            # C = 6ND, so there is no frontier, and NaN says so.
            G = np.exp(np.log(ratio) / s) if ratio > 0 else np.nan
            return {"a": float(beta / s), "b": float(alpha / s), "G": float(G)}

    def frontier(self, p, C):
        C = np.asarray(C, dtype=float)
        d = self.derived(p)
        N = d["G"] * (C / 6.0) ** d["a"]
        return N, C / (6.0 * N)


LAWS = {law.name: law for law in (PowerLaw1D("N"), PowerLaw1D("D"), PowerLaw1D("C"),
                                  KaplanND(), ChinchillaND())}
KAPLAN = ("kaplan_LN", "kaplan_LD", "kaplan_LC", "kaplan_LND")


def powerlaw_frontier(p: dict[str, float], C: np.ndarray):
    """Approach 1/2 frontier: N_opt = k_N C^a, D_opt = C / (6 N_opt) = k_D C^b."""
    C = np.asarray(C, dtype=float)
    N = p["k_N"] * C ** p["a"]
    return N, C / (6.0 * N)


def frontier_for(law_name: str, p: dict[str, float], C: np.ndarray):
    """The compute-optimal (N, D) of any fitted law that has one (used by `scaling plan`)."""
    if law_name in ("chinchilla_approach1", "chinchilla_approach2"):
        return powerlaw_frontier(p, C)
    law = LAWS.get(law_name)
    return None if law is None else law.frontier(p, C)
