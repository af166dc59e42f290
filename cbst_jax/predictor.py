"""Sharded inference for self-training and evaluation.

The network maps a padded, fixed-shape batch of uint8 images to its logits, once per scale and
flip (single scale, or multi-scale + flip, MST); from those logits one traced function makes
class probabilities at the label (canvas) size: each map is flipped back, bilinearly upsampled
(align_corners, as CRST) to the canvas, turned into probabilities, and the probabilities are
averaged over scales and flips. Everything the self-training needs is reduced on the device
from there:

* the two histogram passes of the exact class-wise thresholds (``cbst_jax.selection``),
* pseudo-labels (uint8) with per-class selected / correct pixel counts and the summed
  prediction entropy (for ``cbst_jax.collapse_guard``), and for CRST's LR* modes the soft
  labels' uint8 encoding (``cbst_jax.soft_labels``),
* a confusion matrix for evaluation,

so full-resolution float probability maps never reach the host (the reference wrote 152 MiB
of them per image).

A round of pseudo-labelling (:meth:`Predictor.label_split`) runs the network once per image,
scale and flip: the first pass keeps the logits at the network's output stride (on the devices
within a byte budget, else in host RAM, else it falls back to recomputing them), takes the
coarse histogram, and the fine histogram and the labels come from the kept logits. The
network and the steps after it are separate jitted programs, shared by every path, so the
thresholds and labels are bit-identical whichever path a batch takes.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cbst_jax import crst, losses, metrics, selection, soft_labels
from cbst_jax import sharding as shd
from cbst_jax.labels import IGNORE_INDEX

_log = logging.getLogger(__name__)


def _resize_images(images, size):
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size[0], size[1], c), method="linear", antialias=False)


def _selection_counts(labels, gt, valid, num_classes: int):
    """Per class: selected pixels, selected pixels equal to ``gt``; and the valid-pixel count."""
    c = num_classes
    li = labels.astype(jnp.int32)
    picked = jnp.zeros(c + 1, jnp.int32).at[jnp.minimum(li, c).reshape(-1)].add(1)[:c]
    hit = jnp.where(li == gt.astype(jnp.int32), li, c)
    correct = jnp.zeros(c + 1, jnp.int32).at[jnp.minimum(hit, c).reshape(-1)].add(1)[:c]
    return picked, correct, jnp.sum(valid.astype(jnp.int32))


def _entropy_sum(probs, valid):
    """Σ over the valid pixels of the per-pixel entropy −Σ_c p_c ln p_c (nats), float32: summed
    per image first, then over the batch (the collapse guard's prediction entropy)."""
    probs = probs.astype(jnp.float32)
    plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0)
    per_pixel = jnp.where(valid, -jnp.sum(plogp, axis=-1), 0.0)
    return jnp.sum(jnp.sum(per_pixel, axis=(1, 2)))


class LabelledBatch(NamedTuple):
    """Hard pseudo-labels of one batch: ``labels`` uint8 (B, H, W), batch-sharded, 255 where
    ignored or padded; ``selected`` (C,) int32 labelled pixels per class; ``correct`` (C,) int32
    labelled pixels equal to the batch's ground truth (0 without one); ``valid`` () int32 valid
    pixels of the batch."""

    labels: jax.Array
    selected: jax.Array
    correct: jax.Array
    valid: jax.Array


class SoftLabelledBatch(NamedTuple):
    """CRST LR* pseudo-labels of one batch in ``cbst_jax.soft_labels``' encoding: ``labels``
    uint8 (B, H, W) (argmax of ŷ, 255 where ŷ = 0), ``top`` uint8 (B, H, W) (the top mass),
    ``cells`` uint8 (B, ⌈H/s⌉, ⌈W/s⌉, C) (the residual cells), then ``selected``, ``correct``,
    ``valid`` as in :class:`LabelledBatch`."""

    labels: jax.Array
    top: jax.Array
    cells: jax.Array
    selected: jax.Array
    correct: jax.Array
    valid: jax.Array


class SoftLabelling(NamedTuple):
    """CRST LR* labelling (``cbst_jax.crst.soft_pseudo_labels``): regulariser ``kind``, weight
    ``alpha``, which pixels are kept (``keep``), and the stride of the residual cells."""

    kind: str
    alpha: float
    stride: int
    keep: str = "objective"


