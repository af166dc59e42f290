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
import json
import os
import re
import sys

from cbst_jax import methods as methods_lib
from cbst_jax.methods import SOURCE, Stage

CONFIG_FILE = "config.json"
_STAGE = re.compile(r"^(\w+?)(?:/r|_r| r)(\d+)$")
_STAGE_FILE = re.compile(r"^(\w+)_r(\d+)$")


class ExportError(ValueError):
    """A workdir, stage or output the command cannot use; one line."""


def parse_stage(text: str) -> Stage:
    """``"source"`` (or ``"source_only"``) -> the source stage; ``"cbst/r2"`` (also ``cbst_r2``,
    ``"cbst r2"``) -> Stage("cbst", 2)."""
    text = str(text).strip()
    if text in ("source", SOURCE.method):
        return SOURCE
    m = _STAGE.match(text)
    method = methods_lib.BY_NAME.get(m[1]) if m else None
    if method is None or not method.self_trains:
        raise ExportError(f"--stage {text!r}: expected 'source' or '<method>/r<round>' with a self-training "
                          f"method ({', '.join(n for n, x in methods_lib.BY_NAME.items() if x.self_trains)}), "
                          f"e.g. cbst/r2")
    return Stage(method.name, int(m[2]))


def seed_workdir(workdir: str, seed: int | None = None) -> str:
    """The folder of one seed's run under ``workdir`` (see the module docstring)."""
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise ExportError(f"--workdir {workdir}: no such folder")
    if os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
        return workdir
    seeds = sorted(int(d[5:]) for d in os.listdir(workdir)
                   if re.fullmatch(r"seed_-?\d+", d) and os.path.isfile(os.path.join(workdir, d, CONFIG_FILE)))
    if seed is not None:
        if seed not in seeds:
            raise ExportError(f"--workdir {workdir}: no run of seed {seed} (seeds there: "
                              f"{', '.join(map(str, seeds)) or 'none'})")
        return os.path.join(workdir, f"seed_{seed}")
    if len(seeds) == 1:
        return os.path.join(workdir, f"seed_{seeds[0]}")
    if seeds:
        raise ExportError(f"--workdir {workdir} holds seeds {', '.join(map(str, seeds))}: pass --seed")
    runs = sorted(d for d in os.listdir(workdir) if os.path.isdir(os.path.join(workdir, d))
                  and any(re.fullmatch(r"seed_-?\d+", x) and os.path.isfile(os.path.join(workdir, d, x, CONFIG_FILE))
                          for x in os.listdir(os.path.join(workdir, d))))
    if runs:  # e.g. Cityscapes -> NTHU over all cities: one run per city
        raise ExportError(f"--workdir {workdir} holds one run per sub-folder ({', '.join(runs)}): pass "
                          f"--workdir {os.path.join(workdir, runs[0])} (or another)")
    raise ExportError(f"--workdir {workdir}: not a run's folder (no {CONFIG_FILE}, no seed_<s>/ with one)")


def stage_file(workdir: str, stage: Stage) -> str:
    """Where the run ledger keeps the weights file of ``stage`` in a seed's workdir."""
    from cbst_jax.run_ledger import stage_weights_path

    return stage_weights_path(workdir, stage)


def trained_stages(workdir: str) -> list[str]:
    """The stages with a weights file in a seed's workdir (``source``, ``cbst/r0``, ...)."""
    folder = os.path.dirname(stage_file(workdir, SOURCE))
    if not os.path.isdir(folder):
        return []
    out = []
    for f in sorted(os.listdir(folder)):
        name, ext = os.path.splitext(f)
        m = _STAGE_FILE.match(name)
        if ext == ".npz" and (name == "source" or m):
            out.append("source" if name == "source" else f"{m[1]}/r{m[2]}")
    return sorted(out, key=lambda s: (s != "source", s))


def find_stage(workdir: str, stage_text: str, seed: int | None = None) -> tuple[str, str, Stage]:
    """(weights file, seed workdir, stage) of a trained stage; ExportError otherwise."""
    stage = parse_stage(stage_text)
    run = seed_workdir(workdir, seed)
    path = stage_file(run, stage)
    if not os.path.isfile(path):
        trained = trained_stages(run)
        raise ExportError(f"{run}: stage {stage.key} is not trained (no {os.path.relpath(path, run)}); trained "
                          f"stages: {', '.join(trained) or 'none yet'}")
    from cbst_jax.run_ledger import stage_weights_problem

    problem = stage_weights_problem(run, stage)
    if problem:
        raise ExportError(problem)
    return path, run, stage


def read_run_config(workdir: str):
    """The configuration a seed's workdir was written by (its ``config.json``)."""
    import ml_collections

    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable run configuration ({type(exc).__name__}: {exc})") from None


def recorded_eval(workdir: str, stage: Stage) -> dict | None:
    """The evaluation row the run recorded for ``stage`` (its ``ledger.json``), if any."""
    path = os.path.join(workdir, "ledger.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)["stages"].get(stage.key, {}).get("eval")
    except (OSError, ValueError, KeyError):
        return None


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
                      target_city=config.target.get("city", ""), exported_from=os.path.relpath(path, run),
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
