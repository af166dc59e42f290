"""FLOPs of one round of pseudo-labelling per target image, from XLA's ahead-of-time cost analysis
(``jax.jit(f).lower(...).compile().cost_analysis()``), before and after keeping the logits.

    python -m benchmarks.flops_pseudo_label                        # DeepLab-v2 R101, 1024x2048
    python -m benchmarks.flops_pseudo_label --model deeplabv2_resnet_small --canvas 64,128  # quick

Nothing large is allocated: weights and images are abstract (``jax.eval_shape`` /
``jax.ShapeDtypeStruct``), the programs are only compiled. The programs are the ones
``Predictor.label_split`` runs (``Predictor.programs``): the network (every scale and flip of a
batch), the coarse and fine histogram steps and the labelling step, each from the logits.

* before (the three-pass path, what ``thresholds`` + ``pseudo_labels`` did): the network in
  each pass, ``3 * network + coarse + fine + labels``;
* after (``label_split`` with the logits kept): ``network + coarse + fine + labels``;
* reference: one forward of the bare network per scale and flip (``model.apply`` at each
  input size, compiled alone).

Also the temporary memory the backend's network program needs (``memory_analysis()``, the
``network_temp_gib`` field: on a CPU, what one labelling batch costs in RAM).

Prints one table row per configuration (TFLOP per image) and a JSON line; batch 1.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def flops(fn, *args) -> float:
    """XLA's FLOP count of ``fn`` compiled for ``args`` (abstract shapes); ``fn`` may also be a
    compiled program (``args`` then empty)."""
    compiled = fn.lower(*args).compile() if args else fn
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def measure(model, variables, canvas, scales, num_classes=19):
    from cbst_jax import selection, sharding
    from cbst_jax.predictor import Predictor

    mesh = sharding.make_mesh(jax.devices()[:1])
    pred = Predictor(model, num_classes, mesh, canvas, scales=scales, flip=True)
    progs = pred.programs()
    sds = jax.ShapeDtypeStruct
    images = sds((1, *canvas, 3), jnp.uint8)
    valid, gt = sds((1, *canvas), jnp.bool_), sds((1, *canvas), jnp.uint8)
    logits = jax.eval_shape(pred.logits, variables, images)
    acc = jax.eval_shape(lambda: selection.HistogramAccumulator.zeros(num_classes))
    bins, lam = sds((num_classes,), jnp.int32), sds((num_classes,), jnp.float32)
    t0 = time.perf_counter()
    network = progs.forward.lower(variables, images).compile()
    memory = network.memory_analysis()  # the backend's buffers for the network program of one image
    parts = dict(network=flops(network),
                 coarse=flops(progs.coarse, acc, bins, logits, valid, None),
                 fine=flops(progs.fine, acc, bins, logits, valid, None),
                 labels=flops(progs.labels, logits, valid, gt, lam, None))
    bare = jax.jit(lambda v, x: model.apply(v, x, train=False))
    one_forward = 0.0
    for size, _ in pred._views():  # each (scale, flip): flipping costs nothing
        one_forward += flops(bare, variables, sds((1, *size, 3), jnp.float32))
    after = parts["network"] + parts["coarse"] + parts["fine"] + parts["labels"]
    before = after + 2 * parts["network"]
    return dict(scales=list(scales), flip=True, views=2 * len(scales),
                parts_tflop={k: v / 1e12 for k, v in parts.items()},
                one_forward_per_view_tflop=one_forward / 1e12, before_tflop=before / 1e12, after_tflop=after / 1e12,
                before_vs_one_forward=before / one_forward, after_vs_one_forward=after / one_forward,
                network_temp_gib=round(memory.temp_size_in_bytes / 2**30, 2) if memory else None,
                compile_s=round(time.perf_counter() - t0, 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deeplabv2_resnet101")
    ap.add_argument("--canvas", default="1024,2048")
    ap.add_argument("--configs", default="flip,mst", help="flip: scale 1.0 + flip; mst: 0.9/1.0/1.2 + flip")
    ap.add_argument("--classes", type=int, default=19)
    args = ap.parse_args(argv)
    from cbst_jax import models

    canvas = tuple(int(x) for x in args.canvas.split(","))
    model = models.get_model(args.model, args.classes)
    variables = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 64, 128, 3), jnp.float32), train=False),
                               jax.random.key(0))
    rows = []
    print(f"{'config':<14} {'one forward':>12} {'network':>9} {'coarse':>8} {'fine':>8} {'labels':>8} "
          f"{'before':>9} {'after':>9} {'before/fwd':>10} {'after/fwd':>9}   (TFLOP per image per round)")
    for cfg in args.configs.split(","):
        scales = {"flip": (1.0,), "mst": (0.9, 1.0, 1.2)}[cfg]
        r = dict(model=args.model, canvas=list(canvas), config=cfg, **measure(model, variables, canvas, scales,
                                                                             args.classes))
        p = r["parts_tflop"]
        print(f"{cfg + ' + flip' if cfg == 'mst' else 'single + flip':<14} {r['one_forward_per_view_tflop']:>12.3f} "
              f"{p['network']:>9.3f} {p['coarse']:>8.4f} {p['fine']:>8.4f} {p['labels']:>8.4f} "
              f"{r['before_tflop']:>9.2f} {r['after_tflop']:>9.2f} {r['before_vs_one_forward']:>9.3f}x "
              f"{r['after_vs_one_forward']:>8.3f}x", flush=True)
        rows.append(r)
    print(json.dumps(dict(bench="flops_pseudo_label", jax=jax.__version__, backend=jax.default_backend(),
                          numpy=np.__version__, rows=rows)))


if __name__ == "__main__":
    main()
