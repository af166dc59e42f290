"""Host input pipeline: the mixed source/target training stream of a self-training round, and
fixed-shape evaluation / pseudo-labelling batches.

Every batch is a pure function of (seed, round, epoch, step): a record's augmentation is drawn
from a ``np.random.Generator`` seeded by (seed, round, epoch, domain, record index, repeat), so the
iterator state is two integers (epoch, step), resuming is exact, and each host can build just its
own rows of a global batch (``jax.process_index()``), which ``cbst_jax.sharding.to_global``
assembles into one batch-sharded array. Training crops are cut crop-first (``augment``): only the
window of each record is resized and only its labels remapped.

Training batches are built in worker processes with grain (``MapDataset.range(k0, ...).map(batch
k).mp_prefetch``, the ecosystem's standard: batches come back in order through shared memory),
threads where grain is not installed. Processes, measured (``benchmarks/bench_pipeline.py``,
docs/performance.md): the fastest PNG decoder, pyspng, holds the GIL (so threads must decode with
Pillow: 1.8-2.0x instead of 2.1-2.3x the previous pipeline's crops/s per core), and with threads
every crop costs the training process ~45 ms of CPU under its GIL, against 0.7-0.8 ms per crop
to take the batches from worker processes.

Batches are dicts of numpy arrays; images stay uint8 until they reach the device.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
import sys
from typing import Callable

import numpy as np

from cbst_jax.data import augment as aug
from cbst_jax.data.io import DatasetError
from cbst_jax.labels import IGNORE_INDEX
from cbst_jax.methods import portion_at

SOURCE, TARGET = 0, 1


# ----------------------------------------------------------------- source-subset schedule
def source_portion(round_idx: int, s0: float = 0.03, ds: float = 0.0025, s_max: float = 0.06) -> float:
    """Portion of the source set used in round ``round_idx`` (reference §3): min(s0 + r·ds, s_max),
    the self-paced schedule of the target portion applied to the source."""
    return portion_at((s0, ds, s_max), round_idx)


def source_subset(num_source: int, round_idx: int, *, s0: float = 0.03, ds: float = 0.0025,
                  s_max: float = 0.06, seed: int = 0, schedule: str = "cumulative") -> np.ndarray:
    """Sorted source indices of round ``round_idx``.

    ``"cumulative"`` (CBST): one permutation from ``seed``; round r takes its first
    ``portion·N`` entries, so the subsets are nested and grow. ``"fresh"`` (CRST): a new random
    subset per round (seed + r).
    """
    n = max(1, min(num_source, int(num_source * source_portion(round_idx, s0, ds, s_max))))
    if schedule == "cumulative":
        perm = np.random.default_rng(seed).permutation(num_source)
    elif schedule == "fresh":
        perm = np.random.default_rng(seed + round_idx).permutation(num_source)
    else:
        raise ValueError(f"unknown source-subset schedule {schedule!r} (cumulative | fresh)")
    return np.sort(perm[:n])


# ----------------------------------------------------------------- mixed sampler
@dataclasses.dataclass(frozen=True)
class MixedSampler:
    """Which (domain, index) rows make up global batch ``step`` of ``epoch``.

    ``"pooled"`` (CBST): each epoch is a permutation of the union of the source subset and the
    target set, cut into batches (remainder dropped); batches may be source-only, target-only or
    mixed. ``"paired"``: each batch has ``source_per_batch`` source rows and the rest target;
    an epoch is one pass over the target set, the source subset is cycled (reshuffled each
    pass), and rows are interleaved so any contiguous host slice gets its share of both.
    """
    source_indices: tuple
    num_target: int
    batch_size: int
    mode: str = "pooled"
    source_per_batch: int | None = None
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "source_indices", tuple(int(i) for i in self.source_indices))
        if self.mode not in ("pooled", "paired"):
            raise ValueError(f"unknown sampler mode {self.mode!r} (pooled | paired)")
        if self.mode == "paired":
            ns = self.batch_size // 2 if self.source_per_batch is None else self.source_per_batch
            object.__setattr__(self, "source_per_batch", int(ns))
            if not 0 <= ns <= self.batch_size:
                raise ValueError("source_per_batch must be within [0, batch_size]")
            if (ns and not self.source_indices) or (ns < self.batch_size and not self.num_target):
                raise ValueError("paired batches need both a source subset and a target set")
        if self.batches_per_epoch() < 1:
            raise ValueError("fewer records than one batch")

    @property
    def num_source(self) -> int:
        return len(self.source_indices)

    def batches_per_epoch(self) -> int:
        if self.mode == "pooled":
            return (self.num_source + self.num_target) // self.batch_size
        nt = self.batch_size - self.source_per_batch
        return self.num_target // nt if nt else self.num_source // self.source_per_batch

    def _epoch_rows(self, epoch: int):
        """(domain int8, index int32, repeat int32) arrays of the epoch, batch-major."""
        bpe, b = self.batches_per_epoch(), self.batch_size
        src = np.asarray(self.source_indices, np.int64)
        if self.mode == "pooled":
            dom = np.concatenate([np.zeros(len(src), np.int8), np.ones(self.num_target, np.int8)])
            idx = np.concatenate([src, np.arange(self.num_target)])
            perm = np.random.default_rng([self.seed, epoch, 0]).permutation(len(idx))[:bpe * b]
            return dom[perm], idx[perm].astype(np.int32), np.zeros(len(perm), np.int32)
        ns, nt = self.source_per_batch, b - self.source_per_batch
        need = bpe * ns
        passes = math.ceil(need / len(src)) if need else 0
        s_idx = np.concatenate([src[np.random.default_rng([self.seed, epoch, 1, j]).permutation(len(src))]
                                for j in range(passes)] or [np.zeros(0, np.int64)])[:need]
        s_rep = np.repeat(np.arange(passes, dtype=np.int32), len(src))[:need]
        t_idx = np.random.default_rng([self.seed, epoch, 2]).permutation(self.num_target)[:bpe * nt]
        # Interleave rows evenly: source k sits at key (k + 0.5) / ns, target k at (k + 0.5) / nt.
        keys = np.concatenate([(np.arange(ns) + 0.5) / max(ns, 1), (np.arange(nt) + 0.5) / max(nt, 1)])
        order = np.argsort(keys, kind="stable")
        dom = np.concatenate([np.zeros(ns, np.int8), np.ones(nt, np.int8)])[order]
        idx = np.concatenate([s_idx.reshape(bpe, ns), t_idx.reshape(bpe, nt)], axis=1)[:, order]
        rep = np.concatenate([s_rep.reshape(bpe, ns), np.zeros((bpe, nt), np.int32)], axis=1)[:, order]
        return np.tile(dom, bpe), idx.reshape(-1).astype(np.int32), rep.reshape(-1)

    def batch(self, epoch: int, step: int):
        """(domain, index, repeat) arrays of global batch ``step`` of ``epoch``."""
        cache = self.__dict__.get("_cache")
        if cache is None or cache[0] != epoch:
            cache = (epoch, self._epoch_rows(epoch))
            object.__setattr__(self, "_cache", cache)
        sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
        return tuple(a[sl] for a in cache[1])


def round_sampler(num_source: int, num_target: int, round_idx: int, *, batch_size: int,
                  mode: str = "pooled", source_per_batch: int | None = None, s0: float = 0.03,
                  ds: float = 0.0025, s_max: float = 0.06, subset_schedule: str = "cumulative",
                  seed: int = 0) -> MixedSampler:
    """The sampler of self-training round ``round_idx``: its source subset (schedule above)
    and a shuffling seed distinct per round."""
    subset = source_subset(num_source, round_idx, s0=s0, ds=ds, s_max=s_max, seed=seed,
                           schedule=subset_schedule) if num_source else np.zeros(0, np.int64)
    return MixedSampler(tuple(subset), num_target, batch_size, mode, source_per_batch,
                        seed=int(np.random.SeedSequence([seed, round_idx]).generate_state(1)[0]))


def host_rows(global_batch: int, process_index, process_count) -> slice:
    import jax  # only here: the pipeline itself never touches devices

    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if global_batch % pc:
        raise ValueError(f"global batch {global_batch} does not split over {pc} processes")
    n = global_batch // pc
    return slice(pi * n, (pi + 1) * n)


def global_eval_batch(requested: int, devices: int) -> int:
    """The global batch of evaluation and pseudo-labelling (``input.eval_batch_size``): rounded up
    to a multiple of the device count (padded rows carry no pixels: :class:`EvalIterator`)."""
    return max(devices, -(-requested // devices) * devices)


def default_workers() -> int:
    """Worker count when none is given: every core this process may run on but one (left to the
    training loop), at least one."""
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return max(1, cores - 1)


def _grain():
    """The grain module, or None when it is not installed."""
    try:
        import grain
    except ImportError:
        return None
    return grain


class ThreadPrefetcher:
    """Builds ``make(k)`` for the next keys k, k+1, ... ahead on a thread pool, strictly in order."""

    def __init__(self, make: Callable, depth: int, workers: int, stop: int | None = None):
        self._make, self._depth, self._stop = make, max(0, int(depth)), stop
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers)) if self._depth else None
        self._queue = collections.deque()

    def get(self, key: int):
        if self._pool is None:
            return self._make(key)
        if not self._queue or self._queue[0][0] != key:
            self.reset()
        last = key + self._depth if self._stop is None else min(key + self._depth, self._stop - 1)
        for k in range(key + len(self._queue), last + 1):
            self._queue.append((k, self._pool.submit(self._make, k)))
        return self._queue.popleft()[1].result()

    def reset(self):
        for _, f in self._queue:
            f.cancel()
        self._queue.clear()

    def close(self):
        self.reset()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _init_worker(worker_index: int, worker_count: int) -> None:
    """Worker processes each stand for one core: OpenCV's own thread pool would oversubscribe them.
    A terminal's Ctrl-C reaches every process of the group: the workers ignore it, the training
    process stops the run (one line, ``cbst_jax.cli.run``) and closes them."""
    import signal

    import cv2

    cv2.setNumThreads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _ProcessPrefetcher:
    """Builds ``make(k)`` for k, k+1, ... in ``workers`` grain worker processes (spawned; ``make``
    is pickled to them), returned in order through shared memory. A key out of sequence (a
    restored iterator state) restarts the workers at it."""

    def __init__(self, make: Callable, depth: int, workers: int):
        self._make, self._depth, self._workers = make, max(1, int(depth)), int(workers)
        self._iterator, self._next = None, None

    def get(self, key: int):
        if self._iterator is None or self._next != key:
            self.reset()
            self._iterator = iter(self._dataset(key))
        self._next = key + 1
        return {k: np.asarray(v) for k, v in next(self._iterator).items()}

    def _dataset(self, start: int):
        from absl import flags

        grain = _grain()
        if not flags.FLAGS.is_parsed():  # grain reads its absl flags even outside an absl app (google/grain#1355)
            flags.FLAGS.mark_as_parsed()
        ds = grain.MapDataset.range(start, sys.maxsize).map(self._make)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))  # workers build, no threads
        options = grain.MultiprocessingOptions(num_workers=self._workers, per_worker_buffer_size=self._depth)
        return ds.mp_prefetch(options, worker_init_fn=_init_worker)

    def reset(self):
        if self._iterator is not None:
            self._iterator.close()
        self._iterator, self._next = None, None

    close = reset


def _parallelism(prefetch: int, workers: int | None, processes: bool | None) -> tuple[str, int]:
    """("processes" | "threads" | "none", worker count) of an iterator's settings (docstrings below)."""
    workers = default_workers() if workers is None or workers < 0 else int(workers)
    if workers == 0 or prefetch <= 0:
        if processes:
            raise ValueError("processes=True needs workers > 0 and prefetch > 0")
        return "none", 0
    if processes is None:
        processes = _grain() is not None
    if processes and _grain() is None:
        raise ImportError("processes=True needs grain (pip install grain); pass processes=False for threads")
    return ("processes" if processes else "threads"), workers


