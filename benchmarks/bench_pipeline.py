"""Training crops per second per core of the host input pipeline, in one run: the previous pipeline
(rescale whole records, then crop; checked out from git), the current one (crop first), a plain
per-image PIL/numpy loader, and PNG-decode floors (image + label decoded, nothing else), all on
full-size fixture folders it writes (GTA5 1914x1052 source, Cityscapes 2048x1024 target with
pseudo-label PNGs, both in the official layouts).

Variants run interleaved in one process, one unit each in turn (a batch of 2 crops, or the decode
of 2 records), ``--rounds`` times, so every variant sees the same machine load at the same
moments; the previous pipeline is imported as ``cbst_jax_old`` (``git archive`` of ``--old-ref``,
the package renamed; ``--old-ref ""`` leaves that row out and needs no git). Crops are 512x1024,
pooled source/target batches of 2, scale 0.5-1.5, flip, rare-class mining p=0.8; each unit runs
synchronously in one thread (OpenCV held to one thread). crops/s per core = crops / process CPU
seconds (median unit); wall crops/s beside it. Then the
current pipeline with ``--workers`` grain worker processes (when grain is installed) and threads:
wall crops/s after the first batch, and the CPU the consuming process spends per batch.

    python -m benchmarks.bench_pipeline                          # full size; JSON rows on stdout
    python -m benchmarks.bench_pipeline --quick --crop 32,64     # tiny images: a smoke test
"""
import argparse
import functools
import glob
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_REF = "e98977a"        # the last commit with the rescale-then-crop pipeline
MINE = (5, 6, 7, 12, 17, 18)  # pole, light, sign, rider, motorcycle, bicycle


def write_fixtures(root: str, n: int, gta_size, cs_size) -> None:
    """GTA5 and Cityscapes fixture folders in the official layouts, and pseudo-label PNGs
    (trainIds) for the Cityscapes train images (``<root>/pseudo/<index>.png``)."""
    from PIL import Image

    from cbst_jax.data import open_dataset
    from tests.fixtures_layouts import make_cityscapes, make_gta5

    make_gta5(os.path.join(root, "gta5"), n=n, size=gta_size)
    make_cityscapes(os.path.join(root, "cityscapes"), n_train=n, n_val=0, size=cs_size)
    target = open_dataset("cityscapes", os.path.join(root, "cityscapes"))
    os.makedirs(os.path.join(root, "pseudo"))
    for i in range(len(target)):
        Image.fromarray(target[i]["label"]).save(os.path.join(root, "pseudo", f"{i}.png"))


def import_old(ref: str, tmp: str):
    """The package ``cbst_jax`` of git ``ref``, importable as ``cbst_jax_old``."""
    archive = subprocess.run(["git", "archive", ref, "cbst_jax"], cwd=ROOT, capture_output=True, check=True).stdout
    tree = os.path.join(tmp, "old")
    os.makedirs(tree)
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    os.rename(os.path.join(tree, "cbst_jax"), os.path.join(tree, "cbst_jax_old"))
    for path in glob.glob(os.path.join(tree, "cbst_jax_old", "**", "*.py"), recursive=True):
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(re.sub(r"\bcbst_jax\b", "cbst_jax_old", text))
    sys.path.insert(0, tree)
    return importlib.import_module("cbst_jax_old")


def read_pseudo_label(root: str, index: int) -> np.ndarray:
    """A pseudo-label PNG, read as the round loop's store reads them."""
    from PIL import Image

    with Image.open(os.path.join(root, "pseudo", f"{index}.png")) as im:
        return np.asarray(im, np.uint8)


def _pairs(root: str):
    """(image path, label path) of every fixture record, source then target."""
    gta = sorted(glob.glob(os.path.join(root, "gta5", "images", "*.png")))
    cs = sorted(glob.glob(os.path.join(root, "cityscapes", "leftImg8bit", "train", "*", "*.png")))
    return ([(p, p.replace(os.sep + "images" + os.sep, os.sep + "labels" + os.sep)) for p in gta]
            + [(p, p.replace("leftImg8bit", "gtFine").replace("_gtFine.png", "_gtFine_labelIds.png")) for p in cs])


