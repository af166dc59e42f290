"""Experiment configuration: the one ``ml_collections.ConfigDict`` schema shared by every
experiment and its validation. The configs of the experiments (``experiments/configs/*.py``)
start from :func:`base_config`; the command line (``cbst_jax.cli.run``) locks them, so an unknown
key is rejected, and :func:`validate` rejects invalid values before any work starts, naming the
key and what was expected.
"""
from __future__ import annotations

import json
import math
import os

import ml_collections

from cbst_jax import methods as methods_lib


DOWNLOADS = {
    "gta5": "GTA5 (download.visinf.tu-darmstadt.de/data/from_games: 01_images.zip..10_images.zip, "
            "01_labels.zip..10_labels.zip)",
    "cityscapes": "Cityscapes (cityscapes-dataset.com: leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip)",
    "synthia": "SYNTHIA-RAND-CITYSCAPES (synthia-dataset.net: SYNTHIA_RAND_CITYSCAPES.rar)",
    "bdd100k": "BDD100K semantic segmentation (bdd-data.berkeley.edu: bdd100k_images_10k.zip, "
               "bdd100k_sem_seg_labels_trainval.zip)",
    "nthu": "the NTHU Cross-City dataset (yihsinchen.github.io/segmentation_adaptation_dataset: NTHU_Datasets)",
}


class ConfigError(ValueError):
    """An invalid configuration value; the message is one line naming key and expectation."""


