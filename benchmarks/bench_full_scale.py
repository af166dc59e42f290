"""``experiments.gta5_cityscapes`` at real size on generated fixture folders: GTA5 1914x1052 and
Cityscapes 2048x1024 PNGs in the official layouts (``tests.fixtures_layouts``), the real
``deeplabv2_resnet101`` (random init), source-only training and one CBST round of a few steps, a
few target images pseudo-labelled and evaluated at 1024x2048.

    python -m benchmarks.bench_full_scale              # CPU: batch 1, crop 512x1024, float32
    python -m benchmarks.bench_full_scale --gpu        # GPU: batch 8, bfloat16, more images/steps
    python -m benchmarks.bench_full_scale --smoke      # tiny model and images (the tests)

What it proves, from a child process running the launcher (``python -m experiments.gta5_cityscapes``
in-process, with instruments installed first):
  * shapes: every input shape the network was traced with and its logits' shape, and the
    pseudo-label PNGs / evaluation predictions written (1024x2048);
  * memory: the child's peak RSS (``resource.getrusage(RUSAGE_CHILDREN)`` in this process, the
    largest process of the run) and the child's ``VmHWM`` after each stage;
  * the pass count: network forwards per pseudo-labelled and per evaluated image. ``jax.jit`` is
    wrapped so that every call of a jitted function is counted, and ``flax.linen.Module.apply`` of
    a network (a module with ``output_stride``) adds the rows of its input to the trace it runs in;
    so each execution adds the image rows its program pushes through the network (scales and flips
    included) to the round-loop stage on the Python stack;
  * compilations per stage (as ``benchmarks.count_compiles``) and wall time per stage (the
    ``cbst_jax.self_training.RoundLoop`` methods and ``cbst_jax.experiment.build``, timed, nested time
    subtracted), the time each training stage waited for host batches (``MixedIterator.__next__``)
    and the device's peak memory where the backend reports it.
One JSON summary on stdout (last line) and in ``$OUT/full_scale.json``.
"""
import argparse
import collections
import functools
import json
import os
import resource
import runpy
import shutil
import sys
import tempfile
import threading
import time

from benchmarks.count_compiles import Recorder, enable_cache, loop_stage, run_child

STAGE_METHODS = ("source_model", "label", "retrain", "evaluate_and_record")
SIZES = {  # images per split, training steps, batch, dtype, crop, eval canvas, image sizes
    "cpu": dict(gta5=4, cs_train=2, cs_val=1, source_steps=2, round_steps=2, batch=1, eval_batch=1,
                dtype="float32", crop=(512, 1024), eval_size=(1024, 2048), workers=1, model="deeplabv2_resnet101",
                gta5_size=(1052, 1914), cs_size=(1024, 2048)),
    "gpu": dict(gta5=32, cs_train=16, cs_val=8, source_steps=20, round_steps=20, batch=8, eval_batch=8,
                dtype="bfloat16", crop=(512, 1024), eval_size=(1024, 2048), workers=12, model="deeplabv2_resnet101",
                gta5_size=(1052, 1914), cs_size=(1024, 2048)),
    "smoke": dict(gta5=4, cs_train=2, cs_val=2, source_steps=2, round_steps=2, batch=2, eval_batch=2,
                  dtype="float32", crop=(32, 64), eval_size=(64, 128), workers=1, model="deeplabv2_resnet_small",
                  gta5_size=(70, 120), cs_size=(64, 128)),
}


