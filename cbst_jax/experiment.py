"""The set-up of one seed's run: the mesh, the data, the network and the variables it starts from,
the predictors (inference, thresholds and pseudo-labels at ``predict.scales``; evaluation at
``evaluate.scales``), where a method needs it the spatial prior, and the run's settings as the
records of ``cbst_jax.settings``. Built once per seed (and NTHU city) by :func:`build`, the one
place that reads the configuration for the round loop: every step of the loop reads this."""
from __future__ import annotations

import dataclasses
import os

import jax
from tqdm.auto import tqdm

from cbst_jax import model_init, preflight, priors, settings
from cbst_jax import sharding as shd
from cbst_jax.data import pipeline
from cbst_jax.data.splits import Splits, open_splits
from cbst_jax.predictor import Predictor
from cbst_jax.workdir import SeedDir


@dataclasses.dataclass
class Experiment:
    seed: int
    seed_dir: SeedDir        # where the seed's run lives (cbst_jax.workdir)
    mesh: object
    data: Splits
    network: object          # the flax Module, applied as a pure function of a model's variables
    predictor: Predictor     # pseudo-labelling: predict.scales / predict.flip
    canvas: tuple            # (H, W) of evaluation and pseudo-labelling batches
    eval_batch_size: int     # global, a multiple of the device count
    eval_workers: int        # decoding threads of those batches
    methods: tuple           # cbst_jax.methods.Method, in the order they run (parsed once, by settings)
    source_phase: settings.SourcePhase
    round_phase: settings.RoundPhase
    training: settings.Training
    labelling: settings.Labelling
    evaluation: settings.Evaluation
    guard: settings.Guard
    reporting: settings.Reporting
    online: settings.Online = None  # the online methods' rounds (online.*)
    initial_variables: dict = None  # the network's variables before any training (random init + model.init)
    weights_metadata: dict = None   # what every weights file of the run records (cbst_jax.models)
    prior: object = None     # the spatial prior q on the canvas, replicated (CBST-SP, ST-SP)
    eval_predictor: Predictor | None = None  # evaluation: evaluate.scales / evaluate.flip (None: predictor)
    mst_predictor: Predictor | None = None   # the extra multi-scale evaluation of evaluate.mst_methods
    source_class_counts: object = None  # (N, C) pixels of each class per source image (online rare-class sampling)

    @property
    def num_classes(self) -> int:
        return self.reporting.num_classes

    @property
    def rng(self):
        """The run's root random key (the seed's): the initial variables, the source phase's state,
        and each round's (folded with the stage)."""
        return jax.random.key(self.seed)

    def batches(self, source, label_key=None, desc: str | None = None):
        """(global batch, host batch) pairs: ``source`` in fixed-shape padded batches on the
        canvas (the predictor's input), with a progress bar when ``desc`` is given."""
        return eval_batches(source, self.mesh, self.canvas, self.eval_batch_size, self.eval_workers, label_key, desc)


def eval_batches(source, mesh, canvas, batch_size: int, workers: int, label_key=None, desc: str | None = None):
    """(global batch, host batch) pairs of ``source`` in fixed-shape padded batches of
    ``batch_size`` (global) on ``canvas`` (``pipeline.EvalIterator``), sharded over ``mesh``."""
    it = pipeline.EvalIterator(source, batch_size=batch_size, canvas=canvas, label_key=label_key, workers=workers)
    total = -(-len(source) // batch_size)
    for host in tqdm(it, total=total, desc=desc, leave=False, disable=desc is None or jax.process_index() != 0):
        yield shd.to_global(host, mesh), host


def eval_workers(config) -> int:
    """Decoding threads of evaluation / pseudo-labelling batches (``input.workers``, -1: all cores but one)."""
    return pipeline.default_workers() if config.input.workers < 0 else max(1, config.input.workers)


def build(config, seed_dir: SeedDir, seed: int, city: str | None = None, methods=None) -> Experiment:
    """Seed ``seed``'s run of ``config`` in ``seed_dir`` (over all NTHU cities: on ``city``;
    ``methods``: ``settings.methods(config)`` when the caller has them): the adaptation splits are
    checked against every phase's batch (``preflight.check_adaptation_split``, known only once
    every image is hashed), then the initial variables made."""
    methods = settings.methods(config) if methods is None else tuple(methods)
    mesh = shd.make_mesh()
    data = open_splits(config, city)
    network = model_init.build_model(config)
    canvas = tuple(config.input.eval_size)
    predictor = Predictor(network, config.num_classes, mesh, canvas, config.predict.scales, config.predict.flip)
    eval_predictor = predictor
    if (tuple(float(s) for s in config.evaluate.scales), bool(config.evaluate.flip)) != (predictor.scales,
                                                                                           predictor.flip):
        eval_predictor = Predictor(network, config.num_classes, mesh, canvas, config.evaluate.scales,
                                   config.evaluate.flip)
    evaluation = settings.evaluation(config)
    mst = (Predictor(network, config.num_classes, mesh, canvas, config.evaluate.mst_scales, config.evaluate.mst_flip)
           if evaluation.mst_methods else None)
    exp = Experiment(seed, seed_dir, mesh, data, network, predictor, canvas,
                     eval_batch_size=pipeline.global_eval_batch(config.input.eval_batch_size, mesh.devices.size),
                     eval_workers=eval_workers(config), methods=methods,
                     source_phase=settings.source_phase(config, seed), round_phase=settings.round_phase(config, seed),
                     training=settings.training(config), labelling=settings.labelling(config), evaluation=evaluation,
                     guard=settings.guard(config), reporting=settings.reporting(config, methods),
                     online=settings.online(config, seed), eval_predictor=eval_predictor, mst_predictor=mst)
    if any(m.spatial_prior for m in exp.methods):
        exp.prior = spatial_prior(config, exp)
    if any(m.online for m in exp.methods) and exp.online.rcs_temperature > 0 and config.self_training.rounds > 0:
        exp.source_class_counts = source_class_counts(data.source, exp.num_classes)
    preflight.check_adaptation_split(config, data, city)
    exp.initial_variables = model_init.init_variables(config, network, exp.rng, tuple(config.input.crop))
    exp.weights_metadata = weights_metadata(config, network, seed=seed)
    return exp


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
    with the run's evaluation settings as ``inference`` (``cbst_jax.segment_images``' defaults)."""
    from cbst_jax import models

    return models.make_metadata(config.model.name, config.num_classes, model.normalization,
                                inference=inference_settings(config), compute=compute_path(model), **provenance)


def inference_settings(config) -> dict:
    """The canvas, scales and flip a run evaluates with (a run from before ``evaluate.*``: ``predict.*``)."""
    settings = config.get("evaluate") or config.predict
    return {"canvas": [int(v) for v in config.input.eval_size], "scales": [float(s) for s in settings["scales"]],
            "flip": bool(settings["flip"])}


def source_class_counts(source, num_classes: int):
    """(N, C) int64: each source label map's pixels of each class, on the full maps (DAFormer counts
    them once per dataset for rare-class sampling; here once per seed's run)."""
    from cbst_jax.rare_class_sampling import image_class_counts

    maps = (source[i]["label"] for i in tqdm(range(len(source)), desc="source class counts",
                                             disable=jax.process_index() != 0, leave=False))
    return image_class_counts(maps, num_classes)


def spatial_prior(config, exp: Experiment):
    """The spatial prior q at the canvas size, replicated on the mesh (built once per seed's
    folder from the source label maps, or read from ``self_training.prior``)."""
    cfg = config.self_training
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
