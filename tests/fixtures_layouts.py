"""Tiny datasets in the official on-disk layouts, for tests and end-to-end runs on CPU.

Each ``make_<dataset>(root, ...)`` writes a few small images in exactly the layout, file format
and bit depth of the real release (GTA5: RGB PNG + palette-mode 'P' labelId PNG; Cityscapes: RGB
PNG + 8-bit 'L' labelIds; SYNTHIA: RGB PNG + 16-bit 3-channel GT/LABELS with the class in
channel 0; BDD100K: JPEG + 'L' trainId PNG; NTHU: JPEG + 'L' labelId ``_eval.png``) and returns
the record names it wrote. ``root`` is what ``cbst_jax.data.open_dataset(name, root, split)`` takes.

Scenes are learnable: every image is a band layout (sky, building/vegetation, road/sidewalk)
with a few object boxes; pixel colours are the Cityscapes palette colour of the pixel's class
plus noise, with a per-dataset colour shift as a domain gap. Usage::

    from tests.fixtures_layouts import make_gta5, make_cityscapes
    make_gta5(tmp / "gta5", n=8)
    make_cityscapes(tmp / "cityscapes", n_train=6, n_val=4)
"""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from PIL import Image

from cbst_jax.labels import (CITYSCAPES_PALETTE, CITYSCAPES_TRAINID_TO_ID, IGNORE_INDEX, NTHU13_TRAINIDS,
                             SYNTHIA_ID_TO_TRAINID16, TRAINID16_TO_TRAINID19)

__all__ = ["make_gta5", "make_cityscapes", "make_synthia", "make_bdd100k", "make_nthu", "write_png16",
           "write_list_file", "scene_trainids", "CITYSCAPES_FIXTURE_CITIES"]

CITYSCAPES_FIXTURE_CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt", "lindau"), "test": ("berlin",)}


# ---------------------------------------------------------------- scenes and encodings