# ----------------------------------------------------------------- training iterator
class Closing:
    """Context-manager support for the iterators: closing stops their prefetch workers."""

    def close(self):
        self._prefetch.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclasses.dataclass(frozen=True)
class _Record:
    """A record as the crop needs it: the image, the label ids and their table (None when the ids
    are trainIds already)."""
    image: np.ndarray
    label: np.ndarray | None = None
    table: np.ndarray | None = None


def read_record(source, index: int, label: bool, decoder: str) -> _Record:
    """Record ``index`` of ``source``: through ``raw_record`` when the source has one (folder
    readers: labels not yet remapped, so only the crop is; images decoded by ``decoder``), else
    ``source[index]``."""
    raw = getattr(source, "raw_record", None)
    if raw is not None:
        rec = raw(index, label=label, decoder=decoder)
        return _Record(rec["image"], rec.get("label_ids"), rec.get("label_table"))
    rec = source[index]
    return _Record(rec["image"], rec["label"] if label else None)


@dataclasses.dataclass(frozen=True)
class _CropBatches:
    """Host batch ``k`` of a :class:`MixedIterator` (k = epoch · batches_per_epoch + step), a pure
    function of k and the settings; picklable, as worker processes run it."""
    source: object
    target: object
    sampler: MixedSampler
    rows: slice
    crop_size: tuple
    target_labels: Callable | None
    scale_range: tuple          # source rows
    target_scale_range: tuple   # target rows
    flip: bool
    mine_classes: tuple
    p_mine: float
    mine_domains: tuple
    target_soft_labels: Callable | None
    soft_stride: int
    num_classes: int | None
    decoder: str

    def record(self, domain: int, index: int, epoch: int, repeat: int = 0, out=None):
        """One augmented (image, label) pair - (image, label, soft uint8 or None for source rows)
        with soft labels - a pure function of its arguments and the seeds; written into ``out``
        = (image slot, label slot) when given."""
        soft = self.target_soft_labels is not None
        if domain == SOURCE:
            rec = read_record(self.source, index, True, self.decoder)
        else:
            rec = read_record(self.target, index, False, self.decoder)
            rec = _Record(rec.image, np.asarray(self.target_labels(index), np.uint8))
            if rec.label.shape != rec.image.shape[:2]:
                raise ValueError(f"pseudo-label of target {index} has shape {rec.label.shape}, "
                                 f"image {rec.image.shape[:2]}")
        rng = np.random.default_rng([self.sampler.seed, epoch, domain, index, repeat])
        out = aug.augment(rng, rec.image, rec.label, crop_size=self.crop_size,
                          scale_range=self.scale_range if domain == SOURCE else self.target_scale_range,
                          flip=self.flip, mine_classes=self.mine_classes if domain in self.mine_domains else (),
                          p_mine=self.p_mine,
                          label_table=rec.table, return_geometry=soft, out=out)
        if not soft:
            return out
        image, label, geometry = out
        if domain == SOURCE:  # source rows train on their hard labels: no soft label
            return image, label, None
        from cbst_jax import soft_labels  # imported only by LR* rounds (it imports jax)

        top, cells = self.target_soft_labels(index)
        expect = tuple(-(-n // self.soft_stride) for n in geometry.size) + (self.num_classes,)
        if cells.shape != expect or top.shape != geometry.size:
            raise ValueError(f"soft pseudo-label of target {index} has shapes {top.shape}, {cells.shape}; expected "
                             f"{geometry.size}, {expect} (stride {self.soft_stride})")
        dist = soft_labels.compose(label, aug.warp_pixels(np.asarray(top, np.uint8), geometry),
                                   aug.warp_cells(np.asarray(cells, np.uint8), self.soft_stride, geometry,
                                                  normalize=False))
        return image, label, soft_labels.quantize(dist)

    def __call__(self, k: int) -> dict:
        epoch, step = divmod(int(k), self.sampler.batches_per_epoch())
        dom, idx, rep = (a[self.rows] for a in self.sampler.batch(epoch, step))
        b = len(idx)
        images = np.empty((b, *self.crop_size, 3), np.uint8)
        labels = np.empty((b, *self.crop_size), np.uint8)
        out = {"image": images, "label": labels, "domain": dom.copy(), "index": idx.copy()}
        if self.target_soft_labels is not None:
            out["soft_label"] = np.zeros((b, *self.crop_size, self.num_classes), np.uint8)
        for j in range(b):
            parts = self.record(int(dom[j]), int(idx[j]), epoch, int(rep[j]), out=(images[j], labels[j]))
            if len(parts) == 3 and parts[2] is not None:
                out["soft_label"][j] = parts[2]
        return out


class MixedIterator(Closing):
    """Infinite training stream of host batches for one self-training round.

    Yields ``{"image": uint8 (b, ch, cw, 3), "label": uint8 (b, ch, cw) (255 = ignore),
    "domain": int8 (b,) (0 source, 1 target), "index": int32 (b,) record index}``, where b is
    this host's share of ``sampler.batch_size``. Source labels come from the records, target
    labels from ``target_labels(index)`` (the round's pseudo-labels). With
    ``target_soft_labels(index)`` (CRST LR* rounds: the (top mass, residual cells) pair of
    ``cbst_jax.soft_labels``, cells of stride ``soft_stride``) batches also hold
    ``"soft_label": uint8 (b, ch, cw, num_classes)``, the target crops' soft labels rebuilt
    through the same transform (zero where the hard label is 255, and on source rows).
    ``get_state()`` / ``set_state()`` give ``{"epoch": int, "step": int}``, the position of the
    next batch. Source rows are rescaled within ``scale_range``, target rows within
    ``target_scale_range`` (default: the same); rare-class crops are mined on ``mine_domains``.

    Batches are built ahead, ``prefetch`` per worker, by ``workers`` workers (None or negative:
    :func:`default_workers`; 0, or ``prefetch=0``, builds each batch when asked): grain worker
    processes when ``processes`` (default: whenever grain is installed; the sources and lookups
    are then pickled to them, and ``source.stats`` count in the workers), else threads
    (``parallelism`` says which). Which, and how many, never changes a batch. Worker processes
    and the synchronous mode decode PNGs with pyspng when it is installed, threads with Pillow
    (which releases the GIL; ``cbst_jax.data.io``).
    """

    def __init__(self, source, target, sampler: MixedSampler, *, crop_size: tuple[int, int],
                 target_labels: Callable[[int], np.ndarray] | None = None, scale_range=(0.5, 1.5),
                 target_scale_range=None, flip: bool = True, mine_classes=(), p_mine: float = 0.8,
                 mine_domains=(SOURCE, TARGET), process_index: int | None = None,
                 process_count: int | None = None, prefetch: int = 2, workers: int | None = None,
                 processes: bool | None = None,
                 target_soft_labels: Callable[[int], np.ndarray] | None = None, soft_stride: int = 8,
                 num_classes: int | None = None):
        if sampler.num_target and target_labels is None:
            raise ValueError("target records need a target_labels(index) pseudo-label lookup")
        if target_soft_labels is not None and not num_classes:
            raise ValueError("soft labels need num_classes")
        self.sampler = sampler
        self.parallelism, n = _parallelism(prefetch, workers, processes)
        self._batches = _CropBatches(
            source, target, sampler, host_rows(sampler.batch_size, process_index, process_count),
            tuple(int(c) for c in crop_size), target_labels, tuple(scale_range),
            tuple(scale_range if target_scale_range is None else target_scale_range), bool(flip),
            tuple(int(c) for c in mine_classes), float(p_mine), tuple(int(d) for d in mine_domains),
            target_soft_labels, int(soft_stride), num_classes,
            decoder="pillow" if self.parallelism == "threads" else "pyspng")  # pyspng holds the GIL
        self._epoch, self._step = 0, 0
        self._prefetch = (_ProcessPrefetcher(self._batches, prefetch, n) if self.parallelism == "processes"
                          else ThreadPrefetcher(self._batches, prefetch if n else 0, n))

    @property
    def scale_range(self) -> tuple:
        """The source rows' rescaling range."""
        return self._batches.scale_range

    @property
    def target_scale_range(self) -> tuple:
        return self._batches.target_scale_range

    @property
    def mine_domains(self) -> tuple:
        """The domains whose crops are centred on rare classes."""
        return self._batches.mine_domains

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        bpe = self.sampler.batches_per_epoch()
        batch = self._prefetch.get(self._epoch * bpe + self._step)
        self._epoch, self._step = (self._epoch + 1, 0) if self._step + 1 == bpe else (self._epoch, self._step + 1)
        return batch

    def get_state(self) -> dict:
        return {"epoch": self._epoch, "step": self._step}

    def set_state(self, state: dict) -> None:
        step = int(state["step"])
        if not 0 <= step < self.sampler.batches_per_epoch():
            raise ValueError(f"step {step} outside the epoch of {self.sampler.batches_per_epoch()} batches")
        self._epoch, self._step = int(state["epoch"]), step
        self._prefetch.reset()


# ----------------------------------------------------------------- evaluation / pseudo-labelling
class EvalIterator(Closing):
    """One pass over a source in fixed-shape, padded batches (nothing recompiles).

    Yields ``{"image": uint8 (b, H, W, 3), "label": uint8 (b, H, W), "valid": bool (b, H, W),
    "index": int32 (b,)}``: each record sits at the top-left of an (H, W) ``canvas`` (zeros /
    255 labels / valid False outside it); rows past the end of the source have index -1 and no
    valid pixels. Labels come from ``label_key`` (default "label" when the source has labels,
    otherwise all 255; pass "hidden_label" to score pseudo-labels on synthetic target-train).
    b is this host's share of ``batch_size``; every host sees the same number of batches.
    State: ``{"batch": int}``, the next global batch.
    """

    def __init__(self, source, *, batch_size: int, canvas: tuple[int, int] | None = None,
                 label_key: str | None = None, process_index: int | None = None,
                 process_count: int | None = None, prefetch: int = 2, workers: int = 1):
        self.source, self.batch_size = source, int(batch_size)
        if canvas is None:
            canvas = source[0]["image"].shape[:2]
        self.canvas = tuple(int(c) for c in canvas)
        if label_key is None and getattr(source, "has_labels", True):
            label_key = "label"
        self.label_key = label_key
        self.rows = host_rows(self.batch_size, process_index, process_count)
        self.num_batches = max(1, math.ceil(len(source) / self.batch_size))
        self._batch = 0
        self._prefetch = ThreadPrefetcher(self._make, prefetch, workers, stop=self.num_batches)

    def __len__(self) -> int:
        return self.num_batches

    def _make(self, k):
        H, W = self.canvas
        rows = np.arange(k * self.batch_size, (k + 1) * self.batch_size)[self.rows]
        b = len(rows)
        out = {"image": np.zeros((b, H, W, 3), np.uint8), "label": np.full((b, H, W), IGNORE_INDEX, np.uint8),
               "valid": np.zeros((b, H, W), bool), "index": np.full(b, -1, np.int32)}
        for j, r in enumerate(rows):
            if r >= len(self.source):
                continue
            rec = self.source[int(r)]
            h, w = rec["image"].shape[:2]
            if h > H or w > W:
                name = f" ({self.source.names[int(r)]})" if hasattr(self.source, "names") else ""
                raise DatasetError(f"record {r}{name} is {h}x{w}, larger than the {H}x{W} canvas of evaluation and "
                                   f"pseudo-labelling batches (config.input.eval_size)")
            out["image"][j, :h, :w] = rec["image"]
            if self.label_key is not None:
                out["label"][j, :h, :w] = rec[self.label_key]
            out["valid"][j, :h, :w] = True
            out["index"][j] = r
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._batch >= self.num_batches:
            raise StopIteration
        batch = self._prefetch.get(self._batch)
        self._batch += 1
        return batch

    def get_state(self) -> dict:
        return {"batch": self._batch}

    def set_state(self, state: dict) -> None:
        self._batch = int(state["batch"])
        self._prefetch.reset()
