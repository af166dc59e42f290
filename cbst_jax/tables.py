"""The paper-style markdown tables of a run: one seed's evaluation rows, mean ± std over seeds, the
paired differences between methods within each seed, the pseudo-labels' class shares and
precision, the collapse guard's health per round, and the per-city table of Cityscapes -> NTHU."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cbst_jax import metrics
from cbst_jax.methods import Stage


def none_as_nan(v):
    """A missing value (None) as NaN."""
    return np.nan if v is None else v


def eval_table(rows: Sequence[dict], class_names: Sequence[str], subset: Sequence[int] | None = None,
               subset_name: str = "mIoU*") -> str:
    """Paper-style table of eval rows (one per method and round), single seed."""
    table_rows, extra = [], {subset_name: []} if subset is not None else None
    for r in rows:
        iou = np.array([none_as_nan(v) for v in r["iou"]], np.float64)
        name = Stage(r["method"], r.get("round")).label
        table_rows.append((name, iou, none_as_nan(r["miou"])))
        if subset is not None:
            extra[subset_name].append(none_as_nan(r.get("miou_subset")))
    return metrics.format_table(table_rows, class_names, extra_means=extra)


def mean_std(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1) of the finite values; std None below 2 values
    (the tables' and the figures' spread over seeds)."""
    a = np.array([none_as_nan(v) for v in values], np.float64)
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
        cells = [name] + [_cell(*mean_std([r["iou"][c] for r in rs])) for c in range(len(class_names))]
        cells.append(_cell(*mean_std([r["miou"] for r in rs])))
        if subset is not None:
            cells.append(_cell(*mean_std([r.get("miou_subset") for r in rs])))
        body.append(cells)
    spread = ("mean ± sample standard deviation (ddof=1)" if len(seeds) > 1
              else "one seed: no standard deviation")
    return (_markdown(header, body) + f"\n\nIoU in %, {spread} over seeds {seeds}; n/a = class absent from both "
            f"ground truth and prediction, excluded from the mean.")


# The comparisons the seed's tables make, as (method, baseline): each round of the method against
# the same round of the baseline (source-only has one row, used for every round).
PAIRED = (("st", "source_only"), ("st_sp", "st"), ("cbst", "st"), ("cbst", "source_only"), ("cbst_sp", "cbst"),
          ("cbst_sp+mst", "cbst_sp"), ("mrkld", "cbst"), ("lrent", "cbst"),
          ("online_fixed", "source_only"), ("online_cbst", "online_fixed"), ("online_cbst_sp", "online_cbst"),
          ("online_cbst", "cbst"), ("online_cbst_sp", "cbst_sp"))


def paired_differences_table(rows: Sequence[dict], pairs=PAIRED) -> str:
    """Per (method, baseline) pair present in ``rows`` and per round: the mIoU difference of the
    method and its baseline within each seed, as mean ± sample std (ddof=1) over the seeds, and
    in how many seeds it is positive. Empty when no pair is present."""
    miou = {(r["seed"], r["method"], r.get("round")): none_as_nan(r["miou"]) for r in rows}
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
            mean, std = mean_std(diffs)
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
        portions = [r["portion"] for r in rs if r.get("portion") is not None]  # None: online_fixed (no p)
        cells = [Stage(method, rnd).label, f"{np.mean(portions):.2f}" if portions else "–",
                 f"{100 * np.mean([r['selected_fraction'] for r in rs]):.1f}"]
        for j, c in enumerate(classes):
            prec = [none_as_nan(r["precision"][c]) for r in rs if "precision" in r]
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
              f"selected the class; – none did)."
            + (" Online rows count every target batch the round's teacher labelled; selected: pixel weight > 0 "
               "(online_fixed: every pixel outside the ignored rows once any pixel reaches tau)."
               if any(r.get("online") for r in rows) else ""))


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
            peak = none_as_nan(r["loss_peak_rise"])
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
            iou = [mean_std([r["iou"][c] for r in rs])[0] for c in range(len(class_names))]
            miou = mean_std([r["miou"] for r in rs])[0]
            per_method.setdefault(name, []).append((iou, miou))
            body.append([city, name] + [_cell(v) for v in iou] + [_cell(miou)])
    for name, values in per_method.items():
        iou = [mean_std([v[0][c] for v in values])[0] for c in range(len(class_names))]
        miou = mean_std([v[1] for v in values])[0]
        label = f"mean of {len(values)} cities" if len(values) != len(by_city) else "mean"
        body.append([label, name] + [_cell(v) for v in iou] + [_cell(miou)])
    seeds = sorted({r["seed"] for rows in by_city.values() for r in rows})
    return (_markdown(header, body) + f"\n\nIoU in %, each the mean over seeds {seeds}; \"mean\" rows average the "
            f"cities (a class that is n/a in a city is left out of its column's mean); n/a = class absent from "
            f"both ground truth and prediction, excluded from the mean.")
