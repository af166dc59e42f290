"""Times one DeepLab-v2 ResNet-101 SGD train step, the JAX peer of
/work/shared/bench/anchor_torch_deeplabv2.py (run both in one GPU call).

Step: forward + backward + SGD (momentum 0.9, weight decay 5e-4; head 10x LR) with frozen
BatchNorm, loss = CE (ignore 255, mean over valid pixels) on logits bilinearly resized to
the 512x1024 crop. Jitted with donated params/optimizer state; median over timed steps
after warm-up, each closed by block_until_ready. Prints one JSON line per config and
writes $OUT/bench_jax.json (rewritten after every config). ``--step project`` times the same
workload through the project's own ``cbst_jax.train.make_train_step`` (what the round loop runs:
TrainState, align_corners loss, gradient norm, non-finite guard), ``--step minimal`` the bare
step below, ``both`` (default) one after the other per config.

  python -m benchmarks.bench_train_step            # 4 configs, ~2-3 min on an H100
  python -m benchmarks.bench_train_step --smoke    # tiny model on CPU
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbst_jax import models

TFLOP_PER_IMAGE = 2.193352556544  # torch FlopCounterMode, fwd+bwd at 512x1024 (anchor README)
CONFIGS = ((2, "float32"), (2, "bfloat16"), (8, "bfloat16"), (8, "float32"))


def make_optimizer(module, params, lr=2.5e-4):
    """torch-style SGD: weight decay added to the gradient, frozen BN untouched, head 10x."""
    sgd = lambda rate: optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(rate, momentum=0.9))
    return optax.multi_transform({"backbone": sgd(lr), "head": sgd(10 * lr), "frozen": optax.set_to_zero()},
                                 models.param_groups(module, params))


def cross_entropy(logits, labels, ignore=255):
    valid = labels != ignore
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(valid.sum(), 1)


def make_step(module, tx, hw):
    def step(params, opt_state, batch_stats, images, labels):
        def loss_fn(p):
            logits = module.apply({"params": p, "batch_stats": batch_stats}, images, train=True)
            logits = jax.image.resize(logits, (logits.shape[0], *hw, logits.shape[-1]), "bilinear")
            return cross_entropy(logits, labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def peak_memory_gib():
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def bench(model, batch, dtype, hw, steps, warmup, num_classes=19):
    module = models.get_model(model, num_classes, dtype=dtype)
    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.randint(0, 256, (batch, *hw, 3), np.uint8))
    labels = rng.randint(0, num_classes, (batch, *hw)).astype(np.int32)
    labels[:, :16] = 255
    labels = jnp.asarray(labels)
    variables = jax.jit(module.init)(jax.random.key(0, impl="rbg"), images[:1])
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = make_optimizer(module, params)
    opt_state = tx.init(params)
    step = make_step(module, tx, hw)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, batch_stats, images, labels).compile()
    compile_s = time.perf_counter() - t0
    (params, opt_state, loss), times = time_steps(
        lambda c: compiled(c[0], c[1], batch_stats, images, labels), (params, opt_state, None), steps, warmup)
    return summary(model, batch, dtype, hw, times, compile_s, loss=float(loss), steps=steps)


def time_steps(advance, carry, steps, warmup):
    """``carry = advance(carry)`` ``warmup`` times, then ``steps`` timed calls, each closed by
    ``block_until_ready`` on everything it returns; (last carry, seconds per call)."""
    for _ in range(warmup):
        carry = advance(carry)
    jax.block_until_ready(carry)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        carry = jax.block_until_ready(advance(carry))
        times.append(time.perf_counter() - t)
    return carry, times


def summary(model, batch, dtype, hw, times, compile_s, **extra):
    """One JSON row: median/min step time, throughput, achieved TFLOP/s (DeepLab-v2 R101 only)."""
    ms = 1000 * float(np.median(times))
    return dict(model=model, batch=batch, hw=list(hw), dtype=dtype, bn="frozen", ms_median=ms,
                ms_min=1000 * min(times), img_per_s=batch * 1000 / ms,
                achieved_tflops=TFLOP_PER_IMAGE * batch / (ms / 1000) if model == "deeplabv2_resnet101" else None,
                compile_s=compile_s, peak_mem_gib=peak_memory_gib(), **extra,
                device=jax.devices()[0].device_kind, jax=jax.__version__)


def bench_project(model, batch, dtype, hw, steps, warmup, num_classes=19):
    """The same workload through the project's own step (``cbst_jax.train.make_train_step``):
    TrainState, parameter groups, align_corners upsampling loss, the ``lr`` argument, gradient
    norm and the non-finite guard, batch sharded over a ('data',) mesh of all local devices."""
    from cbst_jax import sharding as shd, train

    module = models.get_model(model, num_classes, dtype=dtype)
    mesh = shd.make_mesh()
    rng = np.random.RandomState(0)
    labels = rng.randint(0, num_classes, (batch, *hw)).astype(np.uint8)
    labels[:, :16] = 255
    host = {"image": rng.randint(0, 256, (batch, *hw, 3)).astype(np.uint8), "label": labels,
            "is_target": np.arange(batch) % 2 == 1}
    data = shd.to_global(host, mesh)
    variables = jax.jit(module.init)(jax.random.key(0, impl="rbg"), host["image"][:1])
    groups = models.param_groups(module, variables["params"])
    tx = train.make_optimizer(groups)
    state = train.create_train_state(variables, tx, 0, mesh)
    step = train.make_train_step(module, tx, train.TrainConfig(loss_resolution="upsample", stride=8), mesh, groups)
    lr = np.float32(2.5e-4)
    t0 = time.perf_counter()
    compiled = step.jitted.lower(state, data, lr).compile()
    compile_s = time.perf_counter() - t0
    (state, m), times = time_steps(lambda c: compiled(c[0], data, lr), (state, None), steps, warmup)
    return dict(step="project", **summary(model, batch, dtype, hw, times, compile_s, loss=float(m["loss"]),
                                          finite=bool(m["finite"]), steps=steps, devices=mesh.devices.size))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="deeplabv2_resnet_small at 64x128, 3 steps")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--configs", default=",".join(f"{b}:{d}" for b, d in CONFIGS),
                        help="batch:dtype pairs, in order, e.g. 2:float32,8:bfloat16")
    parser.add_argument("--step", choices=("project", "minimal", "both"), default="both",
                        help="project: cbst_jax.train.make_train_step; minimal: the bare step above")
    args = parser.parse_args()
    model, hw, steps = "deeplabv2_resnet101", (512, 1024), args.steps
    if args.smoke:
        model, hw, steps = "deeplabv2_resnet_small", (64, 128), 3
    out_dir = os.environ.get("OUT", ".")
    results = []
    kinds = {"project": (bench_project,), "minimal": (bench,), "both": (bench_project, bench)}[args.step]
    configs = [(int(b), d) for b, d in (c.split(":") for c in args.configs.split(","))]
    for batch, dtype in configs:
        for fn in kinds:
            try:
                result = fn(model, batch, dtype, hw, steps, args.warmup)
            except Exception as e:  # e.g. out of memory: report and go on with the next config
                result = dict(model=model, batch=batch, dtype=dtype, error=repr(e)[:500])
            result.setdefault("step", "project" if fn is bench_project else "minimal")
            print(json.dumps(result), flush=True)
            results.append(result)
            with open(os.path.join(out_dir, "bench_jax.json"), "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
