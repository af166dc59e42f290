"""Weights files: one ``.npz`` holding a network's variables and the metadata that says how to
build the network for them (architecture, class count, input normalisation, class names and
palette), so normalisation travels with the weights instead of being guessed by the runner.

Layout: ``params/<module>/.../<leaf>`` and ``batch_stats/...`` float arrays, plus one
``__metadata__`` entry, a 0-d unicode array holding a JSON object (read without pickle):

  format          "cbst_jax-weights-1"
  architecture    a name of ``cbst_jax.models.MODELS``
  num_classes     classes the head was trained for, or null for a backbone-only init (the head
                  in the file is a fresh initialisation, e.g. an ImageNet checkpoint)
  normalization   "imagenet" | "caffe" | "unit" (``cbst_jax.models.layers.normalize_images``)
  class_names     list of num_classes names, or null where unknown
  palette         list of num_classes [r, g, b], or null where unknown
  inference       optional: {"canvas": [H, W], "scales": [...], "flip": bool}, the evaluation settings
                  of the run that trained the weights (``cbst_jax.segment_images``' defaults for the file)
  ...             free-form provenance (converter kind, source file, fresh heads, ...)

Every problem with a file is a one-line ``WeightFileError`` naming it.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any

import numpy as np
from flax import traverse_util

from cbst_jax.models.importers import WeightMismatchError
from cbst_jax.models.layers import NORMALIZATIONS
from cbst_jax.models.registry import MODELS

FORMAT = "cbst_jax-weights-1"
METADATA_KEY = "__metadata__"
COLLECTIONS = ("params", "batch_stats")
CONVERT_HINT = "convert it with: python -m cbst_jax.cli.convert_weights KIND IN OUT"


class WeightFileError(WeightMismatchError):
    """A weights file that cannot be used, or that contradicts the requested model; one line."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.missing, self.unexpected, self.shape_mismatches = [], [], []


def _known_tables(num_classes):
    from cbst_jax import labels

    if num_classes in (13, 16, 19):
        return list(labels.class_names(num_classes)), labels.palette(num_classes).tolist()
    return None, None


def make_metadata(architecture: str, num_classes: int | None, normalization: str, *,
                  class_names=None, palette=None, **provenance) -> dict[str, Any]:
    """A metadata dict for :func:`save_variables`. Class names and palette default to the
    project's tables for 19 (Cityscapes), 16 (SYNTHIA) and 13 (NTHU) classes, else None."""
    default_names, default_palette = _known_tables(num_classes)
    meta = dict(provenance)
    meta.update(format=FORMAT, architecture=architecture, num_classes=num_classes, normalization=normalization,
                class_names=default_names if class_names is None else [str(n) for n in class_names],
                palette=default_palette if palette is None else np.asarray(palette).astype(int).tolist())
    return meta


