"""Throughput and peak memory of pseudo-label selection: cbst_jax vs the numpy per-class sort.

    python -m benchmarks.bench_selection --pixels 5e7

Two workloads, each run by both implementations in its own subprocess (so peak RSS is
clean), best of ``--repeats`` timings:

* ``confidence``: thresholds only, from precomputed confidence (float32) and argmax
  (uint8) maps of all pixels, the reference's layout. numpy: boolean mask + sort per
  class (``/work/shared/bench/anchor_kc_numpy.py``). cbst_jax: ``thresholds_from_confidence``
  (two histogram passes) on maps already on device (``cbst_jax``), or on the numpy maps
  with the host->device copy timed (``cbst_jax_host``).
* ``probs``: thresholds + labels from class probabilities (B, 1024, 1024, C) streamed in
  batches cycling over 4 distinct pre-generated maps. numpy: per batch max/argmax kept in
  memory, sort per class, then a second pass of ``argmax(p / lambda)``. cbst_jax: the maps
  on device (a model's outputs are), ``streaming_class_thresholds`` (two passes) then
  ``select_pseudo_labels`` (third pass).

Timings are the best of ``--repeats`` calls after a first, untimed call (reported apart: for
cbst_jax it includes JIT compilation). Peak memory = peak RSS of the worker over all calls
minus its RSS once the inputs exist (Linux ``VmHWM``, reset after building the inputs).
Both implementations must return identical thresholds and, in the probs workload, identical
labels (a SHA-256 of the labels of the distinct maps, computed after the timings).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time

import numpy as np

POOL = 4  # distinct probability maps in the probs workload
SIDE = 1024  # images are SIDE x SIDE pixels


def _memory_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def numpy_sort_thresholds(conf, pred, num_classes, portion):
    """The anchor's definition: per class, descending sort, element floor(N p) - 1, else 1."""
    lam = np.ones(num_classes, np.float32)
    for c in range(num_classes):
        v = np.sort(conf[pred == c])[::-1]
        k = int(np.floor(v.size * portion))
        if k > 0:
            lam[c] = v[k - 1]
    return lam


def _confidence_inputs(n, num_classes):
    rng = np.random.default_rng(0)
    return rng.random(n, dtype=np.float32), rng.integers(0, num_classes, n, dtype=np.uint8)


def _probs_pool(num_classes, images):
    rng = np.random.default_rng(0)
    pool = []
    for _ in range(POOL):
        logits = rng.standard_normal((images, SIDE, SIDE, num_classes), dtype=np.float32) * 2
        p = np.exp(logits - logits.max(-1, keepdims=True))
        pool.append(p / p.sum(-1, keepdims=True))
    return pool


