"""The set-up of one seed's run: the mesh, the data, the network, its initial variables, the
predictors (inference, thresholds and pseudo-labels at ``predict.scales``; evaluation at
``evaluate.scales``) and, where a method needs it, the spatial prior. Built once per (config,
seed) and read by every step of the round loop."""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from tqdm.auto import tqdm

from cbst_jax import methods as methods_lib
from cbst_jax import priors
from cbst_jax import sharding as shd
from cbst_jax.data import pipeline
from cbst_jax.data.experiment_data import ExperimentData, open_experiment_data
from cbst_jax.errors import RunError
from cbst_jax.predict import Predictor
from cbst_jax.workdir import SeedDir


@dataclasses.dataclass
class Experiment:
    config: object
    seed_dir: SeedDir        # where the seed's run lives (cbst_jax.workdir)
    mesh: object
    data: ExperimentData
    methods: list            # cbst_jax.methods.Method, in the order they run
    model: object
    predictor: Predictor     # pseudo-labelling: predict.scales / predict.flip
    canvas: tuple            # (H, W) of evaluation and pseudo-labelling batches
    prior: object = None     # the spatial prior q on the canvas, replicated (CBST-SP, ST-SP)
    eval_predictor: Predictor | None = None  # evaluation: evaluate.scales / evaluate.flip (None: predictor)
    mst_predictor: Predictor | None = None   # the extra multi-scale evaluation of evaluate.mst_methods
    mst_methods: tuple = ()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def eval_batch_size(self) -> int:
        """The global evaluation batch, a multiple of the device count."""
        n = self.mesh.devices.size
        return max(n, -(-self.config.input.eval_batch_size // n) * n)

    def batches(self, source, label_key=None, desc: str | None = None):
        """(global batch, host batch) pairs: ``source`` in fixed-shape padded batches on the
        canvas (the predictor's input), with a progress bar when ``desc`` is given."""
        it = pipeline.EvalIterator(source, batch_size=self.eval_batch_size(), canvas=self.canvas,
                                   label_key=label_key, workers=eval_workers(self.config))
        total = -(-len(source) // self.eval_batch_size())
        for host in tqdm(it, total=total, desc=desc, leave=False,
                         disable=desc is None or jax.process_index() != 0):
            yield shd.to_global(host, self.mesh), host


def eval_workers(config) -> int:
    """Decoding threads of evaluation / pseudo-labelling batches (``input.workers``, -1: all cores but one)."""
    from cbst_jax.data.pipeline import default_workers

    return default_workers() if config.input.workers < 0 else max(1, config.input.workers)


def build(config, seed_dir: SeedDir) -> Experiment:
    mesh = shd.make_mesh()
    data = open_experiment_data(config)
    model = build_model(config)
    canvas = tuple(config.input.eval_size)
    predictor = Predictor(model, config.num_classes, mesh, canvas, config.predict.scales, config.predict.flip)
    eval_predictor = predictor
    if (tuple(float(s) for s in config.evaluate.scales), bool(config.evaluate.flip)) != (predictor.scales,
                                                                                           predictor.flip):
        eval_predictor = Predictor(model, config.num_classes, mesh, canvas, config.evaluate.scales,
                                   config.evaluate.flip)
    mst_methods = tuple(m.strip() for m in str(config.evaluate.mst_methods).split(",") if m.strip())
    mst = (Predictor(model, config.num_classes, mesh, canvas, config.evaluate.mst_scales, config.evaluate.mst_flip)
           if mst_methods else None)
    exp = Experiment(config, seed_dir, mesh, data, methods_lib.parse(config.methods), model, predictor, canvas,
                     eval_predictor=eval_predictor, mst_predictor=mst, mst_methods=mst_methods)
    if any(m.spatial_prior for m in exp.methods):
        exp.prior = spatial_prior(exp)
    return exp


def build_model(config, platform: str | None = None):
    """The network of ``config.model``, with the input normalisation its weights expect
    (``model.normalization="auto"``: the one recorded in ``model.init``'s metadata) and the compute
    path of ``platform`` (``model.dtype`` / ``model.atrous`` "auto": ``models.registry.resolve_compute``;
    None: this process's backend, which asking for initialises)."""
    from cbst_jax import config_lib, models
    from cbst_jax.models.registry import resolve_compute

    init = config_lib.init_file(config)
    metadata = models.read_metadata(init) if init else None
    normalization = models.resolve_normalization(config.model.normalization, metadata, config.model.name,
                                                 path=init or "model.init")
    dtype, atrous = resolve_compute(config.model.name, config.model.dtype, config.model.atrous, platform)
    return models.get_model(config.model.name, config.num_classes, dtype=dtype,
                            train_bn=config.model.train_bn, normalization=normalization, atrous=atrous)


def compute_path(model) -> dict:
    """How ``model`` computes: activation dtype, atrous mode, frozen BN folded into its convolutions
    or not (None: no BatchNorm), and the platform."""
    import jax.numpy as jnp

    folded = getattr(model, "fold_bn", None)
    return {"dtype": jnp.dtype(model.dtype).name, "atrous": getattr(model, "atrous", "dilated"),
            "bn_folded": None if folded is None else bool(folded and not model.train_bn),
            "platform": jax.default_backend()}


def weights_metadata(config, model, **provenance) -> dict:
    """The metadata a weights file of this run's network carries (``cbst_jax.models.save_variables``),
    with the run's evaluation settings as ``inference`` (``cbst_jax.infer``'s defaults)."""
    from cbst_jax import models

    return models.make_metadata(config.model.name, config.num_classes, model.normalization,
                                inference=inference_settings(config), compute=compute_path(model), **provenance)


def inference_settings(config) -> dict:
    """The canvas, scales and flip a run evaluates with (a run from before ``evaluate.*``: ``predict.*``)."""
    settings = config.get("evaluate") or config.predict
    return {"canvas": [int(v) for v in config.input.eval_size], "scales": [float(s) for s in settings["scales"]],
            "flip": bool(settings["flip"])}


def init_variables(config, model, rng, crop):
    """Random init, merged with converted weights when ``config.model.init`` names a file."""
    from cbst_jax import config_lib, models

    dummy = np.zeros((1, crop[0], crop[1], 3), np.float32)
    variables = jax.jit(lambda k: model.init(k, dummy, train=False))(rng)
    variables = jax.tree.map(np.asarray, variables)
    init = config_lib.init_file(config)
    if init:
        variables = merge_variables(variables, models.load_variables(init), init,
                                    keep_classes=class_map(config.model.init_class_map))
    return variables


def class_map(name: str):
    """The classes ``model.init_class_map`` keeps of a 19-class classifier, in order (None: no map)."""
    from cbst_jax import labels

    return {"": None, "nthu13": labels.NTHU13_TRAINIDS}[name]


def restrict_classes(init, loaded, keep, path):
    """``loaded`` with every classifier leaf cut to the classes ``keep`` (19-class trainIds, in
    order) where ``init`` (the network built for ``len(keep)`` classes) has them: the logits of
    the restricted network are the loaded network's logits at ``keep``. A leaf that mixes
    classes (an FCN upsampling kernel) must not feed a kept class from a dropped one."""
    from flax import traverse_util

    keep = np.asarray(keep)
    flat_i = traverse_util.flatten_dict(init)
    flat_l = dict(traverse_util.flatten_dict(loaded))
    restricted = 0
    for k, v in flat_i.items():
        if k not in flat_l or flat_l[k].shape == v.shape:
            continue
        have, want = flat_l[k].shape, v.shape
        axes = [a for a in range(len(want)) if len(have) == len(want) and have[a] != want[a]]
        if not axes or any(have[a] <= keep.max() or want[a] != len(keep) for a in axes):
            continue  # not a classifier leaf of these class counts: merge_variables reports it
        leaf = np.asarray(flat_l[k])
        if len(axes) > 1:
            dropped = np.setdiff1d(np.arange(have[axes[0]]), keep)
            for a, b in ((axes[0], axes[1]), (axes[1], axes[0])):
                cross = np.take(np.take(leaf, keep, axis=a), dropped, axis=b)
                if np.any(cross != 0):
                    raise RunError(f"{path}: cannot keep {len(keep)} of the classes of {'/'.join(k)}: it mixes them "
                                   f"with the dropped ones (not a per-class map)")
        for a in axes:
            leaf = np.take(leaf, keep, axis=a)
        flat_l[k] = leaf
        restricted += 1
    if not restricted:
        raise RunError(f"{path}: model.init_class_map found no classifier to restrict to {len(keep)} classes")
    return traverse_util.unflatten_dict(flat_l)


def merge_variables(init, loaded, path, keep_classes=None):
    """Loaded leaves replace initial ones; with ``keep_classes`` the loaded classifier is first
    restricted to those classes (:func:`restrict_classes`). Otherwise a classifier of another
    class count is left at its random init (as the references skip the COCO head; a declared
    source model of another class count is refused by ``cbst_jax.preflight``). Any other
    mismatch is an error."""
    from flax import traverse_util

    if keep_classes is not None:
        loaded = restrict_classes(init, loaded, keep_classes, path)
    flat_i = traverse_util.flatten_dict(init)
    flat_l = traverse_util.flatten_dict(loaded)
    wrong = [("/".join(k), flat_l[k].shape, v.shape) for k, v in flat_i.items()
             if k in flat_l and flat_l[k].shape != v.shape]
    head = [w for w in wrong if w[2][-1] != w[1][-1] and len(w[1]) in (1, 4) and keep_classes is None]
    other = [w for w in wrong if w not in head]
    missing = ["/".join(k) for k in flat_i if k not in flat_l]
    if other or len(missing) > len(head) * 2:
        shown = "; ".join(f"{k}: file {a} vs model {b}" for k, a, b in other[:3]) or ", ".join(missing[:3])
        raise RunError(f"{path}: weights do not fit model (another architecture?): {shown}")
    merged = {k: (flat_l[k] if k in flat_l and flat_l[k].shape == v.shape else v) for k, v in flat_i.items()}
    return traverse_util.unflatten_dict(merged)


def spatial_prior(exp: Experiment):
    """The spatial prior q at the canvas size, replicated on the mesh (built once per seed's
    folder from the source label maps, or read from ``self_training.prior``)."""
    cfg = exp.config.self_training
    path = cfg.prior or exp.seed_dir.spatial_prior
    if shd.agree(not os.path.exists(path)):
        source = exp.data.source
        maps = (source[i]["label"] for i in tqdm(range(len(source)), desc="spatial prior",
                                                 disable=jax.process_index() != 0, leave=False))
        q = priors.build_spatial_prior(maps, exp.num_classes, tuple(cfg.prior_size), cfg.prior_sigma,
                                       normalize=cfg.prior_normalize)
        if jax.process_index() == 0:
            priors.save_prior(path, q, sigma=cfg.prior_sigma, size=list(cfg.prior_size), normalize=cfg.prior_normalize)
        shd.barrier("prior")
    q = priors.resize_prior(priors.load_prior(path, exp.num_classes), exp.canvas)
    return jax.device_put(q, shd.replicated(exp.mesh))
