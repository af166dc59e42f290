"""Probe of the synthetic domain gap: train a small segmentation net briefly on the synthetic
source and print per-class IoU on target val and source val.

The pair is right when the source-only model is decent on the large classes (road, sidewalk,
building, vegetation, sky, car) on target but poor on the rare ones (pole, light, sign,
person, rider), which is the regime where class-balanced self-training has something to do.

    python -m benchmarks.synthetic_gap                 # 64x128, 1200 steps, built-in 0.25 M CNN
    python -m benchmarks.synthetic_gap --model fcn8s_vgg16_small --steps 600
"""
from __future__ import annotations

import argparse
import datetime
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbst_jax.data.pipeline import EvalIterator, MixedIterator, MixedSampler
from cbst_jax.data.synthetic import DRAWN_CLASSES, LARGE_CLASSES, RARE_CLASSES, open_synthetic
from cbst_jax.labels import CITYSCAPES_SHORT_NAMES, IGNORE_INDEX


def build_model(name: str, num_classes: int):
    from cbst_jax.models import get_model  # the project registry

    return get_model(name, num_classes)


def confusion(labels, preds, valid, num_classes=19):
    m = valid & (labels != IGNORE_INDEX)
    return np.bincount(labels[m].astype(np.int64) * num_classes + preds[m],
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_of(cm):
    tp = np.diag(cm).astype(np.float64)
    return tp / np.maximum(cm.sum(0) + cm.sum(1) - tp, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo_segnet")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n-source", type=int, default=1500)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-at", type=int, nargs="*", default=[], help="extra target-val evaluations at these steps")
    args = ap.parse_args(argv)
    size = dict(height=args.height, width=args.width, seed=args.seed)

    src = open_synthetic("source", "train", num_images=args.n_source, **size)
    sampler = MixedSampler(tuple(range(len(src))), 0, args.batch, "pooled", seed=args.seed)
    train = MixedIterator(src, None, sampler, crop_size=(args.height, args.width), scale_range=(1.0, 1.0),
                          flip=True, process_index=0, process_count=1)

    model = build_model(args.model, 19)
    variables = model.init(jax.random.key(args.seed), jnp.zeros((1, args.height, args.width, 3), jnp.uint8),
                           train=False)
    params, extra = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    n_params = sum(x.size for x in jax.tree.leaves(params))
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10), args.steps)
    tx = optax.adam(sched)
    opt_state = tx.init(params)

    def forward(p, images):
        """Logits at input resolution (registry nets return them at their output stride)."""
        logits = model.apply({"params": p, **extra}, images, train=False).astype(jnp.float32)
        if logits.shape[1:3] != images.shape[1:3]:
            logits = jax.image.resize(logits, (*images.shape[:3], logits.shape[-1]), "bilinear")
        return logits

    def loss_fn(p, images, labels):
        logits = forward(p, images)
        valid = labels != IGNORE_INDEX
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0).astype(jnp.int32))
        return jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)

    @jax.jit
    def step(p, o, images, labels):
        loss, g = jax.value_and_grad(loss_fn)(p, images, labels)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    @jax.jit
    def predict(p, images):
        prob = jax.nn.softmax(forward(p, images)) + jax.nn.softmax(forward(p, images[:, :, ::-1]))[:, :, ::-1]
        return jnp.argmax(prob, -1)

    def evaluate(p, dom):
        ds = open_synthetic(dom, "val", num_images=args.n_val, **size)
        cm = np.zeros((19, 19), np.int64)
        with EvalIterator(ds, batch_size=32, process_index=0, process_count=1) as it:
            for b in it:
                cm += confusion(b["label"], np.asarray(predict(p, b["image"])), b["valid"])
        return cm

    print(f"model {args.model}: {n_params:,} params; {args.steps} steps of batch {args.batch} "
          f"at {args.height}x{args.width}; backend {jax.default_backend()}", flush=True)
    t0 = time.perf_counter()
    for i in range(args.steps):
        b = next(train)
        params, opt_state, loss = step(params, opt_state, b["image"], b["label"])
        if (i + 1) % 200 == 0 or i == 0:
            print(f"  step {i + 1:5d}  loss {float(loss):.4f}  {time.perf_counter() - t0:6.1f}s", flush=True)
        if i + 1 in args.eval_at:
            iou = iou_of(evaluate(params, "target"))
            print("  target val at step", i + 1, " ".join(f"{CITYSCAPES_SHORT_NAMES[c]}={100 * iou[c]:.1f}"
                                                         for c in DRAWN_CLASSES), flush=True)
    train.close()
    train_s = time.perf_counter() - t0

    results, cms = {}, {}
    for dom in ("target", "source"):
        cms[dom] = evaluate(params, dom)
        results[dom] = iou_of(cms[dom])

    cls = DRAWN_CLASSES
    head = "| domain (val) | " + " | ".join(CITYSCAPES_SHORT_NAMES[c] for c in cls) + " | large | rare | **mIoU11** |"
    print(f"\n{datetime.date.today()}  train {train_s:.0f}s ({args.steps / train_s:.1f} steps/s)\n")
    print(head)
    print("|" + "---|" * (len(cls) + 4))
    for dom, iou in results.items():
        print(f"| {dom} | " + " | ".join(f"{100 * iou[c]:.1f}" for c in cls)
              + f" | {100 * iou[list(LARGE_CLASSES)].mean():.1f} | {100 * iou[list(RARE_CLASSES)].mean():.1f}"
              + f" | **{100 * iou[list(cls)].mean():.1f}** |")
    cm = cms["target"]
    conf = []
    for c in cls:
        row = cm[c].astype(np.float64) / max(cm[c].sum(), 1)
        row[c] = 0
        j = int(np.argmax(row))
        conf.append(f"{CITYSCAPES_SHORT_NAMES[c]}->{CITYSCAPES_SHORT_NAMES[j]} {100 * row[j]:.0f}%")
    print("\nlargest target confusion per class (share of its GT pixels):", ", ".join(conf))
    return results


if __name__ == "__main__":
    main()
