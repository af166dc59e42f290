"""What a user sees of a run: ``metrics.jsonl``, TensorBoard scalars, the paper-style table,
the mIoU-per-round plot, the pseudo-label class-share/precision plots and prediction grids.

Only process 0 writes. Rows are keyed by (seed, method, round): a resumed run that repeats a
phase appends the same key again, and readers keep the last row of each key.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np

from cbst_jax import labels as labels_lib
from cbst_jax import metrics
from cbst_jax.atomic_files import atomic_write
from cbst_jax.methods import Stage


class MetricsLog:
    """Append-only JSON lines at ``path`` + optional TensorBoard events in the folder
    ``tensorboard`` (its events file is opened on the first scalars written)."""

    def __init__(self, path: str, tensorboard: str | None, enabled: bool = True):
        self.path, self.tensorboard = path, tensorboard
        self.enabled = enabled
        self._tensorboard = enabled and tensorboard is not None
        self._tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(jsonable(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def scalars(self, tag_prefix: str, step: int, values: dict) -> None:
        if self._tensorboard and self._tb is None:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(self.tensorboard)
            except ImportError:  # the lent GPU image has no tensorboardX: jsonl only
                self._tensorboard = False
        if self._tb is not None:
            for k, v in values.items():
                if np.isscalar(v) and np.isfinite(v):
                    self._tb.add_scalar(f"{tag_prefix}/{k}", float(v), step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def jsonable(x):
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _nan(v):
    return np.nan if v is None else v


def eval_table(rows: Sequence[dict], class_names: Sequence[str], subset: Sequence[int] | None = None,
               subset_name: str = "mIoU*") -> str:
    """Paper-style table of eval rows (one per method and round), single seed."""
    table_rows, extra = [], {subset_name: []} if subset is not None else None
    for r in rows:
        iou = np.array([_nan(v) for v in r["iou"]], np.float64)
        name = r["method"] if r.get("round") is None else f"{r['method']} r{r['round']}"
        table_rows.append((name, iou, _nan(r["miou"])))
        if subset is not None:
            extra[subset_name].append(_nan(r.get("miou_subset")))
    return metrics.format_table(table_rows, class_names, extra_means=extra)


def _mean_std(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1) of the finite values; std None below 2 values."""
    a = np.array([_nan(v) for v in values], np.float64)
    a = a[np.isfinite(a)]
    if not a.size:
        return float("nan"), None
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)


