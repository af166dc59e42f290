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

    from cbst_jax import experiment, models

    config_lib.validate(config)
    # the network and the normalisation its weights need; its compute path is resolved for the run
    # (a multi-host run must not touch the backend before jax.distributed joins)
    experiment.build_model(config, platform="cpu")
    if config.model.init:
        models.load_variables(config.model.init)
    for city in config_lib.nthu_cities(config) or [None]:
        target = config
        if city is not None:
            target = copy.deepcopy(config)
            target.target.city = city
        _check_splits(target)


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
