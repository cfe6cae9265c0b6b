"""The sweep's PNGs (matplotlib, headless): IsoFLOP curves with their minima, the power-law fit of the optimal
tokens, and the downstream sigmoid."""

import math
from pathlib import Path
from typing import List

import numpy as np


def _figure():
    """pyplot, and a new figure with one axes of the size every sweep plot has."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a training machine
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    return plt, fig, ax


def _save(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label the axes, write the PNG to `path` and free the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_isoflop(path: Path, runs: List[dict], budgets: List[dict]) -> Path:
    """Validation loss against N per budget, the fitted parabolas and their minima."""
    plt, fig, ax = _figure()
    colors = plt.cm.viridis(np.linspace(0, 0.85, max(1, len(budgets))))
    for color, entry in zip(colors, budgets):
        group = sorted((r for r in runs if r["budget"] == entry["budget"]), key=lambda r: r["params"])
        n = np.array([r["params"] for r in group], dtype=float)
        ax.scatter(n, [r["val_loss"] for r in group], color=color, label=f"C = {entry['budget']:.2g}")
        if "parabola" in entry:
            p = entry["parabola"]
            x = np.linspace(math.log10(n.min()) - 0.1, math.log10(n.max()) + 0.1, 100)
            ax.plot(10 ** x, p["a"] * x ** 2 + p["b"] * x + p["c"], color=color, lw=1)
            ax.scatter([entry["n_opt"]], [p["loss_opt"]], color=color, marker="*", s=160, edgecolor="black")
    ax.set_xscale("log")
    return _save(plt, fig, ax, path, "parameters N (non-embedding)", "final validation loss",
                 "IsoFLOP curves (stars: parabola minima)")


def plot_power_law(path: Path, budgets: List[dict], law, predictions: List[dict]) -> Path:
    """The optimal tokens per budget and D*(C) = A C^alpha through them (with its 95% band), up to the targets."""
    plt, fig, ax = _figure()
    fitted = [b for b in budgets if "tokens_opt" in b]
    c = np.array([b["budget"] for b in fitted])
    ax.scatter(c, [b["tokens_opt"] for b in fitted], color="black", zorder=3, label="parabola minima")
    top = max([c.max()] + [p["compute"] for p in predictions])
    grid = np.logspace(math.log10(c.min()) - 0.2, math.log10(top) + 0.2, 200)
    tokens = law.tokens(grid)
    ax.plot(grid, tokens, label=f"D* = {law.A:.3g} C^{law.alpha:.3f}")
    if law.points >= 3:
        spread = np.array([10 ** (law.t95() * law.log10_tokens_stderr(g)) for g in grid])
        ax.fill_between(grid, tokens / spread, tokens * spread, alpha=0.2, label="95% (fit covariance)")
    for p in predictions:
        ax.errorbar([p["compute"]], [p["tokens"]], yerr=[[p["tokens"] - p["tokens_95"][0]],
                                                         [p["tokens_95"][1] - p["tokens"]]], fmt="o", color="red")
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _save(plt, fig, ax, path, "compute C (FLOPs, 6ND)", "compute-optimal training tokens D*",
                 "Optimal tokens against compute")


def plot_downstream(path: Path, runs: List[dict], downstream: dict) -> Path:
    """Accuracy against the normalized NLL of the correct answer (every run) and the fitted sigmoid."""
    from scaling.fit import sigmoid_accuracy
    plt, fig, ax = _figure()
    scored = [r for r in runs if "downstream" in r]
    nll = np.array([r["downstream"]["nll_correct"] for r in scored])
    ax.scatter(nll, [r["downstream"]["accuracy"] for r in scored], c=np.log10([r["budget"] for r in scored]),
               cmap="viridis", label="runs (color: log10 C)")
    s = downstream["sigmoid"]
    x = np.linspace(nll.min() - 0.1, nll.max() + 0.1, 200)
    ax.plot(x, sigmoid_accuracy(x, s["midpoint"], s["scale"], s["chance"]), color="black", label="sigmoid fit")
    ax.axhline(s["chance"], ls=":", color="gray", label="chance")
    return _save(plt, fig, ax, path, "normalized NLL of the correct next line (nats / character)",
                 "accuracy", "Downstream: accuracy from NLL")
