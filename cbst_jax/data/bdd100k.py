"""BDD100K semantic segmentation (10K images) in either layout the dataset has shipped.

* ``seg`` (the earlier ``bdd100k_seg.zip``): ``bdd100k/seg/images/{train,val,test}/<id>.jpg`` and
  ``bdd100k/seg/labels/{train,val}/<id>_train_id.png``;
* ``10k`` (current ``bdd100k_images_10k.zip`` + ``bdd100k_sem_seg_labels_trainval.zip``):
  ``bdd100k/images/10k/{train,val,test}/<id>.jpg`` and ``bdd100k/labels/sem_seg/masks/{train,val}/<id>.png``.

Labels are already the 19 Cityscapes trainIds with 255 = ignore; ``root`` may be the ``bdd100k``
folder or its parent.
"""
from __future__ import annotations

import os

from cbst_jax.data.io import DatasetError, FolderSource, Item, known_mask, list_images, require_dir, select_by_list, trainid19_lut

LAYOUTS = {
    "seg": ("seg/images/{split}", "seg/labels/{split}", "_train_id.png"),
    "10k": ("images/10k/{split}", "labels/sem_seg/masks/{split}", ".png"),
}
LAYOUT = ("bdd100k/seg/images/<split>/*.jpg + bdd100k/seg/labels/<split>/*_train_id.png, or "
          "bdd100k/images/10k/<split>/*.jpg + bdd100k/labels/sem_seg/masks/<split>/*.png")
SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
TRAIN_IDS = list(range(19)) + [255]


def detect_layout(root: str, split: str) -> tuple[str, str]:
    """(bdd100k folder, layout name) for ``root`` = the ``bdd100k`` folder or its parent."""
    for base in (root, os.path.join(root, "bdd100k")):
        for name, (images, _, _) in LAYOUTS.items():
            if os.path.isdir(os.path.join(base, images.format(split=split))):
                return base, name
    raise DatasetError(f"bdd100k: no {split} images under {root}; expected layout: {LAYOUT}")


def open_bdd100k(root, split: str = "train", *, list_file=None, num_classes: int = 19,
                 labelled: bool | None = None, layout: str = "auto") -> FolderSource:
    """BDD100K source. ``split``: train, val (alias validation) or test (unlabelled).

    ``layout``: "auto", "seg" or "10k" (see module doc). ``labelled=False`` serves train/val
    without labels. ``num_classes``: 19, 16 (SYNTHIA protocol) or 13 (NTHU classes).
    ``list_file`` entries: ``<id>``, ``<id>.jpg`` or paths ending in them.
    """
    root = os.fspath(root)
    if split not in SPLITS:
        raise DatasetError(f"bdd100k: split {split!r}, expected one of {sorted(SPLITS)}")
    folder = SPLITS[split]
    post = trainid19_lut(num_classes, "bdd100k")
    require_dir(root, "bdd100k", LAYOUT)
    if layout == "auto":
        base, layout = detect_layout(root, folder)
    elif layout in LAYOUTS:
        base = root if os.path.isdir(os.path.join(root, LAYOUTS[layout][0].format(split=folder))) \
            else os.path.join(root, "bdd100k")
    else:
        raise DatasetError(f"bdd100k: layout {layout!r}, expected 'auto', 'seg' or '10k'")
    images, labels, label_suffix = LAYOUTS[layout]
    image_dir = require_dir(os.path.join(base, images.format(split=folder)), "bdd100k", LAYOUT)
    if labelled is None:
        labelled = folder != "test"
    elif labelled and folder == "test":
        raise DatasetError("bdd100k: the test split has no labels; use labelled=False")
    label_dir = os.path.join(base, labels.format(split=folder))
    if labelled:
        require_dir(label_dir, "bdd100k", LAYOUT + f"; the {folder} split is read with its labels here (e.g. to "
                    f"evaluate on it): extract bdd100k_sem_seg_labels_trainval.zip into {root}")
    files = list_images(image_dir, (".jpg", ".jpeg", ".png"))
    if not files:
        raise DatasetError(f"bdd100k: no images in {image_dir}; expected layout: {LAYOUT}")
    items = []
    for f in files:
        stem = os.path.splitext(f)[0]
        label = os.path.join(label_dir, stem + label_suffix) if labelled else None
        items.append(Item(stem, os.path.join(image_dir, f), label))
    if list_file is not None:
        items = select_by_list(items, list_file, "bdd100k", suffixes=("_train_id",))
    if labelled:
        for item in items:
            if not os.path.isfile(item.label):
                raise DatasetError(f"bdd100k: label {item.label} missing for image {item.image}")
    return FolderSource("bdd100k", folder, items, num_classes, post, known_mask(TRAIN_IDS),
                        has_labels=labelled, root=base)
