"""Times one DeepLab-v2 ResNet-101 SGD train step, the JAX peer of
/work/shared/bench/anchor_torch_deeplabv2.py (run both in one GPU call), and counts its work.

Step: forward + backward + SGD (momentum 0.9, weight decay 5e-4; head 10x LR) with frozen
BatchNorm. ``--step project`` (default) times the project's own ``cbst_jax.train_step.make_train_step``
(what the round loop runs: TrainState, parameter groups, the loss of ``--loss``, gradient norm,
non-finite guard, batch sharded over a ('data',) mesh); ``--step minimal`` a bare step (loss on
logits resized with ``jax.image.resize``); ``both`` one after the other.

Variants: every combination of ``--configs`` (batch:dtype), ``--atrous`` (the models' atrous
option: dilated convolutions or the same convolutions undilated on space-to-batch phase grids),
``--fold`` (on: the frozen BatchNorms folded into their convolutions, the models' default; off: BN
applied after each convolution) and ``--loss`` (upsample: logits bilinear to the crop, as CRST;
stride: labels sampled at the logits' stride, as CBST). Within a config all variants are compiled
first, then timed in ``--rounds`` interleaved rounds of ``--steps`` steps (so a drifting load hits
them alike); each step is closed by ``block_until_ready``; rows give the median and the ratio to
the config's first variant (``--clock cpu``: process CPU seconds instead of wall seconds).

``--step forward`` compiles the bare evaluation forward (``model.apply(train=False)``) instead, for
``--aot`` accounting of inference. ``--optimizer adam`` builds the project step with AdamW groups
(the transformer recipes') instead of SGD.

``--aot`` compiles each variant for abstract inputs only (nothing runs, no memory is taken) and
reports XLA's cost analysis (FLOPs, bytes accessed), memory analysis (argument / output / temp
bytes) and what the optimised HLO holds (convolutions by operand type, transposes, copies).

``--save-hlo DIR`` keeps each variant's optimised HLO. ``--profile DIR`` traces ``--steps`` steps of the first variant with ``jax.profiler`` (a perfetto
trace) and prints the device ops that took the most time.

  python -m benchmarks.bench_train_step --configs 8:bfloat16               # GPU: both atrous modes
  python -m benchmarks.bench_train_step --aot --configs 8:bfloat16 --loss upsample,stride
  python -m benchmarks.bench_train_step --smoke                             # tiny model on CPU
  python -m benchmarks.bench_train_step --aot --model daformer_mit_b5 --size 512,512 --configs 4:bfloat16 \
      --atrous dilated --optimizer adam                                     # DAFormer's step
  python -m benchmarks.bench_train_step --aot --step forward --model daformer_mit_b5 --size 1024,2048 \
      --configs 1:bfloat16 --atrous dilated                                 # one full-size forward

One JSON line per variant on stdout; all rows so far in $OUT/bench_jax.json after each config.
"""
import argparse
import glob
import gzip
import itertools
import json
import os
import re
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbst_jax import models

TFLOP_PER_IMAGE = 2.193352556544  # torch FlopCounterMode, fwd+bwd at 512x1024 (anchor README)
CONFIGS = ((8, "bfloat16"), (2, "bfloat16"), (2, "float32"))


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


def host_batch(batch, hw, num_classes=19, seed=0):
    """Random uint8 images and labels (first 16 rows ignored), half the rows target."""
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, num_classes, (batch, *hw)).astype(np.uint8)
    labels[:, :16] = 255
    return {"image": rng.randint(0, 256, (batch, *hw, 3)).astype(np.uint8), "label": labels,
            "is_target": np.arange(batch) % 2 == 1}


