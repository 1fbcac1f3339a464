"""Turns pytest-benchmark JSON from bench/ into a markdown table and a plot.

    python bench/report.py results.json --markdown table.md --plot layer.png --step-plot step.png
"""
from __future__ import annotations

import argparse
import json
import platform

import torch


def load_rows(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    return [b["extra_info"] | {"name": b["name"]} for b in data["benchmarks"]], data


def machine_line(data: dict) -> str:
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw", platform.processor())
    return (f"{cpu}, {info.get('cpu', {}).get('count', '?')} cores; torch {torch.__version__}; "
            f"{data.get('datetime', '')[:16]}")


def layer_table(rows: list[dict]) -> str:
    lines = ["| shape (C, HxW) | threads | p | narrow/dense | ours/narrow | packed/narrow | "
             "ours/dense | naive/dense | ours ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r.get("kind") == "layer"),
                    key=lambda r: (r["channels"], r["threads"], -r["fraction"])):
        lines.append(
            f"| {r['channels']}, {r['size']}x{r['size']} | {r['threads']} | {r['fraction']} | "
            f"{r['narrow_over_dense']:.3f} | {r['ours_over_narrow']:.3f} | "
            f"{r['packed_over_narrow']:.3f} | {r['ours_over_dense']:.3f} | {r['naive_over_dense']:.3f} | {r['ms_ours']:.1f} |")
    return "\n".join(lines)


SALIENCY_HEADER = "saliency overhead | ± (half IQR) |"


def _saliency_cells(r: dict) -> str:
    return f"{100 * r['saliency_overhead']:+.2f}% | {100 * r['saliency_resolution']:.2f}% |"


def saliency_table(rows: list[dict]) -> str:
    sal = [r for r in rows if r.get("kind") == "saliency"]
    if not sal:
        return ""
    lines = [f"| layer shape (C, HxW) | threads | {SALIENCY_HEADER}", "|---|---|---|---|"]
    for r in sorted(sal, key=lambda r: (r["channels"], r["threads"])):
        lines.append(f"| {r['channels']}, {r['size']}x{r['size']} | {r['threads']} | "
                     + _saliency_cells(r))
    return "\n".join(lines)


def step_table(rows: list[dict]) -> str:
    steps = [r for r in rows if r.get("kind") == "step"]
    if not steps:
        return ""
    lines = ["| threads | p | narrow/dense | ours/narrow | ours/dense | dense ms | narrow ms | "
             "ours ms |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(steps, key=lambda r: (r["threads"], -r["fraction"])):
        lines.append(f"| {r['threads']} | {r['fraction']} | {r['narrow_over_dense']:.3f} | "
                     f"{r['ours_over_narrow']:.3f} | {r['ours_over_dense']:.3f} | "
                     f"{r['ms_dense']:.0f} | {r['ms_narrow']:.0f} | {r['ms_ours']:.0f} |")
    sal = [r for r in rows if r.get("kind") == "step_saliency"]
    if sal:
        lines += ["", f"| whole step, p | threads | {SALIENCY_HEADER}", "|---|---|---|---|"]
        for r in sorted(sal, key=lambda r: -r["fraction"]):
            lines.append(f"| {r['fraction']} | {r['threads']} | " + _saliency_cells(r))
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    mem = [r for r in rows if r.get("kind") == "memory"]
    if not mem:
        return ""
    lines = ["| p | dense MiB | narrow MiB | ours MiB | ours/dense |", "|---|---|---|---|---|"]
    for r in sorted(mem, key=lambda r: -r["fraction"]):
        lines.append(f"| {r['fraction']} | {r['mib_dense']:.0f} | {r['mib_narrow']:.0f} | "
                     f"{r['mib_ours']:.0f} | {r['mib_ours'] / r['mib_dense']:.2f} |")
    return "\n".join(lines)


def plot_layer(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer = [r for r in rows if r.get("kind") == "layer"]
    shapes = sorted({(r["channels"], r["size"]) for r in layer})
    threads = sorted({r["threads"] for r in layer})
    # One row per thread count, one column per layer shape.
    fig, axes = plt.subplots(len(threads), len(shapes), figsize=(3.4 * len(shapes),
                             3.0 * len(threads)), squeeze=False)
    for i, t in enumerate(threads):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            rs = sorted((r for r in layer if (r["channels"], r["size"]) == shape
                         and r["threads"] == t), key=lambda r: r["fraction"])
            ps = [r["fraction"] for r in rs]
            ax.plot(ps, [r["ours_over_dense"] for r in rs], "o-", label="ours")
            ax.plot(ps, [r["narrow_over_dense"] for r in rs], "s--", label="narrow conv")
            ax.plot(ps, [r["naive_over_dense"] for r in rs], "x:", label="naive gather")
            ax.plot(ps, [p * p for p in ps], "k-", lw=0.8, alpha=0.5, label="p²")
            ax.set_title(f"C={shape[0]}, {shape[1]}x{shape[1]}, {t} thread(s)", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if i == len(threads) - 1:
                ax.set_xlabel("active fraction p")
        axes[i][0].set_ylabel("fwd+bwd time / dense")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def plot_step(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if r.get("kind") == "step"]
    threads = sorted({r["threads"] for r in steps})
    fig, axes = plt.subplots(1, len(threads), figsize=(4.2 * len(threads), 3.4), squeeze=False)
    for ax, t in zip(axes[0], threads):
        rs = sorted((r for r in steps if r["threads"] == t), key=lambda r: r["fraction"])
        ps = [r["fraction"] for r in rs]
        ax.plot(ps, [r["ours_over_dense"] for r in rs], "o-", label="ours")
        ax.plot(ps, [r["narrow_over_dense"] for r in rs], "s--", label="narrow network")
        ax.plot(ps, [p * p for p in ps], "k-", lw=0.8, alpha=0.5, label="p²")
        ax.set_title(f"VGG-16-BN training step, {t} thread(s)", fontsize=9)
        ax.set_xlabel("active fraction p")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("step time / dense step")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--markdown", help="write the tables here (default: print)")
    parser.add_argument("--plot", help="write a PNG plot of layer time vs p here")
    parser.add_argument("--step-plot", help="write a PNG plot of whole-step time vs p here")
    args = parser.parse_args()
    rows, data = load_rows(args.json)
    sections = [f"Measured on: {machine_line(data)}", "### Whole training step", step_table(rows),
                "### Peak memory of a training step", memory_table(rows),
                "### Layer forward + backward", layer_table(rows),
                "### Fused saliency, layer", saliency_table(rows)]
    text = "\n\n".join(t for t in sections if t)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.plot and any(r.get("kind") == "layer" for r in rows):
        plot_layer(rows, args.plot)
    if args.step_plot and any(r.get("kind") == "step" for r in rows):
        plot_step(rows, args.step_plot)


if __name__ == "__main__":
    main()