# ------------------------------------------------------------------ instruments (child process)
class ForwardCounter:
    """Image rows pushed through the network, per round-loop stage (see the module docstring)."""

    def __init__(self):
        self.local = threading.local()
        self.rows = collections.Counter()
        self.shapes = set()

    def frames(self):
        if not hasattr(self.local, "frames"):
            self.local.frames = []
        return self.local.frames

    def add(self, rows, stage):
        if rows:
            self.rows[stage] += rows

    def install(self):
        import flax.linen as nn
        import jax

        counter, real_apply, real_jit = self, nn.Module.apply, jax.jit

        def apply(module, variables, *args, **kwargs):
            out = real_apply(module, variables, *args, **kwargs)
            if hasattr(type(module), "output_stride") and args and hasattr(args[0], "shape"):
                rows = int(args[0].shape[0])
                logits = out[0] if isinstance(out, tuple) else out
                counter.shapes.add((tuple(args[0].shape), tuple(getattr(logits, "shape", ()))))
                frames = counter.frames()
                if frames:
                    frames[-1] += rows
                else:  # an eager (un-jitted) forward
                    counter.add(rows, loop_stage(sys._getframe(1)))
            return out

        def jit(fun=None, **kwargs):
            if fun is None:
                return functools.partial(jit, **kwargs)
            return CountingJitted(real_jit(fun, **kwargs), counter)

        nn.Module.apply = apply
        jax.jit = jit


class CountingJitted:
    """A jitted function whose calls add the network rows of their program to the counter."""

    def __init__(self, jitted, counter):
        self._jitted, self._counter, self._rows = jitted, counter, {}
        functools.update_wrapper(self, jitted)

    def __getattr__(self, name):
        return getattr(self._jitted, name)

    def __call__(self, *args, **kwargs):
        import jax

        frames = self._counter.frames()
        nested = bool(frames)  # called while another counted function is being traced
        frames.append(0)
        try:
            out = self._jitted(*args, **kwargs)
        finally:
            traced = frames.pop()
        leaves = jax.tree.leaves((args, kwargs))
        signature = tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x).__name__))) for x in leaves)
        if traced:
            self._rows[signature] = traced
        rows = self._rows.get(signature, 0)
        if nested:
            frames[-1] += rows
        else:
            self._counter.add(rows, loop_stage(sys._getframe(1)))
        return out


def vm_hwm_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def time_stages(events):
    """Wraps the round loop's stage methods and the experiment's set-up: (method, stage key, start,
    end, VmHWM MiB) each."""
    from cbst_jax import experiment, self_training

    real_build = experiment.build

    def build(*args, **kwargs):
        t0 = time.time()
        try:
            return real_build(*args, **kwargs)
        finally:
            events.append(dict(method="build", stage="set-up", start=t0, end=time.time(), vm_hwm_mib=vm_hwm_mib()))

    experiment.build = build
    loop = getattr(self_training, "RoundLoop", None)
    for name in STAGE_METHODS:
        method = getattr(loop, name, None)
        if method is None:
            continue

        def timed(self, *args, _method=method, _name=name, **kwargs):
            key = getattr(args[0], "key", None) if args else None
            t0 = time.time()
            try:
                return _method(self, *args, **kwargs)
            finally:
                events.append(dict(method=_name, stage=key or "source", start=t0, end=time.time(),
                                   vm_hwm_mib=vm_hwm_mib()))

        setattr(loop, name, timed)


class DataWait:
    """Seconds the training loop waited in ``MixedIterator.__next__`` (in all, and for the first
    batch: the workers' start) and batches taken, per stage."""

    def __init__(self):
        self.seconds, self.batches, self.first = collections.Counter(), collections.Counter(), {}

    def install(self):
        from cbst_jax.data import pipeline

        real_next, wait = pipeline.MixedIterator.__next__, self

        def timed_next(iterator):
            t0 = time.perf_counter()
            try:
                return real_next(iterator)
            finally:
                stage, waited = loop_stage(sys._getframe(1)), time.perf_counter() - t0
                wait.seconds[stage] += waited
                wait.batches[stage] += 1
                wait.first.setdefault(stage, round(waited, 2))

        pipeline.MixedIterator.__next__ = timed_next


