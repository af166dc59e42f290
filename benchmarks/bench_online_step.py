"""Times the online teacher-student step (:mod:`cbst_jax.online_step`), or counts its work.

The step is built exactly as the run builds it (``cbst_jax.trainer``): the network of
``cbst_jax.models.get_model``, its parameter groups, ``train_step.make_optimizer`` (AdamW, the
transformer recipes'), ``online_step.OnlineConfig`` with its published defaults and
``online_state_initializer`` / ``make_online_step``. Per policy (``--policy fixed,class_balanced``)
one compiled program of ``--batch`` source + ``--batch`` target crops (DAFormer's 2 + 2); the
class-balanced policy holds a window of ``--window`` target batches; ``--fd on`` adds the
ImageNet feature distance (the network's ``backbone/norm4``, DAFormer's weight 0.005, the
initial network as the frozen ImageNet model).

Timing: each policy's program is compiled first (``compile_s``, untimed for the steps), then
``--rounds`` interleaved rounds of ``--steps`` steps per policy after ``--warmup`` steps each,
every step closed by ``block_until_ready``; rows give ms/step median and min and img/s (source +
target crops per second, 2·batch per step). ``--aot`` compiles for abstract inputs only (nothing
runs). Every row carries XLA's cost analysis (FLOPs, bytes accessed) and memory analysis
(argument / output / temp bytes, per device) of its program; a last row gives the same for the
offline step of the same network, size and 2·batch rows (``benchmarks.bench_train_step``'s project
step, AdamW, compiled for abstract inputs; ``--offline off`` skips it) and each online row its
``flop_ratio_to_offline`` (compiled) and ``lowered_flop_ratio_to_offline``. The offline row comes first.

Each row also states the window the state holds: ``window_bytes`` (all its leaves, global) and
``window_layout`` (leaf: shape, dtype).

  python -m benchmarks.bench_online_step                                   # MiT-B5 512x512, 2+2, both policies
  python -m benchmarks.bench_online_step --aot --model daformer_mit_b0     # XLA's accounting, with the offline row
  python -m benchmarks.bench_online_step --smoke                           # tiny model on CPU

One JSON line per row on stdout; all rows in $OUT/bench_online.json.
"""
import argparse
import json
import os
import time

import jax
import numpy as np

from benchmarks import bench_train_step
from cbst_jax import models, online_step, sharding as shd, train_step
from cbst_jax.device_thresholds import portion_words

NUM_CLASSES = 19
FD_LAYER = ("backbone", "norm4")  # the MiT encoder's last stage (experiments/configs/gta5_cityscapes.py)
FD_WEIGHT = 0.005                 # DAFormer's imnet_feature_dist_lambda
WEIGHT_DECAY = 0.01               # DAFormer's AdamW
LR = 6e-5                         # DAFormer's AdamW learning rate


def host_batch(batch, hw, seed=0):
    """Random uint8 source and target crops and source labels (first 4 rows ignored)."""
    rng = np.random.RandomState(seed)
    label = rng.randint(0, NUM_CLASSES, (batch, *hw)).astype(np.uint8)
    label[:, :4] = 255
    return dict(source_image=rng.randint(0, 256, (batch, *hw, 3)).astype(np.uint8), source_label=label,
                target_image=rng.randint(0, 256, (batch, *hw, 3)).astype(np.uint8))


def resolve_dtype(dtype):
    return ("bfloat16" if jax.default_backend() != "cpu" else "float32") if dtype == "auto" else dtype


def window_summary(window):
    """The window's bytes (all leaves, global) and layout, read off the state's own leaves."""
    if window is None:
        return dict(window_bytes=0, window_layout={})
    leaves = {name: getattr(window, name) for name in ("conf", "pred", "filled", "cursor")}
    return dict(window_bytes=int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in leaves.values())),
                window_layout={k: [list(a.shape), str(np.dtype(a.dtype))] for k, a in leaves.items()})