def base_config() -> ml_collections.ConfigDict:
    """Every key an experiment may set, with neutral defaults (experiments override them)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_classes = 19
    c.methods = "source_only,st,cbst,cbst_sp"   # run in order, each from the same source model
                                                # (the table: cbst_jax.methods)
    c.variant = ""                              # the config file's variant (set by get_config)
    c.distributed = False                       # jax.distributed.initialize() (multi-host)
    c.coordinator_address = ""                  # multi-host without cluster auto-detection:
    c.num_processes = 0                         #   host:port of process 0, process count and
    c.process_id = -1                           #   this process's id
    c.select_by_eval = False                    # report a best round picked on the eval split (flagged)
    c.resume_from_stage = ""                    # e.g. "cbst/r0": go on after that finished stage with changed
                                                # optimiser settings (cbst_jax.run_ledger.REWIND_KEYS)

    c.model = ml_collections.ConfigDict()
    c.model.name = "deeplabv2_resnet101"
    c.model.dtype = "auto"                      # activations: auto | float32 | bfloat16 (parameters, loss,
                                                # softmax and statistics stay float32)
    c.model.train_bn = False                    # False: frozen BN, as both references
    c.model.atrous = "auto"                     # auto | dilated | space_to_batch (DeepLab-v2, ResNet-38: the
                                                # dilated stages as undilated convs on phase grids; same numbers)
                                                # auto (both keys): bfloat16 + space_to_batch on a GPU/TPU, float32 +
                                                # dilated on a CPU (cbst_jax.models.registry.PLATFORM_COMPUTE);
                                                # float32 + dilated are the references' numerics
    c.model.normalization = "auto"              # input normalisation: auto (the weights file's, else the
                                                # architecture's default) | imagenet | caffe | unit
    c.model.init = ""                           # converted weights (.npz): ImageNet init or a source model;
                                                # "none": random init, on purpose
    c.model.init_is_source_model = False        # True: round 0 = these weights, no source training
    c.model.init_class_map = ""                 # "nthu13": a 19-class model.init's classifier restricted to
                                                # the 13 NTHU classes (labels.NTHU13_TRAINIDS)

    c.source = ml_collections.ConfigDict(dict(name="gta5", root="", split="train", list_file="",
                                              # SYNTHIA only: lanemarking (id 22) as road (CRST) or
                                              # ignored (CBST)
                                              lanemarking_as_road=False))
    # target.city (NTHU): Rome | Rio | Tokyo | Taipei, or "all" / "" for each of the four in turn,
    # each in <workdir>/<City>/ with a per-city table at <workdir>/results.md
    c.target = ml_collections.ConfigDict(dict(name="cityscapes", root="", train_split="train",
                                              eval_split="val", list_file="", city="",
                                              # True: also adapt on train images that are evaluation
                                              # images (the published NTHU protocol; reported)
                                              allow_eval_overlap=False))
    c.eval_classes = ""                         # "miou13": also mIoU over 13 of 16; "synthetic": drawn classes
    c.synthetic = ml_collections.ConfigDict(dict(height=64, width=128, num_source=1500, num_target_train=400,
                                                 num_target_val=300, data_seed=0,
                                                 # True: the target camera sits higher (where a
                                                 # spatial prior's shared-layout assumption fails)
                                                 camera_shift=False))

    c.input = ml_collections.ConfigDict()
    c.input.crop = (512, 1024)
    c.input.scale_range = (0.5, 1.5)
    c.input.source_scale_range = ()             # per domain (CRST SYNTHIA: source 0.8-1.2, target
    c.input.target_scale_range = ()             # 0.6-1.5); empty: input.scale_range
    c.input.flip = True
    c.input.mine_prob = 0.8
    c.input.mine_domains = "both"               # rare-class crops on both domains (CBST) | target (CRST)
    c.input.batch_size = 2                      # global batch, source + target
    c.input.sampler = "pooled"                  # pooled (CBST/CRST) | paired (fixed source share)
    c.input.source_share = 0.5                  # paired sampler: source images per batch / batch
    c.input.source_portion = (0.03, 0.0025, 0.06)   # first portion, step per round, maximum
    c.input.source_subset = "nested"            # nested (CBST) | fresh (CRST) subsets per round
    c.input.eval_size = (1024, 2048)            # canvas of evaluation / pseudo-labelling batches
    c.input.eval_batch_size = 1                 # global; padded to a multiple of the devices
    c.input.workers = -1                        # data workers; -1: every core but one
    c.input.worker_kind = "auto"                # auto (processes when grain is installed) | processes | threads

    # batch_size 0, crop () and scale_range (): those of c.input. power: of the poly schedule;
    # warmup_steps > 0: mmcv's linear warm-up from warmup_ratio x the rate (cbst_jax.train_step.learning_rate)
    c.source_training = ml_collections.ConfigDict(dict(steps=0, lr=2.5e-4, schedule="poly", optimizer="sgd",
                                                       batch_size=0, crop=(), scale_range=(), power=0.9,
                                                       warmup_steps=0, warmup_ratio=1e-6))

    c.self_training = ml_collections.ConfigDict()
    c.self_training.rounds = 3
    c.self_training.portion = (0.2, 0.05, 0.5)  # p0, Δp, p_max: p_r = min(p0 + r·Δp, p_max)
    c.self_training.epochs_per_round = 2.0
    c.self_training.steps_per_round = 0         # > 0 overrides epochs_per_round
    c.self_training.lr = 5e-5
    c.self_training.lr_round_decay = 1.0        # lr_r = lr · decay^r (CBST: 1/sqrt(2))
    c.self_training.schedule = "constant"       # constant | poly (within a round)
    c.self_training.power = 0.9                 # of the poly schedule
    c.self_training.warmup_steps = 0            # linear warm-up at the start of each round (0: none)
    c.self_training.warmup_ratio = 1e-6         # the warm-up's first rate / the schedule's
    c.self_training.optimizer = "sgd"           # sgd (both references) | adam: AdamW (transformer recipes,
                                                # from-scratch demo nets)
    c.self_training.loss_resolution = "upsample"  # upsample (CRST) | stride (CBST)
    c.self_training.select_subsample = 1        # reference: every 4th pixel of each class list
    c.self_training.prior = ""                  # spatial prior .npz; empty: built from source labels
    c.self_training.prior_sigma = 4.0
    c.self_training.prior_normalize = "class"   # class (paper) | pixel (a class-frequency prior)
    c.self_training.prior_size = (128, 256)
    c.self_training.reg_weight = 0.1            # MR* weight (effective; CRST mrkld.sh: 0.01)
    # LR* weight α per regulariser (CRST lrent.sh: --lr-weight-ent 0.25; the others are not published,
    # see docs/results.md for how their defaults were set without looking at evaluation labels)
    c.self_training.label_reg_weight = ml_collections.ConfigDict(dict(lrent=0.25, lrl2=0.25, lrkld=0.25))
    # which pixels an LR* round labels: "objective" (regularised objective < f(0) = 0; CRST's LRENT
    # code) or "cbst" (CBST's pixels; LRL2/LRKLD keep almost nothing otherwise: cbst_jax.crst)
    c.self_training.label_reg_keep = ml_collections.ConfigDict(dict(lrent="objective", lrl2="cbst", lrkld="cbst"))
    c.self_training.soft_label_stride = 8       # LR* soft labels kept as cells of this many pixels
    c.self_training.mine_rare = True            # rare-class mining from the pseudo-label statistics
    # the collapse guard (cbst_jax.collapse_guard, docs/reliability.md): after each round, training-side
    # signals only; a fired check warns, and with "stop" the run stops after that round is recorded
    c.self_training.on_collapse = "warn"
    c.self_training.collapse_guard = ml_collections.ConfigDict(dict(
        min_share=1e-4,        # classes below this share of the target's pixels are too small to judge
        share_fraction=0.25,   # share_drop: a class's pseudo-label share < this x its share in round r-1
        loss_rise=0.5,         # loss_rise: a loss window > (1 + this) x the best earlier window of the round ...
        loss_windows=3,        # ... for this many consecutive windows (0: off)
        entropy_fraction=0.25,  # entropy_drop: mean prediction entropy < this x round 0's (0: off)
    ))

    # the online methods (methods.py: online_fixed, online_cbst, online_cbst_sp; docs/online.md): DAFormer's
    # published values (lhoyer/DAFormer configs, cited in docs/online.md); a round is
    # self_training.steps_per_round online steps at self_training.lr's round schedule and portion p_r
    c.online = ml_collections.ConfigDict(dict(
        batch_size=0,               # source crops and target crops per step (global, each); 0: input.batch_size
        alpha=0.999,                # EMA teacher, min(1 - 1/(t+1), alpha)
        tau=0.968,                  # fixed policy: the share of the batch's pixels with confidence >= tau
        ignore_top=15,              # fixed policy: pseudo-weight 0 in the crop's top / bottom rows
        ignore_bottom=120,
        window_batches=8,           # class-balanced policy: lambda_c over the last W target batches
        color_jitter_strength=0.2,  # DACS colour jitter on the mixed image
        color_jitter_probability=0.8,
        blur=True,                  # DACS Gaussian blur on the mixed image
        rcs_temperature=0.01,       # rare-class sampling of source images, softmax((1 - f_c)/T); 0: uniform
        rcs_min_pixels=3000,        # an image qualifies for class c with more than this many pixels of c
        rcs_min_crop_ratio=0.5,     # a crop is re-drawn (up to 10 times) until it holds > ratio x min_pixels
        fd_weight=0.0,              # ImageNet feature distance on thing classes (DAFormer: 0.005); needs fd_layer
        fd_layer=(),                # the network's module path of the compared features, e.g. ("backbone", "norm4")
    ))

    # scales (relative to input.eval_size) and flip of pseudo-labelling (predict) and of evaluation
    c.predict = ml_collections.ConfigDict(dict(scales=(1.0,), flip=True))
    c.evaluate = ml_collections.ConfigDict(dict(scales=(1.0,), flip=True,
                                                # the stages of these methods are also evaluated with
                                                # multi-scale + flip testing (rows "<method>+mst")
                                                mst_methods="", mst_scales=(0.9, 1.0, 1.2), mst_flip=True))

    # bias_lr_mult / bias_weight_decay_mult: biases' LR and weight decay relative to their group's
    # (CBST's MXNet lr_type 'alex': 2 and 0)
    c.optim = ml_collections.ConfigDict(dict(momentum=0.9, weight_decay=5e-4, head_lr_mult=10.0,
                                             bias_lr_mult=1.0, bias_weight_decay_mult=1.0))
    c.log_every = 50
    c.checkpoint_every = 500                    # training steps between checkpoints
    return c


NO_INIT = "none"             # model.init for a random init chosen on purpose
CLASS_MAPS = ("", "nthu13")  # model.init_class_map values

# One line per key of base_config, read by the launcher's --help (tests check that it covers them all).
KEY_HELP = {
    "seed": "random seed of the run (initialisation, batches, augmentation); --seeds=0,1,2 runs several",
    "num_classes": "classes of the protocol: 19 (Cityscapes), 16 (SYNTHIA) or 13 (NTHU)",
    "methods": "comma-separated methods, each from the same source model: " + ", ".join(methods_lib.NAMES),
    "variant": "the config file's variant (set by --config=<variant>; not to be set by hand)",
    "distributed": "call jax.distributed.initialize() (multi-host runs: every host runs the same command)",
    "coordinator_address": "multi-host without cluster auto-detection: host:port of process 0",
    "num_processes": "multi-host without cluster auto-detection: the number of processes",
    "process_id": "multi-host without cluster auto-detection: this process's id",
    "select_by_eval": "also report the best round picked on the evaluation split (flagged as such)",
    "resume_from_stage": "go on after this finished stage (e.g. cbst/r0) with changed optimiser settings",
    "model.name": "the network: deeplabv2_resnet101, resnet38, fcn8s_vgg16, demo_segnet (or a *_small test size)",
    "model.dtype": "activation dtype: float32 or bfloat16",
    "model.train_bn": "train batch-norm statistics (False: frozen, as both references)",
    "model.atrous": "dilated convolutions as dilated or space_to_batch (same numbers)",
    "model.normalization": "input normalisation: auto (the weights file's), imagenet, caffe or unit",
    "model.init": "converted weights (.npz) to start from: an ImageNet init or a source model; 'none': random "
                  "init on purpose (required for the full-size networks)",
    "model.init_is_source_model": "True: model.init is the source model (round 0), no source training here",
    "model.init_class_map": "'nthu13': keep the 13 NTHU classes' rows of a 19-class model.init's classifier",
    "source.name": "source dataset: gta5, synthia, cityscapes or synthetic/source",
    "source.root": "folder of the source dataset in its official layout (or tfds:<data_dir>)",
    "source.split": "source split trained on",
    "source.list_file": "keep only the listed source images (a file, or builtin:<name>)",
    "source.lanemarking_as_road": "SYNTHIA only: lanemarking as road (CRST) instead of ignored (CBST)",
    "target.name": "target dataset: cityscapes, bdd100k, nthu or synthetic/target",
    "target.root": "folder of the target dataset in its official layout (or tfds:<data_dir>)",
    "target.train_split": "unlabelled target split that is pseudo-labelled and adapted on",
    "target.eval_split": "labelled target split the tables are computed on",
    "target.list_file": "keep only the listed images of the adapted split (a file, or builtin:<name>)",
    "target.city": "NTHU: Rome, Rio, Tokyo or Taipei; 'all' or '': each city in turn",
    "target.allow_eval_overlap": "also adapt on train images that are evaluation images (published NTHU protocol)",
    "eval_classes": "table classes: '' (all), 'miou13' (also mIoU* over 13 of 16), 'synthetic' (drawn classes)",
    "synthetic.height": "embedded pair: image height",
    "synthetic.width": "embedded pair: image width",
    "synthetic.num_source": "embedded pair: source images",
    "synthetic.num_target_train": "embedded pair: unlabelled target images adapted on",
    "synthetic.num_target_val": "embedded pair: labelled target evaluation images",
    "synthetic.data_seed": "embedded pair: seed of the drawn scenes",
    "synthetic.camera_shift": "embedded pair: the target camera sits higher",
    "input.crop": "(height, width) of training crops",
    "input.scale_range": "random rescaling range of training images",
    "input.source_scale_range": "source images' rescaling range; (): input.scale_range",
    "input.target_scale_range": "target images' rescaling range; (): input.scale_range",
    "input.flip": "random horizontal flips in training",
    "input.mine_prob": "probability of a crop centred on a rare class",
    "input.mine_domains": "domains with rare-class crops: both (CBST) or target (CRST)",
    "input.batch_size": "global training batch (source + target), a multiple of the device count",
    "input.sampler": "pooled (one shuffled pool, CBST/CRST) or paired (a fixed source share per batch)",
    "input.source_share": "paired sampler: source images per batch / batch",
    "input.source_portion": "(first, step per round, max) share of the source set used per round",
    "input.source_subset": "source subsets per round: nested (CBST) or fresh (CRST)",
    "input.eval_size": "(height, width) canvas of evaluation and pseudo-labelling batches",
    "input.eval_batch_size": "global evaluation batch (padded to a multiple of the devices)",
    "input.workers": "data workers; -1: every core but one",
    "input.worker_kind": "auto (processes when grain is installed), processes or threads",
    "source_training.steps": "steps of source-only training (0: none; skipped with init_is_source_model)",
    "source_training.lr": "learning rate of source training",
    "source_training.schedule": "learning-rate schedule of source training: poly or constant",
    "source_training.optimizer": "optimiser of source training: sgd or adam",
    "source_training.batch_size": "global batch of source training; 0: input.batch_size",
    "source_training.crop": "crop of source training; (): input.crop",
    "source_training.scale_range": "rescaling range of source training; (): input.scale_range",
    "source_training.power": "power of source training's poly schedule (DeepLab: 0.9, DAFormer: 1.0)",
    "source_training.warmup_steps": "linear warm-up steps at the start of source training (0: none; DAFormer: 1500)",
    "source_training.warmup_ratio": "the warm-up's first learning rate as a share of the schedule's (mmcv: 1e-6)",
    "self_training.rounds": "self-training rounds per method",
    "self_training.portion": "(p0, step, p_max): the portion of pseudo-labelled pixels, min(p0 + r*step, p_max)",
    "self_training.epochs_per_round": "training epochs per round (over the round's source subset + target)",
    "self_training.steps_per_round": "training steps per round; > 0 overrides epochs_per_round",
    "self_training.lr": "learning rate of round 0",
    "self_training.lr_round_decay": "learning rate of round r: lr * decay^r (CBST: 1/sqrt(2))",
    "self_training.schedule": "learning-rate schedule within a round: constant or poly",
    "self_training.power": "power of a round's poly schedule",
    "self_training.warmup_steps": "linear warm-up steps at the start of each round (0: none)",
    "self_training.warmup_ratio": "the round warm-up's first learning rate as a share of the schedule's",
    "self_training.optimizer": "optimiser of the rounds: sgd or adam",
    "self_training.loss_resolution": "loss on upsampled logits (CRST) or at the network's stride (CBST)",
    "self_training.select_subsample": "thresholds from every n-th confidence of each class (reference: 4)",
    "self_training.prior": "spatial prior .npz to use; empty: built from the source labels",
    "self_training.prior_sigma": "Gaussian smoothing of the spatial prior, in prior pixels",
    "self_training.prior_normalize": "spatial prior normalised per class (paper) or per pixel",
    "self_training.prior_size": "(height, width) of the spatial prior",
    "self_training.reg_weight": "weight of the MR* model regularisers (CRST)",
    "self_training.label_reg_weight.lrent": "weight alpha of LRENT (CRST label regulariser)",
    "self_training.label_reg_weight.lrl2": "weight alpha of LRL2",
    "self_training.label_reg_weight.lrkld": "weight alpha of LRKLD",
    "self_training.label_reg_keep.lrent": "pixels LRENT labels: objective or cbst",
    "self_training.label_reg_keep.lrl2": "pixels LRL2 labels: objective or cbst",
    "self_training.label_reg_keep.lrkld": "pixels LRKLD labels: objective or cbst",
    "self_training.soft_label_stride": "LR* soft labels stored as cells of this many pixels",
    "self_training.mine_rare": "rare-class crops from the pseudo-label statistics",
    "self_training.on_collapse": "a fired collapse-guard check: warn, or stop after the round is recorded "
                                 "(resumable with resume_from_stage)",
    "self_training.collapse_guard.min_share": "collapse guard: classes below this share of the target's pixels "
                                              "are not judged",
    "self_training.collapse_guard.share_fraction": "collapse guard: fires when a class's pseudo-label share falls "
                                                   "below this x its share in the previous round (0: off)",
    "self_training.collapse_guard.loss_rise": "collapse guard: a loss window counts as risen above (1 + this) x "
                                              "the round's best earlier window",
    "self_training.collapse_guard.loss_windows": "collapse guard: fires after this many consecutive risen loss "
                                                 "windows (0: off)",
    "self_training.collapse_guard.entropy_fraction": "collapse guard: fires when the mean prediction entropy on "
                                                     "the target falls below this x round 0's (0: off)",
    "online.batch_size": "online methods: source crops and target crops per step (global, each); 0: "
                         "input.batch_size",
    "online.alpha": "online methods: EMA weight of the teacher, min(1 - 1/(t+1), alpha) (DAFormer: 0.999)",
    "online.tau": "online_fixed: pseudo-weight = share of the batch's pixels with confidence >= tau (0.968)",
    "online.ignore_top": "online_fixed: crop rows at the top with pseudo-weight 0 (DAFormer: 15)",
    "online.ignore_bottom": "online_fixed: crop rows at the bottom with pseudo-weight 0 (DAFormer: 120)",
    "online.window_batches": "online class-balanced methods: lambda_c over the last this many target batches",
    "online.color_jitter_strength": "online methods: DACS colour jitter strength on the mixed image (0.2)",
    "online.color_jitter_probability": "online methods: probability of that colour jitter per batch (0.8)",
    "online.blur": "online methods: DACS Gaussian blur on the mixed image",
    "online.rcs_temperature": "online methods: rare-class sampling of source images, softmax((1 - f_c)/T) "
                              "(DAFormer: 0.01); 0: uniform",
    "online.rcs_min_pixels": "online methods: an image is drawn for class c if it holds more pixels of c (3000)",
    "online.rcs_min_crop_ratio": "online methods: crops re-drawn until they hold > ratio x min_pixels of c (0.5)",
    "online.fd_weight": "online methods: weight of the ImageNet feature distance on thing classes (DAFormer: "
                        "0.005; 0: off)",
    "online.fd_layer": "online methods: module path of the features the feature distance compares, e.g. "
                       "('backbone', 'norm4') for MiT",
    "predict.scales": "pseudo-labelling scales, relative to input.eval_size",
    "predict.flip": "pseudo-labelling averages with the flipped image",
    "evaluate.scales": "evaluation scales, relative to input.eval_size",
    "evaluate.flip": "evaluation averages with the flipped image",
    "evaluate.mst_methods": "methods also evaluated with multi-scale + flip testing (rows <method>+mst)",
    "evaluate.mst_scales": "the scales of that multi-scale testing",
    "evaluate.mst_flip": "that multi-scale testing averages with the flipped image",
    "optim.momentum": "SGD momentum",
    "optim.weight_decay": "weight decay",
    "optim.head_lr_mult": "classifier learning rate relative to the backbone's",
    "optim.bias_lr_mult": "biases' learning rate relative to their group's (CBST: 2)",
    "optim.bias_weight_decay_mult": "biases' weight decay relative to their group's (CBST: 0)",
    "log_every": "training steps between logged losses",
    "checkpoint_every": "training steps between checkpoints",
}


def apply_variant(config, variant: str, variants: dict):
    """``config`` changed by the named variant of an experiment's config file (``""``: none).
    The variant's name is kept in ``config.variant``; an unknown one raises KeyError."""
    if variant:
        if variant not in variants:
            raise KeyError(f"{variant!r}; known: {', '.join(sorted(variants)) or 'none'}")
        variants[variant](config)
    config.variant = variant
    return config


