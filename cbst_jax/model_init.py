"""The network a configuration names and the variables it starts from: the architecture with the
input normalisation its weights expect and the compute path of the platform, randomly
initialised, then merged with the converted weights ``model.init`` names (a classifier of
another class count left at its init, or cut to the 13 NTHU classes by ``model.init_class_map``).
Used by the run's set-up (``cbst_jax.experiment``) and by ``cbst_jax.preflight``, which checks
the same on shapes before anything is created."""
from __future__ import annotations

import jax
import numpy as np

from cbst_jax.errors import RunError


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
