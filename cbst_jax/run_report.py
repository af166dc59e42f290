"""What a run reports: the rows of each stage (evaluation, pseudo-label statistics), the kept
predictions, the per-round pseudo-label figures, and per seed and over seeds the paper-style
tables and plots (``results.md``, ``summary.json``, ``figures/``). Only process 0 writes."""
from __future__ import annotations

import os

import jax
import numpy as np

from cbst_jax import figures, metrics, metrics_log, tables
from cbst_jax import labels as labels_lib
from cbst_jax.atomic_files import atomic_write, atomic_write_bytes, atomic_write_json
from cbst_jax.experiment import compute_path
from cbst_jax.methods import SOURCE, Stage
from cbst_jax.workdir import RunDir


# ---------------------------------------------------------------------------- rows
def eval_row(stage: Stage, cm, *, seed: int, table_classes, subset_classes=None, extra=None) -> dict:
    """A stage's evaluation: per-class IoU, the mean over ``table_classes`` (and over
    ``subset_classes``: mIoU*), pixel accuracy, and ``extra``."""
    iou = metrics.per_class_iou(cm)
    row = {"kind": "eval", "seed": seed, "method": stage.method, "round": stage.round,
           "iou": iou.tolist(), "miou": metrics.mean_iou(cm, table_classes),
           "pixel_acc": metrics.pixel_accuracy(cm)}
    if subset_classes is not None:
        row["miou_subset"] = metrics.mean_iou(cm, subset_classes)
    row.update(extra or {})
    return row


def pseudo_label_row(seed, manifest) -> dict:
    """A round's pseudo-labels: portion, thresholds, each class's share of the selected pixels,
    the selected fraction, the pixels predicted as each class (argmax of the labelling pass) and
    the pass's mean prediction entropy (the collapse guard's inputs), and (where the target has
    hidden labels) per-class precision."""
    sel = np.asarray(manifest.selected, np.float64)
    share = sel / max(sel.sum(), 1)
    row = {"kind": "pseudo_labels", "seed": seed, "method": manifest.method, "round": manifest.round,
           "portion": manifest.portion, "thresholds": manifest.thresholds, "share": share.tolist(),
           "selected_fraction": float(sel.sum() / max(manifest.valid_pixels, 1)),
           "predicted": [int(n) for n in manifest.class_counts], "mean_entropy": manifest.mean_entropy}
    if manifest.has_ground_truth:
        with np.errstate(invalid="ignore", divide="ignore"):
            row["precision"] = np.where(sel > 0, np.asarray(manifest.correct) / np.maximum(sel, 1),
                                        np.nan).tolist()
    return row


# ---------------------------------------------------------------------------- per stage
def save_predictions(exp, stage: Stage, preds) -> str:
    """Writes the kept predictions (process 0); returns the path."""
    path = exp.seed_dir.predictions(stage)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: np.savez_compressed(f, *preds))
    return path


def load_predictions(exp, stage: Stage):
    path = exp.seed_dir.predictions(stage)
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda s: int(s.split("_")[1]))]


def pseudo_label_figure(exp, stage: Stage, store, n: int = 4) -> str:
    """Per round: target-train images, their hidden ground truth (embedded pair only) and
    pseudo-labels (process 0); returns the path."""
    path = exp.seed_dir.pseudo_label_figure(stage)
    if jax.process_index() != 0:
        return path
    target, hidden = exp.data.target_train, exp.data.hidden_label_key
    idx = range(min(n, len(target)))
    recs = [target[i] for i in idx]
    cols = {"target image": [rec["image"] for rec in recs]}
    if hidden:
        cols["ground truth"] = [rec[hidden] for rec in recs]
    cols[f"{stage.label} pseudo-labels"] = [store.read(i) for i in idx]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figures.prediction_grid(cols, path, exp.num_classes)
    return path


# ---------------------------------------------------------------------------- per seed
def write_seed_report(exp, rows, pl_rows, health_rows=()) -> None:
    """Table, curves, the prediction grid (image, GT, source-only, each method's last round) and
    the collapse guard's per-round health table (``health_rows``)."""
    report = exp.reporting
    names = labels_lib.class_names(report.num_classes)
    table_classes, subset = exp.data.table_classes, exp.data.subset_classes
    sub_rows = [dict(r, iou=[r["iou"][c] for c in table_classes]) for r in rows]
    table = tables.eval_table(sub_rows, [names[c] for c in table_classes], subset, subset_name="mIoU*")
    seed_dir = exp.seed_dir
    os.makedirs(os.path.dirname(seed_dir.figure("miou_per_round")), exist_ok=True)
    figures.plot_miou_curves(rows, seed_dir.figure("miou_per_round"))
    adapted = list(report.adapted)
    figures.plot_pseudo_label_stats(pl_rows, names, seed_dir.figure("pseudo_label_stats"), methods=adapted)
    k = 4
    recs = [exp.data.target_eval[i] for i in range(min(k, len(exp.data.target_eval)))]
    cols = {"image": [rec["image"] for rec in recs], "ground truth": [rec["label"] for rec in recs]}
    src = load_predictions(exp, SOURCE)
    if src:
        cols["source-only"] = src[:len(recs)]
    if report.rounds > 0:
        for name in adapted:
            p = load_predictions(exp, Stage(name, report.rounds - 1))
            if p:
                cols[name] = p[:len(recs)]
    figures.prediction_grid(cols, seed_dir.figure("predictions"), report.num_classes)
    note = ""
    if report.select_by_eval:
        best = max((r for r in rows if r.get("round") is not None), key=lambda r: r["miou"], default=None)
        if best:
            note = (f"\nBest round picked ON THE EVALUATION SPLIT (config.select_by_eval=True): "
                    f"{Stage(best['method'], best['round']).label} mIoU {100 * best['miou']:.1f}.\n")
    note += overlap_note(exp.data.overlap)
    note += f"\n{report.source_origin}\n"
    note += "\nCompute path: " + ", ".join(f"{k}={v}" for k, v in compute_path(exp.network).items()) + "\n"
    atomic_write_json(seed_dir.eval_overlap, exp.data.overlap)
    health = tables.health_table(health_rows, names)
    if health:
        note += f"\n## Collapse guard\n\n{health}\n"
    text = f"# Results, seed {exp.seed}\n\n{table}\n{note}"
    atomic_write_bytes(seed_dir.results, text.encode())
    print(f"\n{table}{note}", flush=True)