def _fail(key, value, expected):
    raise ConfigError(f"config.{key}={value!r}: expected {expected}")


def _is_count(v, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_count(config, key: str, minimum: int, expected: str) -> None:
    v = _get(config, key)
    if not _is_count(v, minimum):
        _fail(key, v, expected)


def _check_number(config, key: str, ok, expected: str) -> None:
    v = _get(config, key)
    if not _is_number(v) or not ok(v):
        _fail(key, v, expected)


def _check_choice(config, key: str, choices) -> None:
    v = _get(config, key)
    if v not in choices:
        _fail(key, v, " or ".join(repr(c) for c in choices))


def _check_size(config, key: str, *, fallback: str = "") -> None:
    """(height, width) of positive integers; ``fallback``: () is allowed and means that key's."""
    v = _get(config, key)
    if fallback and not v:
        return
    if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_count(n, 1) for n in v)):
        _fail(key, tuple(v) if isinstance(v, list) else v,
              "(height, width), two positive integers" + (f", or () for {fallback}'s" if fallback else ""))


def _check_scale_range(config, key: str, *, fallback: str = "") -> None:
    """(low, high) with 0 < low <= high; ``fallback``: () is allowed and means that key's."""
    v = _get(config, key)
    if fallback and not v:
        return
    if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(x) for x in v) and 0 < v[0] <= v[1]):
        _fail(key, tuple(v) if isinstance(v, list) else v,
              "(low, high) with 0 < low <= high" + (f", or () for {fallback}'s" if fallback else ""))


