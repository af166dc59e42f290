"""Dataset access: ``open_dataset(name, root, split, **options)`` gives a random-access source of
``{"image": uint8 (H, W, 3) RGB, "label": uint8 (H, W) trainIds, 255 = ignore, "name": file stem}``
records (no "label" key for unlabelled splits), decoded lazily with Pillow.

Names: gta5, cityscapes, synthia, bdd100k, nthu (official on-disk layouts, or TFDS datasets built
by ``cbst_jax.data.tfds_builders``) and synthetic/source, synthetic/target (generated in memory by
``cbst_jax.data.synthetic``). Importing this package imports neither tensorflow_datasets nor any
reader; they load on first use. Layouts, options and label encodings: docs/datasets.md.

Evaluation-split guard (``cbst_jax.data.overlap``): ``split_overlap`` finds adaptation images
that are also evaluation images by decoded content, ``without_eval_overlap`` returns the
adaptation split without them plus a report.
"""
from __future__ import annotations

import importlib
import inspect
import os

from cbst_jax.data.io import DatasetError, DatasetWarning, FolderSource
from cbst_jax.data.overlap import SubsetSource, check_disjoint, exclude, split_overlap, without_eval_overlap

__all__ = ["open_dataset", "check_disjoint", "split_overlap", "exclude", "without_eval_overlap", "SubsetSource",
           "is_tfds_dir", "DatasetError", "DatasetWarning", "FolderSource", "DATASETS", "FOLDER_DATASETS"]

# name -> (module, opener)
_READERS = {
    "gta5": ("cbst_jax.data.gta5", "open_gta5"),
    "cityscapes": ("cbst_jax.data.cityscapes", "open_cityscapes"),
    "synthia": ("cbst_jax.data.synthia", "open_synthia"),
    "bdd100k": ("cbst_jax.data.bdd100k", "open_bdd100k"),
    "nthu": ("cbst_jax.data.nthu", "open_nthu"),
}
FOLDER_DATASETS = tuple(_READERS)  # read from folders in their official layouts (or built TFDS datasets)
DATASETS = FOLDER_DATASETS + ("synthetic/source", "synthetic/target")
TFDS_PREFIX = "tfds:"


def is_tfds_dir(name: str, path) -> bool:
    """Whether ``path`` holds a built TFDS dataset: a version dir (dataset_info.json) or a data_dir with cbst_<name>/."""
    path = os.fspath(path)
    return (os.path.isfile(os.path.join(path, "dataset_info.json"))
            or os.path.isdir(os.path.join(path, f"cbst_{name}")))


def open_dataset(name: str, root=None, split: str = "train", **options):
    """Open dataset ``name`` at ``root`` (a folder in the official layout, ``"tfds:<data_dir>"``, or a
    TFDS data_dir / version dir detected by :func:`is_tfds_dir`) for ``split``.

    ``options`` are the reader's keyword options (see each ``open_<name>`` and docs/datasets.md);
    an unknown option or dataset raises DatasetError. ``synthetic/<domain>`` ignores ``root`` and
    forwards to ``cbst_jax.data.synthetic.open_synthetic(domain, split, **options)``.
    """
    if name.startswith("synthetic/"):
        from cbst_jax.data.synthetic import open_synthetic  # written separately; imported only when used

        return open_synthetic(name.split("/", 1)[1], split, **options)
    if name not in _READERS:
        raise DatasetError(f"unknown dataset {name!r}, expected one of {', '.join(DATASETS)}")
    if root is None:
        raise DatasetError(f"{name}: root is required (a folder in the official layout or 'tfds:<data_dir>')")
    root = os.fspath(root)
    if root.startswith(TFDS_PREFIX) or is_tfds_dir(name, root):
        from cbst_jax.data.tfds_builders import open_tfds

        return open_tfds(name, root[len(TFDS_PREFIX):] if root.startswith(TFDS_PREFIX) else root, split, **options)
    module, attr = _READERS[name]
    opener = getattr(importlib.import_module(module), attr)
    accepted = [p for p, v in inspect.signature(opener).parameters.items() if v.kind is v.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DatasetError(f"{name}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    return opener(root, split, **options)