def _cell(mean: float, std: float | None = None) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def seed_aggregate_table(rows: Sequence[dict], class_names: Sequence[str], subset: Sequence[int] | None = None,
                         subset_name: str = "mIoU*") -> str:
    """mean ± std over seeds of every (method, round): per class, mIoU and (``subset`` given,
    the rows' ``miou_subset``) the subset's mean, e.g. SYNTHIA's mIoU*. The std is the sample
    standard deviation (ddof=1), as the footer says; a cell with one value shows the mean only."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r.get("round")), []).append(r)
    seeds = sorted({r["seed"] for r in rows})
    header = ["method"] + list(class_names) + ["mIoU"] + ([subset_name] if subset is not None else [])
    body = []
    for (method, rnd), rs in groups.items():
        name = Stage(method, rnd).label + (f" (n={len(rs)})" if len(rs) != len(seeds) else "")
        cells = [name] + [_cell(*_mean_std([r["iou"][c] for r in rs])) for c in range(len(class_names))]
        cells.append(_cell(*_mean_std([r["miou"] for r in rs])))
        if subset is not None:
            cells.append(_cell(*_mean_std([r.get("miou_subset") for r in rs])))
        body.append(cells)
    spread = ("mean ± sample standard deviation (ddof=1)" if len(seeds) > 1
              else "one seed: no standard deviation")
    return (_markdown(header, body) + f"\n\nIoU in %, {spread} over seeds {seeds}; n/a = class absent from both "
            f"ground truth and prediction, excluded from the mean.")


# The comparisons the seed's tables make, as (method, baseline): each round of the method against
# the same round of the baseline (source-only has one row, used for every round).
PAIRED = (("st", "source_only"), ("st_sp", "st"), ("cbst", "st"), ("cbst", "source_only"), ("cbst_sp", "cbst"),
          ("cbst_sp+mst", "cbst_sp"), ("mrkld", "cbst"), ("lrent", "cbst"))


def paired_differences_table(rows: Sequence[dict], pairs=PAIRED) -> str:
    """Per (method, baseline) pair present in ``rows`` and per round: the mIoU difference of the
    method and its baseline within each seed, as mean ± sample std (ddof=1) over the seeds, and
    in how many seeds it is positive. Empty when no pair is present."""
    miou = {(r["seed"], r["method"], r.get("round")): _nan(r["miou"]) for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    rounds = sorted({r["round"] for r in rows if r.get("round") is not None})
    body = []
    for method, base in pairs:
        for rnd in rounds:
            diffs = [miou[(s, method, rnd)] - miou[(s, base, None if base == "source_only" else rnd)]
                     for s in seeds if (s, method, rnd) in miou
                     and (s, base, None if base == "source_only" else rnd) in miou]
            if not diffs:
                continue
            mean, std = _mean_std(diffs)
            body.append([f"{method} − {base}", f"r{rnd}", _cell(mean, std), f"{sum(d > 0 for d in diffs)} of {len(diffs)}"])
    if not body:
        return ""
    return (_markdown(["comparison", "round", "ΔmIoU (mean ± sd over seeds)", "seeds with Δ > 0"], body)
            + "\n\nΔ = method − baseline within each seed (same data and source model), in mIoU points; "
              "sd: sample standard deviation (ddof=1).")


def pseudo_label_table(rows: Sequence[dict], class_names: Sequence[str], classes: Sequence[int]) -> str:
    """Per (method, round), the mean over seeds of: the portion p, the selected fraction of the
    target pixels, and for each of ``classes`` its share of the selected pixels and (in
    brackets, where the target has hidden labels) the precision of those pixels; "–" where no
    seed selected the class. Empty when there are no rows."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["round"]), []).append(r)
    body = []
    for (method, rnd), rs in groups.items():
        share = np.mean([[r["share"][c] for c in classes] for r in rs], axis=0)
        cells = [Stage(method, rnd).label, f"{np.mean([r['portion'] for r in rs]):.2f}",
                 f"{100 * np.mean([r['selected_fraction'] for r in rs]):.1f}"]
        for j, c in enumerate(classes):
            prec = [_nan(r["precision"][c]) for r in rs if "precision" in r]
            prec = [v for v in prec if not np.isnan(v)]
            cells.append(f"{100 * share[j]:.2f}" + (f" ({100 * np.mean(prec):.0f})" if prec else
                                                     " (–)" if any("precision" in r for r in rs) else ""))
        body.append(cells)
    if not body:
        return ""
    seeds = sorted({r["seed"] for r in rows})
    return (_markdown(["method", "p", "selected %"] + [class_names[c] for c in classes], body)
            + f"\n\nShare of the selected pseudo-label pixels per class in %, and (in brackets) their precision in "
              f"% against the hidden target labels, mean over seeds {seeds} (precision: over the seeds that "
              f"selected the class; – none did).")


