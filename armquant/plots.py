"""Figures of a calibration report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from armquant._io import atomic_file

__all__ = ["plot_histograms", "plot_layers", "signed_bin_centers"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def signed_bin_centers(spec: dict) -> np.ndarray:
    """Value at the (geometric) middle of each signed histogram bin of a report's spec."""
    b, lo, hi = spec["bins_per_decade"], spec["min_decade"], spec["max_decade"]
    per_side = b * (hi - lo)
    magnitude = 10.0 ** (lo + (np.arange(per_side) + 0.5) / b)
    return np.concatenate([-magnitude[::-1], [0.0], magnitude])


def _linear_histogram(stats: dict, spec: dict, edges: np.ndarray) -> np.ndarray:
    """Re-bin a report's sparse log-spaced histogram onto linear `edges` (by bin centre)."""
    centers = signed_bin_centers(spec)
    h = stats["histogram"]
    values = centers[np.asarray(h["bin"], dtype=np.int64)]
    counts, _ = np.histogram(values, bins=edges, weights=np.asarray(h["count"], dtype=np.float64))
    return counts


def _num(v):
    if v is None:
        return math.nan
    return float(v) if isinstance(v, str) else v


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_histograms(report: dict, path: str | os.PathLike, bins: int = 200) -> Path:
    """At each ARM layer: ARM input vs ARM output (ARM on), and the down_proj input with ARM
    off vs on; counts on a log axis."""
    plt = _pyplot()
    arm_layers = [e for e in report["layers"] if e["arm"]]
    if not arm_layers:
        raise ValueError("the report has no ARM layer, so there is no before/after histogram to draw")
    spec = report["histogram"]
    fig, axes = plt.subplots(len(arm_layers), 2, figsize=(12, 3.8 * len(arm_layers)), squeeze=False)
    for row, entry in zip(axes, arm_layers):
        s = entry["sites"]
        pairs = [
            (row[0], f"layer {entry['layer']}: ARM input vs ARM output", [("ARM input (act_out)", s["act_out"]["on"]), ("ARM output", s["arm_out"]["on"])]),
            (row[1], f"layer {entry['layer']}: down_proj input, ARM off vs on", [("ARM off", s["down_in"]["off"]), ("ARM on", s["down_in"]["on"])]),
        ]
        for ax, title, series in pairs:
            lo = min(_num(st["min"]) for _, st in series)
            hi = max(_num(st["max"]) for _, st in series)
            edges = np.linspace(lo, hi, bins + 1)
            for (label, st), color in zip(series, ("tab:blue", "tab:orange")):
                counts = _linear_histogram(st, spec, edges)
                ax.stairs(np.maximum(counts, 0.5), edges, label=label, color=color, fill=False, linewidth=1.2, baseline=0.5)
            ax.set_yscale("log")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("activation value")
            ax.set_ylabel("count (log)")
            ax.legend(fontsize=8)
    data = report["data"]
    fig.suptitle(f"{report['model']['model_type']}, {data['windows']} x {data['length']} tokens from {data['source']}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_layers(report: dict, path: str | os.PathLike, site: str = "down_in") -> Path:
    """Per-layer bars, ARM off and on, at `site`: absmax, p99.9 of |x|, INT8 per-tensor SQNR,
    INT4 per-token SQNR."""
    plt = _pyplot()
    layers = [e for e in report["layers"] if site in e["sites"]]
    x = np.array([e["layer"] for e in layers])
    panels = [
        ("absmax", lambda st: _num(st["absmax"])),
        ("p99.9 of |x|", lambda st: _num(st["p99_9"])),
        ("INT8 per-tensor SQNR (dB)", lambda st: _num(st["sqnr_db"]["int8_tensor"])),
        ("INT4 per-token SQNR (dB)", lambda st: _num(st["sqnr_db"]["int4_token"])),
    ]
    sides = report["sides"]
    width = 0.8 / len(sides)
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 2.6 * len(panels)), sharex=True)
    for ax, (label, value) in zip(axes, panels):
        for k, side in enumerate(sides):
            ys = [value(e["sites"][site][side]) for e in layers]
            ax.bar(x + (k - (len(sides) - 1) / 2) * width, ys, width, label=f"ARM {side}",
                   color=("tab:blue", "tab:orange")[k])
        ax.set_ylabel(label, fontsize=9)
        if label == "absmax":
            ax.set_yscale("log")  # a few layers carry outliers 100x the rest
        for e in layers:
            if e["arm"]:
                ax.axvspan(e["layer"] - 0.5, e["layer"] + 0.5, color="0.9", zorder=0)
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{site}: {report['sites'][site]} (grey: ARM layers)", fontsize=10)
    axes[-1].set_xlabel("decoder layer")
    axes[-1].set_xticks(x)
    fig.tight_layout()
    return _save(fig, path)
