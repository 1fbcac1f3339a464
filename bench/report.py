"""Turns pytest-benchmark JSON from bench/ into a markdown table and a plot.

    python bench/report.py results.json --markdown table.md --plot layer.png
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
    lines = ["| shape (C, HxW) | threads | p | narrow/dense | ours/narrow | ours/dense | naive/dense | ours ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r.get("kind") == "layer"),
                    key=lambda r: (r["channels"], r["threads"], -r["fraction"])):
        lines.append(
            f"| {r['channels']}, {r['size']}x{r['size']} | {r['threads']} | {r['fraction']} | "
            f"{r['narrow_over_dense']:.3f} | {r['ours_over_narrow']:.3f} | "
            f"{r['ours_over_dense']:.3f} | {r['naive_over_dense']:.3f} | {r['ms_ours']:.1f} |")
    return "\n".join(lines)


def saliency_table(rows: list[dict]) -> str:
    sal = [r for r in rows if r.get("kind") == "saliency"]
    if not sal:
        return ""
    lines = ["| shape (C, HxW) | saliency overhead |", "|---|---|"]
    for r in sorted(sal, key=lambda r: r["channels"]):
        lines.append(f"| {r['channels']}, {r['size']}x{r['size']} | "
                     f"{100 * r['saliency_overhead']:+.2f}% |")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--markdown", help="write the tables here (default: print)")
    parser.add_argument("--plot", help="write a PNG plot of time vs p here")
    args = parser.parse_args()
    rows, data = load_rows(args.json)
    text = "\n\n".join(t for t in (f"Measured on: {machine_line(data)}", layer_table(rows),
                                   saliency_table(rows)) if t)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.plot:
        plot_layer(rows, args.plot)


if __name__ == "__main__":
    main()
