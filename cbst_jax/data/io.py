"""Shared reading machinery for the on-disk dataset readers.

Everything a folder reader needs that is not specific to one dataset lives here: the error and
warning classes, decoding of RGB images (Pillow; pyspng on request for 8-bit RGB PNGs) and label
PNGs (8-bit L/P, and 16-bit multi-channel PNGs that Pillow alone would truncate to their high
byte), the one nearest-neighbour resize rule, label remapping with a count of unknown ids,
list-file parsing, and ``FolderSource``, the lazy random-access source every reader returns, with
a raw read (ids not yet remapped) for the training pipeline's crop-first path. Only numpy, Pillow
and (optionally) pyspng are imported; tensorflow_datasets never is.

PNG decoders, measured by ``benchmarks/bench_pipeline.py`` (docs/performance.md; CPU per 1914x1052
or 2048x1024 fixture record, image + label, interleaved on one core): Pillow 35-39 ms, OpenCV's
``imdecode`` for the image 35-37 ms (no gain: Pillow's zlib is as fast), pyspng 28-31 ms. pyspng
holds the GIL for the whole decode (its binding never releases it), so it is used only where one
thread decodes per process (``decoder="pyspng"``: the training pipeline's worker processes);
Pillow releases the GIL and stays the default, for decoding threads (evaluation prefetch). The
pixels are identical (lossless PNG; tested).
"""
from __future__ import annotations

import os
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

try:  # optional: the fastest PNG decoder measured (see above)
    import pyspng
except ImportError:
    pyspng = None

from cbst_jax.labels import IGNORE_INDEX, NTHU13_TRAINIDS, TRAINID16_TO_TRAINID19, TRAINID_TO_NTHU13


class DatasetError(ValueError):
    """A dataset root, file, option or split that cannot be used; the message names which and why."""


class DatasetWarning(UserWarning):
    """Recoverable data problems (resized labels, unknown label ids); each is also counted in ``stats``."""


# ---------------------------------------------------------------- decoding

def _open(path):
    from PIL import Image

    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError ...
        raise DatasetError(f"{path}: not a readable image ({exc})") from None


def _decoded(path, im):
    try:
        im.load()
    except Exception as exc:  # truncated or corrupt data surfaces on load
        raise DatasetError(f"{path}: corrupt or truncated image ({exc})") from None
    return im


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last 8 bytes of a whole PNG
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"  # SOI, EOI
_TAIL = 4096  # bytes looked at for the end marker (some writers append data after it): one read


