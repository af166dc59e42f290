"""Everything a run's inputs can be checked for before its workdir is touched: the configuration,
the network name, the weights file (readable, with metadata that fits the network and the
configured normalisation), the data workers, the dataset roots and layouts (each split opens,
the evaluation split has labels and is not the split adapted on, every image and label file
ends as its format ends), each phase's split against its batch (the source phase, every
round), the crop and the evaluation canvas against the images, and the labelling batch against
the threshold histograms. A failure is the usual one-line error naming the key and the count;
only after all of it passes does ``cbst_jax.cli.run`` create, resume or replace a workdir."""
from __future__ import annotations

import importlib.util

from cbst_jax import config_lib
from cbst_jax.data.splits import open_side
from cbst_jax.data.io import DatasetError

SIZE_SAMPLES = 8


def image_sizes(source, samples: int = SIZE_SAMPLES) -> list[tuple[int, int]]:
    """(H, W) of up to ``samples`` records spread over ``source`` (decoded)."""
    n = len(source)
    picks = sorted({round(i * (n - 1) / max(samples - 1, 1)) for i in range(min(samples, n))})
    return [tuple(source[i]["image"].shape[:2]) for i in picks]


def preflight(config) -> None:
    """Raises ConfigError / DatasetError / WeightMismatchError (one line) on the first problem;
    every city of a Cityscapes -> NTHU run over all four is checked."""
    from cbst_jax import model_init

    config_lib.validate(config)
    # the network and the normalisation its weights need; its compute path is resolved for the run
    # (a multi-host run must not touch the backend before jax.distributed joins)
    model_init.build_model(config, platform="cpu")
    check_model_init(config)
    if config.input.worker_kind == "processes" and importlib.util.find_spec("grain") is None:
        raise config_lib.ConfigError("config.input.worker_kind='processes': needs grain (pip install grain); "
                                     "expected 'threads' or 'auto' without it")
    for city in config_lib.nthu_cities(config) or [None]:
        _check_splits(config, city)


def check_model_init(config) -> None:
    """What the network starts from: a full-size network (one with published ImageNet weights,
    ``cbst_jax.models.conversion.KINDS``) needs ``model.init``, or ``model.init="none"`` for a random
    init on purpose; a file declared the source model must have the experiment's classes (19 of
    them with ``model.init_class_map="nthu13"``); and the file's variables must fit the network
    (with the class map applied), checked on shapes before anything is created."""
    import jax
    import numpy as np

    from cbst_jax import model_init, models
    from cbst_jax.models.conversion import KINDS

    init = config_lib.init_file(config)
    kinds = [kind for kind, (model, _) in KINDS.items() if model == config.model.name]
    if not init and config.model.init != config_lib.NO_INIT and kinds:
        raise config_lib.ConfigError(
            f"config.model.init is empty: {config.model.name} would start from random weights "
            f"({config.source_training.steps} source-training steps); pass --config.model.init=<weights.npz> (an "
            f"ImageNet init converted with python -m cbst_jax.cli.convert_weights {' or '.join(kinds)} ..., or a "
            f"source "
            f"model with --config.model.init_is_source_model=True), or --config.model.init={config_lib.NO_INIT} to "
            f"train from random weights on purpose")
    if not init:
        return
    classes = models.read_metadata(init)["num_classes"]
    mapped = config.model.init_class_map == "nthu13"
    if mapped and classes != 19:
        raise config_lib.ConfigError(f"config.model.init={init}: {classes or 'no trained'} classes, but "
                                     f"model.init_class_map='nthu13' keeps 13 of a 19-class classifier")
    if config.model.init_is_source_model and classes is None:
        raise config_lib.ConfigError(f"config.model.init={init}: a backbone-only init (its classifier was never "
                                     f"trained), not a source model; drop model.init_is_source_model to train the "
                                     f"source model here from it")
    if config.model.init_is_source_model and not mapped and classes != config.num_classes:
        hint = (", or --config.model.init_class_map=nthu13 to keep its classifier's rows of the 13 NTHU classes"
                if (classes, config.num_classes) == (19, 13) else "")
        raise config_lib.ConfigError(f"config.model.init={init}: a source model of {classes} classes, but this "
                                     f"experiment has num_classes={config.num_classes}; pass a source model of "
                                     f"{config.num_classes} classes{hint}")
    model = model_init.build_model(config, platform="cpu")  # shapes only; the backend stays untouched
    crop = tuple(config.input.crop)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, *crop, 3), np.float32), train=False))
    model_init.merge_variables(shapes, models.load_variables(init), init,
                               keep_classes=model_init.class_map(config.model.init_class_map))


