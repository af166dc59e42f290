"""GTA5 ("Playing for Data", Richter et al. 2016) in its official extracted layout.

``<root>/images/NNNNN.png`` (RGB, 1914x1052) and ``<root>/labels/NNNNN.png`` (palette-mode 'P'
PNGs whose indices are Cityscapes labelIds 0..33), 24,966 pairs from ``01_images.zip`` ...
``10_labels.zip``. A few pairs in the release differ in size; their labels are resized to the
image by nearest neighbour and counted in ``source.stats["resized_labels"]``.
"""
from __future__ import annotations

import os

from cbst_jax.labels import CITYSCAPES_ID_TO_TRAINID, CITYSCAPES_ID_TO_TRAINID16
from cbst_jax.data.io import (DatasetError, FolderSource, Item, known_mask, list_images, require_dir,
                              select_by_list)

LAYOUT = "<root>/images/*.png and <root>/labels/*.png (extracted GTA5 01_images.zip ... 10_labels.zip)"
CITYSCAPES_LABEL_IDS = range(34)  # labelIds 0..33 occur in Cityscapes-style label maps


def open_gta5(root, split: str = "train", *, list_file=None, num_classes: int = 19) -> FolderSource:
    """GTA5 source. ``split``: "train" or "all" (the same 24,966 images; GTA5 is source-only here).

    ``list_file`` keeps only the listed images (e.g. CRST's 19,984-image list); entries may be
    ``00001``, ``00001.png`` or ``images/00001.png``. ``num_classes``: 19, or 16 for the SYNTHIA protocol.
    """
    root = os.fspath(root)
    if split not in ("train", "all"):
        raise DatasetError(f"gta5: split {split!r}, expected 'train' or 'all' (select subsets with list_file)")
    if num_classes not in (19, 16):
        raise DatasetError(f"gta5: num_classes={num_classes!r}, expected 19 or 16")
    require_dir(root, "gta5", LAYOUT)
    image_dir = require_dir(os.path.join(root, "images"), "gta5", LAYOUT)
    label_dir = require_dir(os.path.join(root, "labels"), "gta5", LAYOUT)
    files = list_images(image_dir, (".png",))
    if not files:
        raise DatasetError(f"gta5: no *.png images in {image_dir}; expected layout: {LAYOUT}")
    items = [Item(f[:-4], os.path.join(image_dir, f), os.path.join(label_dir, f)) for f in files]
    if list_file is not None:
        items = select_by_list(items, list_file, "gta5")
    for item in items:
        if not os.path.isfile(item.label):
            raise DatasetError(f"gta5: label {item.label} missing for image {item.image}")
    lut = CITYSCAPES_ID_TO_TRAINID if num_classes == 19 else CITYSCAPES_ID_TO_TRAINID16
    return FolderSource("gta5", split, items, num_classes, lut, known_mask(CITYSCAPES_LABEL_IDS),
                        has_labels=True, root=root)