def truncation(path) -> str | None:
    """Whether a PNG or JPEG file is whole, from its first and last bytes only (PNG: the IEND
    chunk, JPEG: the EOI marker, within its last 4 KiB): None when it is (or is another
    format), else one line naming the file. A file cut short (a copy or download stopped part
    way) fails this; damage inside a file shows when it is decoded."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except FileNotFoundError:
        return f"{path}: file not found"
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc})"
    if size == 0:
        return f"{path}: empty file"
    if head == PNG_SIGNATURE and PNG_END not in tail:
        return f"{path}: truncated PNG (no IEND chunk at its end: {size} bytes, cut short?)"
    if head.startswith(JPEG_START) and JPEG_END not in tail:
        return f"{path}: truncated JPEG (no end-of-image marker at its end: {size} bytes, cut short?)"
    return None


def _is_rgb8_png(data: bytes) -> bool:
    """Whether ``data`` is a non-interlaced 8-bit truecolour PNG (IHDR bit depth, colour type, interlace)."""
    return (data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 28
            and data[24] == 8 and data[25] == 2 and data[28] == 0)


def read_rgb(path, decoder: str = "pillow") -> np.ndarray:
    """(H, W, 3) uint8 RGB; a corrupt or truncated file raises DatasetError naming it.
    ``decoder="pyspng"`` decodes 8-bit RGB PNGs with pyspng when it is installed (faster, but it
    holds the GIL: for one decoding thread per process); other files always go through Pillow."""
    if decoder == "pyspng" and pyspng is not None and str(path).lower().endswith(".png"):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DatasetError(f"{path}: file not found") from None
        if _is_rgb8_png(data):
            try:
                out = pyspng.load(data)
            except RuntimeError:  # broken data: Pillow names the problem below
                out = None
            if out is not None and out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3:
                return out
    elif decoder not in ("pillow", "pyspng"):
        raise ValueError(f"decoder={decoder!r}: expected 'pillow' or 'pyspng'")
    im = _decoded(path, _open(path))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, np.uint8)


def read_label_png(path) -> np.ndarray:
    """(H, W) integer ids of a single-channel label PNG: 8-bit L, palette P (indices, not colours) or 16-bit I."""
    im = _decoded(path, _open(path))
    if im.mode in ("L", "P"):
        return np.asarray(im, np.uint8)
    if im.mode.startswith("I"):
        return np.asarray(im).astype(np.int64)
    raise DatasetError(f"{path}: label PNG has mode {im.mode}, expected a single-channel id map (L, P or I;16)")


def _tile_with_rawmode(tile, rawmode):
    args = tile.args
    args = rawmode if isinstance(args, str) else (rawmode,) + tuple(args[1:])
    return tile._replace(args=args)


def read_png_any_depth(path) -> np.ndarray:
    """A PNG at full bit depth: (H, W) or (H, W, C), uint8 or uint16 (16-bit RGB/RGBA included).

    Pillow decodes 16-bit RGB(A) PNGs to 8-bit by keeping the high byte of each sample. Its PNG
    decoder unfilters correctly for any raw mode of the same 48/64-bit pixel size, so the file is
    decoded twice, once unpacking the high and once the low byte of every sample, and the two are
    combined. Grey and 8-bit files are read as they are.
    """
    im = _open(path)
    rawmode = None
    if im.format == "PNG" and im.tile:
        args = im.tile[0].args
        rawmode = args if isinstance(args, str) else args[0]
    if rawmode not in ("RGB;16B", "RGBA;16B"):
        im = _decoded(path, im)
        return np.asarray(im) if im.mode != "P" else np.asarray(im, np.uint8)
    high = np.asarray(_decoded(path, im), np.uint16)
    low_im = _open(path)
    low_im.tile = [_tile_with_rawmode(t, rawmode.replace("16B", "16L")) for t in low_im.tile]
    low = np.asarray(_decoded(path, low_im), np.uint16)
    return (high << 8) | low


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) or (H, W, 3) uint8 array (Pillow, lossless)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def nearest_indices(n_out: int, n_in: int) -> np.ndarray:
    """The project's one nearest-neighbour rule: output pixel t of ``n_out`` samples input pixel
    ``⌊(t + ½)·n_in / n_out⌋`` (pixel centres), in exact integer arithmetic. Pillow's NEAREST
    aims at the same pixels but accumulates the step in floating point, so it can be one pixel
    off where ``(t + ½)·n_in / n_out`` is an integer."""
    t = np.arange(n_out, dtype=np.int64)
    return (2 * t + 1) * n_in // (2 * n_out)


def resize_nearest(label: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of an (h, w[, ...]) map to ``shape`` by :func:`nearest_indices`."""
    h, w = label.shape[:2]
    return label[nearest_indices(shape[0], h)[:, None], nearest_indices(shape[1], w)[None, :]]


# ---------------------------------------------------------------- label tables

