"""Cityscapes in its official extracted layout (``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``).

``<root>/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and
``<root>/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`` (8-bit 'L' PNGs of
labelIds 0..33). Record names are the stems without suffix, e.g. ``frankfurt_000000_000294``.
"""
from __future__ import annotations

import os
import re

from cbst_jax.labels import CITYSCAPES_ID_TO_NTHU13, CITYSCAPES_ID_TO_TRAINID, CITYSCAPES_ID_TO_TRAINID16
from cbst_jax.data.io import (DatasetError, FolderSource, Item, known_mask, list_images, read_list_file,
                              require_dir)

LAYOUT = ("<root>/leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png and "
          "<root>/gtFine/{train,val}/<city>/*_gtFine_labelIds.png")
SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
STEM = re.compile(r"([A-Za-z-]+_\d{6}_\d{6})")
IMAGE_SUFFIX = "_leftImg8bit.png"
# num_classes -> labelId table: 19 train classes, SYNTHIA's 16, NTHU's 13 (Cityscapes -> NTHU)
PROTOCOLS = {19: CITYSCAPES_ID_TO_TRAINID, 16: CITYSCAPES_ID_TO_TRAINID16, 13: CITYSCAPES_ID_TO_NTHU13}
LABEL_SUFFIX = "_gtFine_labelIds.png"


def parse_list_entry(token: str) -> str | None:
    """The image stem named by a list-file entry, or None.

    Accepted forms (anything containing ``<city>_<6 digits>_<6 digits>``): ``frankfurt_000000_000294``,
    ``frankfurt/frankfurt_000000_000294``, ``frankfurt_000000_000294_leftImg8bit.png`` and full
    relative paths such as ``leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png``
    (CBST/CRST list lines; only the first token of a line is read).
    """
    match = STEM.search(os.path.basename(token.replace("\\", "/")))
    return match.group(1) if match else None


def open_cityscapes(root, split: str = "train", *, list_file=None, num_classes: int = 19,
                    labelled: bool | None = None) -> FolderSource:
    """Cityscapes source. ``split``: train, val (alias validation) or test.

    ``labelled``: None = labelled for train/val, unlabelled for test (its labels are withheld);
    False serves a labelled split as an unlabelled target split. ``num_classes``: 19; 16
    (``CITYSCAPES_ID_TO_TRAINID16``: terrain, truck and train ignored, SYNTHIA's protocol); or 13
    (``CITYSCAPES_ID_TO_NTHU13``: the NTHU cross-city classes, in the order of ``nthu`` with
    ``num_classes=13``). ``list_file``: a path, or ``builtin:<name>`` for a list shipped with the
    package (``cbst_jax.data.lists``); see :func:`parse_list_entry`.
    """
    root = os.fspath(root)
    if split not in SPLITS:
        raise DatasetError(f"cityscapes: split {split!r}, expected one of {sorted(SPLITS)}")
    if num_classes not in PROTOCOLS:
        raise DatasetError(f"cityscapes: num_classes={num_classes!r}, expected one of 19, 16, 13")
    folder = SPLITS[split]
    if labelled is None:
        labelled = folder != "test"
    elif labelled and folder == "test":
        raise DatasetError("cityscapes: the test split has no public labels; use labelled=False")
    require_dir(root, "cityscapes", LAYOUT)
    image_root = require_dir(os.path.join(root, "leftImg8bit", folder), "cityscapes", LAYOUT)
    label_root = os.path.join(root, "gtFine", folder)
    if labelled:
        require_dir(label_root, "cityscapes", LAYOUT + f"; the {folder} split is read with its labels here (e.g. "
                    f"to evaluate on it): extract gtFine_trainvaltest.zip into {root}")
    items = []
    for city in sorted(os.listdir(image_root)):
        city_dir = os.path.join(image_root, city)
        if not os.path.isdir(city_dir):
            continue
        for f in list_images(city_dir, (".png",), suffix="_leftImg8bit"):
            stem = f[: -len(IMAGE_SUFFIX)]
            label = os.path.join(label_root, city, stem + LABEL_SUFFIX) if labelled else None
            items.append(Item(stem, os.path.join(city_dir, f), label))
    if not items:
        raise DatasetError(f"cityscapes: no *{IMAGE_SUFFIX} images under {image_root}; expected layout: {LAYOUT}")
    if list_file is not None:
        by_name = {item.name: item for item in items}
        chosen = []
        for lineno, token in read_list_file(list_file):
            stem = parse_list_entry(token)
            if stem is None:
                raise DatasetError(f"list_file {list_file} line {lineno}: {token!r} names no "
                                   f"<city>_<seq>_<frame> image")
            if stem not in by_name:
                raise DatasetError(f"list_file {list_file} line {lineno}: {stem} is not in leftImg8bit/{folder}")
            chosen.append(by_name[stem])
        items = chosen
    if labelled:
        for item in items:
            if not os.path.isfile(item.label):
                raise DatasetError(f"cityscapes: label {item.label} missing for image {item.image}")
    return FolderSource("cityscapes", folder, items, num_classes, PROTOCOLS[num_classes], known_mask(range(34)),
                        has_labels=labelled, root=root)