def check_batches(config) -> None:
    """Training batches are split evenly over the devices (evaluation batches are padded), and a
    labelling batch fits the threshold histograms. Needs the device count: on one host before
    the workdir is touched, on several once every process has joined (``jax.distributed.initialize``
    and the workdir's set-up come first there)."""
    import jax

    from cbst_jax.data.pipeline import global_eval_batch
    from cbst_jax.selection import MAX_BATCH_PIXELS

    devices = jax.device_count()
    for key, value in (("input.batch_size", config.input.batch_size),
                       ("source_training.batch_size", config.source_training.batch_size),  # 0: input's
                       ("online.batch_size", config.online.batch_size)):
        if value % devices:
            raise config_lib.ConfigError(f"config.{key}={value}: expected a multiple of the {devices} devices "
                                         f"(each device takes an equal share of a training batch)")
    if not _self_trains(config):
        return
    asked = config.input.eval_batch_size
    batch = global_eval_batch(asked, devices)
    h, w = config.input.eval_size
    if batch * h * w > MAX_BATCH_PIXELS:
        most = MAX_BATCH_PIXELS // (h * w) // devices * devices
        raise config_lib.ConfigError(
            f"config.input.eval_batch_size={asked}: a labelling batch of {batch} images (a multiple of the "
            f"{devices} devices) on the {h}x{w} canvas (input.eval_size) holds {batch * h * w} pixels, more than the "
            f"2**30 the threshold histograms count per batch; expected at most {most} images"
            + ("" if most else " (none fits: a smaller input.eval_size)"))


def check_phase_sizes(config, num_source: int, num_target: int, note: str = "", city: str | None = None) -> None:
    """Every training phase can fill one batch: the source phase (when it runs) from the source
    split, every round from its source subset and the target train split (``num_target``
    images); else ConfigError naming the key and the counts (``note``: appended to it; ``city``:
    the NTHU city the target is, over all cities)."""
    from cbst_jax import settings

    source, rounds = settings.source_phase(config, config.seed), settings.round_phase(config, config.seed)
    if source.trains:
        try:
            source.sampler(num_source)
        except ValueError:
            key = "source_training.batch_size" if config.source_training.batch_size else "input.batch_size"
            b = source.batch_size
            raise config_lib.ConfigError(
                f"config.{key}={b}: the source split of {config.source.name} holds {num_source} images, fewer than "
                f"one batch of the source phase; expected at least {b} images, or a smaller batch{note}") from None
    if not _self_trains(config):
        return
    for r in range(rounds.rounds):
        try:
            rounds.sampler(num_source, num_target, r)
        except ValueError:
            raise config_lib.ConfigError(_round_shortfall(config, rounds, num_source, num_target, r, city)
                                         + note) from None


def check_adaptation_split(config, data, city: str | None = None) -> None:
    """:func:`check_phase_sizes` on the splits a run adapts on (``Splits``: the target
    train split without the evaluation images, ``cbst_jax.data.overlap``), known only once
    every image is hashed, inside the run."""
    excluded = data.overlap.get("excluded_train_images", 0)
    note = (f" (after leaving out the {excluded} target train images that are also evaluation images; "
            f"target.allow_eval_overlap=True keeps them)" if excluded else "")
    check_phase_sizes(config, len(data.source), len(data.target_train), note, city)


def _self_trains(config) -> bool:
    from cbst_jax.methods import parse

    return config.self_training.rounds > 0 and any(m.self_trains for m in parse(config.methods))


