"""Segment your own images with a weights file (converted or exported; it carries its metadata).

  cbst-infer --weights W.npz --out DIR [--scales 1.0 ...] [--flip | --no-flip] [--batch-size N]
             [--canvas H,W] [--gt GT_DIR] [--names A,B] FILES_OR_FOLDERS...

(``cbst-infer`` is ``python -m cbst_jax.cli.infer``.) ``--canvas``, ``--scales`` and ``--flip``
default to the settings the weights file records (a stage exported from a run, or a run's own
stage weights: the run's ``input.eval_size``, ``evaluate.scales`` and ``evaluate.flip``, so the
labels are those the run scored); a file that records none (a converted checkpoint, an export
from before the record) uses 1024x2048, one scale and no flip.

JPG/PNG files of any size, or folders of them (searched recursively). Per image it writes
``<name>_trainid.png`` (class indices, 255 never occurs), ``<name>_color.png`` (the weights'
palette) and ``<name>_overlay.jpg`` (image and colours blended); folder inputs keep their
sub-folders under DIR. Several ``--weights`` files write one sub-folder per model. With several
weights or with ``--gt``, ``DIR/comparison.png`` shows the first ``--figure-rows`` images in the
seed's qualitative layout: image | ground truth (with ``--gt``) | one column per model.

Every image is fitted into the ``--canvas`` (aspect kept) and padded, so at most two programs
are compiled per model; ``--scales`` are relative to the canvas. An unreadable file is
reported, skipped and counted; the exit status is 1 if any file failed, 2 for bad arguments or
weights (a file named on the command line that is not an image is a bad argument). Everything is
checked before DIR is created; all files are written to a temporary name and renamed.
``DIR/infer_summary.json`` lists what was done. The library: ``cbst_jax.segment_images``.
"""
from __future__ import annotations

import argparse
import sys

from cbst_jax.cli import args as cli_args


def main(argv=None) -> int:
    from cbst_jax.segment_images import DEFAULT_CANVAS

    parser = cli_args.parser("cbst-infer", __doc__)
    parser.add_argument("inputs", nargs="+", metavar="FILES_OR_FOLDERS")
    parser.add_argument("--weights", nargs="+", required=True,
                        help="weights file(s) with metadata; several: one column each in comparison.png")
    parser.add_argument("--out", required=True, help="output folder")
    recorded = "the run's, recorded in the weights file by export"
    parser.add_argument("--scales", nargs="+", type=float, default=None,
                        help=f"test scales relative to the canvas (default: {recorded}; else 1.0)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help=f"average with the horizontally flipped image (default: {recorded}; else off)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: one per device)")
    parser.add_argument("--canvas", type=cli_args.size, default=None,
                        help=f"H,W every image is fitted into (default: {recorded}; else "
                             f"{DEFAULT_CANVAS[0]},{DEFAULT_CANVAS[1]})")
    parser.add_argument("--names", default=None, help="comma-separated column titles, one per weights file")
    parser.add_argument("--gt", default=None, help="folder of ground-truth label PNGs for the comparison figure")
    parser.add_argument("--figure-rows", type=int, default=8, help="images in the comparison figure")
    args = parser.parse_args(argv)
    from cbst_jax.models import WeightMismatchError
    from cbst_jax.segment_images import InferError, run

    def command() -> int:
        summary = run(args.weights, args.inputs, args.out, canvas=args.canvas, scales=args.scales, flip=args.flip,
                      batch_size=args.batch_size, names=args.names.split(",") if args.names else None,
                      gt_dir=args.gt, figure_rows=args.figure_rows)
        n_failed = len(summary["failed"])
        print(f"{summary['segmented']} of {summary['images']} images segmented into {args.out}"
              f"{f', {n_failed} unreadable (skipped)' if n_failed else ''} in {summary['seconds']:.1f} s",
              file=sys.stderr)
        return 1 if n_failed else 0

    return cli_args.one_line_errors(command, (InferError, WeightMismatchError))  # WeightFileError is one


if __name__ == "__main__":
    sys.exit(main())