def device_peak_gib():
    """The first local device's peak memory in GiB, or None where the backend reports none (CPU)."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - no backend at all (a failed run): the record must still be written
        return None
    return round(stats["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in stats else None


def child(record_path, cache_dir, command):
    if cache_dir:
        enable_cache(cache_dir)
    compiles, forwards, waits, events = Recorder(), ForwardCounter(), DataWait(), []
    compiles.install()
    forwards.install()
    waits.install()
    time_stages(events)
    sys.argv = list(command)
    status, t0 = 0, time.time()
    try:
        runpy.run_module(command[0], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        with open(record_path, "w") as f:
            json.dump(dict(status=status, wall_s=round(time.time() - t0, 1), compiles=compiles.records,
                           forward_rows=dict(forwards.rows), shapes=sorted(map(list, forwards.shapes)),
                           stage_events=events, vm_hwm_mib=vm_hwm_mib(), device_peak_gib=device_peak_gib(),
                           data_wait_s={k: round(v, 2) for k, v in waits.seconds.items()},
                           first_batch_wait_s=waits.first, batches=dict(waits.batches)), f)
    return status


# ------------------------------------------------------------------ the parent
def make_fixtures(root, size):
    from tests.fixtures_layouts import make_cityscapes, make_gta5

    make_gta5(os.path.join(root, "gta5"), n=size["gta5"], size=size["gta5_size"])
    make_cityscapes(os.path.join(root, "cityscapes"), n_train=size["cs_train"], n_val=size["cs_val"],
                    size=size["cs_size"])


def launcher_args(root, workdir, size, extra=()):
    tup = lambda t: f"({t[0]}, {t[1]})"
    return ["experiments.gta5_cityscapes", f"--workdir={workdir}",
            f"--config.source.root={os.path.join(root, 'gta5')}",
            f"--config.target.root={os.path.join(root, 'cityscapes')}",
            "--config.source.list_file=", "--config.target.list_file=",  # the fixtures' own file names
            # the source phase at the benchmark's batch and crop, not the recipe's (CRST: 4 x 500x500)
            "--config.source_training.batch_size=0", "--config.source_training.crop=()",
            f"--config.model.name={size['model']}", f"--config.model.dtype={size['dtype']}",
            "--config.model.normalization=imagenet",  # random init: inputs near unit scale keep it finite
            "--config.model.init=none",  # a random-init source model on purpose (no weights here)
            "--config.methods=source_only,cbst", f"--config.input.crop={tup(size['crop'])}",
            f"--config.input.eval_size={tup(size['eval_size'])}", f"--config.input.batch_size={size['batch']}",
            f"--config.input.eval_batch_size={size['eval_batch']}", f"--config.input.workers={size['workers']}",
            "--config.input.source_portion=(1.0, 0.0, 1.0)",
            f"--config.source_training.steps={size['source_steps']}", "--config.self_training.rounds=1",
            f"--config.self_training.steps_per_round={size['round_steps']}", "--config.checkpoint_every=1000",
            *extra]


def exclusive_times(events):
    """Seconds per (method, stage) with time spent in nested stage methods subtracted."""
    out = collections.OrderedDict()
    for e in sorted(events, key=lambda e: e["start"]):
        inner = sum(o["end"] - o["start"] for o in events
                    if o is not e and o["start"] >= e["start"] and o["end"] <= e["end"]
                    and not any(p is not e and p is not o and p["start"] >= e["start"] and p["end"] <= e["end"]
                                and p["start"] <= o["start"] and o["end"] <= p["end"] for p in events))
        out[f"{e['method']} {e['stage']}"] = dict(seconds=round(e["end"] - e["start"] - inner, 1),
                                                  vm_hwm_mib_after=round(e["vm_hwm_mib"] or 0))
    return out


def phase_rows(data, stages, counts):
    """Per phase of ``stages`` (:func:`exclusive_times` of a child's record ``data``): wall seconds,
    the compile seconds inside them, the VmHWM after, the rate with compilation left out where
    ``counts`` gives the phase's work ({"label": ("images", n), "retrain": ("steps", n), ...},
    keyed by method, or "method source" for the source stage) and, for training phases, the time
    spent waiting for host batches."""
    compile_s = {}
    for r in data["compiles"]:
        compile_s[r["stage"]] = compile_s.get(r["stage"], 0.0) + r["seconds"]
    rows = {}
    for name, s in stages.items():
        c = compile_s.get(name, 0.0)
        row = dict(seconds=s["seconds"], compile_s=round(c, 1), vm_hwm_gib_after=round(s["vm_hwm_mib_after"] / 1024, 2))
        unit, n = counts.get(name.split(" ")[0] + (" source" if name.endswith(" source") else ""), (None, 0))
        if unit and n:
            net = max(s["seconds"] - c, 1e-9)
            row[f"{unit}_per_s"] = float(f"{n / net:.4g}")  # 4 significant digits
        if name in data.get("data_wait_s", {}):
            row["data_wait_s"] = data["data_wait_s"][name]
            row["first_batch_wait_s"] = data["first_batch_wait_s"].get(name)
            row["batches"] = data["batches"].get(name, 0)
        rows[name] = row
    return rows


def output_shapes(workdir):
    """Shapes of the pseudo-label PNGs and evaluation predictions the run wrote."""
    import numpy as np
    from PIL import Image

    seed = os.path.join(workdir, "seed_0")
    shapes = collections.Counter()
    labels_dir = os.path.join(seed, "pseudo_labels")
    for folder, _, files in os.walk(labels_dir):
        for name in files:
            if name.endswith(".png"):
                with Image.open(os.path.join(folder, name)) as im:
                    shapes[f"pseudo_label {im.size[1]}x{im.size[0]}"] += 1
    pred_dir = os.path.join(seed, "predictions")
    for name in sorted(os.listdir(pred_dir)) if os.path.isdir(pred_dir) else ():
        with np.load(os.path.join(pred_dir, name)) as z:
            for key in z.files:
                shapes[f"prediction {name}:{key} {'x'.join(map(str, z[key].shape))}"] += 1
    return dict(shapes)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="GPU sizes: batch 8, bfloat16, more images and steps")
    parser.add_argument("--smoke", action="store_true", help="tiny model and images (tests)")
    parser.add_argument("--workdir", default="", help="scratch folder (default: temporary, removed)")
    parser.add_argument("--cache", default="", help="persistent compilation cache folder (default: none)")
    parser.add_argument("--timeout", type=float, default=4 * 3600)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args(argv)
    if args.child:
        return child(args.child, args.cache, extra[extra.index("--") + 1:] if "--" in extra else extra)

    size = SIZES["smoke" if args.smoke else "gpu" if args.gpu else "cpu"]
    scratch = args.workdir or tempfile.mkdtemp(prefix="full_scale_")
    t0 = time.time()
    make_fixtures(os.path.join(scratch, "data"), size)
    fixtures_s = time.time() - t0
    workdir, record = os.path.join(scratch, "work"), os.path.join(scratch, "record.json")
    command = launcher_args(os.path.join(scratch, "data"), workdir, size, [a for a in extra if a != "--"])
    t0 = time.time()
    data = run_child("benchmarks.bench_full_scale", record, args.cache, command, timeout=args.timeout)
    wall = time.time() - t0
    peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    rows = data["forward_rows"]
    label_rows = sum(n for s, n in rows.items() if s.startswith("label "))
    eval_rows = {s: n for s, n in rows.items() if s.startswith("evaluate_and_record ")}
    compiles = collections.Counter(r["stage"] for r in data["compiles"] if not r["hit"])
    summary = dict(
        sizes=size, command="python -m " + " ".join(command), wall_s=round(wall, 1), fixtures_s=round(fixtures_s, 1),
        peak_rss_gib=round(peak_rss_mib / 1024, 2), child_vm_hwm_gib=round((data["vm_hwm_mib"] or 0) / 1024, 2),
        forwards_per_pseudo_labelled_image=label_rows / size["cs_train"],
        forwards_per_evaluated_image={s: n / size["cs_val"] for s, n in eval_rows.items()},
        forward_rows_by_stage=rows, network_shapes=data["shapes"], outputs=output_shapes(workdir),
        stages=exclusive_times(data["stage_events"]), programs_compiled_by_stage=dict(compiles),
        compile_s=round(sum(r["seconds"] for r in data["compiles"]), 1))
    return finish(summary, "full_scale.json", None if args.workdir else scratch)


def finish(summary: dict, name: str, scratch: str | None) -> int:
    """A benchmark's end: its summary as ``$OUT/<name>`` (when ``$OUT`` is set) and on stdout, its
    scratch folder removed (None: the user's workdir, kept)."""
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "w") as f:
            json.dump(summary, f, indent=1)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
