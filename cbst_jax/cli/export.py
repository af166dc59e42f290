"""A trained stage of a run as one weights file, to take the model out of its workdir:

  cbst-export --workdir W --stage cbst/r2 --out cbst_r2.npz [--seed S]

(``cbst-export`` is ``python -m cbst_jax.cli.export``.) ``W`` is a seed's folder
(``runs/gta5_cityscapes/seed_0``) or the run's folder holding one or more ``seed_<s>/``
(``--seed`` picks one when there are several); for Cityscapes -> NTHU over all cities, a city's
folder (``W/Rome``). ``--stage``: ``source`` (round 0) or ``<method>/r<round>`` (``cbst/r2``,
``st_sp/r0``). The file written holds the stage's network and its metadata (architecture,
classes, input normalisation, class names, palette), where it came from (stage, seed, datasets,
the stage's recorded evaluation) and the run's evaluation settings (canvas, scales, flip), so
``cbst-infer --weights cbst_r2.npz ...`` and ``cbst-evaluate --weights cbst_r2.npz ...`` need
nothing else. A stage that is not trained is refused with a one-line error listing the trained
ones; every error is one line and exit status 2. The library: ``cbst_jax.export.export_stage``.
"""
from __future__ import annotations

import os
import sys

from cbst_jax.cli import args as cli_args


def _export(args) -> dict:
    from cbst_jax.export import export_stage

    run, stage = cli_args.trained_stage(args.workdir, args.stage, args.seed)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise cli_args.UsageError(f"--out {args.out}: folder {out_dir} does not exist")
    return export_stage(run, stage, args.out)


def main(argv=None) -> int:
    parser = cli_args.parser("cbst-export", __doc__)
    cli_args.add_stage_arguments(parser, required=True)
    parser.add_argument("--out", required=True, help="the weights file to write (.npz)")
    args = parser.parse_args(argv)
    from cbst_jax.models import WeightMismatchError
    from cbst_jax.workdir import WorkdirError

    def command() -> int:
        meta = _export(args)
        score = meta.get("eval", {}).get("miou")
        print(f"{args.out}: {meta['architecture']}, {meta['num_classes']} classes, normalization="
              f"{meta['normalization']!r}, stage {meta['stage']} of seed {meta['seed']}"
              + (f" (recorded mIoU {100 * score:.1f} on {meta['eval']['split']})" if score is not None else ""),
              file=sys.stderr)
        return 0

    return cli_args.one_line_errors(command, (WeightMismatchError, WorkdirError))  # WeightFileError is one


if __name__ == "__main__":
    sys.exit(main())