def _check_scales(config, key: str) -> None:
    v = _get(config, key)
    if not (isinstance(v, (tuple, list)) and v and all(_is_number(s) and s > 0 for s in v)):
        _fail(key, tuple(v) if isinstance(v, list) else v, "positive scales, e.g. (0.9, 1.0, 1.2)")


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def validate(config, *, need_roots: bool = True) -> None:
    """Raises ConfigError on the first invalid value."""
    from cbst_jax.data.nthu import CITIES
    from cbst_jax.models.layers import NORMALIZATIONS
    from cbst_jax.models.registry import ATROUS_FAMILIES, MODELS

    try:
        methods = methods_lib.parse(config.methods)
    except ValueError as e:
        _fail("methods", e.args[0], "one of " + ", ".join(methods_lib.NAMES))
    if not methods:
        _fail("methods", config.methods, "a comma-separated list of " + ", ".join(methods_lib.NAMES))
    if config.num_classes not in (13, 16, 19):
        _fail("num_classes", config.num_classes, "19, 16 (SYNTHIA protocol) or 13 (NTHU)")
    _check_count(config, "seed", 0, "a non-negative integer")
    if config.model.name not in MODELS:
        _fail("model.name", config.model.name, "one of " + ", ".join(MODELS))  # registry order
    _check_choice(config, "model.normalization", ("auto",) + tuple(NORMALIZATIONS))
    p0, dp, pmax = config.self_training.portion
    for key, v in (("self_training.portion[0] (p0)", p0), ("self_training.portion[2] (p_max)", pmax)):
        if not (0 < v <= 1) or math.isnan(v):
            _fail(key, v, "a portion in (0, 1]")
    if dp < 0:
        _fail("self_training.portion[1] (Δp)", dp, "a non-negative step")
    if p0 > pmax:
        _fail("self_training.portion", tuple(config.self_training.portion), "p0 <= p_max")
    s0, ds, smax = config.input.source_portion
    if not (0 < s0 <= 1 and 0 < smax <= 1 and ds >= 0 and s0 <= smax):
        _fail("input.source_portion", tuple(config.input.source_portion),
              "(first, step, max) with 0 < first <= max <= 1 and step >= 0")
    if config.self_training.rounds < 0:
        _fail("self_training.rounds", config.self_training.rounds, "a count >= 0")
    _check_count(config, "self_training.steps_per_round", 0, "a step count >= 0 (0: epochs_per_round)")
    _check_number(config, "self_training.epochs_per_round", lambda v: v >= 0, "a number of epochs >= 0")
    _check_count(config, "source_training.steps", 0, "a step count >= 0")
    if config.input.batch_size < 1:
        _fail("input.batch_size", config.input.batch_size, "a positive global batch size")
    _check_count(config, "input.eval_batch_size", 1, "a positive global batch size")
    if config.input.workers != -1 and config.input.workers < 1:
        _fail("input.workers", config.input.workers, "a positive number of data workers, or -1 (every core but one)")
    _check_size(config, "input.crop")
    _check_size(config, "input.eval_size")
    _check_scale_range(config, "input.scale_range")
    _check_scale_range(config, "input.source_scale_range", fallback="input.scale_range")
    _check_scale_range(config, "input.target_scale_range", fallback="input.scale_range")
    if not 0 <= config.input.mine_prob <= 1:
        _fail("input.mine_prob", config.input.mine_prob, "a probability in [0, 1]")
    _check_choice(config, "input.mine_domains", ("both", "target"))
    if config.input.sampler not in ("pooled", "paired"):
        _fail("input.sampler", config.input.sampler, "pooled or paired")
    _check_number(config, "input.source_share", lambda v: 0 <= v <= 1, "a share in [0, 1]")
    if config.input.source_subset not in ("nested", "fresh"):
        _fail("input.source_subset", config.input.source_subset, "nested or fresh")
    _check_count(config, "source_training.batch_size", 0, "a positive global batch size, or 0 for input.batch_size's")
    _check_size(config, "source_training.crop", fallback="input.crop")
    _check_scale_range(config, "source_training.scale_range", fallback="input.scale_range")
    _check_number(config, "source_training.lr", lambda v: v >= 0, "a learning rate >= 0")
    _check_number(config, "self_training.lr", lambda v: v >= 0, "a learning rate >= 0")
    _check_number(config, "self_training.lr_round_decay", lambda v: v > 0, "a factor > 0 (CBST: 1/sqrt(2))")
    if config.self_training.loss_resolution not in ("upsample", "stride"):
        _fail("self_training.loss_resolution", config.self_training.loss_resolution, "upsample or stride")
    if config.self_training.schedule not in ("constant", "poly"):
        _fail("self_training.schedule", config.self_training.schedule, "constant or poly")
    if config.source_training.schedule not in ("constant", "poly"):
        _fail("source_training.schedule", config.source_training.schedule, "constant or poly")
    for key in ("source_training", "self_training"):
        _check_number(config, f"{key}.power", lambda v: v > 0, "a poly power > 0 (DeepLab: 0.9)")
        _check_count(config, f"{key}.warmup_steps", 0, "a step count >= 0 (0: no warm-up)")
        _check_number(config, f"{key}.warmup_ratio", lambda v: 0 < v <= 1,
                      "a ratio in (0, 1]: the first warm-up rate / the schedule's (mmcv: 1e-6)")
    if config.eval_classes not in ("", "miou13", "synthetic"):
        _fail("eval_classes", config.eval_classes, "'', 'miou13' or 'synthetic'")
    if config.eval_classes == "miou13" and config.num_classes != 16:
        _fail("eval_classes", config.eval_classes, "'miou13' only with num_classes=16 (mIoU* of SYNTHIA)")
    if config.self_training.prior_normalize not in ("class", "pixel"):
        _fail("self_training.prior_normalize", config.self_training.prior_normalize, "class or pixel")
    _check_size(config, "self_training.prior_size")
    _check_number(config, "self_training.prior_sigma", lambda v: v > 0, "a Gaussian sigma > 0 (prior pixels)")
    for key in ("source_training", "self_training"):
        if config[key].optimizer not in ("sgd", "adam"):
            _fail(f"{key}.optimizer", config[key].optimizer, "sgd or adam")
    if config.input.worker_kind not in ("auto", "processes", "threads"):
        _fail("input.worker_kind", config.input.worker_kind, "auto, processes or threads")
    _check_number(config, "optim.momentum", lambda v: 0 <= v < 1, "a momentum in [0, 1)")
    _check_number(config, "optim.weight_decay", lambda v: v >= 0, "a weight decay >= 0")
    _check_number(config, "optim.head_lr_mult", lambda v: v > 0, "a multiplier > 0")
    _check_number(config, "optim.bias_lr_mult", lambda v: v > 0, "a multiplier > 0")
    _check_number(config, "optim.bias_weight_decay_mult", lambda v: v >= 0, "a multiplier >= 0")
    _check_choice(config, "model.atrous", ("auto", "dilated", "space_to_batch"))
    _check_choice(config, "model.dtype", ("auto", "float32", "bfloat16"))
    if config.model.atrous == "space_to_batch" and config.model.name not in ATROUS_FAMILIES:
        _fail("model.atrous", config.model.atrous, f"'auto' or 'dilated' for {config.model.name} "
              f"(space_to_batch is for {', '.join(ATROUS_FAMILIES)})")
    for key in ("predict", "evaluate"):
        _check_scales(config, f"{key}.scales")
    _check_scales(config, "evaluate.mst_scales")
    try:
        mst = methods_lib.parse(config.evaluate.mst_methods)
    except ValueError as e:
        _fail("evaluate.mst_methods", e.args[0], "self-training methods of config.methods, comma-separated")
    for m in mst:
        if not m.self_trains:
            _fail("evaluate.mst_methods", m.name, "self-training methods of config.methods, comma-separated")
        _check_choice(config, f"{key}.flip", (True, False))
    for kind, rule in config.self_training.label_reg_keep.items():
        if rule not in ("objective", "cbst"):
            _fail(f"self_training.label_reg_keep.{kind}", rule, "objective or cbst")
    for kind, alpha in config.self_training.label_reg_weight.items():
        if not alpha > 0:
            _fail(f"self_training.label_reg_weight.{kind}", alpha, "a weight α > 0")
    if config.self_training.reg_weight < 0:
        _fail("self_training.reg_weight", config.self_training.reg_weight, "a weight >= 0")
    if config.self_training.soft_label_stride < 1:
        _fail("self_training.soft_label_stride", config.self_training.soft_label_stride, "an integer >= 1")
    if config.self_training.select_subsample < 1:
        _fail("self_training.select_subsample", config.self_training.select_subsample, "an integer >= 1")
    _check_choice(config, "self_training.on_collapse", ("warn", "stop"))
    guard = "self_training.collapse_guard"
    _check_number(config, f"{guard}.min_share", lambda v: 0 <= v < 1, "a share in [0, 1)")
    _check_number(config, f"{guard}.share_fraction", lambda v: 0 <= v <= 1, "a fraction in [0, 1] (0: off)")
    _check_number(config, f"{guard}.loss_rise", lambda v: v > 0, "a relative rise > 0 (0.5: 50 %)")
    _check_count(config, f"{guard}.loss_windows", 0, "a number of loss windows >= 0 (0: off)")
    _check_number(config, f"{guard}.entropy_fraction", lambda v: 0 <= v <= 1, "a fraction in [0, 1] (0: off)")
    _validate_online(config, methods)
    _check_count(config, "log_every", 1, "a positive number of training steps")
    _check_count(config, "checkpoint_every", 1, "a positive number of training steps")
    if config.source.lanemarking_as_road and config.source.name != "synthia":
        _fail("source.lanemarking_as_road", True, "False unless source.name='synthia' (SYNTHIA's lanemarking id)")
    city = config.target.city
    if config.target.name == "nthu":
        if str(city).lower() not in ("", "all") + tuple(c.lower() for c in CITIES):
            _fail("target.city", city, f"one of {', '.join(CITIES)}, or 'all' (each city in turn)")
    elif city:
        _fail("target.city", city, "'' (cities exist only for target.name='nthu')")
    if config.source.name.startswith("synthetic/") or config.target.name.startswith("synthetic/"):
        _check_count(config, "synthetic.height", 8, "an image height >= 8")
        _check_count(config, "synthetic.width", 8, "an image width >= 8")
        for key in ("num_source", "num_target_train", "num_target_val"):
            _check_count(config, f"synthetic.{key}", 1, "a positive image count")
    init = init_file(config)
    if init and not os.path.exists(init):
        _fail("model.init", init, f"an existing converted-weights file (.npz), or {NO_INIT!r} for a random init")
    if config.model.init_is_source_model and not init:
        _fail("model.init_is_source_model", True, "model.init set to the source model's weights")
    _check_choice(config, "model.init_class_map", CLASS_MAPS)
    if config.model.init_class_map == "nthu13" and (config.num_classes != 13 or not init):
        _fail("model.init_class_map", "nthu13", "'' unless num_classes=13 and model.init is a 19-class weights file")
    if config.self_training.prior and not os.path.exists(config.self_training.prior):
        _fail("self_training.prior", config.self_training.prior, "an existing prior .npz (or empty to build one)")
    if need_roots:
        for side in ("source", "target"):
            d = config[side]
            if d.name.startswith("synthetic"):
                continue
            if not d.root:
                raise ConfigError(f"config.{side}.root is empty: download {DOWNLOADS.get(d.name, d.name)}, "
                                  f"extract it and pass --config.{side}.root=<folder> (layouts: docs/datasets.md); "
                                  f"or run `python -m experiments.synthetic`, which needs no download")
            if not os.path.isdir(d.root) and not str(d.root).startswith("tfds:"):
                _fail(f"{side}.root", d.root, f"an existing folder holding {d.name} (see docs/datasets.md)")


