"""How much of the target each CRST label regulariser keeps, as a function of its weight α.

With the ignore option ŷ = 0 costing f(0) = 0, a pixel is kept only where the regularised
objective at the best soft label is negative. LRENT's r(ŷ) = Σ ŷ log ŷ ≤ 0 makes keeping slightly
cheaper than in CBST; LRL2 (r ≥ 1/K) and LRKLD (r ≥ log K) make it dearer by about α·r, so at
CRST's LRENT weight α = 0.25 they keep almost nothing. This script measures the kept fraction of
the target train split (no evaluation labels involved) for CBST and each LR* kind over a grid of
α, from a finished run's source model, at round 0's portion; where the target train split has
hidden labels (the embedded pair) it also prints the kept pixels' precision, for information.
Both keep rules (``cbst_jax.crst.soft_pseudo_labels``) are measured, and how soft the labels are
(the mean mass of a kept pixel's soft label on its hard class).

    python -m benchmarks.lr_selection --workdir=runs/synthetic/seed_0 [--alphas=0.01,0.03,0.1,0.25]
"""
from __future__ import annotations

import argparse
import os

import numpy as np


def measure(workdir: str, alphas, kinds=("lrent", "lrl2", "lrkld"), keeps=("objective", "cbst")):
    from cbst_jax import experiment
    from cbst_jax.methods import SOURCE, parse, portion_at, stages
    from cbst_jax.config_lib import seed_record
    from cbst_jax.run_ledger import RunLedger
    from cbst_jax.workdir import SeedDir

    cfg = SeedDir(workdir).read_config()
    ledger = RunLedger(SeedDir(workdir), seed_record(cfg), stages(parse(cfg.methods), cfg.self_training.rounds))
    if not ledger.trained(SOURCE):
        raise SystemExit(f"{workdir}: no trained source model (run the experiment first)")
    exp = experiment.build(cfg, SeedDir(workdir), cfg.seed)
    variables = ledger.trained_variables(SOURCE)
    portion = portion_at(cfg.self_training.portion, 0)
    hidden = exp.data.hidden_label_key

    def batches():
        return (g for g, _ in exp.batches(exp.data.target_train, hidden))

    lam, _ = exp.predictor.thresholds(variables, batches, portion, "cbst", None, cfg.self_training.select_subsample)

    def tally(fn):
        picked = correct = valid = 0
        top = []
        for g in batches():
            out = fn(g)
            picked += int(np.asarray(out[-3]).sum())
            correct += int(np.asarray(out[-2]).sum())
            valid += int(out[-1])
            if len(out) == 6:  # soft: the label's mass on its hard class, over kept pixels
                hard, mass = np.asarray(out[0]), np.asarray(out[1])
                top.append(mass[hard != 255].astype(np.float64) / 255)
        top = np.concatenate(top) if top else np.zeros(0)
        return {"kept_fraction": picked / max(valid, 1),
                "precision": correct / picked if picked and hidden else None,
                "top_mass": float(top.mean()) if top.size else None}

    rows = [dict(method="cbst", alpha=None, keep="cbst",
                 **tally(lambda g: exp.predictor.pseudo_labels(variables, g, lam)))]
    for kind in kinds:
        for keep in keeps:
            for a in alphas:
                rows.append(dict(method=kind, alpha=a, keep=keep, **tally(lambda g: exp.predictor.soft_pseudo_labels(
                    variables, g, lam, kind=kind, alpha=a, stride=cfg.self_training.soft_label_stride, keep=keep))))
    return rows, portion


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="a finished run's seed folder (holds config.json)")
    ap.add_argument("--alphas", default="0.003,0.01,0.03,0.1,0.25")
    args = ap.parse_args(argv)
    alphas = [float(a) for a in args.alphas.split(",")]
    rows, portion = measure(os.path.abspath(args.workdir), alphas)
    print(f"round-0 portion p = {portion}; kept fraction of the target train split's pixels\n")
    print("| method | keep | α | kept fraction | mean mass on the hard class | precision (hidden labels) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        prec = "n/a" if r["precision"] is None else f"{100 * r['precision']:.1f} %"
        alpha = "—" if r["alpha"] is None else f"{r['alpha']:g}"
        top = "1 (hard)" if r["method"] == "cbst" else ("n/a" if r["top_mass"] is None else f"{r['top_mass']:.3f}")
        print(f"| {r['method']} | {r['keep']} | {alpha} | {100 * r['kept_fraction']:.2f} % | {top} | {prec} |")


if __name__ == "__main__":
    main()
