"""Sample grids of a dataset in the Cityscapes palette, for eyeballing a domain pair.

    python -m cbst_jax.data.preview synthetic --out docs/     # -> docs/synthetic_samples.png

Columns: source image | source label | target image | target label | the same target scene under
the camera-shift variant (``camera_shift=True``, a higher horizon) | its label; one scene per row.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from cbst_jax.labels import colorize


def grid(rows: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """Tiles equally-sized (H, W, 3) uint8 images with white gaps."""
    h, w = rows[0][0].shape[:2]
    n_r, n_c = len(rows), len(rows[0])
    out = np.full((n_r * h + (n_r - 1) * gap, n_c * w + (n_c - 1) * gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return out


def synthetic_samples(num_rows: int = 4, *, height: int = 64, width: int = 128, seed: int = 0,
                      zoom: int = 3) -> np.ndarray:
    """Source-train and target-val scenes (default camera, then the camera-shift variant) next to
    their label maps, zoomed (nearest) for viewing."""
    from cbst_jax.data.synthetic import open_synthetic

    src = open_synthetic("source", "train", height=height, width=width, seed=seed)
    tgt = open_synthetic("target", "val", height=height, width=width, seed=seed)
    shifted = open_synthetic("target", "val", height=height, width=width, seed=seed, camera_shift=True)
    z = lambda a: np.repeat(np.repeat(a, zoom, 0), zoom, 1)
    rows = []
    for i in range(num_rows):
        row = []
        for rec in (src[i], tgt[i], shifted[i]):
            row += [z(rec["image"]), z(colorize(rec["label"]))]
        rows.append(row)
    return grid(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write sample grids of a dataset.")
    ap.add_argument("dataset", choices=["synthetic"])
    ap.add_argument("--out", default="docs/")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zoom", type=int, default=3)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.dataset}_samples.png")
    Image.fromarray(synthetic_samples(args.rows, height=args.height, width=args.width, seed=args.seed,
                                      zoom=args.zoom)).save(path, optimize=True)
    print(path)


if __name__ == "__main__":
    main()
