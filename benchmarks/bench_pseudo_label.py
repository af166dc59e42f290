"""Pseudo-labelling throughput: one round of ``Predictor.label_split`` (exact class thresholds
from two streaming histogram passes, then the labelling pass) over target images at full
Cityscapes size, single scale + flip or MST + flip.

    python -m benchmarks.bench_pseudo_label                 # GPU: DeepLab-v2 R101, 1024x2048
    python -m benchmarks.bench_pseudo_label --smoke         # CPU: tiny model, 64x128
    python -m benchmarks.bench_pseudo_label --recompute     # the three-pass path (no logits kept)

The network runs once per image, scale and flip (its logits are kept for passes 2 and 3, on the
device within the default budget, else in host RAM); img/s counts images labelled per second,
all passes included. Random weights and images (the cost does not depend on them). Prints one
JSON line per configuration; writes $OUT/bench_pl.json.
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
    ap.add_argument("--recompute", action="store_true", help="keep no logits: the three-pass path")
    args = ap.parse_args()
    from cbst_jax import models, sharding
    from cbst_jax.predictor import Predictor

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
        batches = lambda: ((gbatch, host) for _ in range(n_batches))
        budget = dict(device_bytes=0, host_bytes=0) if args.recompute else {}
        last = []

        def run():
            res = pred.label_split(variables, batches, 0.2, "cbst", write_fn=lambda h, out: last.append(out.labels),
                                   **budget)
            jax.block_until_ready(last[-1])
            return res

        t0 = time.perf_counter()
        run()  # compiles the network and the three steps after it
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = run()
        dt = time.perf_counter() - t0
        r = dict(model=name, canvas=canvas, dtype=args.dtype, scales=scales, flip=True, images=n_batches * batch,
                 seconds=round(dt, 3), img_per_s=round(n_batches * batch / dt, 3),
                 network_runs_per_image_view=res.cache.forward_calls / n_batches, cache_path=res.cache.path,
                 cache_bytes_per_device=res.cache.device_bytes, cache_host_bytes=res.cache.host_bytes,
                 first_call_s=round(compile_s, 1), device=str(jax.devices()[0].device_kind))
        print(json.dumps(r), flush=True)
        results.append(r)
        out = os.environ.get("OUT")
        if out:  # after every configuration, so a time limit keeps what finished
            with open(os.path.join(out, "bench_pl.json"), "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
