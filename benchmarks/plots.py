"""PNG plots for the quality harness: confusion matrices, latency histograms and calibration
curves, one panel per run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from benchmarks.scoring import Case, calibration

DECISIONS = ["allow", "deny", "revise", "escalate", "invalid"]


def _save(fig: Figure, ax: Axes, path: Path, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grid(n: int) -> tuple[Figure, list[Axes]]:
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    return fig, list(axes[0])


def confusion(runs: dict[str, list[Case]], path: Path) -> None:
    fig, axes = _grid(len(runs))
    for ax, (name, cases) in zip(axes, runs.items(), strict=True):
        used = [d for d in DECISIONS if any(c.decision == d for c in cases)] or ["allow"]
        grid = [
            [sum(c.unsafe == gold and c.decision == d for c in cases) for d in used]
            for gold in (False, True)
        ]
        ax.imshow(grid, cmap="Blues")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center")
        ax.set_xticks(range(len(used)), used)
        ax.set_yticks([0, 1], ["safe", "unsafe"])
        ax.set_xlabel("decision")
        ax.set_ylabel("gold label")
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency(runs: dict[str, list[Case]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, cases in runs.items():
        ax.hist([c.total_ms / 1000 for c in cases], bins=20, alpha=0.5, label=name)
    _save(fig, ax, path, "latency per request (s)", "requests")


def reliability(runs: dict[str, list[Case]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for name, cases in runs.items():
        cal = calibration(cases)
        if not cal["bins"]:
            continue
        xs = [b["predicted"] for b in cal["bins"]]
        ys = [b["observed"] for b in cal["bins"]]
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {cal['ece']:.2f})")
    _save(fig, ax, path, "predicted P(unsafe)", "observed unsafe share")