def overlap_note(report: dict) -> str:
    """A line for the report when target train and evaluation images overlap (by content)."""
    n = report["eval_images_in_train"]
    if not n:
        return ""
    where = f" ({report['city']})" if report.get("city") else ""
    if report["allow_eval_overlap"]:
        return (f"\n{n} of the {report['eval_images']} evaluation images{where} are also target train images and "
                f"WERE ADAPTED ON (target.allow_eval_overlap=True, the published protocol).\n")
    return (f"\n{report['excluded_train_images']} target train images{where} are evaluation images and were left "
            f"out of adaptation ({report['adaptation_images']} adapted on).\n")


# ---------------------------------------------------------------------------- over seeds
def write_aggregate(report, run_dir: RunDir, seeds, rows, pl_rows, wall_s) -> None:
    """mean ± std (ddof=1) over seeds: the results, summary and figures of ``run_dir``
    (``report``: ``settings.Reporting``)."""
    names = labels_lib.class_names(report.num_classes)
    table_classes, subset = report.table_classes, report.subset_classes
    sub = [dict(r, iou=[r["iou"][c] for c in table_classes]) for r in rows]
    table = tables.seed_aggregate_table(sub, [names[c] for c in table_classes], subset, subset_name="mIoU*")
    os.makedirs(os.path.dirname(run_dir.figure("miou_per_round")), exist_ok=True)
    figures.plot_miou_curves(rows, run_dir.figure("miou_per_round"))
    figures.plot_pseudo_label_stats(pl_rows, names, run_dir.figure("pseudo_label_stats"),
                                      methods=list(report.adapted))
    paired = tables.paired_differences_table(rows) if len(seeds) > 1 else ""
    labels = tables.pseudo_label_table(pl_rows, names, table_classes)
    text = (f"# Results over seeds {list(seeds)}\n\n{table}\n"
            + (f"\n## Paired differences\n\n{paired}\n" if paired else "")
            + (f"\n## Pseudo-labels\n\n{labels}\n" if labels else "")
            + f"\nwall time {wall_s / 60:.1f} min on {jax.device_count()} {jax.devices()[0].platform} device(s)\n")
    atomic_write_bytes(run_dir.results, text.encode())
    atomic_write_json(run_dir.summary, metrics_log.jsonable({"seeds": list(seeds), "wall_s": wall_s, "rows": rows}))
    if len(seeds) > 1:
        print(f"\n{text}", flush=True)


def write_city_table(report, run_dir: RunDir, seeds, rows_by_city: dict, wall_s) -> None:
    """Cityscapes -> NTHU over several cities (each run in its city's folder of ``run_dir``): the
    seed's per-city table (source-only and every method's last round) with the mean over cities,
    in ``run_dir``'s results; every row of every city in its summary (``report``:
    ``settings.Reporting``)."""
    names = labels_lib.class_names(report.num_classes)
    table_classes = report.table_classes
    sub = {city: [dict(r, iou=[r["iou"][c] for c in table_classes]) for r in rows]
           for city, rows in rows_by_city.items()}
    rounds = report.rounds
    table = tables.city_table(sub, [names[c] for c in table_classes], rounds - 1 if rounds > 0 else None)
    cities = list(rows_by_city)
    text = (f"# Results per city ({', '.join(cities)}), seeds {list(seeds)}\n\n{table}\n\n"
            f"Self-training methods at their last round (r{max(rounds - 1, 0)}); every round of each city, with "
            f"mean ± std over seeds: "
            f"{', '.join(os.path.relpath(run_dir.city(c).results, run_dir.path) for c in cities)}"
            f".\n\nwall time "
            f"{wall_s / 60:.1f} min on {jax.device_count()} {jax.devices()[0].platform} device(s)\n")
    atomic_write_bytes(run_dir.results, text.encode())
    atomic_write_json(run_dir.summary,
                      metrics_log.jsonable({"cities": cities, "seeds": list(seeds), "wall_s": wall_s,
                                          "rows": {city: rows for city, rows in rows_by_city.items()}}))
    print(f"\n{text}", flush=True)
