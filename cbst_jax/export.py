"""A trained stage of a run as one weights file, to take the model out of its workdir.

  python -m cbst_jax.export --workdir W --stage cbst/r2 --out cbst_r2.npz [--seed S]

``W`` is a seed's workdir (``runs/gta5_cityscapes/seed_0``) or the run's folder holding one or
more ``seed_<s>/`` (``--seed`` picks one when there are several); for Cityscapes -> NTHU over all
cities, a city's folder (``W/Rome``). ``--stage``: ``source`` (round 0) or ``<method>/r<round>``
(``cbst/r2``, ``st_sp/r0``). The file written holds the stage's network and its metadata
(architecture, classes, input normalisation, class names, palette: ``cbst_jax.models``), plus
where it came from (stage, seed, datasets, the stage's recorded evaluation) and the run's
evaluation settings (``inference``: canvas, scales, flip; ``cbst_jax.infer``'s defaults), so
``python -m cbst_jax.infer --weights cbst_r2.npz ...`` and ``python -m cbst_jax.evaluate --weights
cbst_r2.npz ...`` need nothing else. A stage that is not trained (no ``models/<stage>.npz`` in the
workdir) is refused with a one-line error listing the trained ones; every error is one line
and exit status 2.

The stage lookup (:func:`find_stage`) is shared with ``cbst_jax.evaluate``.
"""
from __future__ import annotations

import argparse
import os
import sys

from cbst_jax.methods import Stage
from cbst_jax.run_ledger import recorded_eval, stage_weights_problem
from cbst_jax.workdir import RunDir, SeedDir, WorkdirError

class ExportError(ValueError):
    """A workdir, stage or output the command cannot use; one line."""


def parse_stage(text: str) -> Stage:
    """The stage ``--stage`` names (:meth:`Stage.parse`)."""
    try:
        return Stage.parse(text)
    except ValueError as e:
        raise ExportError(f"--stage {e}") from None


def find_stage(workdir: str, stage_text: str, seed: int | None = None) -> tuple[str, SeedDir, Stage]:
    """(weights file, seed's folder, stage) of a trained stage; ExportError otherwise."""
    stage = parse_stage(stage_text)
    try:
        run = RunDir(workdir).find_seed(seed)
    except WorkdirError as e:
        raise ExportError(str(e)) from None
    path = run.weights(stage)
    if not os.path.isfile(path):
        trained = ", ".join(s.key for s in run.weights_stages())
        raise ExportError(f"{run.path}: stage {stage.key} is not trained (no {run.relative(path)}); trained "
                          f"stages: {trained or 'none yet'}")
    problem = stage_weights_problem(run, stage)
    if problem:
        raise ExportError(problem)
    return path, run, stage


def read_run_config(run: SeedDir):
    """The configuration a seed's folder was written by (its ``config.json``)."""
    try:
        return run.read_config()
    except WorkdirError as e:
        raise ExportError(str(e)) from None


def export(workdir: str, stage_text: str, out: str, seed: int | None = None) -> dict:
    """Writes the stage's weights with their metadata to ``out``; returns the metadata."""
    from cbst_jax import models
    from cbst_jax.experiment import inference_settings

    path, run, stage = find_stage(workdir, stage_text, seed)
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise ExportError(f"--out {out}: folder {out_dir} does not exist")
    meta = models.read_metadata(path)
    variables = models.load_variables(path)
    config = read_run_config(run)
    provenance = {k: v for k, v in meta.items()
                  if k not in ("format", "architecture", "num_classes", "normalization", "class_names", "palette")}
    provenance.update(stage=stage.key, seed=config.get("seed"), variant=config.get("variant", ""),
                      source_dataset=config.source.name, target_dataset=config.target.name,
                      target_city=config.target.get("city", ""), exported_from=run.relative(path),
                      inference=inference_settings(config))
    row = recorded_eval(run, stage)
    if row is not None:
        provenance["eval"] = {"split": config.target.eval_split, "miou": row.get("miou"),
                              **({"miou_subset": row["miou_subset"]} if "miou_subset" in row else {})}
    metadata = models.make_metadata(meta["architecture"], meta["num_classes"], meta["normalization"],
                                    class_names=meta["class_names"], palette=meta["palette"], **provenance)
    models.save_variables(out, variables, metadata)
    return metadata


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cbst-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a run's folder or one seed's (seed_<s>)")
    parser.add_argument("--stage", required=True, help="source, or <method>/r<round> (e.g. cbst/r2)")
    parser.add_argument("--seed", type=int, default=None, help="which seed_<s> when the folder holds several")
    parser.add_argument("--out", required=True, help="the weights file to write (.npz)")
    args = parser.parse_args(argv)
    from cbst_jax.models import WeightMismatchError

    try:
        meta = export(args.workdir, args.stage, args.out, args.seed)
    except (ExportError, WeightMismatchError) as exc:  # WeightFileError is one
        print(f"error: {exc}", file=sys.stderr)
        return 2
    score = meta.get("eval", {}).get("miou")
    print(f"{args.out}: {meta['architecture']}, {meta['num_classes']} classes, normalization="
          f"{meta['normalization']!r}, stage {meta['stage']} of seed {meta['seed']}"
          + (f" (recorded mIoU {100 * score:.1f} on {meta['eval']['split']})" if score is not None else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