def health_table(rows: Sequence[dict], class_names: Sequence[str]) -> str:
    """The collapse guard's rows (``cbst_jax.collapse_guard``), one per round: each signal's
    value and which checks fired, with the thresholds used. Empty when there are no rows."""
    body = []
    for r in rows:
        if r["unselected"] is None:
            unselected = "n/a"
        else:
            unselected = ", ".join(f"{class_names[c]} ({100 * p:.2f} %)" for c, p in r["unselected"]) or "–"
        if r["share_drops"]:
            share = ", ".join(f"{class_names[c]} {now / prev:.2f}" for c, prev, now in r["share_drops"])
        elif r["lowest_share_ratio"] is not None:
            c, ratio = r["lowest_share_ratio"]
            share = f"{class_names[int(c)]} {ratio:.2f}"
        else:
            share = "n/a"
        if r["loss_windows"] is None:
            loss = "n/a"
        else:
            peak = _nan(r["loss_peak_rise"])
            peak = f"+{100 * peak:.0f} %" if peak < 10 else f"{1 + peak:.3g} x"
            loss = f"{r['loss_stretch']} of {r['loss_windows']}, peak {peak}"
        if r["mean_entropy"] is None:
            entropy = "n/a"
        else:
            ratio = "baseline" if r["round"] == 0 else ("n/a" if r["entropy_ratio"] is None
                                                          else f"{r['entropy_ratio']:.2f}")
            entropy = f"{r['mean_entropy']:.4f} ({ratio})"
        body.append([Stage(r["method"], r["round"]).label, unselected, share, loss, entropy,
                     ", ".join(r["fired"]) or "–"])
    if not body:
        return ""
    s = rows[-1]["settings"]
    varied = "" if all(r["settings"] == s for r in rows) else " (the last row's; earlier rows used others)"
    return (_markdown(["round", "predicted, none selected", "share / previous round (lowest)",
                       "risen loss windows", "mean entropy, nats (/ round 0)", "fired"], body)
            + f"\n\nTraining-side signals only (cbst_jax.collapse_guard; round r's labels come from the model "
              f"before it). unselected: classes predicted on ≥ {s['min_share']:g} of the target pixels with no "
              f"pixel selected (their predicted share); share_drop: a class's pseudo-label share < "
              f"{s['share_fraction']:g} x its share in the previous round (classes with ≥ {s['min_share']:g} "
              f"there; the lowest ratio, or every class that fell); loss_rise: ≥ {s['loss_windows']} consecutive "
              f"logged loss windows above (1 + {s['loss_rise']:g}) x the best earlier window of the round (the "
              f"longest such run of the round's windows and the largest excess); entropy_drop: mean prediction "
              f"entropy < {s['entropy_fraction']:g} x round 0's. Thresholds{varied}: "
              f"self_training.collapse_guard.")


def city_table(by_city: dict[str, Sequence[dict]], class_names: Sequence[str], last_round: int | None) -> str:
    """The seed's cross-city table: per city one row per method (source-only, and each
    self-training method at round ``last_round``), IoU per class and their mean, each the mean
    over seeds; then the mean over the cities of every column."""
    header = ["city", "method"] + list(class_names) + ["mean"]
    body, per_method = [], {}
    for city, rows in by_city.items():
        groups: dict = {}
        for r in rows:
            if r.get("round") is None or r.get("round") == last_round:
                groups.setdefault(Stage(r["method"], r.get("round")).label, []).append(r)
        for name, rs in groups.items():
            iou = [_mean_std([r["iou"][c] for r in rs])[0] for c in range(len(class_names))]
            miou = _mean_std([r["miou"] for r in rs])[0]
            per_method.setdefault(name, []).append((iou, miou))
            body.append([city, name] + [_cell(v) for v in iou] + [_cell(miou)])
    for name, values in per_method.items():
        iou = [_mean_std([v[0][c] for v in values])[0] for c in range(len(class_names))]
        miou = _mean_std([v[1] for v in values])[0]
        label = f"mean of {len(values)} cities" if len(values) != len(by_city) else "mean"
        body.append([label, name] + [_cell(v) for v in iou] + [_cell(miou)])
    seeds = sorted({r["seed"] for rows in by_city.values() for r in rows})
    return (_markdown(header, body) + f"\n\nIoU in %, each the mean over seeds {seeds}; \"mean\" rows average the "
            f"cities (a class that is n/a in a city is left out of its column's mean); n/a = class absent from "
            f"both ground truth and prediction, excluded from the mean.")


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
        by_method.setdefault(r["method"], {}).setdefault(r.get("round"), []).append(_nan(r["miou"]))
    for method, per_round in by_method.items():
        if list(per_round) == [None]:
            ax.axhline(100 * np.nanmean(per_round[None]), ls="--", color="gray", label=method)
            continue
        rounds = sorted(k for k in per_round if k is not None)
        stats = [_mean_std(per_round[k]) for k in rounds]  # sample std (ddof=1), as the tables
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
    a = np.array([[_nan(v) for v in r] for r in rows], np.float64)
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
