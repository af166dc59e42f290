"""Segment your own images with weights files (converted or exported; each carries its metadata):
the library of ``cbst-infer`` (``cbst_jax.cli.infer``, whose help says what it writes).

Inputs: JPG/PNG files of any size, or folders of them (searched recursively). Per image and
model: ``<name>_trainid.png`` (class indices, 255 never occurs), ``<name>_color.png`` (the
weights' palette) and ``<name>_overlay.jpg``; folder inputs keep their sub-folders. With several
weights files or with ground truth, ``comparison.png`` shows the first images in the seed's
qualitative layout: image | ground truth | one column per model (:func:`comparison_figure`
builds it, for reports too).

Fixed shapes: every image is resized (aspect kept, bilinear) to fit the canvas and padded at the
bottom/right; portrait images use the transposed canvas. So at most two programs are compiled per
model, whatever the image sizes. The forward pass is ``cbst_jax.predictor.Predictor.probs``
(scales relative to the canvas, flip) on a ``('data',)`` mesh over all devices; labels are the
argmax at the canvas resolution, cropped and resized back to the image by nearest neighbour. The
canvas, scales and flip default to the ones the weights files record (:func:`run_settings`). An
unreadable file inside a folder is reported, skipped and counted; everything is checked before
the output folder is created, and every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import collections
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_CANVAS = (1024, 2048)  # Cityscapes' resolution, the one the paper models were trained at
OVERLAY_ALPHA = 0.5


class InferError(ValueError):
    """Bad arguments or weights; one line."""


# ---------------------------------------------------------------- inputs and geometry

def collect_inputs(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(file, output name) of every image named or found (recursively, sorted) under a folder.
    The output name is the file's path below the folder given (or its base name) without the
    extension; two inputs with one output name are an InferError."""
    found, seen = [], {}
    for p in paths:
        if os.path.isdir(p):
            for base, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        full = os.path.join(base, f)
                        found.append((full, os.path.splitext(os.path.relpath(full, p))[0]))
        elif os.path.isfile(p):
            check_image_file(p)
            found.append((p, os.path.splitext(os.path.basename(p))[0]))
        else:
            raise InferError(f"{p}: no such file or folder")
    for path, name in found:
        if name in seen:
            raise InferError(f"{seen[name]} and {path} would both write {name}_*; pass them in separate runs")
        seen[name] = path
    if not found:
        raise InferError(f"no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images in {', '.join(paths)}")
    return found


def check_image_file(path: str) -> None:
    """InferError unless Pillow recognises ``path`` as an image (its header only; a named file is
    checked before anything is written, a damaged image inside a folder is skipped and counted)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError) as exc:
        what = "not an image" if isinstance(exc, UnidentifiedImageError) else f"unreadable ({exc})"
        raise InferError(f"{path}: {what}; expected {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images or "
                         f"folders of them") from None


def bucket_of(h: int, w: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """The canvas an h x w image is fitted into: ``canvas``, or its transpose for images whose
    orientation (portrait / landscape) is the other one."""
    H, W = canvas
    return (W, H) if (h > w) != (H > W) and H != W else (H, W)


def fit_size(h: int, w: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """The largest size of the image's aspect ratio inside ``canvas`` (at least 1 x 1)."""
    s = min(canvas[0] / h, canvas[1] / w)
    return max(1, min(canvas[0], round(h * s))), max(1, min(canvas[1], round(w * s)))


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB, EXIF orientation applied; OSError/ValueError for unreadable files."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"), np.uint8)


@dataclass
class Prepared:
    """One input decoded and fitted: the original, the canvas-ready copy and its bucket."""

    index: int
    path: str
    name: str
    image: np.ndarray
    fitted: np.ndarray
    bucket: tuple[int, int]


def prepare(index: int, path: str, name: str, canvas: tuple[int, int]) -> Prepared:
    from PIL import Image

    image = read_image(path)
    h, w = image.shape[:2]
    bucket = bucket_of(h, w, canvas)
    fh, fw = fit_size(h, w, bucket)
    fitted = image if (fh, fw) == (h, w) else np.asarray(Image.fromarray(image).resize((fw, fh), Image.BILINEAR))
    return Prepared(index, path, name, image, fitted, bucket)


# ---------------------------------------------------------------- models

@dataclass
class Model:
    """A weights file ready to run: module, variables on the mesh, classes, palette."""

    name: str
    path: str
    module: object
    variables: object
    num_classes: int
    palette: np.ndarray
    metadata: dict
    traces: int = 0
    _fns: dict = field(default_factory=dict)


