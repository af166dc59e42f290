"""Pseudo-labelling throughput: exact class thresholds (two streaming histogram passes) plus the
labelling pass, over target images at full Cityscapes size, single scale + flip or MST + flip.

    python -m benchmarks.bench_pseudo_label                 # GPU: DeepLab-v2 R101, 1024x2048
    python -m benchmarks.bench_pseudo_label --smoke         # CPU: tiny model, 64x128

Each image goes through the network three times (pass 1, pass 2, labels), so img/s counts
images labelled per second, all three passes included. Random weights and images (the cost
does not depend on them). Prints one JSON line per configuration; writes $OUT/bench_pl.json.
"""
import argparse
import json
import os
import time

import jax
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--configs", default="single,mst")
    args = ap.parse_args()
    from cbst_jax import models, sharding
    from cbst_jax.predict import Predictor

    name, canvas = ("deeplabv2_resnet_small", (64, 128)) if args.smoke else ("deeplabv2_resnet101", (1024, 2048))
    model = models.get_model(name, 19, dtype=args.dtype)
    variables = jax.jit(lambda k: model.init(k, np.zeros((1, 64, 128, 3), np.float32), train=False))(jax.random.key(0))
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    batch = args.batch * jax.device_count()
    host = {"image": rng.integers(0, 256, (batch, *canvas, 3)).astype(np.uint8),
            "valid": np.ones((batch, *canvas), bool), "label": np.full((batch, *canvas), 255, np.uint8)}
    gbatch = sharding.to_global(host, mesh)
    n_batches = max(1, args.images // batch)
    results = []
    for cfg in args.configs.split(","):
        scales = (1.0,) if cfg == "single" else (0.9, 1.0, 1.2)
        pred = Predictor(model, 19, mesh, canvas, scales=scales, flip=True)
        batches = lambda: (gbatch for _ in range(n_batches))
        t0 = time.perf_counter()
        lam, _ = pred.thresholds(variables, batches, 0.2, "cbst")  # compiles both passes
        lab = pred.pseudo_labels(variables, gbatch, lam)[0]
        lab.block_until_ready()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lam, _ = pred.thresholds(variables, batches, 0.2, "cbst")
        for _ in range(n_batches):
            lab = pred.pseudo_labels(variables, gbatch, lam)[0]
        lab.block_until_ready()
        dt = time.perf_counter() - t0
        r = dict(model=name, canvas=canvas, dtype=args.dtype, scales=scales, flip=True, images=n_batches * batch,
                 seconds=round(dt, 3), img_per_s=round(n_batches * batch / dt, 3),
                 forward_passes_per_image=3 * 2 * len(scales), first_call_s=round(compile_s, 1),
                 device=str(jax.devices()[0].device_kind))
        print(json.dumps(r), flush=True)
        results.append(r)
        out = os.environ.get("OUT")
        if out:  # after every configuration, so a time limit keeps what finished
            with open(os.path.join(out, "bench_pl.json"), "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
