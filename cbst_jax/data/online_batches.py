"""The host batches of an online method's round (``docs/online.md``): at each step a source batch
and a target batch of the same size, drawn independently of each other.

* Source rows: with rare-class sampling (``temperature > 0``) each row first draws a class with
  DAFormer's ``softmax((1 - f_c) / T)`` and then an image holding more than ``min_pixels`` pixels
  of it (:class:`cbst_jax.rare_class_sampling.RareClassSampler`), and its crop is re-drawn until
  it holds more than ``min_pixels · min_crop_ratio`` of them (``choose_crop``); without it, images
  are drawn uniformly. Crops, rescaling and flips are the offline rounds' (``cbst_jax.data.augment``).
* Target rows: images drawn uniformly (with replacement when the batch outgrows the split), their
  labels never read for training. ``target_origin`` (B, 2) int32 is each crop's top-left corner on
  the evaluation canvas, where the spatial prior lies (the crop's offset mapped back through its
  rescaling, clipped so the crop fits). Where the target train records keep ground truth (the
  embedded pair's hidden labels), ``target_truth`` holds it for the pseudo-label precision the
  run reports; it never reaches the loss (``cbst_jax.online_step`` counts it only).

Step ``k``'s batch is a pure function of (the round's seed, ``k``): every draw comes from a
``np.random.Generator`` seeded with them, so the iterator's state is the next step and a resumed
round sees the same batches. Each host builds its own rows of the global batch.
"""
from __future__ import annotations

import numpy as np

from cbst_jax.data import augment as aug
from cbst_jax.data import pipeline
from cbst_jax.rare_class_sampling import RareClassSampler, choose_crop

_SOURCE, _TARGET = 0, 1


class OnlineBatches(pipeline.Closing):
    """Infinite stream of an online round's host batches: ``{"source_image" uint8 (b, ch, cw, 3),
    "source_label" uint8 (b, ch, cw), "target_image" uint8 (b, ch, cw, 3), "target_origin" int32
    (b, 2)}`` (+ ``"target_truth"`` uint8 (b, ch, cw) with ``truth_key``), b this host's rows of
    ``batch_size``. ``rcs``: the source images' class counts' sampler (None: uniform).
    ``get_state()`` / ``set_state()``: ``{"step": k}``, the next step."""

    def __init__(self, source, target, *, batch_size: int, crop_size, source_scale_range, target_scale_range,
                 flip: bool, seed: int, canvas, rcs: RareClassSampler | None = None, min_pixels: int = 0,
                 min_crop_ratio: float = 0.0, truth_key: str | None = None, workers: int = 1,
                 process_index: int | None = None, process_count: int | None = None):
        if len(source) < 1 or len(target) < 1:
            raise ValueError("online batches need source and target train images")
        self.source, self.target, self.batch_size = source, target, int(batch_size)
        self.crop = tuple(int(c) for c in crop_size)
        self.source_scale_range, self.target_scale_range = tuple(source_scale_range), tuple(target_scale_range)
        self.flip, self.seed, self.canvas = bool(flip), int(seed), tuple(int(c) for c in canvas)
        self.rcs, self.min_pixels, self.min_crop_ratio = rcs, int(min_pixels), float(min_crop_ratio)
        self.truth_key = truth_key
        self.rows = pipeline.host_rows(self.batch_size, process_index, process_count)
        self._step = 0
        self._prefetch = pipeline.ThreadPrefetcher(self.batch, 2, max(1, int(workers)))

    # ------------------------------------------------------------------ draws
    def draws(self, step: int):
        """(source images (B,), their RCS classes (B,) or None, target images (B,)) of global step ``step``."""
        b = self.batch_size
        if self.rcs is not None:
            classes, images = self.rcs.draw(step, b)
        else:
            classes, images = None, np.random.default_rng([self.seed, step, _SOURCE]).integers(len(self.source),
                                                                                               size=b)
        rng = np.random.default_rng([self.seed, step, _TARGET])
        targets = rng.choice(len(self.target), size=b, replace=b > len(self.target))
        return images, classes, targets

    def _source_row(self, step: int, row: int, index: int, cls, image_out, label_out):
        rec = pipeline.read_record(self.source, int(index), True, "pillow")

        def draw_crop(attempt: int):
            rng = np.random.default_rng([self.seed, step, _SOURCE, row, attempt])
            geometry = aug.sample_geometry(rng, rec.label, crop_size=self.crop, scale_range=self.source_scale_range,
                                           flip=self.flip, label_table=rec.table)
            return geometry, aug.crop_label(rec.label, geometry, rec.table)

        if cls is None:
            geometry, label = draw_crop(0)
        else:
            drawn = {}

            def label_of(attempt: int):
                drawn[attempt] = draw_crop(attempt)
                return drawn[attempt][1]

            attempt, label = choose_crop(label_of, int(cls), min_pixels=self.min_pixels,
                                         min_crop_ratio=self.min_crop_ratio)
            geometry = drawn[attempt][0]
        aug.crop_image(rec.image, geometry, image_out)
        label_out[:] = label

    def _target_row(self, step: int, row: int, index: int, image_out, origin_out, truth_out):
        rec = pipeline.read_record(self.target, int(index), False, "pillow")
        rng = np.random.default_rng([self.seed, step, _TARGET, row])
        h, w = rec.image.shape[:2]
        geometry = aug.sample_geometry(rng, np.zeros((h, w), np.uint8), crop_size=self.crop,
                                       scale_range=self.target_scale_range, flip=self.flip)
        aug.crop_image(rec.image, geometry, image_out)
        for axis in range(2):
            back = geometry.offset[axis] * geometry.size[axis] / geometry.rescaled[axis]
            origin_out[axis] = int(np.clip(round(back), 0, max(self.canvas[axis] - self.crop[axis], 0)))
        if truth_out is not None:
            aug.crop_label(np.asarray(self.target[int(index)][self.truth_key], np.uint8), geometry, out=truth_out)

    def batch(self, step: int) -> dict:
        """This host's rows of global step ``step``."""
        images, classes, targets = (a[self.rows] if a is not None else None for a in self.draws(step))
        first, b, (ch, cw) = self.rows.start, len(images), self.crop
        out = {"source_image": np.empty((b, ch, cw, 3), np.uint8), "source_label": np.empty((b, ch, cw), np.uint8),
               "target_image": np.empty((b, ch, cw, 3), np.uint8), "target_origin": np.zeros((b, 2), np.int32)}
        if self.truth_key is not None:
            out["target_truth"] = np.empty((b, ch, cw), np.uint8)
        for j in range(b):
            self._source_row(step, first + j, images[j], None if classes is None else classes[j],
                             out["source_image"][j], out["source_label"][j])
            self._target_row(step, first + j, targets[j], out["target_image"][j], out["target_origin"][j],
                             out["target_truth"][j] if self.truth_key is not None else None)
        return out

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self._prefetch.get(self._step)
        self._step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self._step}

    def set_state(self, state: dict) -> None:
        self._step = int(state["step"])
        self._prefetch.reset()

