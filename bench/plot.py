"""Plots for the benchmarks (matplotlib, written as PNG files; no display needed).

Every function takes plain rows (dicts as written to the JSON files) and a path, so that a plot
can be redrawn from a saved JSON file without running anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after use(): the backend must be chosen first
from matplotlib.ticker import FixedLocator, NullLocator

#: One colour per VMM, the same in every plot.
VMM_STYLE = {
    "intrahost": {"color": "#1f6fb4", "label": "intrahost (fd hand-off)", "short": "intrahost"},
    "qemu": {"color": "#d1495b", "label": "QEMU 7.2 (x-ignore-shared)", "short": "QEMU"},
}
PHASE_COLOURS = {
    "pause": "#4e79a7",
    "export": "#f28e2b",
    "transfer": "#59a14f",
    "import": "#e15759",
    "resume": "#b07aa1",
}


def _size_label(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib >= 1024 else f"{mib} MiB"


def blackout_vs_memory(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Median progress blackout (marker and line) with its p99 (whisker) against guest memory
    size, log-scale x: one panel per vCPU count (their scales differ), one line per VMM, and
    each VMM's noise floor as a thin dotted line with hollow markers.

    ``rows``: dicts with ``vmm``, ``memory_mib``, ``vcpus``, ``median_ms``, ``p99_ms`` and
    optionally ``noise_ms`` (the median noise floor).
    """
    sizes = sorted({r["memory_mib"] for r in rows})
    counts = sorted({r["vcpus"] for r in rows})
    fig, axes = plt.subplots(
        1, len(counts), figsize=(5.2 * len(counts), 5.0), dpi=120, squeeze=False
    )
    # Spread the two VMMs a little along x so that their whiskers do not hide each other.
    nudge = {"intrahost": 0.95, "qemu": 1.05}
    for ax, vcpus in zip(axes[0], counts, strict=True):
        for vmm in sorted({r["vmm"] for r in rows}):
            points = sorted(
                (
                    r
                    for r in rows
                    if r["vmm"] == vmm and r["vcpus"] == vcpus and r["median_ms"] is not None
                ),
                key=lambda r: r["memory_mib"],
            )
            if not points:
                continue
            style = VMM_STYLE.get(vmm, {"color": "grey", "label": vmm, "short": vmm})
            xs = [r["memory_mib"] * nudge.get(vmm, 1.0) for r in points]
            noise = [float(r["noise_ms"]) for r in points if r.get("noise_ms") is not None]
            if len(noise) == len(points):
                ax.plot(
                    xs,
                    noise,
                    color=style["color"],
                    linestyle=":",
                    linewidth=1.2,
                    marker="o",
                    markersize=5,
                    markerfacecolor="none",
                    label=f"{style['short']}: noise floor (no hand-off)",
                )
            med = [r["median_ms"] for r in points]
            up = [max(0.0, r["p99_ms"] - r["median_ms"]) for r in points]
            ax.errorbar(
                xs,
                med,
                yerr=[[0.0] * len(up), up],
                color=style["color"],
                marker="o",
                linewidth=2,
                markersize=7,
                capsize=4,
                label=f"{style['label']}: median, whisker to p99",
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([_size_label(s) for s in sizes])
        ax.set_xlim(sizes[0] / 1.8, sizes[-1] * 1.8)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("guest memory (log scale)")
        ax.set_title(f"{vcpus} vCPU{'s' if vcpus > 1 else ''}", fontsize=11)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("progress blackout, ms")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def breakdown_bars(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Per point, two bars: the VMM's own blackout breakdown, stacked (medians of each
    phase), and beside it in grey the guest's own median gap across the hand-off (the
    stopwatch; the observer's progress blackout where a row has no ``guest_ms``).

    ``rows``: dicts with ``label``, ``phases`` ({phase: median ms}), ``progress_ms`` and
    optionally ``guest_ms`` (the C floor's rows: its steps and its blackout).
    """
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(rows) + 2.5), 5.2), dpi=120)
    width = 0.36
    left = [x - width / 2 - 0.02 for x in range(len(rows))]
    right = [x + width / 2 + 0.02 for x in range(len(rows))]
    bottoms = [0.0] * len(rows)
    for phase, colour in PHASE_COLOURS.items():
        heights = [float(r["phases"].get(phase) or 0.0) for r in rows]
        ax.bar(left, heights, width, bottom=bottoms, color=colour, label=phase, edgecolor="white")
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for x, total in zip(left, bottoms, strict=True):
        ax.annotate(f"{total:.2f}", (x, total), ha="center", va="bottom", fontsize=8)
    observed = [r.get("guest_ms") or r.get("progress_ms") for r in rows]
    progress = [(x, y) for x, y in zip(right, observed, strict=True) if y]
    ax.bar(
        [x for x, _ in progress],
        [y for _, y in progress],
        width,
        color="#bbbbbb",
        hatch="//",
        edgecolor="#777777",
        label="the guest's own gap (stopwatch)",
    )
    for x, y in progress:
        ax.annotate(f"{y:.2f}", (x, y), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(range(len(rows))))
    ax.set_xticklabels([r["label"] for r in rows], fontsize=9)
    ax.set_xlabel("point: guest memory / vCPUs")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("ms (medians)")
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=9, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def grouped_bars(
    rows: Sequence[dict[str, Any]],
    series: Sequence[tuple[str, str, str]],
    path: Path,
    title: str,
    ylabel: str,
    xlabel: str = "",
) -> None:
    """Grouped bars: one group per row (``label``), one bar per ``(key, legend, colour)`` in
    ``series``; a row's value is ``row[key]`` (None: no bar)."""
    fig, ax = plt.subplots(figsize=(max(7.0, 1.4 * len(rows) + 2.5), 5.2), dpi=120)
    width = 0.8 / len(series)
    for i, (key, legend, colour) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        values = [r.get(key) for r in rows]
        shown = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        ax.bar([x for x, _ in shown], [v for _, v in shown], width, color=colour, label=legend)
        for x, v in shown:
            ax.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(range(len(rows))))
    ax.set_xticklabels([r["label"] for r in rows], fontsize=9)
    ax.set_ylim(bottom=0)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