class OnlineVariant:
    """One compiled online step of ``policy``: ``advance(state) -> state`` runs one step."""

    def __init__(self, model, policy, batch, dtype, hw, window, fd, abstract=False):
        self.row = dict(step="online", model=model, policy=policy, batch_source=batch, batch_target=batch,
                        hw=list(hw), dtype=dtype, window_batches=window if policy == "class_balanced" else 0,
                        fd=fd, optimizer="adam")
        module = models.get_model(model, NUM_CLASSES, dtype=dtype, normalization="imagenet")
        key = jax.random.key(0)
        image0 = np.zeros((1, *hw, 3), np.uint8)
        variables = (jax.eval_shape(module.init, key, jax.ShapeDtypeStruct(image0.shape, image0.dtype)) if abstract
                     else jax.jit(module.init)(key, image0))
        mesh = shd.make_mesh()
        groups = models.param_groups(module, variables["params"])
        tx = train_step.make_optimizer(groups, weight_decay=WEIGHT_DECAY, optimizer="adam")
        config = online_step.OnlineConfig(num_classes=NUM_CLASSES, policy=policy, window_batches=window,
                                          fd_weight=FD_WEIGHT if fd else 0.0, fd_layer=FD_LAYER if fd else (),
                                          stride=module.output_stride)
        init = online_step.online_state_initializer(tx, mesh, config, (batch, *hw))
        step = online_step.make_online_step(module, tx, config, mesh, groups)
        host = host_batch(batch, hw)
        if abstract:
            self.state = jax.eval_shape(init, variables, jax.random.key(0))
            data = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), host)
        else:
            self.state = init(jax.tree.map(np.asarray, jax.device_get(variables)), 0)
            data = shd.to_global(host, mesh)
        self.row.update(window_summary(self.state.window), devices=mesh.devices.size)
        lr, words = np.float32(LR), portion_words(0.5)
        consts = dict(prior=None, imagenet=variables if fd else None)
        self.lowered = step.jitted.lower(self.state, data, lr, words, consts)
        t0 = time.perf_counter()
        self.compiled = self.lowered.compile()
        self.row["compile_s"] = round(time.perf_counter() - t0, 2)
        self.metrics = None

        def advance(state):
            state, self.metrics = self.compiled(state, data, lr, words, consts)
            return state

        self.advance = advance

    def accounting(self):
        """XLA's cost and memory analysis of the compiled step (per device)."""
        row = dict(self.row)
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost:
            row["tflop_per_step"] = cost.get("flops", float("nan")) / 1e12
            row["gb_accessed"] = cost.get("bytes accessed", float("nan")) / 1e9
        # the program JAX emits, before the backend's rewrites (XLA's CPU backend counts a depthwise
        # convolution's kernel gradient as a dense one: docs/performance.md, transformer networks)
        lowered = self.lowered.cost_analysis()
        lowered = lowered[0] if isinstance(lowered, (list, tuple)) else lowered
        if lowered and "flops" in lowered:
            row["tflop_per_step_lowered"] = lowered["flops"] / 1e12
        mem = self.compiled.memory_analysis()
        if mem is not None:
            for field in ("argument", "output", "alias", "temp"):
                if hasattr(mem, f"{field}_size_in_bytes"):
                    row[f"{field}_bytes"] = int(getattr(mem, f"{field}_size_in_bytes"))
        row.update(device=jax.devices()[0].device_kind, jax=jax.__version__)
        return row


