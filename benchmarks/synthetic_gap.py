"""Probe of the synthetic domain gap: per-class IoU and the largest confusions of a source-only
model on target val (and source val).

The gap is calibrated (docs/results.md) so that the source-only per-class profile on target
resembles GTA5->Cityscapes': large classes with real gaps (road, sidewalk, building, sky),
rare classes low. Two ways to get the model:

    python -m benchmarks.synthetic_gap                 # train here: 64x128, 1200 steps, demo_segnet
    python -m benchmarks.synthetic_gap --model fcn8s_vgg16_small --steps 600
    python -m benchmarks.synthetic_gap --from-workdir /tmp/cal/seed_0   # the demo's source model
        # after: python -m experiments.synthetic --config.methods=source_only --workdir=/tmp/cal

``--from-workdir`` restores the source model that ``experiments.synthetic`` saved in a seed
directory and evaluates it with the demo's own predictor on the scenes the generator renders now.
"""
from __future__ import annotations

import argparse
import datetime
import tempfile
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


def demo_source_confusion(seed_dir: str) -> np.ndarray:
    """(19, 19) target-val confusion (rows: ground truth) of the source model that
    ``python -m experiments.synthetic`` saved in ``seed_dir`` (a ``<workdir>/seed_<s>`` folder)."""
    from cbst_jax import experiment, models
    from cbst_jax.evaluation import evaluate
    from cbst_jax.methods import SOURCE
    from cbst_jax.workdir import SeedDir

    run = SeedDir(seed_dir)
    cfg = run.read_config()
    variables = models.load_variables(run.weights(SOURCE))
    with tempfile.TemporaryDirectory() as scratch:   # the run's own workdir stays untouched
        cm, _ = evaluate(experiment.build(cfg, SeedDir(scratch), cfg.seed), variables)
    return np.asarray(cm, np.int64)


def print_report(cms: dict) -> None:
    """Per-class IoU table of each evaluated domain, then the target's recall/precision and largest
    confusions per class."""
    cls = DRAWN_CLASSES
    name = CITYSCAPES_SHORT_NAMES
    print("| domain (val) | " + " | ".join(name[c] for c in cls) + " | large | rare | **mIoU11** |")
    print("|" + "---|" * (len(cls) + 4))
    for dom, cm in cms.items():
        iou = iou_of(cm)
        print(f"| {dom} | " + " | ".join(f"{100 * iou[c]:.1f}" for c in cls)
              + f" | {100 * iou[list(LARGE_CLASSES)].mean():.1f} | {100 * iou[list(RARE_CLASSES)].mean():.1f}"
              + f" | **{100 * iou[list(cls)].mean():.1f}** |")
    cm = cms["target"].astype(np.float64)
    print("\ntarget: recall -> where its pixels go | precision <- what its predictions are")
    for c in cls:
        row, col = cm[c] / max(cm[c].sum(), 1), cm[:, c] / max(cm[:, c].sum(), 1)
        fn = sorted(((row[j], name[j]) for j in cls if j != c), reverse=True)[:2]
        fp = sorted(((col[j], name[j]) for j in cls if j != c), reverse=True)[:2]
        print(f"  {name[c]:>6}: recall {100 * row[c]:5.1f} -> " + ", ".join(f"{n} {100 * v:.0f}%" for v, n in fn)
              + f" | precision {100 * col[c]:5.1f} <- " + ", ".join(f"{n} {100 * v:.0f}%" for v, n in fp))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-workdir", default=None,
                    help="a <workdir>/seed_<s> folder of experiments.synthetic: evaluate its source model")
    ap.add_argument("--model", default="demo_segnet")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n-source", type=int, default=1500)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--camera-shift", action="store_true", help="evaluate on the camera-shift target variant")
    ap.add_argument("--eval-at", type=int, nargs="*", default=[], help="extra target-val evaluations at these steps")
    args = ap.parse_args(argv)
    if args.from_workdir is not None:
        if args.camera_shift:
            ap.error("--camera-shift trains and evaluates here; a workdir's model is evaluated on its run's target")
        cms = {"target": demo_source_confusion(args.from_workdir)}
        print(f"{datetime.date.today()}  source model of {args.from_workdir}\n")
        print_report(cms)
        return {d: iou_of(cm) for d, cm in cms.items()}
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
        ds = open_synthetic(dom, "val", num_images=args.n_val, camera_shift=args.camera_shift, **size)
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

    cms = {dom: evaluate(params, dom) for dom in ("target", "source")}
    print(f"\n{datetime.date.today()}  train {train_s:.0f}s ({args.steps / train_s:.1f} steps/s)\n")
    print_report(cms)
    return {d: iou_of(cm) for d, cm in cms.items()}


if __name__ == "__main__":
    main()