def palette_for(metadata: dict, num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: the file's palette, else the project's table."""
    from cbst_jax import labels

    if metadata.get("palette") is not None:
        return np.asarray(metadata["palette"], np.uint8)
    try:
        return labels.palette(num_classes)
    except ValueError:
        raise InferError(f"no palette for {num_classes} classes: the weights file has none") from None


def load_model(path: str, mesh, name: str | None = None) -> Model:
    import jax

    from cbst_jax import models
    from cbst_jax import sharding as shd

    metadata = models.read_metadata(path)
    if metadata["num_classes"] is None:
        raise InferError(f"{path}: a backbone-only init (its classifier was never trained); infer needs "
                         f"trained weights, e.g. an exported stage")
    n = metadata["num_classes"]
    module = models.get_model(metadata["architecture"], n, normalization=metadata["normalization"])
    variables = jax.device_put(models.load_variables(path), shd.replicated(mesh))
    name = name or os.path.splitext(os.path.basename(path))[0]
    return Model(name, path, module, variables, n, palette_for(metadata, n), metadata)


def segment(model: Model, images: np.ndarray, mesh, scales, flip: bool) -> np.ndarray:
    """uint8 (B, H, W) argmax labels of a padded uint8 (B, H, W, 3) batch (B divisible by the
    number of devices); one compiled program per (model, canvas)."""
    import jax
    import jax.numpy as jnp

    from cbst_jax import sharding as shd
    from cbst_jax.predictor import Predictor

    canvas = images.shape[1:3]
    if canvas not in model._fns:
        predictor = Predictor(model.module, model.num_classes, mesh, canvas, scales, flip)

        def labels(variables, x):
            model.traces += 1  # runs once per trace, i.e. per compiled program
            return jnp.argmax(predictor.probs(variables, x), axis=-1).astype(jnp.uint8)

        model._fns[canvas] = jax.jit(labels, out_shardings=shd.batch_sharded(mesh))
    out = model._fns[canvas](model.variables, shd.to_global(images, mesh))
    return shd.to_host(out)


# ---------------------------------------------------------------- outputs

def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8; indices without a colour are black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette
    return lut[label]


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    return (image.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha + 0.5).astype(np.uint8)


def to_image_size(label: np.ndarray, fitted_hw, image_hw) -> np.ndarray:
    """The canvas label map cropped to the fitted image and resized (nearest) to the original."""
    from PIL import Image

    label = label[: fitted_hw[0], : fitted_hw[1]]
    if tuple(fitted_hw) == tuple(image_hw):
        return np.ascontiguousarray(label)
    return np.asarray(Image.fromarray(label).resize((image_hw[1], image_hw[0]), Image.NEAREST))


def write_outputs(out_dir: str, name: str, image: np.ndarray, label: np.ndarray, palette) -> list[str]:
    from cbst_jax.atomic_files import atomic_write_bytes

    base = os.path.join(out_dir, name)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    color = colorize(label, palette)
    files = {f"{base}_trainid.png": _png(label), f"{base}_color.png": _png(color),
             f"{base}_overlay.jpg": _jpeg(overlay(image, color))}
    for path, data in files.items():
        atomic_write_bytes(path, data)
    return list(files)


# ---------------------------------------------------------------- comparison figure

def _tile(array: np.ndarray, width: int, nearest: bool) -> np.ndarray:
    from PIL import Image

    h, w = array.shape[:2]
    if w == width:
        return array
    size = (width, max(1, round(h * width / w)))
    return np.asarray(Image.fromarray(array).resize(size, Image.NEAREST if nearest else Image.BILINEAR))


def comparison_figure(images: Sequence[np.ndarray], columns: dict[str, Sequence[np.ndarray]], *,
                      ground_truth: Sequence[np.ndarray | None] | None = None, palette=None,
                      palettes: dict[str, np.ndarray] | None = None, tile_width: int = 320,
                      gap: int = 4) -> np.ndarray:
    """The seed's qualitative layout as one RGB array: a header row of titles, then one row per
    image: image | ground truth (if given) | one column per model (``columns``: title -> label
    maps, each (H, W) class indices of its image). ``palette`` colours the ground truth (and
    the models, unless ``palettes`` gives one per title); 255 / unknown ids are black. Tiles
    are ``tile_width`` pixels wide, label maps resized by nearest neighbour."""
    from PIL import Image, ImageDraw

    from cbst_jax import labels

    palette = labels.CITYSCAPES_PALETTE if palette is None else np.asarray(palette, np.uint8)
    palettes = palettes or {}
    titles = ["image"] + (["ground truth"] if ground_truth is not None else []) + list(columns)
    rows = []
    for r, image in enumerate(images):
        row = [_tile(np.asarray(image, np.uint8), tile_width, False)]
        if ground_truth is not None:
            gt = ground_truth[r]
            row.append(_tile(colorize(gt, palette), tile_width, True) if gt is not None
                       else np.full_like(row[0], 255))
        for title, maps in columns.items():
            row.append(_tile(colorize(np.asarray(maps[r], np.uint8), palettes.get(title, palette)), tile_width, True))
        height = max(t.shape[0] for t in row)
        rows.append([np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0)), constant_values=255) for t in row])
    header = 18
    n_cols = len(titles)
    width = n_cols * tile_width + (n_cols - 1) * gap
    height = header + sum(row[0].shape[0] for row in rows) + gap * len(rows)
    canvas = np.full((height, width, 3), 255, np.uint8)
    y = header + gap
    for row in rows:
        for c, tile in enumerate(row):
            x = c * (tile_width + gap)
            canvas[y:y + tile.shape[0], x:x + tile_width] = tile
        y += row[0].shape[0] + gap
    figure = Image.fromarray(canvas)
    draw = ImageDraw.Draw(figure)
    for c, title in enumerate(titles):
        draw.text((c * (tile_width + gap) + 4, 3), title, fill=(0, 0, 0))
    return np.asarray(figure)


def find_ground_truth(gt_dir: str, name: str, num_classes: int):
    """The ground-truth map of image ``name`` under ``gt_dir``: ``<name>.png`` or
    ``<name>_trainid.png`` (class indices of the model's protocol), or for Cityscapes names
    (``<stem>_leftImg8bit``) ``<stem>_gtFine_labelIds.png`` mapped by the labelId table of
    ``num_classes``; None if there is none."""
    from cbst_jax.data.cityscapes import PROTOCOLS
    from cbst_jax.data.io import read_label_png

    stem = os.path.basename(name)
    rel_dir = os.path.dirname(name)
    for candidate in (f"{stem}.png", f"{stem}_trainid.png"):
        for folder in (os.path.join(gt_dir, rel_dir), gt_dir):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return np.asarray(read_label_png(path), np.uint8)
    if stem.endswith("_leftImg8bit") and num_classes in PROTOCOLS:
        base = stem[: -len("_leftImg8bit")]
        for folder in (os.path.join(gt_dir, rel_dir), gt_dir, os.path.join(gt_dir, base.split("_")[0])):
            path = os.path.join(folder, base + "_gtFine_labelIds.png")
            if os.path.isfile(path):
                return PROTOCOLS[num_classes][read_label_png(path)]
    return None


# ---------------------------------------------------------------- the run

def run_settings(models_: Sequence[Model], canvas=None, scales=None, flip=None) -> tuple[tuple, tuple, bool, str]:
    """(canvas, scales, flip, where they come from): each one given, else the one the weights
    files record (``inference``: the evaluation settings of the run they were exported from),
    else the defaults (DEFAULT_CANVAS, one scale, no flip) for files that record none."""
    given = {"canvas": canvas, "scales": scales, "flip": flip}
    missing = [k for k, v in given.items() if v is None]
    if not missing:
        return tuple(canvas), tuple(scales), bool(flip), "as given"
    records = [m.metadata["inference"] for m in models_ if "inference" in m.metadata]
    if len({json.dumps(r, sort_keys=True) for r in records}) > 1:
        raise InferError(f"the weights files record different evaluation settings "
                         f"({'; '.join(json.dumps(r, sort_keys=True) for r in records)}); give "
                         f"{', '.join('--' + k for k in missing)}")
    base = records[0] if records else {"canvas": list(DEFAULT_CANVAS), "scales": [1.0], "flip": False}
    values = {k: base[k] if v is None else v for k, v in given.items()}
    source = ("the run's evaluation settings, recorded in the weights file" if records
              else "the defaults: the weights file records no settings")
    return (tuple(int(v) for v in values["canvas"]), tuple(float(v) for v in values["scales"]), bool(values["flip"]),
            f"{', '.join(missing)}: {source}")


def run(weights: Sequence[str], inputs: Sequence[str], out_dir: str, *, canvas=None, scales=None,
        flip: bool | None = None, batch_size: int | None = None, names: Sequence[str] | None = None,
        gt_dir: str | None = None, figure_rows: int = 8, workers: int | None = None,
        progress: bool = True, log=None) -> dict:
    """Segments ``inputs`` with every weights file; returns the summary (also written to
    ``out_dir/infer_summary.json``). ``canvas``, ``scales``, ``flip``: None takes the weights
    files' recorded evaluation settings (:func:`run_settings`). ``log(line)`` receives the
    settings line and the per-file failure lines. Everything is checked before ``out_dir`` is
    created."""
    from tqdm import tqdm

    from cbst_jax import sharding as shd
    from cbst_jax.atomic_files import atomic_write_json

    log = log or (lambda line: tqdm.write(line, file=sys.stderr))
    if names is not None and len(names) != len(weights):
        raise InferError(f"--names gives {len(names)} names for {len(weights)} weights files")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InferError(f"--out {out_dir}: a file, expected a folder")
    files = collect_inputs(inputs)
    mesh = shd.make_mesh()
    n_dev = mesh.devices.size
    batch = n_dev if batch_size is None else max(1, int(batch_size))
    batch = -(-batch // n_dev) * n_dev  # every device gets the same number of rows
    loaded = [load_model(w, mesh, names[i] if names else None) for i, w in enumerate(weights)]
    if len({m.name for m in loaded}) != len(loaded):
        raise InferError(f"model names {[m.name for m in loaded]} repeat; give --names")
    canvas, scales, flip, source = run_settings(loaded, canvas, scales, flip)
    if min(canvas) < 8:
        raise InferError(f"--canvas {canvas[0]},{canvas[1]}: expected at least 8 pixels per side")
    if not scales or any(not s > 0 for s in scales):
        raise InferError(f"--scales {list(scales)}: expected positive scales, e.g. 0.9 1.0 1.2")
    log(f"canvas {canvas[0]}x{canvas[1]}, scales {', '.join(f'{s:g}' for s in scales)}, flip "
        f"{'on' if flip else 'off'} ({source})")
    several = len(loaded) > 1
    model_dirs = {m.name: os.path.join(out_dir, m.name) if several else out_dir for m in loaded}
    os.makedirs(out_dir, exist_ok=True)

    failed, written, figure = [], 0, {}
    pending: dict[tuple[int, int], list[Prepared]] = {}
    start = time.perf_counter()

    def flush(bucket):
        nonlocal written
        items = pending.pop(bucket, [])
        if not items:
            return
        images = np.zeros((batch, bucket[0], bucket[1], 3), np.uint8)
        for j, p in enumerate(items):
            images[j, : p.fitted.shape[0], : p.fitted.shape[1]] = p.fitted
        for model in loaded:
            labels = segment(model, images, mesh, scales, flip)
            for j, p in enumerate(items):
                label = to_image_size(labels[j], p.fitted.shape[:2], p.image.shape[:2])
                write_outputs(model_dirs[model.name], p.name, p.image, label, model.palette)
                if p.index in figure:
                    figure[p.index][2][model.name] = label
        written += len(items)

    def load(index):
        path, name = files[index]
        try:
            return prepare(index, path, name, canvas), None
        except Exception as exc:  # unreadable: any decoding error is reported, counted and skipped
            lines = str(exc).strip().splitlines()
            return None, {"file": path, "error": f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")}

    bar = tqdm(total=len(files), desc="infer", unit="img", disable=not progress)
    ahead = collections.deque()  # decoded images in flight: bounded, so memory does not grow with the inputs
    depth = batch + 2 * (workers or min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        for index in range(len(files)):
            ahead.append(pool.submit(load, index))
            if len(ahead) < depth and index + 1 < len(files):
                continue
            while ahead and (len(ahead) >= depth or index + 1 == len(files)):
                prepared, error = ahead.popleft().result()
                bar.update(1)
                if error is not None:
                    failed.append(error)
                    log(f"skipped {error['file']}: {error['error']}")
                    continue
                if len(figure) < figure_rows and (several or gt_dir):
                    figure[prepared.index] = (prepared.name, prepared.image, {})
                pending.setdefault(prepared.bucket, []).append(prepared)
                if len(pending[prepared.bucket]) == batch:
                    flush(prepared.bucket)
        for bucket in list(pending):
            flush(bucket)
    bar.close()

    summary = {
        "weights": [{"name": m.name, "path": m.path, "architecture": m.metadata["architecture"],
                     "num_classes": m.num_classes, "normalization": m.metadata["normalization"],
                     "compiled_programs": m.traces} for m in loaded],
        "canvas": list(canvas), "scales": list(scales), "flip": bool(flip), "settings": source,
        "batch_size": batch,
        "devices": n_dev, "images": len(files), "segmented": written, "failed": failed,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if figure:
        rows = [figure[i] for i in sorted(figure)]
        first = loaded[0]
        gts = [find_ground_truth(gt_dir, name, first.num_classes) for name, _, _ in rows] if gt_dir else None
        fig = comparison_figure([image for _, image, _ in rows],
                                {m.name: [cols[m.name] for _, _, cols in rows] for m in loaded},
                                ground_truth=gts, palette=first.palette,
                                palettes={m.name: m.palette for m in loaded})
        from cbst_jax.atomic_files import atomic_write_bytes

        atomic_write_bytes(os.path.join(out_dir, "comparison.png"), _png(fig))
        summary["comparison"] = os.path.join(out_dir, "comparison.png")
    atomic_write_json(os.path.join(out_dir, "infer_summary.json"), summary)
    return summary