class Evaluation(NamedTuple):
    """``confusion`` (C, C + 1) int64 over all batches (``metrics.confusion_matrix``: the last
    column counts predictions outside [0, C)); ``predictions``: the first kept predictions
    (host uint8 maps, each cropped to its record)."""

    confusion: np.ndarray
    predictions: list


class CacheReport(NamedTuple):
    """Where a pseudo-labelling pass kept each batch's logits and what it cost: batches on the
    devices / in host RAM / recomputed in each later pass; ``device_bytes`` per device and
    ``host_bytes`` on this host at the end of the first pass (logits, and the host batches
    without their images); ``device_budget`` / ``host_budget`` the limits used; ``forward_calls``
    the network program's runs (each runs every scale and flip of one batch)."""

    device_batches: int
    host_batches: int
    recomputed_batches: int
    device_bytes: int
    host_bytes: int
    device_budget: int
    host_budget: int
    forward_calls: int

    @property
    def path(self) -> str:
        kinds = [(self.device_batches, "device"), (self.host_batches, "host RAM"),
                 (self.recomputed_batches, "recompute")]
        return " + ".join(name for n, name in kinds if n) or "empty"


class LabellingResult(NamedTuple):
    """One round of pseudo-labelling over a split: ``thresholds`` λ (C,) float32 and
    ``class_counts`` (C,) int64 (pass 1), ``selected`` / ``correct`` (C,) int64 and
    ``valid_pixels`` summed over the labelled batches, the :class:`CacheReport`, and
    ``mean_entropy``: the mean prediction entropy per valid pixel (nats; the batches' float32
    sums added in float64; NaN without a valid pixel)."""

    thresholds: np.ndarray
    class_counts: np.ndarray
    selected: np.ndarray
    correct: np.ndarray
    valid_pixels: int
    cache: CacheReport
    mean_entropy: float = float("nan")


class PassPrograms(NamedTuple):
    """The jitted programs of a pseudo-labelling round (shared by every path; for AOT cost
    analysis): ``forward(variables, images) -> logits`` (a tuple, one per scale and flip);
    ``coarse`` / ``fine(acc, bins, logits, valid, prior) -> acc``; ``labels(logits, valid, gt,
    lam, prior)`` -> (:class:`LabelledBatch` or :class:`SoftLabelledBatch`, () float32 the sum of
    the valid pixels' prediction entropy in nats, of the probabilities the labels come from)."""

    forward: Callable
    coarse: Callable
    fine: Callable
    labels: Callable


DEVICE_CACHE_FRACTION = 0.5  # default device budget: this share of the least free device memory
HOST_CACHE_FRACTION = 0.5  # default host budget: this share of the host's available RAM


def _available_host_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo (Linux), else free physical pages; 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return 0


def _free_device_bytes(devices) -> int:
    """The least free memory (``bytes_limit - bytes_in_use``) of ``devices``; 0 where a backend
    reports no memory statistics (the CPU: its "device" memory is the host's RAM)."""
    free = []
    for d in devices:
        stats = d.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return 0
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return max(0, min(free)) if free else 0


