"""Evaluate any stage of a run or any weights file on any labelled split, without the source dataset:

  cbst-evaluate --workdir W --stage cbst/r2 [--seed S] [--split val] [--root DIR]
  cbst-evaluate --weights F.npz --dataset cityscapes --root DIR [--split val] [--city C] [--list-file L]
  both: [--scales 0.9 1.0 1.2] [--flip | --no-flip] [--eval-size H,W] [--batch-size N] [--workers N]
        [--out DIR]

(``cbst-evaluate`` is ``python -m cbst_jax.cli.evaluate``.) With ``--workdir`` (a seed's folder or
a run's, as ``cbst-export``) the stage's weights file is evaluated with the run's configuration:
its target dataset and evaluation split, canvas, class protocol and evaluation scales, any of them
overridable (``--root`` when the dataset has moved). With ``--weights`` the dataset is named on
the command line and the class protocol is the file's (16 classes also report mIoU*; a 19-class
file on NTHU is scored on the 13 NTHU classes, its predictions of the other six counting as
errors, as ``docs/datasets.md`` says). The network is built from the weights file's metadata
(architecture, classes, normalisation). Scales are relative to the canvas (``--eval-size``), as
in training; the defaults are the run's ``evaluate.scales`` / ``evaluate.flip`` (``--weights``:
1.0 with flip). The paper-style table goes to stdout, and with ``--out`` to
``DIR/evaluation.md`` with the numbers in ``DIR/evaluation.json``. Bad arguments, weights or
datasets: one line and exit status 2. The library: ``cbst_jax.evaluation.evaluate_weights``.
"""
from __future__ import annotations

import argparse
import os
import sys

from cbst_jax.cli import args as cli_args
from cbst_jax.data import FOLDER_DATASETS


def _evaluate(args) -> dict:
    from cbst_jax import evaluation

    if bool(args.workdir) == bool(args.weights):
        raise cli_args.UsageError("give either --workdir (with --stage) or --weights (with --dataset and --root)")
    if args.workdir:
        if not args.stage:
            raise cli_args.UsageError("--workdir needs --stage: source, or <method>/r<round> (e.g. cbst/r2)")
        for flag in ("dataset", "list_file"):
            if getattr(args, flag):
                raise cli_args.UsageError(f"--{flag.replace('_', '-')} is for --weights; a run's dataset is its own")
        run, stage = cli_args.trained_stage(args.workdir, args.stage, args.seed)
        weights, name = run.weights(stage), stage.label
        config = evaluation.run_config(run)
        if args.root:
            config.target.root = args.root
        if args.city:
            config.target.city = args.city
    else:
        if args.stage or args.seed is not None:
            raise cli_args.UsageError("--stage and --seed are for --workdir")
        weights, name = args.weights, None
        config = evaluation.weights_config(args.weights, args.dataset or "", args.root or "", args.split,
                                           city=args.city or "", list_file=args.list_file or "")
    if args.scales is not None:
        if not args.scales or any(not s > 0 for s in args.scales):
            raise cli_args.UsageError(f"--scales {args.scales}: expected positive scales, e.g. 0.9 1.0 1.2")
        config.evaluate.scales = tuple(args.scales)
    if args.flip is not None:
        config.evaluate.flip = args.flip
    if args.eval_size is not None:
        if min(args.eval_size) < 8:
            raise cli_args.UsageError(f"--eval-size {args.eval_size}: expected at least 8 pixels per side")
        config.input.eval_size = tuple(args.eval_size)
    for flag, key in (("batch_size", "eval_batch_size"), ("workers", "workers")):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise cli_args.UsageError(f"--{flag.replace('_', '-')} {value}: expected a positive integer")
            config.input[key] = value
    result = evaluation.evaluate_weights(weights, config, split=args.split, name=name)
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
    parser = cli_args.parser("cbst-evaluate", __doc__)
    cli_args.add_stage_arguments(parser, required=False)
    parser.add_argument("--weights", default=None, help="a weights file with metadata (converted or exported)")
    parser.add_argument("--dataset", default=None, help=f"with --weights: {', '.join(FOLDER_DATASETS)}")
    parser.add_argument("--root", default=None, help="the dataset's folder (with --workdir: overrides the run's)")
    parser.add_argument("--split", default=None, help="a labelled split (default: the run's evaluation split; "
                                                      "--weights: val, NTHU test)")
    parser.add_argument("--city", default=None, help="NTHU: Rome, Rio, Tokyo or Taipei")
    parser.add_argument("--list-file", default=None, help="with --weights: evaluate only the listed images")
    parser.add_argument("--scales", nargs="+", type=float, default=None, help="test scales relative to the canvas")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="average with the flipped image (default: the run's; --weights: on)")
    parser.add_argument("--eval-size", type=cli_args.size, default=None,
                        help="H,W canvas (default: the run's; --weights: 1024,2048)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (rounded up to the devices)")
    parser.add_argument("--workers", type=int, default=None, help="image-loading threads")
    parser.add_argument("--out", default=None, help="folder for evaluation.md and evaluation.json")
    args = parser.parse_args(argv)
    from cbst_jax.config_lib import ConfigError
    from cbst_jax.data import DatasetError
    from cbst_jax.evaluation import EvaluateError
    from cbst_jax.models import WeightMismatchError
    from cbst_jax.workdir import WorkdirError

    def command() -> int:
        result = _evaluate(args)
        print(_heading(result["row"]) + result["table"])
        return 0

    # WeightFileError is a WeightMismatchError
    return cli_args.one_line_errors(command, (EvaluateError, ConfigError, DatasetError, WeightMismatchError,
                                              WorkdirError))


if __name__ == "__main__":
    sys.exit(main())