def decode_floor(root: str, decoder: str):
    """Unit: decode the image and label PNGs of the next 2 records, nothing else."""
    from PIL import Image

    pairs, state = _pairs(root), {"k": 0}

    def pil(path):
        with Image.open(path) as im:
            return np.asarray(im)

    def image(path):
        if decoder == "pillow":
            return pil(path)
        with open(path, "rb") as f:
            data = f.read()
        if decoder == "cv2":
            import cv2

            return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        import pyspng

        return pyspng.load(data)

    def unit():
        for _ in range(2):
            path, label = pairs[state["k"] % len(pairs)]
            state["k"] += 1
            image(path), pil(label)

    return unit


def plain_loader(root: str, crop):
    """Unit: 2 crops as a per-image loader written with PIL and numpy does it (CRST's recipe):
    decode, remap labelIds -> trainIds, resize the whole image (bilinear) and label (nearest) by
    a random scale, pad, random crop, flip."""
    from PIL import Image

    from cbst_jax.labels import CITYSCAPES_ID_TO_TRAINID

    pairs, lut, state = _pairs(root), np.asarray(CITYSCAPES_ID_TO_TRAINID, np.uint8), {"k": 0}

    def one(k):
        rng = np.random.default_rng(k)
        path, label_path = pairs[k % len(pairs)]
        with Image.open(path) as im:
            image = im.convert("RGB")
        with Image.open(label_path) as im:
            label = Image.fromarray(lut[np.asarray(im)])
        s = rng.uniform(0.5, 1.5)
        size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
        img = np.asarray(image.resize(size, Image.BILINEAR))
        lab = np.asarray(label.resize(size, Image.NEAREST))
        ph, pw = max(crop[0] - img.shape[0], 0), max(crop[1] - img.shape[1], 0)
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
        lab = np.pad(lab, ((0, ph), (0, pw)), constant_values=255)
        y, x = rng.integers(img.shape[0] - crop[0] + 1), rng.integers(img.shape[1] - crop[1] + 1)
        img, lab = img[y:y + crop[0], x:x + crop[1]], lab[y:y + crop[0], x:x + crop[1]]
        if rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        return np.ascontiguousarray(img), np.ascontiguousarray(lab)

    def unit():
        for _ in range(2):
            one(state["k"])
            state["k"] += 1

    return unit


def mixed_iterator(package, root: str, crop, **kw):
    """``package.data.pipeline.MixedIterator`` (the current or the previous pipeline) on the
    fixture folders."""
    data = importlib.import_module(package.__name__ + ".data")
    pl = importlib.import_module(package.__name__ + ".data.pipeline")
    src = data.open_dataset("gta5", os.path.join(root, "gta5"))
    tgt = data.open_dataset("cityscapes", os.path.join(root, "cityscapes"), labelled=False)
    sampler = pl.MixedSampler(tuple(range(len(src))), len(tgt), 2, "pooled", seed=0)
    return pl.MixedIterator(src, tgt, sampler, crop_size=crop, target_labels=functools.partial(read_pseudo_label, root),
                            scale_range=(0.5, 1.5), flip=True, mine_classes=MINE, p_mine=0.8, process_index=0,
                            process_count=1, **kw)


def with_pillow_decoder(unit):
    """``unit`` run with pyspng switched off in the readers (as where it is not installed)."""
    from cbst_jax.data import io as data_io

    def run():
        pyspng, data_io.pyspng = data_io.pyspng, None
        try:
            unit()
        finally:
            data_io.pyspng = pyspng

    return run


def interleaved(units: dict, rounds: int) -> list[dict]:
    """Runs every unit once per round, in turn; per variant the median unit's CPU and wall time."""
    times = {name: [] for name in units}
    for unit in units.values():
        unit()  # warm: imports, first file reads
    for _ in range(rounds):
        for name, unit in units.items():
            c, w = time.process_time(), time.perf_counter()
            unit()
            times[name].append((time.process_time() - c, time.perf_counter() - w))
    rows = []
    for name, ts in times.items():
        cpu, wall = float(np.median([t[0] for t in ts])), float(np.median([t[1] for t in ts]))
        rows.append(dict(variant=name, crops_per_core_s=round(2 / cpu, 2), crops_per_s=round(2 / wall, 2),
                         cpu_ms_per_crop=round(500 * cpu, 1), units=len(ts)))
    old = next((r["crops_per_core_s"] for r in rows if r["variant"] == "old pipeline"), None)
    for r in rows:
        if old is not None:
            r["vs_old"] = round(r["crops_per_core_s"] / old, 2)
    return rows


