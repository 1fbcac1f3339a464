"""The poster's Fig. 3 from a sweep's results table, and a size-vs-accuracy figure.

``accuracy_figure``: test accuracy vs % of channels kept, one line per method (DCE's
variants, post-training pruning, the narrow network trained from scratch), the
mean over seeds as a line and min..max over seeds as a band (with three seeds a
standard deviation says little; the band shows every seed), each seed as a dot,
and the dense baseline (fraction 1.0) as a horizontal line with its band.

``reduction_figure``: accuracy vs parameter reduction and vs FLOP reduction
(factor dense / compact, log axis), one point per method and fraction with
min..max error bars, the dense baseline as a horizontal line.

matplotlib runs on its Agg backend (no display needed).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from ..atomic import write_atomic
from .results import METHOD_ORDER, aggregate

__all__ = ["accuracy_figure", "reduction_figure", "plot_results", "ACCURACY_PNG",
           "REDUCTION_PNG"]

ACCURACY_PNG = "accuracy_vs_channels.png"
REDUCTION_PNG = "reduction_vs_accuracy.png"
_STYLE = {"shrink": dict(color="tab:blue", marker="o", label="DCE, shrinking (ours)"),
          "shrink-random": dict(color="tab:purple", marker="P",
                                label="DCE shrinking, random channels"),
          "cucb": dict(color="tab:cyan", marker="v", label="DCE, CUCB (poster)"),
          "random": dict(color="tab:orange", marker="s", label="DCE, random (poster)"),
          "prune": dict(color="tab:red", marker="^", label="Taylor pruning after dense"),
          "narrow": dict(color="tab:green", marker="D",
                         label="narrow at the budget's widths, from scratch"),
          "narrow-uniform": dict(color="tab:olive", marker="d",
                                 label="uniformly narrow, from scratch")}
assert set(_STYLE) <= set(METHOD_ORDER)


def save_figure(fig, path: str) -> None:
    """``fig`` as the image file ``path`` (its extension names the format), written whole."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    write_atomic(path, lambda f: fig.savefig(f, format=fmt), binary=True)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _dense_line(ax, cells: list[dict]) -> Optional[dict]:
    dense = [c for c in cells if c["method"] == "dense"]
    if not dense:
        return None
    d = dense[0]
    ax.axhline(100 * d["acc_mean"], color="black", linestyle="--", linewidth=1,
               label=f"dense baseline (n={d['n']})")
    ax.axhspan(100 * d["acc_min"], 100 * d["acc_max"], color="black", alpha=0.08, linewidth=0)
    return d


def accuracy_figure(rows: Sequence[dict], path: str, title: Optional[str] = None) -> str:
    plt = _pyplot()
    cells = aggregate(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    dense = _dense_line(ax, cells)
    if dense is not None:  # the baseline is also the point at 100 % active channels
        ax.errorbar([100 * dense["fraction"]], [100 * dense["acc_mean"]],
                    yerr=[[100 * (dense["acc_mean"] - dense["acc_min"])],
                          [100 * (dense["acc_max"] - dense["acc_mean"])]],
                    color="black", marker="D", capsize=3, zorder=4)
    for method, style in _STYLE.items():
        mine = [c for c in cells if c["method"] == method]
        if not mine:
            continue
        x = [100 * c["fraction"] for c in mine]
        ax.plot(x, [100 * c["acc_mean"] for c in mine], color=style["color"],
                marker=style["marker"], label=f"{style['label']} (n={max(c['n'] for c in mine)})")
        ax.fill_between(x, [100 * c["acc_min"] for c in mine],
                        [100 * c["acc_max"] for c in mine], color=style["color"], alpha=0.18,
                        linewidth=0)
        seeds = [r for r in rows if r["method"] == method]
        ax.scatter([100 * r["fraction"] for r in seeds], [100 * r["test_acc"] for r in seeds],
                   color=style["color"], s=8, alpha=0.6, zorder=3)
    ax.set_xlabel("channels kept (% of each conv layer, or of all under a global budget)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Accuracy vs channels kept: mean, band = min..max over seeds",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def reduction_figure(rows: Sequence[dict], path: str, title: Optional[str] = None) -> str:
    plt = _pyplot()
    cells = aggregate(rows)
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.2), dpi=110, sharey=True)
    for ax, key, label in ((axes[0], "param_reduction", "parameter reduction (dense / compact)"),
                           (axes[1], "flop_reduction", "FLOP reduction (dense / compact)")):
        _dense_line(ax, cells)
        for method, style in _STYLE.items():
            mine = [c for c in cells if c["method"] == method]
            if not mine:
                continue
            y = [100 * c["acc_mean"] for c in mine]
            err = [[100 * (c["acc_mean"] - c["acc_min"]) for c in mine],
                   [100 * (c["acc_max"] - c["acc_mean"]) for c in mine]]
            ax.errorbar([c[key] for c in mine], y, yerr=err, color=style["color"],
                        marker=style["marker"], capsize=3, label=style["label"])
            if method == "narrow-uniform" or (method == "narrow" and not any(
                    c["method"] == "narrow-uniform" for c in cells)):
                for c in mine:
                    ax.annotate(f"{100 * c['fraction']:.0f}%", (c[key], 100 * c["acc_mean"]),
                                textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(loc="lower left", fontsize=8)
    fig.suptitle(title or "Accuracy vs size of the compact network (labels: % active channels)",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_results(rows: Sequence[dict], out_dir: str, title: Optional[str] = None) -> list[str]:
    """Writes both figures into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    return [accuracy_figure(rows, os.path.join(out_dir, ACCURACY_PNG), title),
            reduction_figure(rows, os.path.join(out_dir, REDUCTION_PNG))]