def _validate_online(config, methods) -> None:
    """The ``online.*`` keys (read by every run, used by the online methods)."""
    o = "online"
    _check_count(config, f"{o}.batch_size", 0, "a positive global batch size, or 0 for input.batch_size's")
    _check_number(config, f"{o}.alpha", lambda v: 0 < v < 1, "an EMA weight in (0, 1) (DAFormer: 0.999)")
    _check_number(config, f"{o}.tau", lambda v: 0 < v <= 1, "a confidence threshold in (0, 1] (DAFormer: 0.968)")
    _check_count(config, f"{o}.ignore_top", 0, "a row count >= 0")
    _check_count(config, f"{o}.ignore_bottom", 0, "a row count >= 0")
    _check_count(config, f"{o}.window_batches", 1, "a number of target batches >= 1")
    _check_number(config, f"{o}.color_jitter_strength", lambda v: v >= 0, "a jitter strength >= 0 (DACS: 0.2)")
    _check_number(config, f"{o}.color_jitter_probability", lambda v: 0 <= v <= 1, "a probability in [0, 1]")
    _check_choice(config, f"{o}.blur", (True, False))
    _check_number(config, f"{o}.rcs_temperature", lambda v: v >= 0, "a temperature >= 0 (0: uniform sampling)")
    _check_count(config, f"{o}.rcs_min_pixels", 0, "a pixel count >= 0")
    _check_number(config, f"{o}.rcs_min_crop_ratio", lambda v: 0 <= v <= 1, "a ratio in [0, 1]")
    _check_number(config, f"{o}.fd_weight", lambda v: v >= 0, "a weight >= 0 (0: no feature distance)")
    layer = config.online.fd_layer
    if not (isinstance(layer, (tuple, list)) and all(isinstance(p, str) and p for p in layer)):
        _fail(f"{o}.fd_layer", layer, "a tuple of module names, e.g. ('backbone', 'norm4')")
    if config.online.fd_weight > 0 and not layer:
        _fail(f"{o}.fd_layer", tuple(layer), "the module path of the compared features when online.fd_weight > 0")
    online = [m for m in methods if m.online]
    if online and config.self_training.rounds > 0 and config.self_training.steps_per_round < 1:
        _fail("self_training.steps_per_round", config.self_training.steps_per_round,
              f"a step count >= 1 for the online method {online[0].name} (its rounds are steps, not epochs)")
    rows = config.online.ignore_top + config.online.ignore_bottom
    if any(m.online == "fixed" for m in online) and rows >= config.input.crop[0]:
        _fail(f"{o}.ignore_bottom", config.online.ignore_bottom,
              f"ignored rows (online.ignore_top + ignore_bottom = {rows}) fewer than the crop's "
              f"{config.input.crop[0]} rows for online_fixed (DAFormer's 15 + 120 are for 512-row crops)")
    if any(m.spatial_prior for m in online):
        crop, canvas = tuple(config.input.crop), tuple(config.input.eval_size)
        if crop[0] > canvas[0] or crop[1] > canvas[1]:
            _fail("input.crop", crop, f"a crop within input.eval_size {canvas} for "
                  f"{next(m.name for m in online if m.spatial_prior)} (the spatial prior lies on that canvas)")


