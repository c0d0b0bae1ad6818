"""Compute budgets: the compute-optimal (N, D) for a budget, and IsoFLOP sweep configs.

`plan` evaluates a fitted law's frontier at the budget; its interval comes from the bootstrap
samples saved by `scaling fit --json` (the published fits are point estimates: no interval).
`sweep` writes one run config per (budget, model size): the model shape is chosen to hit N
(non-embedding, 12 * n_layers * d_model^2, the count `scaling fit` falls back to) at the base
config's head_dim and depth/width ratio, and train.steps to hit D = C / (6 N) at
train.global_batch_size * train.seq_len tokens per step.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np

from llmtrain.config import Config, ConfigError, load_config, save_config
from llmtrain.scaling.data import fmt_si
from llmtrain.scaling.fit import interval
from llmtrain.scaling.laws import LAWS, PUBLISHED, frontier_for

PREFERRED = ("chinchilla_approach3", "chinchilla_approach2", "chinchilla_approach1", "kaplan_LND")


def load_fit(spec: str = "hoffmann2022", law: str | None = None):
    """(law name, params, bootstrap samples as a list of param dicts, description)."""
    if spec in PUBLISHED:
        p = {k: v for k, v in PUBLISHED[spec].items() if k != "cite"}
        return "chinchilla_approach3", p, [], f"{spec} ({PUBLISHED[spec]['cite']})"
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--fit {spec!r} is neither a fit JSON file nor one of: "
                          + ", ".join(PUBLISHED))
    try:
        laws = json.loads(path.read_text())["laws"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"--fit {spec!r} is not a `llmtrain scaling fit --json` file") from None
    # a degenerate fit's frontier is null (see fit.degeneracies): nothing to plan with
    usable = [n for n in PREFERRED
              if laws.get(n, {}).get("status") == "ok" and laws[n].get("frontier")]
    if law is None:
        if not usable:
            raise ConfigError(f"--fit {spec!r} has no law with a compute-optimal frontier; fit "
                              "with --law chinchilla or all (a degenerate fit has none: see its "
                              "warnings)")
        law = usable[0]
    elif law not in usable:
        raise ConfigError(f"--law {law!r} is not a fitted frontier in {spec!r}; use one of: "
                          + (", ".join(usable) or "(none)"))
    r = laws[law]
    p = {k: v["value"] for k, v in r["params"].items()}
    s = r.get("bootstrap", {}).get("samples", {})
    n = min((len(v) for v in s.values()), default=0)
    samples = [{k: s[k][i] for k in s} for i in range(n)]
    samples = [q for q in samples if None not in q.values()]  # null: a degenerate resample
    return law, p, samples, f"{law} from {spec}"


def plan(budgets: list[float], spec: str = "hoffmann2022", law: str | None = None) -> dict:
    name, p, samples, desc = load_fit(spec, law)
    C = np.asarray(budgets, dtype=float)
    N, D = frontier_for(name, p, C)
    bN = np.array([frontier_for(name, s, C)[0] for s in samples]) if samples else None
    rows = []
    for j, c in enumerate(C):
        row = {"C": float(c), "N_opt": float(N[j]), "D_opt": float(D[j]),
               "tokens_per_param": float(D[j] / N[j]), "N_ci95": None, "D_ci95": None}
        ci = None if bN is None else interval(bN[:, j])
        if ci is not None:
            row["N_ci95"] = ci
            row["D_ci95"] = [float(c / (6 * ci[1])), float(c / (6 * ci[0]))]
        if name in LAWS:
            row["L_opt"] = float(LAWS[name].predict(p, N=N[j:j + 1], D=D[j:j + 1])[0])
        rows.append(row)
    return {"fit": desc, "law": name, "params": p, "bootstrap_samples": len(samples),
            "budgets": rows}


# ----------------------------------------------------------------------------------------------
# IsoFLOP sweep


def nonembedding_params(n_layers: int, d_model: int) -> float:
    return 12.0 * n_layers * d_model * d_model


def model_shape(n_target: float, head_dim: int, aspect: float) -> tuple[int, int]:
    """(n_layers, d_model) with d_model a multiple of head_dim, 12 L d^2 close to n_target and
    d_model / n_layers close to `aspect` (Kaplan et al. 2020 Fig. 5: loss is flat in the ratio
    over a wide range, so N accuracy comes first)."""
    best = None
    for L in range(1, 257):
        raw = math.sqrt(n_target / (12.0 * L)) / head_dim
        for m in {max(1, math.floor(raw)), max(1, math.ceil(raw))}:
            d = m * head_dim
            score = (abs(math.log(nonembedding_params(L, d) / n_target))
                     + 0.25 * abs(math.log(d / L / aspect)))
            if best is None or score < best[0]:
                best = (score, L, d)
    return best[1], best[2]


def _kv_heads(base: Config, n_heads: int) -> int | None:
    if base.model.n_kv_heads is None:
        return None
    group = max(1, base.model.n_heads // base.model.kv_heads)
    want = max(1, n_heads // group)
    return max(k for k in range(1, want + 1) if n_heads % k == 0)


def sweep(base_path: str, budgets: list[float], sizes: list[float] | None, out: str | Path,
          points: int = 5, spread: float = 4.0, fit: str = "hoffmann2022",
          aspect: float | None = None) -> list[dict]:
    """Write <out>/<name>.yaml per IsoFLOP point and <out>/sweep.json; return the points.

    Without `sizes`, each budget gets `points` sizes log-spaced over [N_opt/spread, N_opt*spread]
    around the optimum predicted by `fit`.
    """
    base = load_config(base_path)
    hd = base.model.head_dim
    aspect = aspect or base.model.d_model / base.model.n_layers
    tokens_per_step = base.train.global_batch_size * base.train.seq_len
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for C in budgets:
        if sizes:
            targets = sizes
        else:
            if points < 3:
                raise ConfigError(f"--points {points} is too few for an IsoFLOP parabola; use >= 3")
            n_opt = plan([C], fit)["budgets"][0]["N_opt"]
            targets = list(np.exp(np.linspace(np.log(n_opt / spread), np.log(n_opt * spread),
                                              points)))
        for n_target in targets:
            L, d = model_shape(n_target, hd, aspect)
            N = nonembedding_params(L, d)
            steps = max(1, round(C / (6.0 * N) / tokens_per_step))
            name = f"c{C:.0e}_n{fmt_si(N)}".replace("+", "")
            cfg = copy.deepcopy(base)
            m, t = cfg.model, cfg.train
            if base.model.d_ff:
                m.d_ff = max(8, round(base.model.d_ff * d / base.model.d_model / 8) * 8)
            m.n_layers, m.d_model, m.n_heads = L, d, d // hd
            m.n_kv_heads = _kv_heads(base, m.n_heads)
            t.steps = steps
            t.eval_every = max(1, steps // 20)  # approach 1 needs a loss curve per run
            cfg.optim.warmup_steps = min(base.optim.warmup_steps, steps // 10)
            cfg.logging.run_dir = str(out / "runs" / name)
            path = out / f"{name}.yaml"
            save_config(cfg, path)
            load_config(path)  # the trainer must accept what we wrote
            D = steps * tokens_per_step
            rows.append({"name": name, "config": str(path), "run_dir": cfg.logging.run_dir,
                         "C_target": C, "N_target": float(n_target), "N": N, "D": float(D),
                         "C": 6.0 * N * D, "steps": steps, "n_layers": L, "d_model": d,
                         "n_heads": m.n_heads, "warmup_steps": cfg.optim.warmup_steps})
            if D < tokens_per_step or abs(math.log(6.0 * N * D / C)) > math.log(1.5):
                rows[-1]["warning"] = "budget missed by more than 1.5x (too few steps?)"
    (out / "sweep.json").write_text(json.dumps({"base": str(base_path), "points": rows},
                                               indent=1))
    return rows