def _agreed_minimum(value: int) -> int:
    """The smallest ``value`` over all processes, so that every host takes the same decisions."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def _nbytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


class _LogitsCache:
    """Per batch, in order: the network's logits kept on the devices (global arrays, with the
    batch's global ``valid`` / ``label``), on this host (numpy copies of its shards) or not at
    all (recomputed), and the host batch without its image. A batch goes to the devices while
    their per-device share fits ``device_budget`` (bytes per device), else to host RAM while
    ``host_budget`` (bytes on this host) holds it, else it is recomputed; the host batch counts
    against ``host_budget`` in both kept cases. Sizes are global shapes and the budgets agree
    across hosts, so every host takes the same decisions."""

    def __init__(self, mesh, device_budget: int, host_budget: int):
        self.mesh, self.device_budget, self.host_budget = mesh, int(device_budget), int(host_budget)
        self.slots: list = []
        self.device_bytes = self.host_bytes = 0
        self._share = len(mesh.local_devices) / mesh.devices.size  # this host's part of a global array

    def add(self, logits, batch, host) -> None:
        meta = {k: v for k, v in host.items() if k != "image"}
        on_device = {"logits": logits, "valid": batch["valid"], "label": batch["label"]}
        device_cost = _nbytes(on_device) // self.mesh.devices.size
        meta_cost = _nbytes(meta)
        host_cost = meta_cost + int(_nbytes(logits) * self._share)
        if (self.device_bytes + device_cost <= self.device_budget
                and self.host_bytes + meta_cost <= self.host_budget):
            self.device_bytes += device_cost
            self.host_bytes += meta_cost
            self.slots.append(("device", on_device, meta))
        elif self.host_bytes + host_cost <= self.host_budget:
            self.host_bytes += host_cost
            shards = jax.tree.map(lambda x: [(s.device, np.asarray(s.data)) for s in x.addressable_shards], logits)
            self.slots.append(("host", (shards, jax.tree.map(lambda x: (x.shape, x.sharding), logits)), meta))
        else:
            self.slots.append(("recompute", None, None))

    def count(self, kind: str) -> int:
        return sum(slot[0] == kind for slot in self.slots)

    def get(self, k: int):
        """(logits, global batch with ``valid`` and ``label``, host batch) of batch ``k``; None
        for a recomputed batch."""
        kind, data, meta = self.slots[k]
        if kind == "recompute":
            return None
        if kind == "device":
            return data["logits"], data, meta
        shards, layout = data
        logits = jax.tree.map(
            lambda parts, lay: jax.make_array_from_single_device_arrays(
                lay[0], lay[1], [jax.device_put(x, d) for d, x in parts]),
            shards, layout, is_leaf=lambda x: isinstance(x, list))
        return logits, shd.to_global({"valid": meta["valid"], "label": meta["label"]}, self.mesh), meta


class Predictor:
    """Probabilities, threshold statistics, pseudo-labels and confusion matrices of a model on
    batch-sharded padded batches (``EvalIterator`` batches made global with ``to_global``)."""

    def __init__(self, model, num_classes: int, mesh, canvas: tuple[int, int],
                 scales: Sequence[float] = (1.0,), flip: bool = True):
        self.model, self.num_classes, self.mesh = model, num_classes, mesh
        self.canvas = tuple(int(c) for c in canvas)
        self.scales, self.flip = tuple(float(s) for s in scales), bool(flip)
        self._rep, self._data = shd.replicated(mesh), shd.batch_sharded(mesh)
        self._jit_cache: dict = {}

    # ------------------------------------------------------------------ traced pieces
    def _views(self):
        """(input size, flipped) of every network run, in averaging order."""
        for s in self.scales:
            size = (max(8, round(self.canvas[0] * s)), max(8, round(self.canvas[1] * s)))
            for flipped in ((False, True) if self.flip else (False,)):
                yield size, flipped

    def logits(self, variables, images) -> tuple:
        """The network's raw outputs (B, h, w, C) at its output stride, one per scale and flip
        (of the flipped input where flipped), in the model's dtype."""
        x = images.astype(jnp.float32)
        out = []
        for size, flipped in self._views():
            xs = x if size == self.canvas else _resize_images(x, size)
            out.append(self.model.apply(variables, xs[:, :, ::-1] if flipped else xs, train=False))
        return tuple(out)

    def probs_from_logits(self, logits: tuple):
        """(B, H, W, C) float32 probabilities averaged over scales and flips, from :meth:`logits`."""
        total = 0.0
        for out, (_, flipped) in zip(logits, self._views()):
            out = out[:, :, ::-1] if flipped else out
            up = losses.resize_bilinear_align_corners(out.astype(jnp.float32), self.canvas)
            total = total + jax.nn.softmax(up, axis=-1)
        return total / len(logits)

    def probs(self, variables, images):
        """(B, H, W, C) float32 probabilities averaged over scales and flips."""
        return self.probs_from_logits(self.logits(variables, images))

    def _jit(self, key, fn, **kw):
        if key not in self._jit_cache:
            self._jit_cache[key] = jax.jit(fn, **kw)
        return self._jit_cache[key]

    # ------------------------------------------------------------------ programs
    def programs(self, soft: SoftLabelling | None = None, subsample: int = 1) -> PassPrograms:
        """The jitted programs every pseudo-labelling path runs (:class:`PassPrograms`)."""
        c = self.num_classes
        forward = self._jit(("forward",), self.logits, out_shardings=self._data)

        def histogram(refine):
            hist = selection.histogram_step(self.mesh, refine, subsample)

            def step(acc, bins, logits, valid, prior):
                return hist(acc, bins, self.probs_from_logits(logits), valid, prior)

            return self._jit(("hist", refine, subsample), step, donate_argnums=0)

        if soft is None:
            def label(logits, valid, gt, lam, prior):
                probs = self.probs_from_logits(logits)
                lab = selection.select_pseudo_labels(probs, lam, prior)
                lab = jnp.where(valid, lab, IGNORE_INDEX).astype(jnp.uint8)
                return LabelledBatch(lab, *_selection_counts(lab, gt, valid, c)), _entropy_sum(probs, valid)

            labels = self._jit(("labels",), label,
                               out_shardings=(LabelledBatch(self._data, *[self._rep] * 3), self._rep))
        else:
            kind, alpha, stride, keep = soft.kind, float(soft.alpha), int(soft.stride), soft.keep

            def label(logits, valid, gt, lam, prior):
                del prior  # LR* labels use the class thresholds only
                probs = self.probs_from_logits(logits)
                y = crst.soft_pseudo_labels(probs, lam, kind=kind, alpha=alpha, keep=keep)
                lab, top, cells = soft_labels.encode(jnp.where(valid[..., None], y, 0.0), stride)
                return SoftLabelledBatch(lab, top, cells, *_selection_counts(lab, gt, valid, c)), _entropy_sum(
                    probs, valid)

            labels = self._jit(("soft", kind, alpha, stride, keep), label,
                               out_shardings=(SoftLabelledBatch(*[self._data] * 3, *[self._rep] * 3), self._rep))
        return PassPrograms(forward, histogram(False), histogram(True), labels)

    # ------------------------------------------------------------------ one round, one network pass
    def label_split(self, variables, batches_fn: Callable[[], Iterable], portion: float, policy: str,
                    prior=None, subsample: int = 1, write_fn: Callable | None = None, *,
                    soft: SoftLabelling | None = None, device_bytes: int | None = None,
                    host_bytes: int | None = None, desc: str | None = None,
                    total: int | None = None) -> LabellingResult:
        """Thresholds at ``portion`` (``policy`` "cbst" | "st", ``prior``, ``subsample`` as
        :meth:`thresholds`) and the pseudo-labels of every batch, running the network once per
        batch, scale and flip.

        ``batches_fn()`` returns a fresh iterator of ``(global batch, host batch)`` pairs (as
        ``evaluate`` takes; keys ``image``, ``valid``, ``label``, ...). Pass 1 runs the network,
        takes the coarse histogram and keeps the logits; pass 2 (fine histogram) and pass 3
        (labels) read them back. For each labelled batch ``write_fn(host_batch, labelled)`` is
        called, ``labelled`` a :class:`LabelledBatch` or, with ``soft``, a
        :class:`SoftLabelledBatch` (write rows with :func:`local_rows`); the host batch is the
        one pass 1 saw, without its image.

        Memory, stated and bounded: the kept logits take at most ``device_bytes`` per device
        (default: ``DEVICE_CACHE_FRACTION`` of the least free device memory reported by
        ``device.memory_stats()``; 0 where none is reported, as on CPU) and, for the batches
        that do not fit there, at most ``host_bytes`` of this host's RAM (default
        ``HOST_CACHE_FRACTION`` of ``MemAvailable``), which also holds every kept batch's host
        batch without its image (about 2 bytes per pixel). Batches beyond both budgets are not
        kept; if there are any, passes 2 and 3 iterate ``batches_fn()`` again and recompute
        those batches' logits (the three-pass path). Per batch of B images the logits take
        ``B * C * sum_scales(h_s * w_s) * flips * itemsize`` bytes (h_s, w_s the network's
        output size at scale s; float32 DeepLab-v2 on 1024x2048, 19 classes: 5.0 MB per image
        for scale 1 + flip, 16.3 MB for MST 0.9/1.0/1.2 + flip). Beyond the cache, device
        memory is one batch's network temporaries and two (C, 65536) int32 histograms. Which
        path was taken and how many bytes it kept is logged (one line) and returned in
        :attr:`LabellingResult.cache`.
        """
        progs = self.programs(soft, subsample)
        dev_budget = (_free_device_bytes(self.mesh.local_devices) * DEVICE_CACHE_FRACTION
                      if device_bytes is None else device_bytes)
        host_budget = _available_host_bytes() * HOST_CACHE_FRACTION if host_bytes is None else host_bytes
        cache = _LogitsCache(self.mesh, _agreed_minimum(int(dev_budget)), _agreed_minimum(int(host_budget)))
        state = {"calls": 0, "filled": False}
        show = jax.process_index() == 0

        def forward(images):
            state["calls"] += 1
            return progs.forward(variables, images)

        def batches(name):
            """(logits, global batch, host batch) of every batch; pass 1 fills the cache."""
            if not state["filled"]:
                it = tqdm(batches_fn(), desc=f"{desc} λ (1/2)" if desc else None, total=total,
                          disable=not (show and desc), leave=False)
                for batch, host in it:
                    logits = forward(batch["image"])
                    cache.add(logits, batch, host)
                    yield logits, batch, host
                state["filled"] = True
                _log_cache(cache, state["calls"])
                return
            source = iter(batches_fn()) if cache.count("recompute") else None
            for k in tqdm(range(len(cache.slots)), desc=f"{desc} {name}" if desc else None,
                          disable=not (show and desc), leave=False):
                batch, host = next(source) if source is not None else (None, None)
                kept = cache.get(k)
                yield (forward(batch["image"]), batch, host) if kept is None else kept

        def run_pass(bins):
            step = progs.fine if bins is not None else progs.coarse
            args = ((logits, batch["valid"], prior) for logits, batch, _ in batches("λ (2/2)"))
            return selection.histogram_pass(step, args, self.num_classes, bins, self._rep)

        lam, class_counts = selection.two_pass_thresholds(run_pass, portion, policy)
        lam_dev = jax.device_put(lam, self._rep)
        c = self.num_classes
        picked, correct, valid_n, entropy = np.zeros(c, np.int64), np.zeros(c, np.int64), 0, 0.0
        for logits, batch, host in batches("labels"):
            out, entropy_sum = progs.labels(logits, batch["valid"], batch["label"], lam_dev, prior)
            if write_fn is not None:
                write_fn(host, out)
            picked += np.asarray(out.selected, np.int64)
            correct += np.asarray(out.correct, np.int64)
            valid_n += int(out.valid)
            entropy += float(entropy_sum)
        report = CacheReport(cache.count("device"), cache.count("host"), cache.count("recompute"),
                             cache.device_bytes, cache.host_bytes, cache.device_budget, cache.host_budget,
                             state["calls"])
        return LabellingResult(lam, class_counts, picked, correct, valid_n, report,
                               mean_entropy=entropy / valid_n if valid_n else float("nan"))

    # ------------------------------------------------------------------ per-pass pieces (three-pass path)
    def threshold_statistics(self, variables, batches_fn, prior=None, bins=None, subsample: int = 1):
        """One histogram pass over ``batches_fn()`` (global batches); int64 (C, 65536) counts.
        ``bins`` None is the coarse pass, ``RefinementTarget.bins`` the fine one."""
        progs = self.programs(subsample=subsample)
        step = progs.fine if bins is not None else progs.coarse
        batches = ((progs.forward(variables, b["image"]), b["valid"], prior) for b in batches_fn())
        return selection.histogram_pass(step, batches, self.num_classes, bins, self._rep)

    def thresholds(self, variables, batches_fn, portion: float, policy: str, prior=None,
                   subsample: int = 1) -> selection.ClassThresholds:
        """Exact λ (C,) over a whole split (two streaming passes, the network in each) and
        per-class pixel counts. :meth:`label_split` does this and the labels with one network
        pass per image."""
        return selection.two_pass_thresholds(
            lambda bins: self.threshold_statistics(variables, batches_fn, prior, bins, subsample), portion, policy)

    def pseudo_labels(self, variables, batch, thresholds, prior=None) -> LabelledBatch:
        """CBST hard pseudo-labels of one global batch (:class:`LabelledBatch`)."""
        progs = self.programs()
        lam = jax.device_put(np.asarray(thresholds, np.float32), self._rep)
        return progs.labels(progs.forward(variables, batch["image"]), batch["valid"], batch["label"], lam, prior)[0]

    def soft_pseudo_labels(self, variables, batch, thresholds, *, kind: str, alpha: float, stride: int,
                           keep: str = "objective") -> SoftLabelledBatch:
        """CRST LR* labelling of one global batch (:class:`SoftLabelledBatch`, cells at
        ``stride``); ``keep``: which pixels are kept (``cbst_jax.crst.soft_pseudo_labels``)."""
        progs = self.programs(SoftLabelling(kind, alpha, stride, keep))
        lam = jax.device_put(np.asarray(thresholds, np.float32), self._rep)
        return progs.labels(progs.forward(variables, batch["image"]), batch["valid"], batch["label"], lam, None)[0]

    # ------------------------------------------------------------------ evaluation
    def confusion(self, variables, batch, return_pred: bool = False):
        """(C, C + 1) int32 confusion matrix of one batch (``metrics.confusion_matrix``; and the
        uint8 predictions if asked)."""
        c = self.num_classes

        def step(variables, images, labels, valid):
            pred = jnp.argmax(self.probs(variables, images), axis=-1)
            cm = metrics.confusion_matrix(labels, pred, c, IGNORE_INDEX, valid)
            return cm, jnp.where(valid, pred, IGNORE_INDEX).astype(jnp.uint8)

        fn = self._jit(("cm",), step, out_shardings=(self._rep, self._data))
        cm, pred = fn(variables, batch["image"], batch["label"], batch["valid"])
        return (cm, pred) if return_pred else cm

    def evaluate(self, variables, batches: Iterable, keep_predictions: int = 0, *,
                 desc: str | None = None, total: int | None = None) -> Evaluation:
        """Confusion matrix (int64) over all ``(global batch, host batch)`` pairs, plus the first
        ``keep_predictions`` predictions (host numpy, cropped to each record) for figures. With
        ``desc``, a tqdm bar (``total`` batches) on process 0."""
        acc, kept = metrics.ConfusionAccumulator(self.num_classes), []
        if desc is not None:
            batches = tqdm(batches, desc=desc, total=total, disable=jax.process_index() != 0, leave=False)
        for batch, host_batch in batches:
            cm, pred = self.confusion(variables, batch, return_pred=True)
            acc.add(cm)
            if len(kept) < keep_predictions:
                for row, lab in local_rows(pred, host_batch):
                    if len(kept) < keep_predictions:
                        kept.append(lab)
        return Evaluation(acc.total, kept)