def init_file(config) -> str:
    """The weights file ``model.init`` names, or "" for a random init ("" or "none")."""
    init = str(config.model.init)
    return "" if init in ("", NO_INIT) else init


def source_model_origin(config) -> str:
    """One line saying where the run's source model (round 0) comes from, for the log and the report."""
    init = init_file(config)
    mapped = " (its classifier's rows of the 13 NTHU classes)" if config.model.init_class_map == "nthu13" else ""
    if config.model.init_is_source_model:
        return f"source model: imported from {init}{mapped} (model.init_is_source_model=True)"
    if init:
        start = f"from {init}{mapped}"
    elif config.model.init == NO_INIT:
        start = f"from RANDOM INIT (model.init={NO_INIT})"
    else:
        start = f"from random init ({config.model.name} is trained from scratch)"
    steps = config.source_training.steps
    if steps == 0:
        return f"source model: {config.model.name} {start}, not trained (source_training.steps=0)"
    return f"source model: {config.model.name} trained here for {steps} steps on {config.source.name}, {start}"


def nthu_cities(config) -> list[str] | None:
    """The NTHU cities a configuration runs one after another (``target.city`` "all" or ""),
    or None when it runs one target (any other dataset, or one named city)."""
    from cbst_jax.data.nthu import CITIES

    if config.target.name == "nthu" and str(config.target.city).lower() in ("", "all"):
        return list(CITIES)
    return None


