"""SYNTHIA-RAND-CITYSCAPES (``SYNTHIA_RAND_CITYSCAPES.rar``) in its official extracted layout.

``<root>/RGB/NNNNNNN.png`` (8-bit RGB, 1280x760) and ``<root>/GT/LABELS/NNNNNNN.png``: 16-bit
multi-channel PNGs whose first channel in file (RGB) order holds the SYNTHIA class id 0..22 and
whose second holds an instance id. That is ``imageio.imread(p, format="PNG-FI")[:, :, 0]`` or
``cv2.imread(p, cv2.IMREAD_UNCHANGED)[:, :, -1]`` (cv2 returns BGR); see docs/datasets.md for the
evidence. Single-channel label PNGs (already-converted class-id maps such as CBST's
``GT/labels``) are read as they are. Labels follow the 16-class protocol.
"""
from __future__ import annotations

import os

import numpy as np

from cbst_jax.labels import synthia_id_to_trainid16
from cbst_jax.data.io import (DatasetError, FolderSource, Item, known_mask, list_images, read_png_any_depth,
                              require_dir, select_by_list)

LAYOUT = "<root>/RGB/*.png and <root>/GT/LABELS/*.png (extracted SYNTHIA_RAND_CITYSCAPES.rar)"
SYNTHIA_IDS = range(23)  # 0 void ... 22 lanemarking
CLASS_CHANNEL = 0  # in RGB (file) order


def read_synthia_label(path) -> np.ndarray:
    """(H, W) SYNTHIA class ids of a ``GT/LABELS`` PNG (channel 0 of a multi-channel file)."""
    raw = read_png_any_depth(path)
    return raw if raw.ndim == 2 else raw[:, :, CLASS_CHANNEL]


def resolve_root(root: str) -> str:
    """``root`` itself, or its ``RAND_CITYSCAPES`` sub-folder (the top folder of the official archive)."""
    if not os.path.isdir(os.path.join(root, "RGB")) and os.path.isdir(os.path.join(root, "RAND_CITYSCAPES", "RGB")):
        return os.path.join(root, "RAND_CITYSCAPES")
    return root


def open_synthia(root, split: str = "train", *, list_file=None, num_classes: int = 16,
                 lanemarking_as_road: bool = False) -> FolderSource:
    """SYNTHIA source. ``split``: "train" or "all" (SYNTHIA has no official split: all 9,400 images).

    ``list_file`` keeps the listed images (``0000000``, ``0000000.png`` or ``RGB/0000000.png``).
    ``lanemarking_as_road``: False maps id 22 to 255 (CBST), True to road (CRST). Only the
    16-class protocol exists for SYNTHIA.
    """
    root = os.fspath(root)
    if split not in ("train", "all"):
        raise DatasetError(f"synthia: split {split!r}, expected 'train' or 'all' (select subsets with list_file)")
    if num_classes != 16:
        raise DatasetError(f"synthia: num_classes={num_classes!r}, expected 16 (the SYNTHIA protocol)")
    require_dir(root, "synthia", LAYOUT)
    root = resolve_root(root)
    image_dir = require_dir(os.path.join(root, "RGB"), "synthia", LAYOUT)
    label_dir = require_dir(os.path.join(root, "GT", "LABELS"), "synthia", LAYOUT)
    files = list_images(image_dir, (".png",))
    if not files:
        raise DatasetError(f"synthia: no *.png images in {image_dir}; expected layout: {LAYOUT}")
    items = [Item(f[:-4], os.path.join(image_dir, f), os.path.join(label_dir, f)) for f in files]
    if list_file is not None:
        items = select_by_list(items, list_file, "synthia")
    for item in items:
        if not os.path.isfile(item.label):
            raise DatasetError(f"synthia: label {item.label} missing for image {item.image}")
    return FolderSource("synthia", split, items, 16, synthia_id_to_trainid16(lanemarking_as_road),
                        known_mask(SYNTHIA_IDS), has_labels=True, read_label=read_synthia_label, root=root)
