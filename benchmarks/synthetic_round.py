"""The embedded benchmark's run timed phase by phase: ``python -m experiments.synthetic`` with the
given flags, in a child process instrumented as ``benchmarks.bench_full_scale`` (set-up, which
renders the pair; source training; each evaluation, labelling and retraining), with the training
rates (steps/s with compilation left out) and the time the training loop waited for host batches,
and the time of each self-training round (its labelling, retraining and evaluation).

    python -m benchmarks.synthetic_round -- --config=gpu --config.methods=source_only,cbst   # a lent GPU
    python -m benchmarks.synthetic_round -- --config=quick                                   # CPU

One JSON line on stdout, also ``$OUT/synthetic_round.json``; ``--workdir`` keeps the run's workdir.
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

from benchmarks.bench_full_scale import exclusive_times, phase_rows
from benchmarks.count_compiles import run_child


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="", help="the run's workdir (default: temporary, removed)")
    parser.add_argument("--cache", default="", help="persistent compilation cache folder (default: none)")
    parser.add_argument("--timeout", type=float, default=4 * 3600)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        from benchmarks.bench_full_scale import child

        return child(args.child, args.cache, flags)

    scratch = tempfile.mkdtemp(prefix="synthetic_round_")
    workdir = args.workdir or os.path.join(scratch, "work")
    command = ["experiments.synthetic", *flags, f"--workdir={workdir}"]
    t0 = time.time()
    data = run_child("benchmarks.synthetic_round", os.path.join(scratch, "record.json"), args.cache, command,
                     timeout=args.timeout)
    wall = time.time() - t0
    seed = os.path.join(workdir, "seed_0")
    with open(os.path.join(seed, "config.json")) as f:
        cfg = json.load(f)
    syn, st = cfg["synthetic"], cfg["self_training"]
    counts = {"source_model source": ("steps", cfg["source_training"]["steps"]),
              "evaluate_and_record": ("images", syn["num_target_val"]),
              "evaluate_and_record source": ("images", syn["num_target_val"]),
              "label": ("images", syn["num_target_train"]),
              "retrain": ("steps", st["steps_per_round"] or _round_steps(seed))}
    phases = phase_rows(data, exclusive_times(data["stage_events"]), counts)
    rounds = {}
    for name, row in phases.items():
        m = re.fullmatch(r"(label|retrain|evaluate_and_record) (\w+/r\d+)", name)
        if m:
            rounds.setdefault(m.group(2), 0.0)
            rounds[m.group(2)] += row["seconds"]
    summary = dict(command="python -m " + " ".join(command), wall_s=round(wall, 1), child_wall_s=data["wall_s"],
                   size=[syn["height"], syn["width"]], images=[syn["num_source"], syn["num_target_train"],
                                                               syn["num_target_val"]],
                   batch=cfg["input"]["batch_size"], workers=cfg["input"]["workers"],
                   compute=_compute(seed), phases=phases, round_s={k: round(v, 1) for k, v in rounds.items()},
                   compile_s=round(sum(r["seconds"] for r in data["compiles"]), 1),
                   device_peak_gib=data.get("device_peak_gib"),
                   child_vm_hwm_gib=round((data["vm_hwm_mib"] or 0) / 1024, 2))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "synthetic_round.json"), "w") as f:
            json.dump(summary, f, indent=1)
        for name in ("results.md", "metrics.jsonl"):
            if os.path.exists(os.path.join(seed, name)):
                shutil.copy(os.path.join(seed, name), os.path.join(out, name))
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(summary))
    return 0


def _round_steps(seed):
    """Training steps of the first round (its evaluation row's), where epochs set them."""
    with open(os.path.join(seed, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return next((r["steps"] for r in rows if r.get("kind") == "eval" and r.get("round") == 0 and "steps" in r), 0)


def _compute(seed):
    from cbst_jax import models

    path = os.path.join(seed, "models", "source.npz")
    return models.read_metadata(path).get("compute") if os.path.exists(path) else None


if __name__ == "__main__":
    sys.exit(main())