def seed_record(config, seed: int | None = None, city: str | None = None) -> dict:
    """The configuration of one seed's run as its folder records it (``config.json``): ``config``
    with ``seed`` (None: config.seed) and, over all NTHU cities, the ``city`` it runs on."""
    record = json.loads(config.to_json(sort_keys=True))
    if seed is not None:
        record["seed"] = int(seed)
    if city is not None:
        record["target"]["city"] = city
    return record


MAX_SEED = 2**63 - 1  # jax.random.key takes a signed 64-bit seed


def parse_seeds(text: str) -> list[int]:
    """The ``--seeds`` list: distinct integers in [0, 2**63)."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds={text!r}: expected a comma-separated list of integers, e.g. 0,1,2") from None
    if not seeds:
        raise ConfigError(f"--seeds={text!r}: expected at least one seed")
    for s in seeds:
        if not 0 <= s <= MAX_SEED:
            raise ConfigError(f"--seeds={text}: {s} is not a seed; expected integers in [0, 2**63), e.g. 0,1,2")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ConfigError(f"--seeds={text}: seed {twice[0]} is listed twice; expected distinct seeds")
    return seeds


def unknown_override(argv, config) -> str | None:
    """A one-line message for the first ``--config.a.b=...`` naming a key the schema lacks."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        node = config
        for i, key in enumerate(path):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                where = ".".join(path[:i]) or "config"
                known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
                return (f"unknown config key config.{'.'.join(path)}: {where} has no {key!r}"
                        + (f" (known: {known})" if known else ""))
            node = node[key]
    return None
