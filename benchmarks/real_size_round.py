"""One whole self-training round of the GTA5 -> Cityscapes recipe at real size, through the real
launcher, with the platform's compute path (``model.dtype`` / ``model.atrous`` "auto").

    python -m benchmarks.real_size_round            # one GPU: label 200, retrain 200 steps, evaluate 100
    python -m benchmarks.real_size_round --gta5 2 --label 1 --steps 2 --evaluate 1 --workers 1 --scales 1.0  # CPU
    python -m benchmarks.real_size_round --smoke    # tiny network and images (the tests)

1. Fixture folders in the official layouts (``tests.fixtures_layouts``): ``--gta5`` GTA5 images of
   1914x1052, ``--label`` Cityscapes train and ``--evaluate`` val images of 2048x1024, written by
   ``--workers`` processes.
2. A weights file that claims to be a source model: a random ``deeplabv2_resnet101`` with the
   metadata of a converted one (19 classes, ImageNet normalisation).
3. ``python -m experiments.gta5_cityscapes`` (the CRST recipe: DeepLab-v2, batch 2, 512x1024 crops,
   15 target-train workers by ``--workers``) from that file (``model.init_is_source_model``), in a
   child process instrumented as ``benchmarks.bench_full_scale``: the source model evaluated, then
   one CBST round: the ``--label`` images pseudo-labelled with MST 0.9/1.0/1.2 + flip (the
   recipe's evaluation scales, so labelling and evaluation share their programs; ``--scales``
   changes both), ``--steps`` training steps through the real input pipeline, the ``--evaluate``
   images evaluated. (On a CPU, XLA's MST + flip program of one 1024x2048 image needs 19.7 GiB of
   temporaries in float32, single scale + flip 6.2 GiB: docs/performance.md.)

Reports (one JSON line on stdout, also ``$OUT/real_size_round.json``): wall time per phase with
the compile time inside it, the rates of each phase with compilation left out (images/s, steps/s,
and the time the training loop waited for host batches, i.e. whether the host starves the
device), the step time against ``--step-bench`` (a ``benchmarks.bench_train_step`` result file of
the same machine: the row of the same batch, dtype, atrous mode and folding), the device's peak
memory (where the backend reports it) and the largest process's peak RSS, and a projection of the
paper's full round from the measured rates: 2975 Cityscapes train images labelled, the recipe's
epochs of retraining (2 epochs of the 2975 images and its GTA5 subset at batch 2), 500 images
evaluated; compilation counted once.
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time

from benchmarks.bench_full_scale import exclusive_times, finish, output_shapes, phase_rows
from benchmarks.count_compiles import run_child

PAPER = dict(label=2975, evaluate=500, source_list=19984)  # Cityscapes train / val; CRST's GTA5 list
SIZES = {
    "real": dict(model="deeplabv2_resnet101", gta5_size=(1052, 1914), cs_size=(1024, 2048), crop=None,
                 eval_size=None),
    "smoke": dict(model="deeplabv2_resnet_small", gta5_size=(70, 120), cs_size=(64, 128), crop=(32, 64),
                  eval_size=(64, 128)),
}


# ------------------------------------------------------------------ inputs
def _write_part(job):
    from tests.fixtures_layouts import make_cityscapes, make_gta5

    kind, root, names, size, seed = job
    if kind == "gta5":
        make_gta5(root, n=names, size=size, seed=seed)
    else:
        make_cityscapes(root, n_train=0, n_val=0, stems={kind: names}, size=size, seed=seed)


def make_fixtures(root, gta5: int, label: int, evaluate: int, size, workers: int):
    """GTA5 (one process) and Cityscapes train/val (stems split over ``workers`` processes)."""
    from tests.fixtures_layouts import CITYSCAPES_FIXTURE_CITIES

    def stems(split, n):
        cities = CITYSCAPES_FIXTURE_CITIES[split]
        return [f"{cities[i % len(cities)]}_{i:06d}_{(19 * i + 19) % 1000000:06d}" for i in range(n)]

    jobs = [("gta5", os.path.join(root, "gta5"), gta5, size["gta5_size"], 0)]
    for split, n in (("train", label), ("val", evaluate)):
        for k, part in enumerate(stems(split, n)[i::max(1, workers)] for i in range(max(1, workers))):
            if part:
                jobs.append((split, os.path.join(root, "cityscapes"), part, size["cs_size"],
                             1 + k + (0 if split == "train" else 1000)))
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            list(pool.map(_write_part, jobs))
    else:
        for job in jobs:
            _write_part(job)


def write_source_model(path, model: str):
    """A random ``model`` saved as a converted source model would be (19 classes, ImageNet input).
    Drawn with numpy from the variables' shapes (``jax.eval_shape``: nothing is compiled or run):
    kernels normal with variance 1/fan-in (LeCun, as the layers' own initialiser), BN scale and
    running variance 1, biases and running means 0."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cbst_jax import models

    module = models.get_model(model, 19, normalization="imagenet", dtype="float32")
    shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "kernel":
            return rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
        return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    models.save_variables(path, variables,
                          models.make_metadata(model, 19, "imagenet", converter="benchmarks.real_size_round",
                                               note="random weights standing in for a source model"))


def launcher_args(root, workdir, weights, args, size):
    tup = lambda t: f"({t[0]}, {t[1]})"
    extra = [f"--config.input.crop={tup(size['crop'])}", f"--config.input.eval_size={tup(size['eval_size'])}",
             f"--config.self_training.prior_size={tup(size['eval_size'])}"] if size["crop"] else []
    return ["experiments.gta5_cityscapes", f"--workdir={workdir}",
            f"--config.source.root={os.path.join(root, 'gta5')}",
            f"--config.target.root={os.path.join(root, 'cityscapes')}",
            "--config.source.list_file=", "--config.target.list_file=",  # the fixtures' own file names
            f"--config.model.name={size['model']}", f"--config.model.init={weights}",
            "--config.model.init_is_source_model=True", "--config.methods=cbst",
            "--config.self_training.rounds=1", f"--config.self_training.steps_per_round={args.steps}",
            f"--config.predict.scales=({args.scales},)", "--config.predict.flip=True",
            f"--config.evaluate.scales=({args.scales},)", "--config.evaluate.flip=True",
            f"--config.input.workers={args.workers}", "--config.checkpoint_every=100000", *extra,
            *args.config]


# ------------------------------------------------------------------ report
def step_bench_row(path, config):
    """The row of ``path`` (a bench_train_step JSON list) with the round's batch, dtype, atrous and folding."""
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        rows = json.load(f)
    for r in rows:
        if all(r.get(k) == v for k, v in config.items()) and "ms_median" in r:
            return r
    return None


def paper_round_steps(batch: int, epochs: float) -> int:
    """Training steps of one CRST round on the full data: ``epochs`` epochs of the 2975 target
    images and the round-0 GTA5 subset (the recipe's portion of CRST's 19984-image list)."""
    from cbst_jax.data import pipeline
    from experiments.configs import gta5_cityscapes

    c = gta5_cityscapes.get_config()
    s0, ds, smax = c.input.source_portion
    sampler = pipeline.round_sampler(PAPER["source_list"], PAPER["label"], 0, batch_size=batch, mode=c.input.sampler,
                                     s0=s0, ds=ds, s_max=smax, subset_schedule="fresh", seed=0)
    return max(1, int(round(epochs * sampler.batches_per_epoch())))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gta5", type=int, default=16, help="GTA5 images (the round's source subset comes from them)")
    parser.add_argument("--label", type=int, default=200, help="Cityscapes train images, all pseudo-labelled")
    parser.add_argument("--steps", type=int, default=200, help="retraining steps of the round")
    parser.add_argument("--evaluate", type=int, default=100, help="Cityscapes val images evaluated")
    parser.add_argument("--workers", type=int, default=15, help="fixture writers and the pipeline's input.workers")
    parser.add_argument("--scales", default="0.9, 1.0, 1.2",
                        help="labelling and evaluation scales, with flip (default: MST, the recipe's test scales)")
    parser.add_argument("--step-bench", default="", help="bench_train_step's bench_jax.json of this machine")
    parser.add_argument("--smoke", action="store_true", help="tiny network and images (the tests)")
    parser.add_argument("--workdir", default="", help="scratch folder (default: temporary, removed)")
    parser.add_argument("--cache", default="", help="persistent compilation cache folder (default: none)")
    parser.add_argument("--timeout", type=float, default=4 * 3600)
    parser.add_argument("--config", action="append", default=[], help="a further launcher flag (repeatable)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args(argv)
    if args.child:
        from benchmarks.bench_full_scale import child

        return child(args.child, args.cache, extra[extra.index("--") + 1:] if "--" in extra else extra)

    import jax

    jax.devices()  # fail at once where the backend asked for (JAX_PLATFORMS) is missing, before any fixture
    size = SIZES["smoke" if args.smoke else "real"]
    scratch = args.workdir or tempfile.mkdtemp(prefix="real_size_round_")
    root, workdir = os.path.join(scratch, "data"), os.path.join(scratch, "work")
    weights, record = os.path.join(scratch, "source_model.npz"), os.path.join(scratch, "record.json")
    t0 = time.time()
    make_fixtures(root, args.gta5, args.label, args.evaluate, size, args.workers)
    fixtures_s = time.time() - t0
    t0 = time.time()
    write_source_model(weights, size["model"])
    weights_s = time.time() - t0
    command = launcher_args(root, workdir, weights, args, size)
    t0 = time.time()
    data = run_child("benchmarks.real_size_round", record, args.cache, command, timeout=args.timeout)
    wall = time.time() - t0
    peak_rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux; this
    # process's children: the fixture writers, the launcher (the largest) and its pipeline workers

    from cbst_jax import models

    with open(os.path.join(workdir, "seed_0", "config.json")) as f:
        cfg = json.load(f)

    compute = models.read_metadata(os.path.join(workdir, "seed_0", "models", "cbst_r0.npz")).get("compute", {})
    stages = exclusive_times(data["stage_events"])
    counts = {"label": ("images", args.label), "retrain": ("steps", args.steps),
              "evaluate_and_record": ("images", args.evaluate), "evaluate_and_record source": ("images", args.evaluate)}
    phases = phase_rows(data, stages, counts)
    retrain = next((v for k, v in phases.items() if k.startswith("retrain")), {})
    step_ms = (1000 * (retrain["seconds"] - retrain["compile_s"]) / args.steps if retrain.get("steps_per_s") else None)
    fed_ms = (1000 * (retrain["seconds"] - retrain["compile_s"] - retrain["data_wait_s"]) / args.steps
              if step_ms and "data_wait_s" in retrain else None)  # the step time with the host's waits left out
    batch = cfg["input"]["batch_size"]
    bench = step_bench_row(args.step_bench, dict(batch=batch, dtype=compute.get("dtype"), atrous=compute.get("atrous"),
                                                 bn_folded=bool(compute.get("bn_folded")), model=size["model"],
                                                 hw=cfg["input"]["crop"]))
    label = next((v for k, v in phases.items() if k.startswith("label")), {})
    evaluate = next((v for k, v in phases.items() if k.startswith("evaluate_and_record cbst")), {})
    compile_total = sum(r["seconds"] for r in data["compiles"])
    paper_steps = paper_round_steps(batch, cfg["self_training"]["epochs_per_round"])
    project = None
    if label.get("images_per_s") and step_ms and evaluate.get("images_per_s"):
        parts = dict(label_s=PAPER["label"] / label["images_per_s"], retrain_s=paper_steps * step_ms / 1000,
                     evaluate_s=PAPER["evaluate"] / evaluate["images_per_s"], compile_s=compile_total)
        project = dict(images_labelled=PAPER["label"], steps=paper_steps, images_evaluated=PAPER["evaluate"],
                       **{k: round(v, 1) for k, v in parts.items()}, total_s=round(sum(parts.values()), 1),
                       total_min=round(sum(parts.values()) / 60, 1))
    summary = dict(
        counts=dict(gta5=args.gta5, label=args.label, steps=args.steps, evaluate=args.evaluate, workers=args.workers),
        model=size["model"], compute=compute, batch=batch, crop=cfg["input"]["crop"],
        eval_size=cfg["input"]["eval_size"], predict_scales=cfg["predict"]["scales"],
        command="python -m " + " ".join(command), wall_s=round(wall, 1), fixtures_s=round(fixtures_s, 1),
        weights_s=round(weights_s, 1), phases=phases, compile_s=round(compile_total, 1),
        programs_compiled=sum(not r["hit"] for r in data["compiles"]),
        step_ms=round(step_ms, 2) if step_ms else None, step_ms_without_data_wait=round(fed_ms, 2) if fed_ms else None,
        step_bench_ms=round(bench["ms_median"], 2) if bench else None,
        step_vs_bench=round(step_ms / bench["ms_median"], 3) if bench and step_ms else None,
        data_wait_share=(round(retrain["data_wait_s"] / max(retrain["seconds"] - retrain["compile_s"], 1e-9), 3)
                         if "data_wait_s" in retrain else None),
        device_peak_gib=data.get("device_peak_gib"), peak_rss_gib=round(peak_rss_gib, 2),
        child_vm_hwm_gib=round((data["vm_hwm_mib"] or 0) / 1024, 2), outputs=output_shapes(workdir),
        paper_round_projection=project)
    return finish(summary, "real_size_round.json", None if args.workdir else scratch)


if __name__ == "__main__":
    sys.exit(main())