def offline_row(model, batch, dtype, hw):
    """The offline project step (AdamW) of ``bench_train_step`` for ``batch`` rows, XLA's accounting."""
    v = bench_train_step.Variant("project", model, batch, dtype, hw, "dilated", "upsample", num_classes=NUM_CLASSES,
                                 abstract=True, optimizer="adam")
    r = bench_train_step.aot_row(v)
    out = dict(step="offline", model=model, batch=batch, hw=list(hw), dtype=dtype, optimizer="adam",
               compile_s=r["compile_s"], tflop_per_step=r.get("tflop_per_step"),
               tflop_per_step_lowered=r.get("tflop_per_image_lowered", float("nan")) * batch,
               gb_accessed=r.get("gb_accessed"),
               device=r["device"], jax=r["jax"])
    for field in ("argument", "output", "alias", "temp"):
        if f"{field}_gib" in r:
            out[f"{field}_bytes"] = int(round(r[f"{field}_gib"] * 2**30))
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="demo_segnet at 32x64, 2 steps")
    parser.add_argument("--model", default="daformer_mit_b5")
    parser.add_argument("--size", default="512,512", help="crop H,W")
    parser.add_argument("--batch", type=int, default=2, help="source crops per step (as many target crops)")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="auto: bfloat16 on an accelerator, float32 on CPU")
    parser.add_argument("--policy", default="fixed,class_balanced", help="threshold policies, interleaved")
    parser.add_argument("--window", type=int, default=8, help="class-balanced window, in target batches")
    parser.add_argument("--fd", choices=("on", "off"), default="off", help="ImageNet feature distance")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per policy and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--aot", action="store_true", help="compile for abstract inputs; report XLA's accounting")
    parser.add_argument("--offline", choices=("on", "off"), default="on",
                        help="also the offline step's accounting (same network, size, 2*batch rows; one more compile)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.size, args.steps, args.warmup, args.window = "demo_segnet", "32,64", 2, 1, 2
    for policy in args.policy.split(","):
        if policy not in ("fixed", "class_balanced"):
            parser.error(f"--policy: {policy!r} is not one of fixed, class_balanced")
    size = args.size.split(",")
    if len(size) != 2 or not all(v.isdigit() and int(v) > 0 for v in size):
        parser.error(f"--size: {args.size!r} is not H,W (two positive integers)")
    for name in ("batch", "window", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: {getattr(args, name)} is not a positive integer")
    return args


def timed_rows(variants, steps, warmup, rounds):
    """``warmup`` steps each, then ``rounds`` x (``steps`` steps of each policy)."""
    times = [[] for _ in variants]
    for v in variants:
        v.state, _ = bench_train_step.time_steps(v.advance, v.state, 0, warmup)
    for _ in range(rounds):
        for v, ts in zip(variants, times):
            v.state, t = bench_train_step.time_steps(v.advance, v.state, steps)
            ts += t
    rows = []
    for v, ts in zip(variants, times):
        ms = 1000 * float(np.median(ts))
        images = v.row["batch_source"] + v.row["batch_target"]
        rows.append(dict(v.accounting(), ms_median=ms, ms_min=1000 * min(ts), steps=len(ts),
                         img_per_s=images * 1000 / ms,
                         process_peak_mem_gib=bench_train_step.peak_memory_gib(),
                         loss=float(v.metrics["loss"]), finite=bool(v.metrics["finite"])))
    return rows


def main(argv=None):
    args = parse_args(argv)
    hw = tuple(int(v) for v in args.size.split(","))
    dtype = resolve_dtype(args.dtype)
    out_path = os.path.join(os.environ.get("OUT", "."), "bench_online.json")
    rows, variants, offline = [], [], None

    def emit(new_rows):  # print and save as they come (a long compile cut short keeps the rows so far)
        for r in new_rows:
            if offline is not None and r is not offline:
                r["flop_ratio_to_offline"] = r["tflop_per_step"] / offline["tflop_per_step"]
                r["lowered_flop_ratio_to_offline"] = r["tflop_per_step_lowered"] / offline["tflop_per_step_lowered"]
            print(json.dumps(r), flush=True)
        rows.extend(new_rows)
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)

    if args.offline == "on":
        offline = dict(offline_row(args.model, 2 * args.batch, dtype, hw), aot=True)
        emit([offline])
    for policy in args.policy.split(","):
        v = OnlineVariant(args.model, policy, args.batch, dtype, hw, args.window, args.fd == "on", abstract=args.aot)
        if args.aot:
            emit([dict(v.accounting(), aot=True)])
        else:
            variants.append(v)
    if variants:
        emit(timed_rows(variants, args.steps, args.warmup, args.rounds))
    return rows


if __name__ == "__main__":
    main()