class Variant:
    """One compiled train step: ``advance(carry) -> carry`` runs one step; ``abstract`` builds
    only shapes (for ``--aot``)."""

    def __init__(self, step_kind, model, batch, dtype, hw, atrous, loss, num_classes=19, abstract=False,
                 optimizer="sgd", fold=True):
        from cbst_jax import sharding as shd, train_step

        self.row = dict(step=step_kind, model=model, batch=batch, hw=list(hw), dtype=dtype, atrous=atrous,
                        loss_resolution=loss if step_kind == "project" else "resize", bn="frozen", bn_folded=fold,
                        optimizer=optimizer if step_kind == "project" else "sgd")
        # imagenet normalisation: inputs near unit scale, so the random network's loss stays finite
        # (with the Caffe mean-only input, random R101 logits reach ~2e3 and the loss overflows)
        # fold_bn exists where frozen BN sits after a convolution (DeepLab-v2, ResNet-38); elsewhere
        # only its default (on) is meaningful
        module = models.get_model(model, num_classes, dtype=dtype, atrous=atrous, normalization="imagenet",
                                  **({} if fold else {"fold_bn": False}))
        key = jax.random.key(0, impl="rbg")
        image0 = jax.ShapeDtypeStruct((1, *hw, 3), jnp.uint8)
        variables = (jax.eval_shape(module.init, key, image0) if abstract
                     else jax.jit(module.init)(key, np.zeros((1, *hw, 3), np.uint8)))
        host = host_batch(batch, hw, num_classes)
        if step_kind == "forward":
            self.row.update(loss_resolution="none", optimizer="none")
            images = host["image"]
            images = jax.ShapeDtypeStruct(images.shape, images.dtype) if abstract else jnp.asarray(images)
            self.lowered = jax.jit(lambda v, x: module.apply(v, x, train=False)).lower(variables, images)
            self.carry = (None,)
            self.call = lambda compiled, c: (compiled(variables, images),)
        elif step_kind == "project":
            mesh = shd.make_mesh()
            groups = models.param_groups(module, variables["params"])
            tx = train_step.make_optimizer(groups, optimizer=optimizer)
            config = train_step.TrainConfig(loss_resolution=loss, stride=module.output_stride)
            step = train_step.make_train_step(module, tx, config, mesh, groups)
            init_state = lambda v: train_step.TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                                                    batch_stats=v.get("batch_stats", {}), opt_state=tx.init(v["params"]),
                                                    rng=jax.random.key_data(jax.random.key(0)))
            state = jax.eval_shape(init_state, variables) if abstract else train_step.create_train_state(variables, tx, 0, mesh)
            data = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), host) if abstract
                    else shd.to_global(host, mesh))
            lr = np.float32(2.5e-4)
            self.lowered = step.jitted.lower(state, data, lr)
            self.carry = (state, None)
            self.call = lambda compiled, c: compiled(c[0], data, lr)
            self.row["devices"] = mesh.devices.size
        else:
            params, batch_stats = variables["params"], variables["batch_stats"]
            tx = make_optimizer(module, params)
            opt_state = jax.eval_shape(tx.init, params) if abstract else tx.init(params)

            def bare(params, opt_state, batch_stats, images, labels):
                def loss_fn(p):
                    logits = module.apply({"params": p, "batch_stats": batch_stats}, images, train=True)
                    logits = jax.image.resize(logits, (logits.shape[0], *hw, logits.shape[-1]), "bilinear")
                    return cross_entropy(logits, labels)

                loss_value, grads = jax.value_and_grad(loss_fn)(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, {"loss": loss_value}

            images, labels = host["image"], host["label"].astype(np.int32)
            if abstract:
                images, labels = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (images, labels))
            else:
                images, labels = jnp.asarray(images), jnp.asarray(labels)
            self.lowered = jax.jit(bare, donate_argnums=(0, 1)).lower(params, opt_state, batch_stats, images, labels)
            self.carry = (params, opt_state, None)
            self.call = lambda compiled, c: compiled(c[0], c[1], batch_stats, images, labels)
        t0 = time.perf_counter()
        self.compiled = self.lowered.compile()
        self.row["compile_s"] = round(time.perf_counter() - t0, 2)

    def advance(self, carry):
        return self.call(self.compiled, carry)

    def metrics(self):
        m = self.carry[-1]
        if not isinstance(m, dict):  # a forward: no loss
            return {}
        out = {"loss": float(m["loss"])}
        if "finite" in m:
            out["finite"] = bool(m["finite"])
        return out


def hlo_summary(lowered, compiled):
    """What the program holds. Lowered (what JAX asked for): convolutions by operand and result
    types. Optimised (what the backend runs): convolutions (XLA ops or cuDNN calls) by result type
    and layout, transposes and copies (layout changes), fusions."""
    lowered_convs = Counter("x".join(m) for m in re.findall(
        r"stablehlo.convolution.*: \(tensor<\S+x(\w+)>, tensor<\S+x(\w+)>\) -> tensor<\S+x(\w+)>",
        lowered.as_text()))
    text = compiled.as_text()
    convs, layouts = Counter(), Counter()
    for line in text.splitlines():
        if " convolution(" in line or "cudnn$conv" in line:
            m = re.search(r"= \(?(\w+)\[[\d,]*\](\{[\d,]*\})?", line)
            if m:
                convs[m.group(1)] += 1
                layouts[m.group(2) or "-"] += 1
    return dict(lowered_convolutions=dict(lowered_convs), convolutions=dict(convs), conv_layouts=dict(layouts),
                transposes=len(re.findall(r"= \S+ transpose\(", text)),
                copies=len(re.findall(r"= \S+ copy\(", text)), fusions=len(re.findall(r"= \S+ fusion\(", text)))


