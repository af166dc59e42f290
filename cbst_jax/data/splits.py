"""The three splits of an experiment, opened from its configuration: the labelled source, the
unlabelled target split that is pseudo-labelled and adapted on, and the labelled target split
it is evaluated on (the embedded pair's rendered once per run); and which classes its tables
average over.

Dataset knowledge the round loop should not carry lives here: the embedded pair's sizes and
drawn classes, which readers take a list file, a ``labelled`` flag or a city, and the key under
which the embedded target's training records keep their hidden ground truth (used only to
report pseudo-label precision, never for training).
"""
from __future__ import annotations

import dataclasses

from cbst_jax import labels as labels_lib
from cbst_jax.data import open_dataset
from cbst_jax.data.overlap import without_eval_overlap

HIDDEN_LABEL = "hidden_label"
_UNLABELLED_OPTION = ("cityscapes", "bdd100k", "nthu")


@dataclasses.dataclass
class Splits:
    source: object
    target_train: object
    target_eval: object
    table_classes: list           # classes the tables show and mIoU averages
    subset_classes: list | None   # SYNTHIA's 13 of 16 (mIoU*), else None
    hidden_label_key: str | None  # where target-train records hold ground truth, if anywhere
    overlap: dict                 # target train vs evaluation images, by content (data.overlap)


def open_side(config, side: str, split: str, *, labelled=None, city: str | None = None):
    """``config.source`` or ``config.target`` opened at ``split`` (NTHU: at ``city``, default
    ``target.city``)."""
    d = config[side]
    if d.name.startswith("synthetic/"):
        s = config.synthetic
        counts = {("source", "train"): s.num_source, ("target", "train"): s.num_target_train,
                  ("target", "val"): s.num_target_val, ("target", "test"): s.num_target_val}
        return open_dataset(d.name, None, split, height=s.height, width=s.width, seed=s.data_seed,
                            num_images=counts.get((d.name.split("/")[1], split)), camera_shift=s.camera_shift)
    opts = {"num_classes": config.num_classes}
    if d.get("list_file") and split == d.get("train_split", d.get("split")):
        opts["list_file"] = d.list_file
    if labelled is not None and d.name in _UNLABELLED_OPTION:
        opts["labelled"] = labelled
    city = d.get("city") if city is None else city
    if d.name == "nthu" and city:
        opts["city"] = city
    if d.name == "synthia" and d.get("lanemarking_as_road"):
        opts["lanemarking_as_road"] = True
    return open_dataset(d.name, d.root, split, **opts)


def rendered(config, split):
    """``split`` itself, or for the embedded pair its scenes rendered once into memory (the same
    arrays; ``input.workers`` processes render them), so no batch renders an image again."""
    from cbst_jax.data.synthetic import RenderedSource, SyntheticSource

    if not isinstance(split, SyntheticSource):
        return split
    from cbst_jax.data.pipeline import default_workers

    return RenderedSource(split, default_workers() if config.input.workers < 0 else config.input.workers)


def class_lists(config) -> tuple[list, list | None]:
    """(classes of the tables, subset of the mIoU* column or None). A 19-class model on NTHU is
    scored on the 13 NTHU classes (its predictions of the other six count as errors)."""
    if config.eval_classes == "synthetic":
        from cbst_jax.data.synthetic import DRAWN_CLASSES
        return sorted(DRAWN_CLASSES), None
    if config.eval_classes == "miou13":
        return list(range(config.num_classes)), list(labels_lib.MIOU13_OF_16)
    if config.target.name == "nthu" and config.num_classes == 19:  # only the 13 NTHU classes are labelled
        return list(labels_lib.NTHU13_TRAINIDS), None
    return list(range(config.num_classes)), None


def open_splits(config, city: str | None = None) -> Splits:
    """The splits of ``config`` (NTHU: of ``city``, default ``target.city``). The target
    evaluation split must be labelled; target train images that are also evaluation images (by
    content) are left out of the split adapted on, unless ``target.allow_eval_overlap`` keeps
    them (the published protocol; reported)."""
    from cbst_jax.data.io import DatasetError

    source = open_side(config, "source", config.source.split)
    target_train = open_side(config, "target", config.target.train_split, labelled=False, city=city)
    target_eval = open_side(config, "target", config.target.eval_split, city=city)
    source, target_train, target_eval = (rendered(config, split) for split in (source, target_train, target_eval))
    if not getattr(target_eval, "has_labels", True):
        raise DatasetError(f"target evaluation split {config.target.eval_split!r} has no labels")
    target_train, overlap = without_eval_overlap(target_train, target_eval,
                                                 allow_overlap=config.target.allow_eval_overlap)
    table, subset = class_lists(config)
    hidden = HIDDEN_LABEL if HIDDEN_LABEL in target_train[0] else None
    return Splits(source, target_train, target_eval, table, subset, hidden, overlap)