def make_lut(pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """256-entry uint8 look-up table, 255 where no pair is given."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for src, dst in pairs:
        lut[src] = dst
    return lut


def known_mask(ids: Iterable[int]) -> np.ndarray:
    """256-entry bool table of the ids a dataset's label files may legitimately contain."""
    mask = np.zeros(256, bool)
    mask[list(ids)] = True
    return mask


# trainId19 -> protocol of ``num_classes`` classes (used on already-trainId labels: BDD100K, NTHU, TFDS).
TRAINID19_TO_TRAINID16 = make_lut((t19, t16) for t16, t19 in enumerate(TRAINID16_TO_TRAINID19))
TRAINID19_TO_PROTOCOL = {19: np.arange(256, dtype=np.uint8), 16: TRAINID19_TO_TRAINID16, 13: TRAINID_TO_NTHU13}
NTHU13_TO_TRAINID19 = make_lut(enumerate(NTHU13_TRAINIDS))


def trainid19_lut(num_classes: int, dataset: str, allowed: Sequence[int] = (19, 16, 13)) -> np.ndarray:
    """The trainId19 -> ``num_classes`` table, or DatasetError if the dataset does not offer that protocol."""
    if num_classes not in allowed:
        raise DatasetError(f"{dataset}: num_classes={num_classes!r}, expected one of {sorted(allowed)}")
    return np.asarray(TRAINID19_TO_PROTOCOL[num_classes], np.uint8)


def make_label_table(lut: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(256,) uint8 trainId of every 8-bit raw id: ``lut`` where ``known``, 255 elsewhere."""
    return np.where(np.asarray(known, bool), np.asarray(lut, np.uint8), IGNORE_INDEX).astype(np.uint8)


def count_unknown(raw: np.ndarray, known: np.ndarray) -> int:
    """Pixels of ``raw`` whose id is outside ``known`` (every id > 255 is). Labels whose ids all
    lie below the first unknown id (the usual case) cost one ``max``, not a histogram."""
    raw = np.asarray(raw)
    if raw.size == 0:
        return 0
    first_unknown = int(np.argmin(known)) if not known.all() else 256
    if int(raw.max()) < first_unknown:
        return 0
    over = int(np.count_nonzero(raw > 255)) if raw.dtype != np.uint8 else 0
    small = raw if raw.dtype == np.uint8 else raw[raw <= 255]
    return int(np.bincount(small.ravel(), minlength=256)[:256][~known].sum()) + over


def to_train_ids(raw: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 trainIds of raw ids through a :func:`make_label_table`; ids > 255 become 255."""
    raw = np.asarray(raw)
    if raw.dtype == np.uint8:
        return table[raw]
    return np.where(raw > 255, IGNORE_INDEX, table[np.clip(raw, 0, 255)]).astype(np.uint8)


# ---------------------------------------------------------------- list files

def read_list_file(path) -> list[tuple[int, str]]:
    """(line number, first whitespace-separated token) of every non-blank, non-# line.

    ``path`` is a file, or ``"builtin:<name>"`` for a list shipped in ``cbst_jax/data/lists``.
    """
    if isinstance(path, str) and path.startswith("builtin:"):
        from cbst_jax.data import lists

        found = lists.find(path)
        if found is None:
            raise DatasetError(f"list_file {path}: no such built-in list; available: "
                               f"{', '.join(lists.PREFIX + n for n in lists.names())}")
        return _parse_list(found, path)
    return _parse_list(path, path)


def _parse_list(path, shown) -> list[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise DatasetError(f"list_file {shown}: cannot read ({exc.strerror})") from None
    entries = []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append((lineno, line.split()[0]))
    if not entries:
        raise DatasetError(f"list_file {shown}: no entries")
    return entries


def stem_of(token: str, suffixes: Sequence[str] = ()) -> str:
    """File stem of a list entry: directories and extension dropped, then the first matching suffix."""
    stem = os.path.basename(token.replace("\\", "/"))
    stem = re.sub(r"\.(png|jpe?g)$", "", stem, flags=re.IGNORECASE)
    for suffix in suffixes:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def select_by_list(items: Sequence["Item"], list_file, dataset: str, suffixes: Sequence[str] = ()) -> list["Item"]:
    """The items named by a list file, in the file's order; an entry with no image raises DatasetError."""
    by_name = {item.name: item for item in items}
    chosen = []
    for lineno, token in read_list_file(list_file):
        stem = stem_of(token, suffixes)
        if stem not in by_name:
            raise DatasetError(f"list_file {list_file} line {lineno}: {token!r} is not an image of this {dataset} split")
        chosen.append(by_name[stem])
    return chosen


# ---------------------------------------------------------------- the source

@dataclass(frozen=True)
class Item:
    """One record on disk: its name (file stem), image path and label path (None when unlabelled)."""

    name: str
    image: str
    label: str | None = None


class FolderSource:
    """Random-access source of ``{"image", "label", "name"}`` records decoded lazily from files.

    ``stats`` counts, over the records read so far in this process: ``resized_labels`` (labels
    whose size differed from the image and were resized by nearest neighbour; names in
    ``resized_label_names``), ``unknown_label_pixels`` and ``unknown_label_images`` (ids outside
    the dataset's table, mapped to 255). The first of each kind also emits a DatasetWarning.
    """

    def __init__(self, dataset: str, split: str, items: Sequence[Item], num_classes: int,
                 lut: np.ndarray | None, known: np.ndarray | None, has_labels: bool,
                 read_label: Callable[[str], np.ndarray] = read_label_png, root: str | None = None):
        self.dataset = dataset
        self.split = split
        self.root = root
        self.num_classes = num_classes
        self.has_labels = bool(has_labels)
        self._items = list(items)
        self._known = np.ones(256, bool) if known is None else np.asarray(known, bool)
        self.label_table = make_label_table(np.arange(256) if lut is None else lut, self._known)
        self._read_label = read_label
        self._lock = threading.Lock()
        self.stats = {"resized_labels": 0, "unknown_label_pixels": 0, "unknown_label_images": 0}
        self.resized_label_names: list[str] = []

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"]  # locks do not pickle; grain worker processes pickle their source
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [item.name for item in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.dataset!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, has_labels={self.has_labels})")

    def _warn_once(self, key: str, message: str) -> None:
        if self.stats[key] == 1:
            warnings.warn(DatasetWarning(message), stacklevel=3)

    def _label_ids(self, item: Item, shape: Sequence[int]) -> np.ndarray:
        """``item``'s raw label ids, resized to ``shape`` if its size differs; counts unknown ids and resizes."""
        raw = self._read_label(item.label)
        unknown = count_unknown(raw, self._known)
        if unknown:
            with self._lock:
                self.stats["unknown_label_pixels"] += unknown
                self.stats["unknown_label_images"] += 1
            self._warn_once("unknown_label_images",
                            f"{item.label}: {unknown} pixels with ids outside the {self.dataset} table, set to 255")
        if raw.shape[:2] != tuple(shape):
            with self._lock:
                self.stats["resized_labels"] += 1
                self.resized_label_names.append(item.name)
            self._warn_once("resized_labels", f"{item.label}: label {raw.shape[1]}x{raw.shape[0]} differs from "
                                              f"image {shape[1]}x{shape[0]}; resized by nearest neighbour")
            raw = resize_nearest(raw, shape)
        return raw

    def label_for(self, item: Item, shape: Sequence[int]) -> np.ndarray:
        """The remapped label of ``item``, resized to ``shape`` if its size differs (counted)."""
        return to_train_ids(self._label_ids(item, shape), self.label_table)

    def damaged_file(self) -> str | None:
        """The first image or label file (labels only when ``has_labels``) that is missing, empty
        or cut short (:func:`truncation`), in one line; None when every one is whole."""
        for item in self._items:
            for path in (item.image, item.label if self.has_labels else None):
                problem = truncation(path) if path else None
                if problem:
                    return problem
        return None

    def _item(self, index: int) -> Item:
        n = len(self._items)
        if not -n <= index < n:
            raise IndexError(f"{self.dataset} {self.split}: index {index} out of range for {n} records")
        return self._items[index]

    def __getitem__(self, index: int) -> dict:
        item = self._item(index)
        image = read_rgb(item.image)
        record = {"image": image, "name": item.name}
        if self.has_labels:
            record["label"] = self.label_for(item, image.shape[:2])
        return record

    def raw_record(self, index: int, label: bool = True, decoder: str = "pillow") -> dict:
        """Record ``index`` with its label not yet remapped, for pipelines that crop first:
        ``{"image", "name"}`` and, when labelled and ``label``, ``"label_ids"`` (H, W) uint8 raw ids
        at the image's size and ``"label_table"`` (256,) uint8 with
        ``label_table[label_ids] == self[index]["label"]``. (16-bit ids are remapped here and
        come with the identity table.) ``decoder``: see :func:`read_rgb`. ``stats`` count as for
        ``self[index]``."""
        item = self._item(index)
        image = read_rgb(item.image, decoder)
        record = {"image": image, "name": item.name}
        if self.has_labels and label:
            raw = self._label_ids(item, image.shape[:2])
            if raw.dtype == np.uint8:
                record["label_ids"], record["label_table"] = raw, self.label_table
            else:
                record["label_ids"] = to_train_ids(raw, self.label_table)
                record["label_table"] = np.arange(256, dtype=np.uint8)
        return record


def require_dir(path: str, dataset: str, layout: str) -> str:
    """``path`` if it is a directory, else DatasetError naming the expected layout."""
    if not os.path.isdir(path):
        raise DatasetError(f"{dataset}: {path} is not a directory; expected layout: {layout}")
    return path


def list_images(folder: str, extensions: Sequence[str], suffix: str = "") -> list[str]:
    """Sorted file names in ``folder`` ending in ``suffix`` + one of ``extensions`` (case-insensitive)."""
    ends = tuple((suffix + ext).lower() for ext in extensions)
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(ends))
