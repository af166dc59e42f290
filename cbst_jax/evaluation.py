"""Evaluation of a model on a labelled target split: the confusion matrix over the whole split
(mIoU, per-class IoU, pixel accuracy: ``cbst_jax.metrics``) and a few predictions kept for
figures. The round loop calls :func:`evaluate`; :func:`evaluate_weights` evaluates any weights
file on any labelled split, without the source dataset, with a run's settings
(:func:`run_config`) or a file's (:func:`weights_config`): ``cbst_jax.cli.evaluate`` is its
command line.
"""
from __future__ import annotations

import os

from cbst_jax.data import FOLDER_DATASETS


def evaluate(exp, variables, keep: int = 4, desc: str = "evaluate", predictor=None):
    """(confusion matrix int64 (C, C + 1), the first ``keep`` predictions as host arrays), with
    ``predictor`` (default: the evaluation scales, ``exp.eval_predictor``; the pseudo-labelling
    predictor when unset)."""
    batches = exp.batches(exp.data.target_eval, desc=desc)
    predictor = predictor or exp.eval_predictor or exp.predictor
    return predictor.evaluate(variables, batches, keep)


class EvaluateError(ValueError):
    """Arguments the command cannot use; one line."""


def weights_config(weights: str, dataset: str, root: str, split: str | None, *, city: str = "",
                   list_file: str = ""):
    """A run configuration for evaluating ``weights`` on ``dataset`` (class protocol: the file's)."""
    from cbst_jax import config_lib, models

    meta = models.read_metadata(weights)
    if meta["num_classes"] is None:
        raise EvaluateError(f"{weights}: a backbone-only init (its classifier was never trained); evaluate "
                            f"needs trained weights, e.g. an exported stage")
    if dataset not in FOLDER_DATASETS:
        raise EvaluateError(f"--dataset {dataset!r}: expected one of {', '.join(FOLDER_DATASETS)}")
    if not root:
        raise EvaluateError("--root is required with --weights: the folder holding the dataset")
    if dataset == "nthu" and not city:
        from cbst_jax.data.nthu import CITIES

        raise EvaluateError(f"--dataset nthu needs --city: one of {', '.join(CITIES)}")
    c = config_lib.base_config()
    c.num_classes = meta["num_classes"]
    c.eval_classes = "miou13" if c.num_classes == 16 else ""
    c.model.name = meta["architecture"]
    split = split or ("test" if dataset == "nthu" else "val")
    c.target.name, c.target.root, c.target.eval_split, c.target.city = dataset, root, split, city
    if list_file:  # the readers apply a list to the split adapted on: make that the evaluated one
        c.target.list_file, c.target.train_split = list_file, split
    c.evaluate.scales, c.evaluate.flip = (1.0,), True
    return c


def run_config(seed_dir):
    """The configuration a seed's folder was written by, to evaluate its stages with (a run from
    before ``evaluate.*`` existed evaluated at ``predict.*``)."""
    config = seed_dir.read_config()
    if "evaluate" not in config:
        config.evaluate = {"scales": config.predict.scales, "flip": config.predict.flip}
    return config


def evaluate_weights(weights: str, config, *, split: str | None = None, name: str | None = None,
                     progress: bool = True) -> dict:
    """Evaluates ``weights`` on ``config.target`` at ``config.evaluate``'s scales and flip, on
    ``config.input.eval_size``; returns {"row": evaluation row, "table": paper-style table, ...}."""
    import jax

    from cbst_jax import labels as labels_lib
    from cbst_jax import metrics_log, models, run_report, tables
    from cbst_jax import sharding as shd
    from cbst_jax.data import DatasetError
    from cbst_jax.data.splits import class_lists, open_side
    from cbst_jax.data.pipeline import global_eval_batch
    from cbst_jax.experiment import eval_batches, eval_workers
    from cbst_jax.methods import Stage
    from cbst_jax.predictor import Predictor

    meta = models.read_metadata(weights)
    if meta["num_classes"] != config.num_classes:
        raise EvaluateError(f"{weights}: {meta['num_classes']} classes, but the run has {config.num_classes}")
    split = split or config.target.eval_split
    target = open_side(config, "target", split)
    if not getattr(target, "has_labels", True):
        raise DatasetError(f"{config.target.name}: split {split!r} has no labels to evaluate against")
    if len(target) == 0:
        raise DatasetError(f"{config.target.name}: split {split!r} holds no images")
    model = models.get_model(meta["architecture"], meta["num_classes"], dtype=config.model.dtype,
                             train_bn=config.model.train_bn, normalization=meta["normalization"])
    mesh = shd.make_mesh()
    canvas = tuple(int(v) for v in config.input.eval_size)
    predictor = Predictor(model, config.num_classes, mesh, canvas, config.evaluate.scales, config.evaluate.flip)
    table_classes, subset = class_lists(config)
    variables = jax.device_put(models.load_variables(weights), shd.replicated(mesh))
    name = name or os.path.splitext(os.path.basename(weights))[0]
    batches = eval_batches(target, mesh, canvas, global_eval_batch(config.input.eval_batch_size, mesh.devices.size),
                           eval_workers(config), desc=f"evaluate {name}" if progress else None)
    cm, _ = predictor.evaluate(variables, batches, 0)
    row = run_report.eval_row(Stage(name), cm, seed=config.seed, table_classes=table_classes, subset_classes=subset,
                               extra={"split": split, "images": len(target), "scales": list(predictor.scales),
                                      "flip": predictor.flip, "eval_size": list(canvas), "weights": weights})
    names = labels_lib.class_names(config.num_classes)
    shown = dict(row, iou=[row["iou"][c] for c in table_classes])
    table = tables.eval_table([shown], [names[c] for c in table_classes], subset, subset_name="mIoU*")
    return {"row": metrics_log.jsonable(row), "table": table, "confusion_matrix": cm.tolist()}
