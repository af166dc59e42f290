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


@dataclasses.dataclass
class Experiment:
    config: object
    workdir: str
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


def build(config, workdir: str) -> Experiment:
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
    exp = Experiment(config, workdir, mesh, data, methods_lib.parse(config.methods), model, predictor, canvas,
                     eval_predictor=eval_predictor, mst_predictor=mst, mst_methods=mst_methods)
    if any(m.spatial_prior for m in exp.methods):
        exp.prior = spatial_prior(exp)
    return exp


def build_model(config, platform: str | None = None):
    """The network of ``config.model``, with the input normalisation its weights expect
    (``model.normalization="auto"``: the one recorded in ``model.init``'s metadata) and the compute
    path of ``platform`` (``model.dtype`` / ``model.atrous`` "auto": ``models.registry.resolve_compute``;
    None: this process's backend, which asking for initialises)."""
    from cbst_jax import models
    from cbst_jax.models.registry import resolve_compute

    init = config.model.init
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
    """The metadata a weights file of this run's network carries (``cbst_jax.models.save_variables``)."""
    from cbst_jax import models

    return models.make_metadata(config.model.name, config.num_classes, model.normalization,
                                compute=compute_path(model), **provenance)


def init_variables(config, model, rng, crop):
    """Random init, merged with converted weights when ``config.model.init`` is set."""
    from cbst_jax import models

    dummy = np.zeros((1, crop[0], crop[1], 3), np.float32)
    variables = jax.jit(lambda k: model.init(k, dummy, train=False))(rng)
    variables = jax.tree.map(np.asarray, variables)
    if config.model.init:
        loaded = models.load_variables(config.model.init)
        variables = merge_variables(variables, loaded, config.model.init)
    return variables


def merge_variables(init, loaded, path):
    """Loaded leaves replace initial ones; a classifier of another class count is left at its
    random init (as the references skip the COCO head). Any other mismatch is an error."""
    from flax import traverse_util

    flat_i = traverse_util.flatten_dict(init)
    flat_l = traverse_util.flatten_dict(loaded)
    wrong = [("/".join(k), flat_l[k].shape, v.shape) for k, v in flat_i.items()
             if k in flat_l and flat_l[k].shape != v.shape]
    head = [w for w in wrong if w[2][-1] != w[1][-1] and len(w[1]) in (1, 4)]
    other = [w for w in wrong if w not in head]
    missing = ["/".join(k) for k in flat_i if k not in flat_l]
    if other or len(missing) > len(head) * 2:
        shown = "; ".join(f"{k}: file {a} vs model {b}" for k, a, b in other[:3]) or ", ".join(missing[:3])
        raise RunError(f"{path}: weights do not fit model (another architecture?): {shown}")
    merged = {k: (flat_l[k] if k in flat_l and flat_l[k].shape == v.shape else v) for k, v in flat_i.items()}
    return traverse_util.unflatten_dict(merged)


def spatial_prior(exp: Experiment):
    """The spatial prior q at the canvas size, replicated on the mesh (built once per workdir
    from the source label maps, or read from ``self_training.prior``)."""
    cfg = exp.config.self_training
    path = cfg.prior or os.path.join(exp.workdir, "spatial_prior.npz")
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