def parallel(root: str, crop, workers: int, processes: bool, batches: int) -> dict:
    """Wall crops/s of the current pipeline with ``workers`` workers, after its first batch."""
    import cbst_jax

    with mixed_iterator(cbst_jax, root, crop, workers=workers, processes=processes, prefetch=2) as it:
        t0 = time.perf_counter()
        next(it)
        first = time.perf_counter() - t0
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(batches):
            next(it)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return dict(variant=f"current pipeline, {workers} {'processes' if processes else 'threads'}",
                crops=2 * batches, crops_per_s=round(2 * batches / wall, 2), first_batch_s=round(first, 2),
                consumer_cpu_ms_per_batch=round(1000 * cpu / batches, 2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3, help="records per dataset")
    ap.add_argument("--rounds", type=int, default=12, help="units per variant")
    ap.add_argument("--workers", default="2", help="comma-separated worker counts of the parallel rows")
    ap.add_argument("--batches", type=int, default=12, help="batches timed per parallel row")
    ap.add_argument("--old-ref", default=OLD_REF,
                    help="git ref of the previous pipeline's row ('': no such row, no git needed)")
    ap.add_argument("--crop", default="512,1024")
    ap.add_argument("--quick", action="store_true", help="tiny images (a smoke test of this script)")
    args = ap.parse_args(argv)
    crop = tuple(int(v) for v in args.crop.split(","))
    sys.path.insert(0, ROOT)
    import cv2

    import cbst_jax
    from cbst_jax.data import io as data_io

    cv2.setNumThreads(1)  # one core: OpenCV's pool would spread a crop's resample over several
    gta, cs = ((1052, 1914), (1024, 2048)) if not args.quick else ((53, 96), (51, 102))
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "data")
        write_fixtures(root, args.images, gta, cs)
        units = {"decode floor, Pillow": decode_floor(root, "pillow")}
        for name in ("cv2", "pyspng"):
            if importlib.util.find_spec(name) is not None:
                units[f"decode floor, {name} image + Pillow label"] = decode_floor(root, name)
        units["plain PIL/numpy loader"] = plain_loader(root, crop)
        if args.old_ref:
            old_it = mixed_iterator(import_old(args.old_ref, tmp), root, crop, prefetch=0)
            units["old pipeline"] = lambda: next(old_it)
        new_it = mixed_iterator(cbst_jax, root, crop, prefetch=0)
        units["current pipeline"] = lambda: next(new_it)
        if data_io.pyspng is not None:
            pil_it = mixed_iterator(cbst_jax, root, crop, prefetch=0)
            units["current pipeline, Pillow decoder"] = with_pillow_decoder(lambda: next(pil_it))
        for row in interleaved(units, args.rounds):
            print(json.dumps(row))
        for w in (int(x) for x in args.workers.split(",") if x):
            kinds = [True, False] if importlib.util.find_spec("grain") is not None else [False]
            for processes in kinds:
                print(json.dumps(parallel(root, crop, w, processes, args.batches)))
        sizes = {k: round(float(np.mean([os.path.getsize(p) for p in glob.glob(os.path.join(root, *g))])) / 2**20, 2)
                 for k, g in (("gta5 image MiB", ("gta5", "images", "*.png")),
                              ("cityscapes image MiB", ("cityscapes", "leftImg8bit", "train", "*", "*.png")))}
        print(json.dumps(dict(load_avg=[round(x, 2) for x in os.getloadavg()], cpus=os.cpu_count(),
                              date=time.strftime("%Y-%m-%d %H:%M %Z"), old_ref=args.old_ref, **sizes)))


if __name__ == "__main__":
    main()