def aot_row(variant, save_hlo=""):
    """XLA's own accounting of the compiled step (per device); ``save_hlo``: a folder for the
    optimised HLO text (gzip)."""
    row = dict(variant.row)
    if save_hlo:
        os.makedirs(save_hlo, exist_ok=True)
        name = "hlo_{dtype}_b{batch}_{atrous}_{loss_resolution}_{step}_fold{bn_folded:d}.txt.gz".format(**variant.row)
        with gzip.open(os.path.join(save_hlo, name), "wt") as f:
            f.write(variant.compiled.as_text())
    cost = variant.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost:
        row["tflop_per_step"] = cost.get("flops", float("nan")) / 1e12
        row["tflop_per_image"] = row["tflop_per_step"] / variant.row["batch"]
        row["gb_accessed"] = cost.get("bytes accessed", float("nan")) / 1e9
    # the program as JAX lowered it, before the backend's rewrites: the CPU backend computes the
    # kernel gradient of a depthwise convolution as a dense one (C times the work), the GPU need not
    lowered = variant.lowered.cost_analysis()
    lowered = lowered[0] if isinstance(lowered, (list, tuple)) else lowered
    if lowered and "flops" in lowered:
        row["tflop_per_image_lowered"] = lowered["flops"] / 1e12 / variant.row["batch"]
    mem = variant.compiled.memory_analysis()
    if mem is not None:
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                      "temp_size_in_bytes", "generated_code_size_in_bytes"):
            if hasattr(mem, field):
                row[field.replace("_size_in_bytes", "_gib")] = round(getattr(mem, field) / 2**30, 3)
    row["hlo"] = hlo_summary(variant.lowered, variant.compiled)
    row.update(device=jax.devices()[0].device_kind, jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))
    return row


def time_steps(advance, carry, steps, warmup=0, clock=time.perf_counter):
    """``carry = advance(carry)`` ``warmup`` times, then ``steps`` timed calls, each closed by
    ``block_until_ready`` on everything it returns; (last carry, ``clock`` seconds per call)."""
    for _ in range(warmup):
        carry = advance(carry)
    jax.block_until_ready(carry)
    times = []
    for _ in range(steps):
        t = clock()
        carry = jax.block_until_ready(advance(carry))
        times.append(clock() - t)
    return carry, times


def peak_memory_gib():
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def timed_rows(variants, steps, warmup, rounds, clock="wall"):
    """Interleaved timing: ``warmup`` steps each, then ``rounds`` x (``steps`` steps of each).
    ``clock``: "wall" (the step's wall time) or "cpu" (this process's CPU seconds per step: on a
    CPU shared with other processes, the work done rather than the time waited for cores)."""
    timer = {"wall": time.perf_counter, "cpu": time.process_time}[clock]
    times = [[] for _ in variants]
    for v in variants:
        v.carry, _ = time_steps(v.advance, v.carry, 0, warmup)
    for _ in range(rounds):
        for v, ts in zip(variants, times):
            v.carry, t = time_steps(v.advance, v.carry, steps, clock=timer)
            ts += t
    rows = []
    for v, ts in zip(variants, times):
        ms = 1000 * float(np.median(ts))
        batch = v.row["batch"]
        rows.append(dict(v.accounting, clock=clock, ms_median=ms, ms_min=1000 * min(ts), steps=len(ts),
                         img_per_s=batch * 1000 / ms,
                         achieved_tflops=(TFLOP_PER_IMAGE * batch / (ms / 1000)
                                          if v.row["model"] == "deeplabv2_resnet101" else None),
                         speed_vs_first=None, process_peak_mem_gib=peak_memory_gib(), **v.metrics()))
        if "tflop_per_step" in rows[-1]:  # XLA's own count of the work, over the time
            rows[-1]["xla_tflops_achieved"] = rows[-1]["tflop_per_step"] / (ms / 1000)
    for r in rows:
        r["speed_vs_first"] = round(rows[0]["ms_median"] / r["ms_median"], 4)
    return rows


