"""The demo report's figures: reward histograms, means with intervals, training curves (`rlhfkit.eval.report`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(path: Path, label: str, by_policy: dict[str, list[list[float]]]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    values = {name: [s for row in rows for s in row] for name, rows in by_policy.items()}
    everything = [v for vs in values.values() for v in vs]
    bins = np.linspace(min(everything), max(everything), 31) if everything and min(everything) < max(everything) else 30
    for name, vals in values.items():
        ax.hist(vals, bins=bins, alpha=0.5, label=f"{name} (mean {np.mean(vals):.3f})")
        ax.axvline(float(np.mean(vals)), linestyle="--", linewidth=1, color=ax.patches[-1].get_facecolor()[:3])
    ax.set_xlabel(label)
    ax.set_ylabel("responses")
    ax.set_title(f"{label} on held-out prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_means(path: Path, summary: dict, metric_labels: dict[str, str]) -> None:
    plt = _pyplot()
    metrics = list(metric_labels)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        names, means, errors = [], [], [[], []]
        for name, entry in summary["policies"].items():
            record = entry["metrics"].get(metric)
            if not record:
                continue
            interval = record["mean"]
            names.append(name)
            means.append(interval["mean"])
            errors[0].append(interval["mean"] - interval["ci_low"])
            errors[1].append(interval["ci_high"] - interval["mean"])
        ax.bar(range(len(names)), means, yerr=errors, capsize=6, color=[f"C{i}" for i in range(len(names))])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(metric_labels[metric])
        # the paired difference to the baseline, the number the comparison rests on, under each aligned policy
        labels = []
        for name in names:
            diff = summary["policies"][name]["metrics"][metric].get("diff_vs_baseline")
            labels.append(name if not diff else
                          f"{name}\nΔ {diff['mean']:+.3f}\n[{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]")
        ax.set_xticks(range(len(names)), labels, fontsize=8)
    fig.suptitle(f"held-out means, {int(round(summary['confidence'] * 100))}% bootstrap CI")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(path: Path, curves: dict[str, dict[str, tuple[list[float], list[float]]]]) -> None:
    plt = _pyplot()
    rows = [(stage, series) for stage, series in curves.items() if series]
    width = max(len(series) for _, series in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(3.4 * width, 2.6 * len(rows)), squeeze=False)
    for r, (stage, series) in enumerate(rows):
        for c in range(width):
            ax = axes[r][c]
            if c >= len(series):
                ax.axis("off")
                continue
            key, (steps, values) = list(series.items())[c]
            ax.plot(steps, values, marker="." if len(values) < 30 else None)
            ax.set_title(f"{stage}: {key}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