def _log_cache(cache: _LogitsCache, forward_calls: int) -> None:
    total = len(cache.slots)
    _log.info("pseudo-labelling cache: %d of %d batches on the devices (%d bytes per device, budget %d), "
              "%d in host RAM (%d bytes on this host with the host batches, budget %d), %d recomputed in "
              "passes 2-3; %d network runs in pass 1", cache.count("device"), total, cache.device_bytes,
              cache.device_budget, cache.count("host"), cache.host_bytes, cache.host_budget,
              cache.count("recompute"), forward_calls)


def local_rows(global_labels, host_batch, stride: int = 1):
    """(host row, map cropped to the record's valid region) for this host's real rows; with
    ``stride`` > 1 the maps are cell grids and keep ⌈h/stride⌉ x ⌈w/stride⌉ cells."""
    out = []
    offset = jax.process_index() * len(host_batch["index"])
    for shard in global_labels.addressable_shards:
        start = shard.index[0].start or 0
        data = np.asarray(shard.data)
        for k in range(data.shape[0]):
            row = start + k - offset
            if 0 <= row < len(host_batch["index"]) and host_batch["index"][row] >= 0:
                valid = host_batch["valid"][row]
                h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
                out.append((row, data[k, :-(-h // stride), :-(-w // stride)]))
    out.sort(key=lambda t: t[0])
    return out