def _target_name(config, city: str | None) -> str:
    city = config.target.get("city") if city is None else city
    return config.target.name + (f" ({city})" if city else "")


def _round_shortfall(config, rounds, num_source: int, num_target: int, r: int, city: str | None) -> str:
    """Why round ``r``'s sampler cannot fill one batch, in one line with the counts."""
    from cbst_jax.data.pipeline import source_subset

    b, inp = config.input.batch_size, config.input
    s0, ds, smax = inp.source_portion
    subset = len(source_subset(num_source, r, s0=s0, ds=ds, s_max=smax))
    per_batch = rounds.source_per_batch
    head = f"config.input.batch_size={b}: "
    if per_batch is None:
        return (head + f"round {r} draws its batches from {subset} source images (input.source_portion of "
                f"{num_source}) and the {num_target} target train images of {_target_name(config, city)}, "
                f"{subset + num_target} in all, fewer than one batch; expected at least {b}")
    paired = f"(input.sampler='paired', input.source_share={inp.source_share})"
    if b - per_batch > num_target:
        return (head + f"a round's batch takes {b - per_batch} target train images {paired}, but the target train "
                f"split of {_target_name(config, city)} holds {num_target}; expected at least {b - per_batch}")
    return (head + f"a round's batch takes {per_batch} source images {paired}, but round {r} uses {subset} "
            f"(input.source_portion of {num_source}); expected at least {per_batch}")


def _check_splits(config, city: str | None) -> None:
    source = open_side(config, "source", config.source.split)
    target_train = open_side(config, "target", config.target.train_split, labelled=False, city=city)
    target_eval = open_side(config, "target", config.target.eval_split, city=city)
    for name, split in (("source", source), ("target train", target_train), ("target evaluation", target_eval)):
        if len(split) == 0:
            raise DatasetError(f"the {name} split of {config.source.name if name == 'source' else config.target.name} "
                               f"is empty")
    if not getattr(target_eval, "has_labels", True):
        raise DatasetError(f"target evaluation split {config.target.eval_split!r} has no labels")
    if config.target.train_split == config.target.eval_split and not config.target.allow_eval_overlap:
        raise config_lib.ConfigError(
            f"config.target.train_split={config.target.train_split!r} is also config.target.eval_split: every one "
            f"of its {len(target_train)} images is an evaluation image and would be left out of adaptation, leaving "
            f"none; expected another split, or target.allow_eval_overlap=True (adapt on the evaluation images, "
            f"the published protocol)")
    check_phase_sizes(config, len(source), len(target_train), city=city)
    for split in (source, target_train, target_eval):
        problem = split.damaged_file() if hasattr(split, "damaged_file") else None
        if problem:
            raise DatasetError(problem)
    checks = [("input.crop", tuple(config.input.crop), "source", source),
              ("input.crop", tuple(config.input.crop), "target", target_train)]
    if config.source_training.steps > 0 and not config.model.init_is_source_model and config.source_training.crop:
        checks.append(("source_training.crop", tuple(config.source_training.crop), "source", source))
    sizes = {}
    for key, crop, name, split in checks:
        sizes.setdefault(name, image_sizes(split))
        if all(crop[0] > h or crop[1] > w for h, w in sizes[name]):
            largest = max(sizes[name], key=lambda s: s[0] * s[1])
            raise config_lib.ConfigError(f"config.{key}={crop}: larger than every {name} image looked at "
                                         f"(e.g. {largest[0]}x{largest[1]}); expected a crop that fits the images")
    canvas = tuple(config.input.eval_size)
    on_canvas = [("target evaluation", image_sizes(target_eval))]
    if _self_trains(config):
        on_canvas.append(("target train", sizes["target"]))
    for name, looked_at in on_canvas:
        for h, w in looked_at:
            if h > canvas[0] or w > canvas[1]:
                raise config_lib.ConfigError(
                    f"config.input.eval_size={canvas}: smaller than a {name} image ({h}x{w}); evaluation and "
                    f"pseudo-labelling batches hold whole images on that canvas, expected at least {h}x{w}")
