"""A trained stage of a run as one weights file, to take the model out of its workdir: the stage's
network and its metadata (architecture, classes, input normalisation, class names, palette:
``cbst_jax.models``), plus where it came from (stage, seed, datasets, the stage's recorded
evaluation) and the run's evaluation settings (``inference``: canvas, scales, flip; the defaults
of ``cbst_jax.segment_images``), so segmenting images with the file or evaluating it needs
nothing else. Its command line: ``cbst_jax.cli.export``.
"""
from __future__ import annotations

from cbst_jax.methods import Stage
from cbst_jax.run_ledger import recorded_eval
from cbst_jax.workdir import SeedDir


def export_stage(run: SeedDir, stage: Stage, out: str) -> dict:
    """Writes the weights of ``stage``, trained in the seed's folder ``run``
    (``run_ledger.find_trained_stage``), with their metadata to ``out``; returns the metadata."""
    from cbst_jax import models
    from cbst_jax.experiment import inference_settings

    path = run.weights(stage)
    meta = models.read_metadata(path)
    variables = models.load_variables(path)
    config = run.read_config()
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
