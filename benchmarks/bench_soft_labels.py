"""Host cost of an LR* training crop: rebuilding a target crop's soft labels (per-pixel hard
label and mass through the crop transform, residual cells interpolated, composed, quantised) from
a full-size record's stored encoding (``cbst_jax.soft_labels``). Random data of real size; the
augmentation of image and hard label is timed apart, as every method pays it.

    python -m benchmarks.bench_soft_labels                       # 1024x2048 record, 512x1024 crop
    python -m benchmarks.bench_soft_labels --size 64,128 --crop 64,128 --stride 8
"""
import argparse
import json
import time

import numpy as np

from cbst_jax import soft_labels
from cbst_jax.data import augment as aug


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1024,2048")
    ap.add_argument("--crop", default="512,1024")
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    h, w = (int(v) for v in args.size.split(","))
    crop = tuple(int(v) for v in args.crop.split(","))
    k, s = args.classes, args.stride
    rng = np.random.default_rng(0)
    cells = soft_labels.quantize(rng.dirichlet(np.full(k - 1, 0.3), size=(-(-h // s), -(-w // s))).astype(np.float32))
    cells = np.concatenate([cells, np.zeros(cells.shape[:2] + (1,), np.uint8)], -1)
    top = rng.integers(200, 256, (h, w)).astype(np.uint8)
    hard = rng.integers(0, k, (h, w)).astype(np.uint8)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    t_aug, t_soft = [], []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        _, lab, geom = aug.augment(np.random.default_rng(i), image, hard, crop_size=crop, scale_range=(0.5, 1.5),
                                   return_geometry=True)
        t1 = time.perf_counter()
        out = soft_labels.quantize(soft_labels.compose(lab, aug.warp_pixels(top, geom),
                                                        aug.warp_cells(cells, s, geom, normalize=False)))
        t_soft.append(time.perf_counter() - t1)
        t_aug.append(t1 - t0)
    print(json.dumps(dict(size=[h, w], crop=list(crop), stride=s, classes=k, out_shape=list(out.shape),
                          augment_ms_median=round(1000 * float(np.median(t_aug)), 1),
                          soft_ms_median=round(1000 * float(np.median(t_soft)), 1), repeats=args.repeats)))


if __name__ == "__main__":
    main()
