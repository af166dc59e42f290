"""The figures of a run: mIoU per round, the pseudo-labels' class shares and precision per round,
and prediction grids (images, ground truth, label maps side by side). Written atomically."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from cbst_jax import labels as labels_lib
from cbst_jax.atomic_files import atomic_write
from cbst_jax.tables import mean_std, none_as_nan


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _atomic_savefig(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


def plot_miou_curves(rows: Sequence[dict], path: str) -> None:
    """mIoU per round per method (mean over seeds, with a ±std band, ddof=1, when several seeds)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict = {}
    for r in rows:
        by_method.setdefault(r["method"], {}).setdefault(r.get("round"), []).append(none_as_nan(r["miou"]))
    for method, per_round in by_method.items():
        if list(per_round) == [None]:
            ax.axhline(100 * np.nanmean(per_round[None]), ls="--", color="gray", label=method)
            continue
        rounds = sorted(k for k in per_round if k is not None)
        stats = [mean_std(per_round[k]) for k in rounds]  # sample std (ddof=1), as the tables
        mean = np.array([100 * m for m, _ in stats])
        std = np.array([100 * (sd or 0.0) for _, sd in stats])
        ax.plot(rounds, mean, marker="o", label=method)
        ax.set_xticks(rounds)
        if any(len(per_round[k]) > 1 for k in rounds):
            ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    _atomic_savefig(fig, path)
    plt.close(fig)


def _nanmean_rows(rows) -> np.ndarray:
    """Column means ignoring NaN/None; NaN where a column has no value (no warning)."""
    a = np.array([[none_as_nan(v) for v in r] for r in rows], np.float64)
    n = np.sum(~np.isnan(a), 0)
    return np.where(n > 0, np.nansum(a, 0) / np.maximum(n, 1), np.nan)


def plot_pseudo_label_stats(rows: Sequence[dict], class_names: Sequence[str], path: str,
                            methods: Iterable[str] = ("st", "cbst")) -> None:
    """Per round: each class's share of the selected pseudo-label pixels, and their precision
    against the hidden target labels, one panel pair per method (means over seeds)."""
    plt = _plt()
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    if not methods:
        return
    fig, axes = plt.subplots(2, len(methods), figsize=(6 * len(methods), 7), squeeze=False)
    for j, method in enumerate(methods):
        mrows = [r for r in rows if r["method"] == method]
        rounds = sorted({r["round"] for r in mrows})
        share = np.array([_nanmean_rows([r["share"] for r in mrows if r["round"] == k]) for k in rounds])
        prec = np.array([_nanmean_rows([r.get("precision") or [None] * len(class_names)
                                        for r in mrows if r["round"] == k]) for k in rounds])
        present = np.where(np.nansum(share, 0) > 0)[0]
        colors = labels_lib.palette(len(class_names)) / 255.0 if len(class_names) in (13, 16, 19) else None
        for c in present:
            kw = dict(marker="o", label=class_names[c])
            if colors is not None:
                kw["color"] = colors[c]
            axes[0, j].semilogy(rounds, 100 * np.maximum(share[:, c], 1e-6), **kw)
            axes[1, j].plot(rounds, 100 * prec[:, c], **kw)
        axes[0, j].set_title(f"{method}: class share of pseudo-labels (%)")
        axes[1, j].set_title(f"{method}: pseudo-label precision (%)")
        for ax in axes[:, j]:
            ax.set_xlabel("round")
            ax.set_xticks(rounds)
            ax.grid(alpha=0.3)
    labelled = [ax for ax in axes[0] if ax.get_legend_handles_labels()[0]]
    if labelled:  # a method may have selected nothing (then its panels stay empty)
        labelled[-1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    _atomic_savefig(fig, path)
    plt.close(fig)


def prediction_grid(columns: dict[str, Sequence[np.ndarray]], path: str, num_classes: int) -> None:
    """A PNG grid like the paper's figure: one column per entry (an RGB image list, or trainId
    maps drawn in the Cityscapes palette with ignore in black), one row per example."""
    from PIL import Image

    names = list(columns)
    n = len(columns[names[0]])
    tiles = []
    for i in range(n):
        row = []
        for name in names:
            x = np.asarray(columns[name][i])
            row.append(x if x.ndim == 3 else labels_lib.colorize(x, num_classes))
        h = max(t.shape[0] for t in row)
        row = [np.pad(t, ((0, h - t.shape[0]), (0, 2), (0, 0))) for t in row]
        tiles.append(np.concatenate(row, 1))
    w = max(t.shape[1] for t in tiles)
    grid = np.concatenate([np.pad(t, ((0, 2), (0, w - t.shape[1]), (0, 0))) for t in tiles], 0)
    header = _header(names, [columns[k][0].shape[1] + 2 for k in names], grid.shape[1])
    atomic_write(path, lambda f: Image.fromarray(np.concatenate([header, grid], 0)).save(f, format="PNG"))


def _header(names, widths, total_width, height=14):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (total_width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    x = 0
    for name, w in zip(names, widths):
        draw.text((x + 2, 1), name, fill=(0, 0, 0))
        x += w
    return np.asarray(img)
