"""How many pseudo-labels change when one fixed model computes in bfloat16 instead of float32.

The same weights file is built twice (``dtype`` float32 and bfloat16; float32 parameters, logits,
softmax and statistics either way) and pseudo-labels the embedded pair's target-train split the
way a round does: ``cbst_jax.predictor.Predictor`` probabilities (flip-averaged softmax of the
upsampled logits), CBST class thresholds at portion ``--portion`` (``selection.class_thresholds``)
and ``selection.select_pseudo_labels``. Reports the pixels whose pseudo-label differs (another
class, or selected in one and ignored in the other), whose arg-max prediction differs, the
thresholds' relative differences and the largest probability difference.

    python -m experiments.synthetic --config=quick --workdir=/tmp/quick       # a trained demo net
    python -m benchmarks.bf16_pseudo_labels --weights /tmp/quick/seed_0/models/source.npz

One JSON line on stdout (also ``$OUT/bf16_pseudo_labels.json``).
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def pseudo_labels(weights, dtype, images, portion, scales, flip, batch):
    """(probabilities, thresholds, pseudo-labels) of ``weights`` built with activation ``dtype``."""
    from cbst_jax import models, selection
    from cbst_jax import sharding as shd
    from cbst_jax.predictor import Predictor

    meta = models.read_metadata(weights)
    model = models.get_model(meta["architecture"], meta["num_classes"], dtype=dtype,
                             normalization=meta["normalization"])
    variables = models.load_variables(weights)
    predictor = Predictor(model, meta["num_classes"], shd.make_mesh(), images.shape[1:3], scales, flip)
    probs_fn = jax.jit(predictor.probs)
    probs = np.concatenate([np.asarray(probs_fn(variables, images[i:i + batch]))
                            for i in range(0, len(images), batch)])
    lam = selection.class_thresholds(jnp.asarray(probs), portion)
    return probs, np.asarray(lam), np.asarray(selection.select_pseudo_labels(jnp.asarray(probs), lam))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="a weights file (e.g. a synthetic run's models/source.npz)")
    parser.add_argument("--images", type=int, default=320, help="target-train images (the default recipe's count)")
    parser.add_argument("--size", default="64,128", help="image H,W (the weights' training size)")
    parser.add_argument("--portion", type=float, default=0.2, help="CBST portion p (round 0 of the recipes)")
    parser.add_argument("--scales", default="1.0")
    parser.add_argument("--no-flip", action="store_true")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    from cbst_jax.data.synthetic import RenderedSource, open_synthetic

    h, w = (int(v) for v in args.size.split(","))
    split = RenderedSource(open_synthetic("target", "train", height=h, width=w, num_images=args.images))
    images = np.asarray(split.images)
    scales = tuple(float(s) for s in args.scales.split(","))
    t0 = time.time()
    p32, lam32, lab32 = pseudo_labels(args.weights, "float32", images, args.portion, scales, not args.no_flip,
                                      args.batch)
    p16, lam16, lab16 = pseudo_labels(args.weights, "bfloat16", images, args.portion, scales, not args.no_flip,
                                      args.batch)
    pixels = lab32.size
    differ = lab32 != lab16
    selected32, selected16 = lab32 != 255, lab16 != 255
    row = dict(weights=args.weights, images=args.images, size=[h, w], portion=args.portion, scales=list(scales),
               flip=not args.no_flip, pixels=int(pixels),
               pseudo_labels_differ=int(differ.sum()), pseudo_labels_differ_share=float(differ.mean()),
               selected_float32=int(selected32.sum()), selected_bfloat16=int(selected16.sum()),
               selected_in_one_only=int((selected32 != selected16).sum()),
               other_class_where_both_selected=int((differ & selected32 & selected16).sum()),
               argmax_differ=int((p32.argmax(-1) != p16.argmax(-1)).sum()),
               argmax_differ_share=float((p32.argmax(-1) != p16.argmax(-1)).mean()),
               max_abs_prob_diff=float(np.abs(p32 - p16).max()),
               threshold_rel_diff_max=float(np.max(np.abs(lam16 - lam32) / np.maximum(np.abs(lam32), 1e-30))),
               thresholds_float32=lam32.tolist(), thresholds_bfloat16=lam16.tolist(),
               probs_dtype=[str(p32.dtype), str(p16.dtype)], seconds=round(time.time() - t0, 1),
               backend=jax.default_backend())
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bf16_pseudo_labels.json"), "w") as f:
            json.dump(row, f, indent=1)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    main()
