"""One PNG per fit: data vs. fitted curves, IsoFLOP parabolas, and the compute-optimal frontier
with its bootstrap band. matplotlib's Agg backend, so it works without a display."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from llmtrain.scaling.data import Points  # noqa: E402
from llmtrain.scaling.fit import isoflop_groups  # noqa: E402
from llmtrain.scaling.laws import LAWS  # noqa: E402


def _ok(result: dict, name: str) -> dict | None:
    """The fitted law, if it was fitted and all its parameters are numbers (not null)."""
    r = result["laws"].get(name)
    usable = r and r.get("status") == "ok" and all(
        v["value"] is not None for v in r["params"].values())
    return r if usable else None


def _values(r: dict) -> dict[str, float]:
    return {k: v["value"] for k, v in r["params"].items()}


def _panel_data(ax, result: dict, pts: Points) -> None:
    sc = ax.scatter(pts.N, pts.loss, c=np.log10(pts.C), cmap="viridis", s=14, zorder=3)
    plt.colorbar(sc, ax=ax, label="log10 C (FLOPs)")
    n = np.logspace(np.log10(pts.N.min()) - 0.2, np.log10(pts.N.max()) + 0.2, 200)
    a3 = _ok(result, "chinchilla_approach3")
    if a3:
        p = _values(a3)
        groups = [g for g in isoflop_groups(pts.C, 0.1) if len(g) >= 3]
        levels = [groups[i] for i in np.unique(np.linspace(0, len(groups) - 1, 8).astype(int))] \
            if groups else [np.array([i]) for i in np.argsort(pts.C)[::max(1, len(pts) // 6)]]
        cmap = plt.get_cmap("viridis")
        lo, hi = np.log10(pts.C.min()), np.log10(pts.C.max())
        for g in levels:
            c = float(np.exp(np.mean(np.log(pts.C[g]))))
            ng = np.logspace(np.log10(pts.N[g].min() / 2), np.log10(pts.N[g].max() * 2), 100)
            ax.plot(ng, LAWS["chinchilla_approach3"].predict(p, N=ng, D=c / (6 * ng)),
                    color=cmap((np.log10(c) - lo) / max(hi - lo, 1e-9)), lw=1)
        ax.plot([], [], color="gray", lw=1, label="approach 3 at fixed C")
    ln = _ok(result, "kaplan_LN")
    if ln:
        ax.plot(n, LAWS["kaplan_LN"].predict(_values(ln), N=n), "k--", lw=1, label="Kaplan L(N)")
    ax.set(xscale="log", xlabel="N (parameters)", ylabel="loss", title="data vs. fitted laws")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _panel_isoflop(ax, result: dict, pts: Points) -> None:
    a2 = result["laws"]["chinchilla_approach2"]
    cmap = plt.get_cmap("plasma")
    groups = isoflop_groups(pts.C, a2["isoflop_width_decades"])
    rows = a2.get("groups", [])
    for k, g in enumerate(groups):
        color = cmap(k / max(1, len(groups) - 1))
        ax.scatter(pts.N[g], pts.loss[g], s=10, color=color)
        Cg = float(np.exp(np.mean(np.log(pts.C[g]))))
        row = next((r for r in rows if np.isclose(r["C"], Cg)), None)
        if row:
            x = np.linspace(np.log(pts.N[g].min()), np.log(pts.N[g].max()), 100)
            ax.plot(np.exp(x), np.polyval(row["parabola"], x), color=color, lw=1)
            ax.plot(row["N_opt"], row["L_opt"], "kx")
    ax.set(xscale="log", xlabel="N (parameters)", ylabel="loss",
           title=f"IsoFLOP parabolas ({len(rows)} of {len(groups)} groups fitted)")


def _panel_frontier(ax, result: dict) -> None:
    for name, r in result["laws"].items():
        if r.get("status") != "ok" or not r.get("frontier"):
            continue
        f = r["frontier"]
        C = np.array([x["C"] for x in f])
        line, = ax.plot(C, [x["N_opt"] for x in f], label=name)
        band = [x.get("N_ci95") for x in f]
        if all(band):
            ax.fill_between(C, [b[0] for b in band], [b[1] for b in band],
                            color=line.get_color(), alpha=0.2)
        if name == "chinchilla_approach2":
            ax.scatter([g["C"] for g in r["groups"]], [g["N_opt"] for g in r["groups"]],
                       color=line.get_color(), marker="x", zorder=3)
        if name == "chinchilla_approach1":
            ax.scatter([g["C"] for g in r["envelope"]], [g["N_opt"] for g in r["envelope"]],
                       color=line.get_color(), s=8, zorder=3)
    ax.set(xscale="log", yscale="log", xlabel="C (FLOPs)", ylabel="N_opt (parameters)",
           title="compute-optimal frontier (95% bootstrap band)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot_fit(result: dict, pts: Points, path: str | Path) -> Path:
    """Write the figure; panels whose fit is missing or insufficient are left out."""
    panels = [_panel_data]
    if _ok(result, "chinchilla_approach2"):
        panels.append(_panel_isoflop)
    if any(r.get("status") == "ok" and r.get("frontier") for r in result["laws"].values()):
        panels.append(lambda ax, res, _: _panel_frontier(ax, res))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        panel(ax, result, pts)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
