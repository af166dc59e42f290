"""Class tables: the 19 Cityscapes train classes, their official colours, and the label-id
look-up tables of every dataset protocol used in the CBST/CRST papers.

Every table is written out explicitly in trainId order. The reference code derived its
``id_2_label`` list from dict iteration, which under Python 3 reverses the classes (trainId k
comes back as 18 - k, see docs/design.md); nothing here depends on dict order.

Look-up tables are 256-entry uint8 arrays (``lut[label_id] -> train_id``, 255 = ignore), so a
whole label map is remapped with ``lut[label_map]``.
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255

# ---------------------------------------------------------------- 19 Cityscapes train classes
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_SHORT_NAMES = (
    "road", "side", "bldg", "wall", "fence", "pole", "light", "sign", "veg", "terr", "sky",
    "pers", "rider", "car", "truck", "bus", "train", "motor", "bike",
)
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)
# Cityscapes labelId of each trainId 0..18 (GTA5 label PNGs hold the same labelIds).
CITYSCAPES_TRAINID_TO_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def _lut(pairs) -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for label_id, train_id in pairs:
        lut[label_id] = train_id
    lut.setflags(write=False)
    return lut


CITYSCAPES_ID_TO_TRAINID = _lut([
    (7, 0), (8, 1), (11, 2), (12, 3), (13, 4), (17, 5), (19, 6), (20, 7), (21, 8), (22, 9),
    (23, 10), (24, 11), (25, 12), (26, 13), (27, 14), (28, 15), (31, 16), (32, 17), (33, 18),
])

# ---------------------------------------------------------------- 16-class SYNTHIA protocol
SYNTHIA16_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle",
)
# trainId16 -> trainId19, for colours and for comparing with 19-class models.
TRAINID16_TO_TRAINID19 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA16_PALETTE = CITYSCAPES_PALETTE[list(TRAINID16_TO_TRAINID19)]

# Cityscapes labelId -> 16-class trainId: terrain (22), truck (27), train (31) are ignored.
CITYSCAPES_ID_TO_TRAINID16 = _lut([
    (7, 0), (8, 1), (11, 2), (12, 3), (13, 4), (17, 5), (19, 6), (20, 7), (21, 8),
    (23, 9), (24, 10), (25, 11), (26, 12), (28, 13), (32, 14), (33, 15),
])

# SYNTHIA-RAND-CITYSCAPES class id -> 16-class trainId. 0 void, 13 parking-slot, 14 road-work,
# 16 terrain, 18 truck, 20 train and 22 lanemarking are ignored (lanemarking: see
# synthia_id_to_trainid16 for CRST's choice of mapping it to road).
SYNTHIA_ID_TO_TRAINID16 = _lut([
    (3, 0), (4, 1), (2, 2), (21, 3), (5, 4), (7, 5), (15, 6), (9, 7), (6, 8), (1, 9),
    (10, 10), (17, 11), (8, 12), (19, 13), (12, 14), (11, 15),
])
SYNTHIA_LANEMARKING_ID = 22


def synthia_id_to_trainid16(lanemarking_as_road: bool = False) -> np.ndarray:
    """The SYNTHIA table; ``lanemarking_as_road=True`` follows CRST (22 -> road), the default CBST (22 -> 255)."""
    if not lanemarking_as_road:
        return SYNTHIA_ID_TO_TRAINID16
    lut = SYNTHIA_ID_TO_TRAINID16.copy()
    lut[SYNTHIA_LANEMARKING_ID] = 0
    lut.setflags(write=False)
    return lut


# mIoU*: the 13 of the 16 SYNTHIA classes left after dropping wall, fence and pole.
MIOU13_OF_16 = (0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)

# ---------------------------------------------------------------- NTHU Cross-City, 13 classes
# As Cityscapes trainIds, in trainId order: road, sidewalk, building, traffic light,
# traffic sign, vegetation, sky, person, rider, car, bus, motorcycle, bicycle.
NTHU13_TRAINIDS = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
NTHU13_CLASSES = tuple(CITYSCAPES_CLASSES[t] for t in NTHU13_TRAINIDS)
# 19-class trainId -> 13-class index (wall, fence, pole, terrain, truck, train -> 255).
TRAINID_TO_NTHU13 = _lut([(t, i) for i, t in enumerate(NTHU13_TRAINIDS)])
# Cityscapes labelId -> 13-class index: the Cityscapes side of Cityscapes -> NTHU (the same
# table maps NTHU's labelId ``_eval.png`` maps, so both domains share one class order).
CITYSCAPES_ID_TO_NTHU13 = _lut([
    (7, 0), (8, 1), (11, 2), (19, 3), (20, 4), (21, 5), (23, 6), (24, 7), (25, 8), (26, 9), (28, 10),
    (32, 11), (33, 12),
])


def class_names(num_classes: int) -> tuple[str, ...]:
    """Names of a 19-, 16- or 13-class (NTHU) protocol."""
    table = {19: CITYSCAPES_CLASSES, 16: SYNTHIA16_CLASSES, 13: NTHU13_CLASSES}
    if num_classes not in table:
        raise ValueError(f"no class table for {num_classes} classes (expected 19, 16 or 13)")
    return table[num_classes]


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours in the Cityscapes palette."""
    if num_classes == 19:
        return CITYSCAPES_PALETTE
    if num_classes == 16:
        return SYNTHIA16_PALETTE
    if num_classes == 13:
        return CITYSCAPES_PALETTE[list(NTHU13_TRAINIDS)]
    if num_classes < 19:
        return CITYSCAPES_PALETTE[:num_classes]
    raise ValueError(f"no palette for {num_classes} classes")


def colorize(label_map: np.ndarray, num_classes: int = 19) -> np.ndarray:
    """(H, W) trainIds -> (H, W, 3) uint8 RGB; ignore (255) and unknown ids are black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:num_classes] = palette(num_classes)
    return lut[np.asarray(label_map, np.uint8)]
