"""Everything a run's inputs can be checked for before its workdir is touched: the configuration,
the network name, the weights file (readable, with metadata that fits the network and the
configured normalisation), the dataset roots and layouts (each split opens, the evaluation
split has labels) and the crop against the images. A failure is the usual one-line error; only
after all of it passes does ``cbst_jax.main`` create, resume or replace a workdir."""
from __future__ import annotations

from cbst_jax import config_lib
from cbst_jax.data.experiment_data import open_side
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
    import copy

    from cbst_jax import experiment

    config_lib.validate(config)
    experiment.build_model(config)  # the network and the normalisation its weights need
    check_model_init(config)
    for city in config_lib.nthu_cities(config) or [None]:
        target = config
        if city is not None:
            target = copy.deepcopy(config)
            target.target.city = city
        _check_splits(target)


def check_model_init(config) -> None:
    """What the network starts from: a full-size network (one with published ImageNet weights,
    ``cbst_jax.convert_weights.KINDS``) needs ``model.init``, or ``model.init="none"`` for a random
    init on purpose; a file declared the source model must have the experiment's classes (19 of
    them with ``model.init_class_map="nthu13"``); and the file's variables must fit the network
    (with the class map applied), checked on shapes before anything is created."""
    import jax
    import numpy as np

    from cbst_jax import experiment, models
    from cbst_jax.convert_weights import KINDS

    init = config_lib.init_file(config)
    kinds = [kind for kind, (model, _) in KINDS.items() if model == config.model.name]
    if not init and config.model.init != config_lib.NO_INIT and kinds:
        raise config_lib.ConfigError(
            f"config.model.init is empty: {config.model.name} would start from random weights "
            f"({config.source_training.steps} source-training steps); pass --config.model.init=<weights.npz> (an "
            f"ImageNet init converted with python -m cbst_jax.convert_weights {' or '.join(kinds)} ..., or a source "
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
    model = experiment.build_model(config)
    crop = tuple(config.input.crop)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, *crop, 3), np.float32), train=False))
    experiment.merge_variables(shapes, models.load_variables(init), init,
                               keep_classes=experiment.class_map(config.model.init_class_map))


def check_batches(config) -> None:
    """Training batches are split evenly over the devices (evaluation batches are padded). Needs
    the device count: on one host before the workdir is touched, on several once every process has
    joined (``jax.distributed.initialize`` and the workdir's set-up come first there)."""
    import jax

    devices = jax.device_count()
    for key, value in (("input.batch_size", config.input.batch_size),
                       ("source_training.batch_size", config.source_training.batch_size)):  # 0: input's
        if value % devices:
            raise config_lib.ConfigError(f"config.{key}={value}: expected a multiple of the {devices} devices "
                                         f"(each device takes an equal share of a training batch)")


def _check_splits(config) -> None:
    source = open_side(config, "source", config.source.split)
    target_train = open_side(config, "target", config.target.train_split, labelled=False)
    target_eval = open_side(config, "target", config.target.eval_split)
    for name, split in (("source", source), ("target train", target_train), ("target evaluation", target_eval)):
        if len(split) == 0:
            raise DatasetError(f"the {name} split of {config.source.name if name == 'source' else config.target.name} "
                               f"is empty")
    if not getattr(target_eval, "has_labels", True):
        raise DatasetError(f"target evaluation split {config.target.eval_split!r} has no labels")
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