def _worker(args):
    num_classes, portion = args.classes, args.portion
    label_maps = None  # probs workload: lam -> the labels of the distinct maps (checked, untimed)
    if args.workload == "confidence":
        conf, pred = _confidence_inputs(args.pixels, num_classes)
        n = conf.size
        if args.impl == "numpy":
            run = lambda: numpy_sort_thresholds(conf, pred, num_classes, portion)
        else:
            import jax

            from cbst_jax import selection as sel

            if args.impl == "cbst_jax":  # maps already on device, as a model's outputs are
                conf, pred = jax.device_put(conf), jax.device_put(pred)
            run = lambda: sel.thresholds_from_confidence(conf, pred, num_classes, portion)
    else:
        images = max(1, args.batch_pixels // (SIDE * SIDE))
        pool = _probs_pool(num_classes, images)
        num_batches = max(1, round(args.pixels / (images * SIDE * SIDE)))
        n = num_batches * images * SIDE * SIDE
        batches = lambda: (pool[i % POOL] for i in range(num_batches))
        if args.impl == "numpy":

            def run():
                conf = np.empty(n, np.float32)
                pred = np.empty(n, np.uint8)
                for i, p in enumerate(batches()):
                    s = slice(i * p[..., 0].size, (i + 1) * p[..., 0].size)
                    conf[s], pred[s] = p.max(-1).ravel(), p.argmax(-1).ravel()
                lam = numpy_sort_thresholds(conf, pred, num_classes, portion)
                for p in batches():
                    ratio = p / lam
                    np.where(ratio.max(-1) >= 1, ratio.argmax(-1), 255).astype(np.uint8)
                return lam

            def label_maps(lam):
                return [np.where((p / lam).max(-1) >= 1, (p / lam).argmax(-1), 255).astype(np.uint8) for p in pool]
        else:
            import jax

            from cbst_jax import selection as sel

            pool = [jax.device_put(p) for p in pool]  # on device, as a model's outputs are

            def run():
                lam = sel.streaming_class_thresholds(lambda: ((p, None) for p in batches()),
                                                     num_classes, portion)
                labels = [sel.select_pseudo_labels(p, lam) for p in batches()]
                jax.block_until_ready(labels)
                return lam

            def label_maps(lam):
                return [np.asarray(sel.select_pseudo_labels(p, lam)) for p in pool]

    _reset_peak()
    base = _memory_mib("VmRSS")
    t = time.perf_counter()
    run()  # first call: includes JIT compilation for cbst_jax
    first = time.perf_counter() - t
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        lam = run()
        times.append(time.perf_counter() - t)
    print(json.dumps(dict(workload=args.workload, impl=args.impl, pixels=n, seconds=min(times),
                          first_call_s=first, mpix_per_s=n / min(times) / 1e6,
                          peak_mib=_memory_mib("VmHWM") - base,
                          thresholds=np.asarray(lam).tolist(),
                          labels_sha256=None if label_maps is None else hashlib.sha256(
                              b"".join(x.tobytes() for x in label_maps(np.asarray(lam, np.float32)))).hexdigest())))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pixels", type=float, default=5e7)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--portion", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-pixels", type=int, default=SIDE * SIDE, help="pixels per probs batch")
    ap.add_argument("--workloads", default="confidence,probs")
    ap.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.pixels = int(args.pixels)
    if args.worker:
        args.workload, args.impl = args.worker
        return _worker(args)

    import jax  # only for the versions and backend in the record

    rows = []
    impls = dict(confidence=("numpy", "cbst_jax", "cbst_jax_host"), probs=("numpy", "cbst_jax"))
    for workload in args.workloads.split(","):
        for impl in impls[workload]:
            cmd = [sys.executable, "-m", "benchmarks.bench_selection", "--worker", workload, impl,
                   "--pixels", str(args.pixels), "--classes", str(args.classes),
                   "--portion", str(args.portion), "--repeats", str(args.repeats),
                   "--batch-pixels", str(args.batch_pixels)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'workload':<11} {'impl':<14} {'pixels':>11} {'1st call s':>10} {'seconds':>8} "
          f"{'Mpix/s':>8} {'peak MiB':>9} {'speed-up':>8} {'same λ':>9} {'same labels':>11}")
    summary = {}
    for r in rows:
        ref = next(x for x in rows if x["workload"] == r["workload"] and x["impl"] == "numpy")
        r["speedup"] = ref["seconds"] / r["seconds"]
        r["identical_thresholds"] = ref["thresholds"] == r["thresholds"]
        r["identical_labels"] = ref["labels_sha256"] == r["labels_sha256"]
        print(f"{r['workload']:<11} {r['impl']:<14} {r['pixels']:>11,} {r['first_call_s']:>10.3f} "
              f"{r['seconds']:>8.3f} {r['mpix_per_s']:>8.1f} {r['peak_mib']:>9.0f} "
              f"{r['speedup']:>7.1f}x {r['identical_thresholds']!s:>9} {r['identical_labels']!s:>11}")
        summary[f"{r['workload']}/{r['impl']}"] = dict(
            pixels=r["pixels"], seconds=round(r["seconds"], 3), mpix_s=round(r["mpix_per_s"], 1),
            first_call_s=round(r["first_call_s"], 3), peak_mib=round(r["peak_mib"]),
            speedup=round(r["speedup"], 2), identical_thresholds=r["identical_thresholds"],
            identical_labels=r["identical_labels"])
    if not all(r["identical_thresholds"] and r["identical_labels"] for r in rows):
        raise SystemExit("thresholds or labels differ between implementations")
    print(json.dumps(dict(bench="selection", backend=jax.default_backend(), jax=jax.__version__,
                          numpy=np.__version__, machine=platform.machine(), classes=args.classes,
                          portion=args.portion, repeats=args.repeats, results=summary)))


if __name__ == "__main__":
    main()
