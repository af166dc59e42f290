"""Evaluation of a model on a labelled target split: the confusion matrix over the whole split
(mIoU, per-class IoU, pixel accuracy: ``cbst_jax.metrics``) and a few predictions kept for
figures. The round loop calls :func:`evaluate`; the command line evaluates any stage of a run
or any weights file, on any labelled split, without the source dataset:

  python -m cbst_jax.evaluate --workdir W --stage cbst/r2 [--seed S] [--split val] [--root DIR]
  python -m cbst_jax.evaluate --weights F.npz --dataset cityscapes --root DIR [--split val] [--city C]
                              [--list-file L]
  both: [--scales 0.9 1.0 1.2] [--flip | --no-flip] [--eval-size H,W] [--batch-size N] [--workers N]
        [--out DIR]

With ``--workdir`` (a seed's workdir or a run's folder, as ``cbst_jax.export``) the stage's
weights file (``models/<stage>.npz``) is evaluated with the run's configuration: its target
dataset and evaluation split, canvas, class protocol and evaluation scales, any of them
overridable (``--root`` when the dataset has moved). With ``--weights`` the dataset is named on
the command line and the class protocol is the file's (16 classes also report mIoU*; a 19-class
file on NTHU is scored on the 13 NTHU classes, its predictions of the other six counting as
errors, as ``docs/datasets.md`` says). The
network is built from the weights file's metadata (architecture, classes, normalisation).
Scales are relative to the canvas (``--eval-size``), as in training; the defaults are the run's
``evaluate.scales`` / ``evaluate.flip`` (``--weights``: 1.0 with flip). The paper-style table
goes to stdout, and with ``--out`` to ``DIR/evaluation.md`` with the numbers in
``DIR/evaluation.json``. Bad arguments, weights or datasets: one line and exit status 2.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys


def evaluate(exp, variables, keep: int = 4, desc: str = "evaluate", predictor=None):
    """(confusion matrix int64 (C, C + 1), the first ``keep`` predictions as host arrays), with
    ``predictor`` (default: the evaluation scales, ``exp.eval_predictor``; the pseudo-labelling
    predictor when unset)."""
    batches = exp.batches(exp.data.target_eval, desc=desc)
    predictor = predictor or exp.eval_predictor or exp.predictor
    return predictor.evaluate(variables, batches, keep)


class EvaluateError(ValueError):
    """Arguments the command cannot use; one line."""


DATASETS = ("cityscapes", "bdd100k", "nthu", "gta5", "synthia")


def weights_config(weights: str, dataset: str, root: str, split: str | None, *, city: str = "",
                   list_file: str = ""):
    """A run configuration for evaluating ``weights`` on ``dataset`` (class protocol: the file's)."""
    from cbst_jax import config_lib, models

    meta = models.read_metadata(weights)
    if meta["num_classes"] is None:
        raise EvaluateError(f"{weights}: a backbone-only init (its classifier was never trained); evaluate "
                            f"needs trained weights, e.g. an exported stage")
    if dataset not in DATASETS:
        raise EvaluateError(f"--dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
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


def evaluate_weights(weights: str, config, *, split: str | None = None, name: str | None = None,
                     progress: bool = True) -> dict:
    """Evaluates ``weights`` on ``config.target`` at ``config.evaluate``'s scales and flip, on
    ``config.input.eval_size``; returns {"row": evaluation row, "table": paper-style table, ...}."""
    import jax

    from cbst_jax import labels as labels_lib
    from cbst_jax import models, reporting, run_outputs
    from cbst_jax import sharding as shd
    from cbst_jax.data import DatasetError
    from cbst_jax.data.experiment_data import ExperimentData, class_lists, open_side
    from cbst_jax.experiment import Experiment
    from cbst_jax.methods import Stage
    from cbst_jax.predict import Predictor

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
    data = ExperimentData(None, None, target, table_classes, subset, None, {})
    exp = Experiment(config, "", mesh, data, [], model, predictor, canvas, eval_predictor=predictor)
    variables = jax.device_put(models.load_variables(weights), shd.replicated(mesh))
    name = name or os.path.splitext(os.path.basename(weights))[0]
    cm, _ = evaluate(exp, variables, keep=0, desc=f"evaluate {name}" if progress else None)
    row = run_outputs.eval_row(exp, Stage(name), cm, {"split": split, "images": len(target),
                                                      "scales": list(predictor.scales), "flip": predictor.flip,
                                                      "eval_size": list(canvas), "weights": weights})
    names = labels_lib.class_names(config.num_classes)
    shown = dict(row, iou=[row["iou"][c] for c in table_classes])
    table = reporting.eval_table([shown], [names[c] for c in table_classes], subset, subset_name="mIoU*")
    return {"row": reporting.jsonable(row), "table": table, "confusion_matrix": cm.tolist()}


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected H,W (two integers)") from None
    return h, w


def _run(args) -> dict:
    from cbst_jax import export

    if bool(args.workdir) == bool(args.weights):
        raise EvaluateError("give either --workdir (with --stage) or --weights (with --dataset and --root)")
    if args.workdir:
        if not args.stage:
            raise EvaluateError("--workdir needs --stage: source, or <method>/r<round> (e.g. cbst/r2)")
        for flag in ("dataset", "list_file"):
            if getattr(args, flag):
                raise EvaluateError(f"--{flag.replace('_', '-')} is for --weights; a run's dataset is its own")
        try:
            weights, run, stage = export.find_stage(args.workdir, args.stage, args.seed)
        except export.ExportError as exc:
            raise EvaluateError(str(exc)) from None
        config = export.read_run_config(run)
        if "evaluate" not in config:  # a run from before evaluate.* existed evaluated at predict.*
            config.evaluate = {"scales": config.predict.scales, "flip": config.predict.flip}
        if args.root:
            config.target.root = args.root
        if args.city:
            config.target.city = args.city
        name = stage.label
    else:
        if args.stage or args.seed is not None:
            raise EvaluateError("--stage and --seed are for --workdir")
        weights, name = args.weights, None
        config = weights_config(args.weights, args.dataset or "", args.root or "", args.split, city=args.city or "",
                                list_file=args.list_file or "")
    config = copy.deepcopy(config)
    if args.scales is not None:
        if not args.scales or any(not s > 0 for s in args.scales):
            raise EvaluateError(f"--scales {args.scales}: expected positive scales, e.g. 0.9 1.0 1.2")
        config.evaluate.scales = tuple(args.scales)
    if args.flip is not None:
        config.evaluate.flip = args.flip
    if args.eval_size is not None:
        if min(args.eval_size) < 8:
            raise EvaluateError(f"--eval-size {args.eval_size}: expected at least 8 pixels per side")
        config.input.eval_size = tuple(args.eval_size)
    for flag, key in (("batch_size", "eval_batch_size"), ("workers", "workers")):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise EvaluateError(f"--{flag.replace('_', '-')} {value}: expected a positive integer")
            config.input[key] = value
    result = evaluate_weights(weights, config, split=args.split, name=name)
    if args.out:
        from cbst_jax.atomic_files import atomic_write_bytes, atomic_write_json

        os.makedirs(args.out, exist_ok=True)
        atomic_write_bytes(os.path.join(args.out, "evaluation.md"), (_heading(result["row"]) + result["table"]
                                                                     + "\n").encode())
        atomic_write_json(os.path.join(args.out, "evaluation.json"), result)
    return result


def _heading(row: dict) -> str:
    scales = ", ".join(f"{s:g}" for s in row["scales"])
    return (f"# Evaluation of {row['weights']}\n\nsplit {row['split']} ({row['images']} images), canvas "
            f"{row['eval_size'][0]}x{row['eval_size'][1]}, scales {scales}, flip {row['flip']}\n\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cbst-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="a run's folder or one seed's (seed_<s>)")
    parser.add_argument("--stage", default=None, help="with --workdir: source, or <method>/r<round>")
    parser.add_argument("--seed", type=int, default=None, help="with --workdir: which seed_<s>")
    parser.add_argument("--weights", default=None, help="a weights file with metadata (converted or exported)")
    parser.add_argument("--dataset", default=None, help=f"with --weights: {', '.join(DATASETS)}")
    parser.add_argument("--root", default=None, help="the dataset's folder (with --workdir: overrides the run's)")
    parser.add_argument("--split", default=None, help="a labelled split (default: the run's evaluation split; "
                                                      "--weights: val, NTHU test)")
    parser.add_argument("--city", default=None, help="NTHU: Rome, Rio, Tokyo or Taipei")
    parser.add_argument("--list-file", default=None, help="with --weights: evaluate only the listed images")
    parser.add_argument("--scales", nargs="+", type=float, default=None, help="test scales relative to the canvas")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="average with the flipped image (default: the run's; --weights: on)")
    parser.add_argument("--eval-size", type=_size, default=None,
                        help="H,W canvas (default: the run's; --weights: 1024,2048)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (rounded up to the devices)")
    parser.add_argument("--workers", type=int, default=None, help="image-loading threads")
    parser.add_argument("--out", default=None, help="folder for evaluation.md and evaluation.json")
    args = parser.parse_args(argv)
    from cbst_jax.config_lib import ConfigError
    from cbst_jax.data import DatasetError
    from cbst_jax.models import WeightMismatchError

    try:
        result = _run(args)
    except (EvaluateError, ConfigError, DatasetError, WeightMismatchError) as exc:  # WeightFileError is one
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_heading(result["row"]) + result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
