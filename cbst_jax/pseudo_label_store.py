"""Per-round pseudo-labels on disk: one uint8 trainId PNG per target image (255 = ignored;
~0.1–2 MB at 1024x2048, never float maps), for CRST's LR* rounds also the image's uint8 top
masses and residual cells (``<index>.soft.npz``, see ``cbst_jax.soft_labels``), plus a
``manifest.json`` written last.

Every file is written to a temporary name and renamed, so a kill leaves either the old file or
the new one. A round's labels count only once its manifest exists; a run killed while labelling
redoes the round's labelling from the same model, which gives the same bytes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
from PIL import Image

from cbst_jax.atomic_files import atomic_write_bytes, atomic_write_json

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a round's labelling found, written last into its store: the portion and policy,
    the thresholds λ, per class the pixels predicted (``class_counts``) / selected / selected
    and correct (``correct``, where the target has hidden labels), the valid pixel count, the
    classes chosen for rare-class mining, and (LR* rounds) the soft labels' cell stride."""
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


class PseudoLabelStore:
    """The pseudo-labels of one (method, round): ``<dir>/<index>.png`` keyed by record index."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, f"{int(index):07d}.png")

    def begin(self) -> None:
        """Starts (or restarts) labelling: removes any partial earlier attempt."""
        if os.path.isdir(self.directory) and not self.complete():
            shutil.rmtree(self.directory)
        os.makedirs(self.directory, exist_ok=True)

    def write(self, index: int, label: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        Image.fromarray(np.asarray(label, np.uint8), mode="L").save(buf, format="PNG", compress_level=1)
        atomic_write_bytes(self._path(index), buf.getvalue())

    def read(self, index: int) -> np.ndarray:
        path = self._path(index)
        try:
            with Image.open(path) as im:
                return np.asarray(im, np.uint8)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: pseudo-label of target record {index} is missing "
                                    f"(labelling of {self.directory} did not finish)") from None

    def _soft_path(self, index: int) -> str:
        return os.path.join(self.directory, f"{int(index):07d}.soft.npz")

    def write_soft(self, index: int, top: np.ndarray, cells: np.ndarray) -> None:
        """CRST LR* rounds: the image's top masses (uint8, full resolution) and residual cells
        (``cbst_jax.soft_labels``), compressed together."""
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, top=np.asarray(top, np.uint8), cells=np.asarray(cells, np.uint8))
        atomic_write_bytes(self._soft_path(index), buf.getvalue())

    def read_soft(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(top masses, residual cells) of a record."""
        path = self._soft_path(index)
        try:
            with np.load(path, allow_pickle=False) as f:
                return f["top"], f["cells"]
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: soft pseudo-label of target record {index} is missing "
                                    f"(labelling of {self.directory} did not finish)") from None

    def finish(self, manifest: Manifest) -> None:
        atomic_write_json(os.path.join(self.directory, MANIFEST), dataclasses.asdict(manifest))

    def complete(self) -> bool:
        return os.path.exists(os.path.join(self.directory, MANIFEST))

    def manifest(self) -> Manifest:
        with open(os.path.join(self.directory, MANIFEST)) as f:
            return Manifest(**json.load(f))
