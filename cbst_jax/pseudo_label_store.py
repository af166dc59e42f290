"""Per-round pseudo-labels on disk: one uint8 trainId PNG per target image (255 = ignored;
~0.1–2 MB at 1024x2048, never float maps), for CRST's LR* rounds also the image's uint8 top
masses and residual cells (``<index>.soft.npz``, see ``cbst_jax.soft_labels``), plus a
``manifest.json`` written last, holding the round's statistics and every file's sha256.

Every file is written to a temporary name and renamed, so a kill leaves either the old file or
the new one. A round's labels count only once its manifest exists; a run killed while labelling
redoes the round's labelling from the same model, which gives the same bytes. Every file read
back is checked against the manifest: a damaged, replaced or missing file is a one-line
:class:`PseudoLabelError` naming it, never a silently different training signal.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil

import numpy as np
from PIL import Image

from cbst_jax.atomic_files import atomic_write_bytes, atomic_write_json
from cbst_jax.failpoints import failpoint

MANIFEST = "manifest.json"
_FILE_NAME = re.compile(r"\d{7}(\.png|\.soft\.npz)")  # as _path and _soft_path name them


class PseudoLabelError(RuntimeError):
    """A pseudo-label file is missing or does not match its manifest; one line naming it."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a round's labelling found, written last into its store: the portion and policy,
    the thresholds λ, per class the pixels predicted (``class_counts``) / selected / selected
    and correct (``correct``, where the target has hidden labels), the valid pixel count, the
    classes chosen for rare-class mining, (LR* rounds) the soft labels' cell stride, where the
    network's logits were kept, the mean prediction entropy per valid pixel (``mean_entropy``,
    nats; None in manifests written before it existed, which stay readable), and the sha256 of
    every file of the store (``files``, by name)."""
    method: str
    round: int
    portion: float
    policy: str
    thresholds: list
    class_counts: list
    selected: list
    correct: list
    valid_pixels: int
    mine_classes: list
    num_records: int
    has_ground_truth: bool
    soft_label_stride: int | None
    logits: str = ""   # where the labelling pass kept the network's logits (Predictor.label_split)
    mean_entropy: float | None = None
    files: dict = dataclasses.field(default_factory=dict)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PseudoLabelStore:
    """The pseudo-labels of one (method, round): ``<dir>/<index>.png`` keyed by record index."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self._files: dict | None = None  # the manifest's digests, read on first use

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, f"{int(index):07d}.png")

    def _soft_path(self, index: int) -> str:
        return os.path.join(self.directory, f"{int(index):07d}.soft.npz")

    def begin(self) -> None:
        """Starts (or restarts) labelling: removes any partial or damaged earlier attempt."""
        if os.path.isdir(self.directory):
            shutil.rmtree(self.directory)
        os.makedirs(self.directory, exist_ok=True)
        self._files = None

    def write(self, index: int, label: np.ndarray) -> None:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(label, np.uint8), mode="L").save(buf, format="PNG", compress_level=1)
        atomic_write_bytes(self._path(index), buf.getvalue())
        failpoint("pseudo_labels.write")

    def write_soft(self, index: int, top: np.ndarray, cells: np.ndarray) -> None:
        """CRST LR* rounds: the image's top masses (uint8, full resolution) and residual cells
        (``cbst_jax.soft_labels``), compressed together."""
        buf = io.BytesIO()
        np.savez_compressed(buf, top=np.asarray(top, np.uint8), cells=np.asarray(cells, np.uint8))
        atomic_write_bytes(self._soft_path(index), buf.getvalue())

    def _checked_bytes(self, path: str, what: str) -> bytes:
        if self._files is None:
            self._files = self.manifest().files
        name = os.path.basename(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise PseudoLabelError(f"{path}: the {what} is missing; rerun the same command to make this "
                                   f"round's pseudo-labels again") from None
        if self._files.get(name) != _sha256(data):
            raise PseudoLabelError(f"{path}: the {what} does not match its manifest (damaged or replaced); rerun "
                                   f"the same command to make this round's pseudo-labels again")
        return data

    def read(self, index: int) -> np.ndarray:
        data = self._checked_bytes(self._path(index), f"pseudo-label of target record {index}")
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im, np.uint8)

    def read_soft(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(top masses, residual cells) of a record."""
        data = self._checked_bytes(self._soft_path(index), f"soft pseudo-label of target record {index}")
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return f["top"], f["cells"]

    def finish(self, manifest: Manifest) -> None:
        """Writes the manifest, with the sha256 of every file written, last."""
        files = {}
        for name in sorted(os.listdir(self.directory)):
            if name != MANIFEST and ".tmp" not in name:
                with open(os.path.join(self.directory, name), "rb") as f:
                    files[name] = _sha256(f.read())
        atomic_write_json(os.path.join(self.directory, MANIFEST), dataclasses.asdict(
            dataclasses.replace(manifest, files=files)))
        self._files = files

    def holds(self, name: str) -> bool:
        """Whether ``name`` is a file of the store: its manifest or a file the manifest lists;
        before the manifest is written (labelling under way, or stopped: redone on resume), a
        file named as the store names its files."""
        if name == MANIFEST:
            return True
        if not self.complete():
            return bool(_FILE_NAME.fullmatch(name))
        try:
            return name in self.manifest().files
        except PseudoLabelError:
            return False

    def complete(self) -> bool:
        return os.path.exists(os.path.join(self.directory, MANIFEST))

    def manifest(self) -> Manifest:
        path = os.path.join(self.directory, MANIFEST)
        try:
            with open(path) as f:
                return Manifest(**json.load(f))
        except (OSError, ValueError, TypeError) as e:
            raise PseudoLabelError(f"{path} cannot be read ({e}); rerun the same command to make this round's "
                                   f"pseudo-labels again") from None

    def verify(self) -> str | None:
        """None if the manifest reads and every file it lists (one per record, and its soft
        file for LR* rounds) is present and matches; else what is wrong, in one line."""
        try:
            manifest = self.manifest()
        except PseudoLabelError as e:
            return str(e).split(";")[0]
        expected = {f"{i:07d}.png" for i in range(manifest.num_records)}
        if manifest.soft_label_stride:
            expected |= {f"{i:07d}.soft.npz" for i in range(manifest.num_records)}
        missing = sorted(expected - set(manifest.files))
        if missing:
            return f"{self.directory}: the manifest lists no {missing[0]}"
        for name, digest in sorted(manifest.files.items()):
            path = os.path.join(self.directory, name)
            if not os.path.exists(path):
                return f"{path} is missing"
            with open(path, "rb") as f:
                if _sha256(f.read()) != digest:
                    return f"{path} does not match its manifest (damaged or replaced)"
        return None
