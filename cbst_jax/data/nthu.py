"""NTHU Cross-City (Chen et al., ICCV 2017, "No More Discrimination") in its released layout.

``<root>/<City>/Images/Train/*.jpg`` (unlabelled target images), ``<root>/<City>/Images/Test/*.jpg``
(100 per city) and ``<root>/<City>/Labels/Test/<stem>_eval.png`` for City in Rome, Rio, Tokyo,
Taipei; ``root`` is the extracted ``NTHU_Datasets`` folder. Public loaders read the ``_eval.png``
maps as Cityscapes labelIds (7 road, 8 sidewalk, 11 building, ...), which is the default
``label_encoding="labelid"``; "trainid" (0..18) and "nthu13" (0..12 in NTHU13_TRAINIDS order)
are offered because the encoding is not documented by the authors (docs/datasets.md).
"""
from __future__ import annotations

import os

import numpy as np

from cbst_jax.labels import CITYSCAPES_ID_TO_TRAINID
from cbst_jax.data.io import (NTHU13_TO_TRAINID19, DatasetError, FolderSource, Item, known_mask, list_images,
                              require_dir, select_by_list, trainid19_lut)

CITIES = ("Rome", "Rio", "Tokyo", "Taipei")
LAYOUT = "<root>/<City>/Images/{Train,Test}/*.jpg and <root>/<City>/Labels/Test/*_eval.png (extracted NTHU_Datasets)"
SPLITS = {"train": "Train", "test": "Test", "val": "Test", "validation": "Test"}
LABEL_SUFFIX = "_eval.png"
# label_encoding -> (raw id -> trainId19, ids that may occur)
ENCODINGS = {
    "labelid": (CITYSCAPES_ID_TO_TRAINID, range(34)),
    "trainid": (np.arange(256, dtype=np.uint8), list(range(19)) + [255]),
    "nthu13": (NTHU13_TO_TRAINID19, list(range(13)) + [255]),
}


def canonical_city(city) -> str:
    """The folder name of ``city`` (case-insensitive), or DatasetError."""
    for name in CITIES:
        if isinstance(city, str) and city.lower() == name.lower():
            return name
    raise DatasetError(f"nthu: city={city!r}, expected one of {', '.join(CITIES)}")


def open_nthu(root, split: str = "train", *, city=None, list_file=None, num_classes: int = 19,
              labelled: bool | None = None, label_encoding: str = "labelid") -> FolderSource:
    """NTHU source for one ``city``. ``split``: train (unlabelled) or test (labelled; aliases val, validation).

    ``num_classes``: 19 (trainIds; only the 13 NTHU classes occur) or 13 (indices into
    NTHU13_TRAINIDS). ``label_encoding``: "labelid", "trainid" or "nthu13" (see module doc).
    """
    root = os.fspath(root)
    city = canonical_city(city)
    if split not in SPLITS:
        raise DatasetError(f"nthu: split {split!r}, expected one of {sorted(SPLITS)}")
    if label_encoding not in ENCODINGS:
        raise DatasetError(f"nthu: label_encoding={label_encoding!r}, expected one of {sorted(ENCODINGS)}")
    folder = SPLITS[split]
    post = trainid19_lut(num_classes, "nthu", allowed=(19, 13))
    if labelled is None:
        labelled = folder == "Test"
    elif labelled and folder == "Train":
        raise DatasetError("nthu: the Train images are unlabelled; use split='test' for labels")
    require_dir(root, "nthu", LAYOUT)
    image_dir = require_dir(os.path.join(root, city, "Images", folder), "nthu", LAYOUT)
    label_dir = os.path.join(root, city, "Labels", folder)
    if labelled:
        require_dir(label_dir, "nthu", LAYOUT)
    files = list_images(image_dir, (".jpg", ".jpeg", ".png"))
    if not files:
        raise DatasetError(f"nthu: no images in {image_dir}; expected layout: {LAYOUT}")
    items = []
    for f in files:
        stem = os.path.splitext(f)[0]
        items.append(Item(stem, os.path.join(image_dir, f),
                          os.path.join(label_dir, stem + LABEL_SUFFIX) if labelled else None))
    if list_file is not None:
        items = select_by_list(items, list_file, "nthu", suffixes=("_eval",))
    if labelled:
        for item in items:
            if not os.path.isfile(item.label):
                raise DatasetError(f"nthu: label {item.label} missing for image {item.image}")
    to_19, ids = ENCODINGS[label_encoding]
    source = FolderSource("nthu", folder.lower(), items, num_classes, post[to_19], known_mask(ids),
                          has_labels=labelled, root=root)
    source.city = city
    return source