def scene_trainids(rng: np.random.Generator, size=(32, 64), classes=tuple(range(19))) -> np.ndarray:
    """(H, W) uint8 trainId map: sky / building-or-vegetation / road-or-sidewalk bands, object boxes, a void strip."""
    h, w = size
    allowed = set(classes)
    pick = lambda options: rng.choice([c for c in options if c in allowed] or [0])  # noqa: E731
    label = np.empty((h, w), np.uint8)
    top, mid = int(h * rng.uniform(0.2, 0.35)), int(h * rng.uniform(0.55, 0.7))
    label[:top] = pick([10])
    label[top:mid] = pick([2, 8, 3, 4, 9])
    label[mid:] = pick([0])
    label[mid:, : max(1, w // 6)] = pick([1])
    for _ in range(3):
        cls = pick([5, 6, 7, 11, 12, 13, 14, 15, 16, 17, 18])
        y0, x0 = rng.integers(top, h - 2), rng.integers(0, w - 2)
        label[y0:y0 + rng.integers(2, max(3, h // 4)), x0:x0 + rng.integers(2, max(3, w // 6))] = cls
    label[-1:, :] = IGNORE_INDEX  # a void row (ego vehicle / unlabeled)
    return label


def scene_image(rng: np.random.Generator, trainids: np.ndarray, shift=(0, 0, 0)) -> np.ndarray:
    """(H, W, 3) uint8 image: palette colour of each pixel's class (grey for void) + noise + ``shift``."""
    lut = np.full((256, 3), 90, np.int16)
    lut[:19] = CITYSCAPES_PALETTE
    image = lut[trainids] + np.asarray(shift, np.int16) + rng.integers(-20, 21, trainids.shape + (3,))
    return np.clip(image, 0, 255).astype(np.uint8)


def _trainid_to_labelid() -> np.ndarray:
    lut = np.zeros(256, np.uint8)  # void -> 0 "unlabeled"
    lut[:19] = CITYSCAPES_TRAINID_TO_ID
    return lut


def _trainid_to_synthia() -> np.ndarray:
    lut = np.zeros(256, np.uint8)  # void -> 0
    for synthia_id, t16 in enumerate(SYNTHIA_ID_TO_TRAINID16):
        if t16 != IGNORE_INDEX:
            lut[TRAINID16_TO_TRAINID19[t16]] = synthia_id
    lut[9], lut[14], lut[16] = 16, 18, 20  # terrain, truck, train: SYNTHIA ids outside the 16 classes
    return lut


def _labelid_palette() -> list[int]:
    """GTA5-style palette: colour of labelId i = Cityscapes colour of its class, black elsewhere."""
    pal = np.zeros((256, 3), np.uint8)
    pal[list(CITYSCAPES_TRAINID_TO_ID)] = CITYSCAPES_PALETTE
    return pal.ravel().tolist()


def _save(path, array, palette=None, **params):
    """Save ``array`` with Pillow: RGB for (H, W, 3), 'L' for (H, W), 'P' with ``palette`` (indices = ids)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = np.ascontiguousarray(array, np.uint8)
    if array.ndim == 3:
        im = Image.fromarray(array)
    else:
        im = Image.frombytes("P" if palette is not None else "L", (array.shape[1], array.shape[0]), array.tobytes())
        if palette is not None:
            im.putpalette(palette)
    im.save(path, **params)


def write_png16(path, array: np.ndarray, filters=(0, 1, 2, 3, 4)) -> None:
    """Write a 16-bit PNG (grey, grey+alpha, RGB or RGBA by channel count) with a spec-conformant encoder.

    Row ``y`` uses filter type ``filters[y % len(filters)]`` (0 None, 1 Sub, 2 Up, 3 Average,
    4 Paeth), so readers are exercised on every PNG filter, as real encoders mix them.
    """
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    h, w, c = a.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    bpp = 2 * c
    raw = a.astype(">u2").reshape(h, w * c).view(np.uint8).reshape(h, w * bpp).astype(np.int32)
    prev = np.zeros(w * bpp, np.int32)
    rows = []
    for y in range(h):
        line, ftype = raw[y], filters[y % len(filters)]
        left = np.concatenate([np.zeros(bpp, np.int32), line[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        if ftype == 0:
            pred = np.zeros_like(line)
        elif ftype == 1:
            pred = left
        elif ftype == 2:
            pred = prev
        elif ftype == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - prev), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        rows.append(bytes([ftype]) + ((line - pred) % 256).astype(np.uint8).tobytes())
        prev = line

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def write_list_file(path, lines) -> str:
    """Write ``lines`` one per line (a split list as CBST/CRST ship them); returns the path."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.fspath(path)


# ---------------------------------------------------------------- layouts

def make_gta5(root, n: int = 4, size=(32, 64), seed: int = 0, mismatched: int = 0) -> list[str]:
    """``root/images/NNNNN.png`` + ``root/labels/NNNNN.png`` (palette 'P', labelIds); names "00001"...

    The first ``mismatched`` labels are written 2 rows and 4 columns larger than their image, as
    in a few pairs of the real release.
    """
    rng = np.random.default_rng(seed)
    to_id, names = _trainid_to_labelid(), []
    for i in range(1, n + 1):
        name = f"{i:05d}"
        train = scene_trainids(rng, size)
        _save(os.path.join(root, "images", name + ".png"), scene_image(rng, train, (12, 6, -10)))
        label = to_id[train]
        if i <= mismatched:
            label = np.pad(label, ((0, 2), (0, 4)), mode="edge")
        _save(os.path.join(root, "labels", name + ".png"), label, palette=_labelid_palette())
        names.append(name)
    return names


def make_cityscapes(root, n_train: int = 4, n_val: int = 2, n_test: int = 0, size=(32, 64), seed: int = 1,
                    cities=None, stems=None) -> dict[str, list[str]]:
    """``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png`` ('L').

    Images are spread round-robin over ``cities`` (default CITYSCAPES_FIXTURE_CITIES). Test
    labels are written all-zero, like the withheld ones in gtFine_trainvaltest.zip. ``stems``
    ({split: [stem, ...]}) writes exactly those images for the splits it names instead.
    """
    rng = np.random.default_rng(seed)
    cities = cities or CITYSCAPES_FIXTURE_CITIES
    stems = stems or {}
    to_id, written = _trainid_to_labelid(), {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        written[split] = []
        for i in range(len(stems[split]) if split in stems else n):
            if split in stems:
                stem = stems[split][i]
            else:
                stem = f"{cities[split][i % len(cities[split])]}_{i:06d}_{(19 * i + 19) % 1000000:06d}"
            city = stem.rsplit("_", 2)[0]
            train = scene_trainids(rng, size)
            _save(os.path.join(root, "leftImg8bit", split, city, stem + "_leftImg8bit.png"), scene_image(rng, train))
            label = to_id[train] if split != "test" else np.zeros(size, np.uint8)
            _save(os.path.join(root, "gtFine", split, city, stem + "_gtFine_labelIds.png"), label)
            written[split].append(stem)
        written[split].sort()
    return written


def make_synthia(root, n: int = 4, size=(32, 64), seed: int = 2, channels: int = 3) -> list[str]:
    """``RGB/NNNNNNN.png`` + ``GT/LABELS/NNNNNNN.png``: 16-bit, ``channels`` channels, class id in channel 0,
    instance ids (up to 1,000, so above 8 bits) in channel 1; road pixels get a lanemarking (22) stripe."""
    rng = np.random.default_rng(seed)
    to_synthia, names = _trainid_to_synthia(), []
    for i in range(n):
        name = f"{i:07d}"
        train = scene_trainids(rng, size)
        _save(os.path.join(root, "RGB", name + ".png"), scene_image(rng, train, (-8, 4, 14)))
        ids = to_synthia[train].astype(np.uint16)
        road_rows = np.where((train == 0).any(axis=1))[0]
        if road_rows.size:
            ids[road_rows[len(road_rows) // 2], ::3] = 22
        label = np.zeros(size + (channels,), np.uint16)
        label[:, :, 0] = ids
        label[:, :, 1] = np.where(ids > 0, rng.integers(1, 1000, size), 0)
        if channels == 4:
            label[:, :, 3] = 65535
        write_png16(os.path.join(root, "GT", "LABELS", name + ".png"), label)
        names.append(name)
    return names


def make_bdd100k(root, layout: str = "10k", n_train: int = 3, n_val: int = 2, n_test: int = 1, size=(32, 64),
                 seed: int = 3) -> dict[str, list[str]]:
    """``root/bdd100k/...`` in layout "10k" (images/10k + labels/sem_seg/masks/<id>.png) or "seg"
    (seg/images + seg/labels/<id>_train_id.png): JPEG images, 'L' trainId masks (0..18, 255)."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "bdd100k")
    if layout == "10k":
        image_dir, label_dir, suffix = "images/10k/{}", "labels/sem_seg/masks/{}", ".png"
    elif layout == "seg":
        image_dir, label_dir, suffix = "seg/images/{}", "seg/labels/{}", "_train_id.png"
    else:
        raise ValueError(f"layout {layout!r}, expected '10k' or 'seg'")
    written = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        written[split] = []
        for _ in range(n):
            name = f"{rng.integers(0, 16**8):08x}-{rng.integers(0, 16**8):08x}"
            train = scene_trainids(rng, size)
            _save(os.path.join(base, image_dir.format(split), name + ".jpg"), scene_image(rng, train, (0, -10, 8)),
                  quality=95)
            if split != "test":
                _save(os.path.join(base, label_dir.format(split), name + suffix), train)
            written[split].append(name)
        written[split].sort()
    return written


def make_nthu(root, cities=("Rome",), n_train: int = 3, n_test: int = 2, size=(32, 64),
              seed: int = 4) -> dict[str, dict[str, list[str]]]:
    """``root/<City>/Images/{Train,Test}/pic_NNN.jpg`` + ``root/<City>/Labels/Test/pic_NNN_eval.png``
    ('L', Cityscapes labelIds of the 13 NTHU classes, 0 elsewhere)."""
    rng = np.random.default_rng(seed)
    to_id, written = _trainid_to_labelid(), {}
    for city in cities:
        written[city] = {"train": [], "test": []}
        for split, folder, n in (("train", "Train", n_train), ("test", "Test", n_test)):
            for i in range(n):
                name = f"pic_{i:03d}"
                train = scene_trainids(rng, size, classes=NTHU13_TRAINIDS)
                _save(os.path.join(root, city, "Images", folder, name + ".jpg"),
                      scene_image(rng, train, (6, 6, 6)), quality=95)
                if split == "test":
                    _save(os.path.join(root, city, "Labels", folder, name + "_eval.png"), to_id[train])
                written[city][split].append(name)
    return written