def profile(variant, steps, out_dir, top=25):
    """A jax.profiler (perfetto) trace of ``steps`` steps; the device ops that took most time."""
    variant.carry, _ = time_steps(variant.advance, variant.carry, 0, 1)
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        variant.carry, _ = time_steps(variant.advance, variant.carry, steps)
    found = sorted(glob.glob(os.path.join(out_dir, "**", "*.trace.json.gz"), recursive=True))
    if not found:
        return dict(variant.row, profile=None, note="no perfetto trace written")
    with gzip.open(found[-1], "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            names[(e["pid"], e.get("tid") if e["name"] == "thread_name" else None)] = e["args"].get("name", "")
    # device ops: the GPU's streams (a "/device:..." process); on CPU, XLA's own threads
    on_device = lambda e: ("/device:" in names.get((e["pid"], None), "")
                           or names.get((e["pid"], e.get("tid")), "").startswith("tf_XLA"))
    per_op = Counter()
    for e in events:
        if e.get("ph") == "X" and on_device(e):
            per_op[e.get("name", "?")] += e.get("dur", 0)
    total = sum(per_op.values())
    return dict(variant.row, profile=found[-1], device_us_per_step=total / steps,
                top_ops=[(name, round(us / steps, 1), round(100 * us / max(total, 1), 2))
                         for name, us in per_op.most_common(top)])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="deeplabv2_resnet_small at 64x128, 2 steps")
    parser.add_argument("--model", default="deeplabv2_resnet101")
    parser.add_argument("--size", default="512,1024", help="crop H,W")
    parser.add_argument("--configs", default=",".join(f"{b}:{d}" for b, d in CONFIGS),
                        help="batch:dtype pairs, in order, e.g. 8:bfloat16,2:float32")
    parser.add_argument("--atrous", default="dilated,space_to_batch", help="atrous modes to compare")
    parser.add_argument("--fold", default="on", help="frozen BN folded into its conv: on, off or on,off")
    parser.add_argument("--loss", default="upsample", help="loss resolutions (project step): upsample,stride")
    parser.add_argument("--step", choices=("project", "minimal", "both", "forward"), default="project")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="the project step's optimiser")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time steps by wall clock or by this process's CPU seconds (a shared CPU)")
    parser.add_argument("--aot", action="store_true", help="compile for abstract inputs; report XLA's accounting")
    parser.add_argument("--save-hlo", default="", help="folder for each variant's optimised HLO (text, gzip)")
    parser.add_argument("--profile", default="", help="folder for a jax.profiler trace of the first variant")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.size, args.steps, args.warmup = "deeplabv2_resnet_small", "64,128", 2, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    hw = tuple(int(v) for v in args.size.split(","))
    out_dir = os.environ.get("OUT", ".")
    kinds = {"project": ("project",), "minimal": ("minimal",), "both": ("project", "minimal"),
             "forward": ("forward",)}[args.step]
    results = []
    for config in args.configs.split(","):
        batch, dtype = config.split(":")
        variants, rows = [], []
        for kind in kinds:
            for atrous, fold, loss in itertools.product(
                    args.atrous.split(","), [f == "on" for f in args.fold.split(",")],
                    args.loss.split(",") if kind == "project" else ("resize",)):
                try:
                    v = Variant(kind, args.model, int(batch), dtype, hw, atrous, loss, abstract=args.aot,
                                optimizer=args.optimizer, fold=fold)
                except Exception as e:  # e.g. out of memory: report and go on
                    rows.append(dict(step=kind, model=args.model, batch=int(batch), dtype=dtype, atrous=atrous,
                                     bn_folded=fold, loss_resolution=loss, error=repr(e)[:500]))
                    continue
                if args.aot:
                    rows.append(dict(aot_row(v, args.save_hlo), aot=True))
                    del v
                else:
                    v.accounting = aot_row(v, args.save_hlo)
                    variants.append(v)
        if variants:
            try:
                rows += timed_rows(variants, args.steps, args.warmup, args.rounds, args.clock)
                if args.profile:
                    rows.append(profile(variants[0], min(args.steps, 3), args.profile))
            except Exception as e:
                rows.append(dict(batch=int(batch), dtype=dtype, error=repr(e)[:500]))
        for r in rows:
            print(json.dumps(r), flush=True)
        results += rows
        with open(os.path.join(out_dir, "bench_jax.json"), "w") as f:
            json.dump(results, f, indent=1)
        del variants
    return results


if __name__ == "__main__":
    main()