def validate_metadata(metadata, path="weights file") -> dict[str, Any]:
    """``metadata`` if it is well formed, else WeightFileError naming ``path`` and the field."""
    def bad(what):
        raise WeightFileError(f"{path}: bad weights metadata: {what}")

    if not isinstance(metadata, dict):
        bad(f"expected a JSON object, got {type(metadata).__name__}")
    if metadata.get("format") != FORMAT:
        bad(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
    if metadata.get("architecture") not in MODELS:
        bad(f"architecture {metadata.get('architecture')!r}, expected one of {', '.join(sorted(MODELS))}")
    n = metadata.get("num_classes")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        bad(f"num_classes {n!r}, expected a positive integer or null")
    if metadata.get("normalization") not in NORMALIZATIONS:
        bad(f"normalization {metadata.get('normalization')!r}, expected one of {', '.join(NORMALIZATIONS)}")
    names, palette = metadata.get("class_names"), metadata.get("palette")
    if names is not None and (n is None or not isinstance(names, list) or len(names) != n
                              or not all(isinstance(x, str) for x in names)):
        bad(f"class_names must be a list of num_classes={n} strings or null")
    if palette is not None:
        arr = np.asarray(palette) if isinstance(palette, list) else None
        if (n is None or arr is None or arr.shape != (n, 3) or arr.dtype.kind not in "iu"
                or arr.min() < 0 or arr.max() > 255):
            bad(f"palette must be num_classes={n} [r, g, b] triples of 0..255 or null")
    if "inference" in metadata and not _is_inference(metadata["inference"]):
        bad(f"inference {metadata['inference']!r}, expected {{'canvas': [H, W] (at least 8 each), 'scales': "
            f"[positive numbers], 'flip': true or false}}")
    return metadata


def _is_inference(value) -> bool:
    """A well-formed ``inference`` entry (see the module docstring)."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 8

    def scale(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")

    return (isinstance(value, dict) and set(value) == {"canvas", "scales", "flip"}
            and isinstance(value["canvas"], list) and len(value["canvas"]) == 2 and all(map(count, value["canvas"]))
            and isinstance(value["scales"], list) and bool(value["scales"]) and all(map(scale, value["scales"]))
            and isinstance(value["flip"], bool))


def save_variables(path, variables, metadata: dict[str, Any]) -> None:
    """Writes ``variables`` ({'params', 'batch_stats'}) and validated ``metadata`` to ``path``
    (an .npz), atomically: a temporary file renamed into place."""
    from cbst_jax.atomic_files import atomic_write_bytes

    metadata = validate_metadata(dict(metadata), path)
    arrays = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(variables)).items()}
    arrays[METADATA_KEY] = np.array(json.dumps(metadata, sort_keys=True))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(os.fspath(path), buf.getvalue())


def _what_is(path: str) -> str:
    """A short description of a file that is not a converted-weights .npz, for the message."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:1] == b"\x80":
        return "a Python pickle, e.g. a PyTorch .pth"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "a damaged or truncated zip archive"
        if any(n.endswith("data.pkl") for n in names):
            return "a PyTorch checkpoint"
        return "a zip archive without cbst_jax weights metadata"
    if not head:
        return "an empty file"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "a text file"
    return "not a zip archive"


def _open(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"{path}: weights file not found")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception:
        z = None
    if not isinstance(z, np.lib.npyio.NpzFile) or METADATA_KEY not in z.files:
        if z is not None and hasattr(z, "close"):
            z.close()
        raise WeightFileError(f"{path}: not a converted-weights .npz ({_what_is(path)}); {CONVERT_HINT}")
    return path, z


def _metadata_of(path, z) -> dict[str, Any]:
    try:
        metadata = json.loads(str(z[METADATA_KEY]))
    except Exception as exc:  # truncated entry, not JSON
        raise WeightFileError(f"{path}: unreadable weights metadata ({type(exc).__name__}: {exc})") from None
    return validate_metadata(metadata, path)


def read_metadata(path) -> dict[str, Any]:
    """The validated metadata of a weights file (see the module docstring)."""
    path, z = _open(path)
    with z:
        return _metadata_of(path, z)


def load_variables(path) -> dict[str, Any]:
    """{'params': ..., 'batch_stats': ...} (nested dicts of numpy arrays) of a weights file;
    a missing, truncated or foreign file is a WeightFileError naming it."""
    path, z = _open(path)
    with z:
        _metadata_of(path, z)
        flat = {}
        for key in z.files:
            if key == METADATA_KEY:
                continue
            parts = tuple(key.split("/"))
            if parts[0] not in COLLECTIONS or len(parts) < 2:
                raise WeightFileError(f"{path}: unexpected entry {key!r}, expected params/... or batch_stats/...")
            try:
                flat[parts] = z[key]
            except Exception as exc:  # a truncated archive fails when the member is read
                raise WeightFileError(f"{path}: cannot read {key!r} ({type(exc).__name__}: {exc}); "
                                      f"the file is damaged or truncated") from None
    variables = traverse_util.unflatten_dict(flat)
    variables.setdefault("params", {})
    variables.setdefault("batch_stats", {})
    return variables


def resolve_normalization(requested: str, metadata: dict[str, Any] | None, model_name: str,
                          path="model.init") -> str:
    """The input normalisation to build ``model_name`` with.

    ``requested``: "auto" or one of NORMALIZATIONS (the configuration's choice). ``metadata``:
    the weights file's (``read_metadata``), or None when the model starts from random init.
    "auto" takes the file's normalisation, or without a file the architecture's default. An
    explicit choice that contradicts the file, or a file for another architecture, is a
    WeightFileError naming ``path``.
    """
    if requested != "auto" and requested not in NORMALIZATIONS:
        raise WeightFileError(f"model.normalization={requested!r}, expected 'auto' or one of "
                              f"{', '.join(NORMALIZATIONS)}")
    if model_name not in MODELS:
        raise WeightFileError(f"model.name={model_name!r}, expected one of {', '.join(sorted(MODELS))}")
    if metadata is None:
        return MODELS[model_name](1).normalization if requested == "auto" else requested
    if metadata["architecture"] != model_name:
        raise WeightFileError(f"{path}: weights of {metadata['architecture']!r}, but model.name={model_name!r} "
                              f"(another architecture)")
    recorded = metadata["normalization"]
    if requested not in ("auto", recorded):
        raise WeightFileError(f"{path}: the weights expect normalization {recorded!r}, but "
                              f"model.normalization={requested!r}; use 'auto' or {recorded!r}")
    return recorded
