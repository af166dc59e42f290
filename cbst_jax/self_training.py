"""The self-training round loop of CBST (Zou et al., ECCV 2018), readable as the paper's algorithm.

    round 0: a source-only model (trained here on the source, or imported weights)
    for each method (ST, CBST, CBST-SP, CRST variants), from that source model:
        for round r = 0 .. R-1:
            p_r = min(p0 + r·Δp, p_max)                         # self-paced portion
            predict the target train split; λ = class thresholds at p_r (ST / CBST / CBST-SP)
            write pseudo-labels ŷ = argmax q·p/λ where ≥ 1, else ignore
                (CRST LR*: soft ŷ, the closed-form minimiser of the label-regularised objective)
            retrain E epochs on the round's source subset + pseudo-labelled target
                (CRST MR*: plus a model regulariser on the pseudo-labelled target pixels)
            evaluate on the target evaluation split; log

State and resume: a run is a fixed sequence of *stages* ("source", then "<method>/r<k>"). Each
stage ends with a checkpoint (phase "done"); training checkpoints inside a stage (phase
"train") hold the train state, the data-iterator position and the pseudo-label manifest's
location. Killed anywhere, the same command resumes from the latest checkpoint and, since every
batch, augmentation and pseudo-label is a pure function of (seed, stage, step), reaches the same
final metrics bit for bit (on CPU). Evaluation never feeds back into training: every round is
reported, and no round is picked by looking at the evaluation split unless
``config.select_by_eval`` asks for it (the report then says so).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
import zlib

import jax
import numpy as np
from tqdm.auto import tqdm

from cbst_jax import checkpointing, config_lib, labels as labels_lib, metrics, priors, reporting
from cbst_jax import sharding as shd
from cbst_jax import train as train_lib
from cbst_jax.data import pipeline
from cbst_jax.predict import Predictor, local_rows
from cbst_jax.pseudo_label_store import PseudoLabelStore, atomic_write_bytes

SOURCE_STAGE = "source"


class RunError(RuntimeError):
    """A run cannot go on (non-finite loss, inconsistent workdir); the message is one line."""


# ---------------------------------------------------------------------------- set-up
@dataclasses.dataclass
class Experiment:
    """Everything built once per (config, seed): data, model, mesh, predictor, prior."""
    config: object
    workdir: str
    mesh: object
    model: object
    source: object
    target_train: object
    target_eval: object
    predictor: Predictor
    canvas: tuple
    table_classes: list
    subset_classes: list | None
    prior: object = None
    pl_label_key: str | None = None
    log: reporting.MetricsLog | None = None


def _open_side(config, side: str, split: str, *, labelled=None):
    from cbst_jax import data

    d = config[side]
    if d.name.startswith("synthetic/"):
        s = config.synthetic
        counts = {("source", "train"): s.num_source, ("target", "train"): s.num_target_train,
                  ("target", "val"): s.num_target_val, ("target", "test"): s.num_target_val}
        return data.open_dataset(d.name, None, split, height=s.height, width=s.width, seed=s.data_seed,
                                 num_images=counts.get((d.name.split("/")[1], split)))
    opts = {"num_classes": config.num_classes}
    if d.get("list_file") and split == d.get("train_split", d.get("split")):
        opts["list_file"] = d.list_file
    if labelled is not None and d.name in ("cityscapes", "bdd100k", "nthu"):
        opts["labelled"] = labelled
    if d.name == "nthu" and d.get("city"):
        opts["city"] = d.city
    return data.open_dataset(d.name, d.root, split, **opts)


def _class_lists(config):
    if config.eval_classes == "synthetic":
        from cbst_jax.data.synthetic import DRAWN_CLASSES
        return sorted(DRAWN_CLASSES), None
    if config.eval_classes == "miou13":
        return list(range(config.num_classes)), list(labels_lib.MIOU13_OF_16)
    return list(range(config.num_classes)), None


def build_model(config):
    from cbst_jax import models

    return models.get_model(config.model.name, config.num_classes, dtype=config.model.dtype,
                            train_bn=config.model.train_bn)


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


def build(config, workdir: str) -> Experiment:
    from cbst_jax import data

    mesh = shd.make_mesh()
    source = _open_side(config, "source", config.source.split)
    target_train = _open_side(config, "target", config.target.train_split, labelled=False)
    target_eval = _open_side(config, "target", config.target.eval_split)
    data.check_disjoint(target_train, target_eval)
    if not getattr(target_eval, "has_labels", True):
        raise RunError(f"target evaluation split {config.target.eval_split!r} has no labels")
    model = build_model(config)
    canvas = tuple(config.input.eval_size)
    predictor = Predictor(model, config.num_classes, mesh, canvas, config.predict.scales, config.predict.flip)
    table_classes, subset = _class_lists(config)
    pl_key = "hidden_label" if "hidden_label" in target_train[0] else None
    return Experiment(config, workdir, mesh, model, source, target_train, target_eval, predictor, canvas,
                      table_classes, subset, pl_label_key=pl_key,
                      log=reporting.MetricsLog(workdir, enabled=jax.process_index() == 0))


def spatial_prior(exp: Experiment):
    """The CBST-SP prior q at the canvas size, replicated on the mesh (built once per workdir)."""
    cfg = exp.config.self_training
    path = cfg.prior or os.path.join(exp.workdir, "spatial_prior.npz")
    # Process 0's answer: another process may look after process 0 has written the file, and
    # must still join the barrier below.
    if _agree(not os.path.exists(path)):
        maps = (exp.source[i]["label"] for i in tqdm(range(len(exp.source)), desc="spatial prior",
                                                      disable=jax.process_index() != 0, leave=False))
        q = priors.build_spatial_prior(maps, exp.config.num_classes, tuple(cfg.prior_size), cfg.prior_sigma,
                                       normalize=cfg.prior_normalize)
        if jax.process_index() == 0:
            priors.save_prior(path, q, sigma=cfg.prior_sigma, size=list(cfg.prior_size), normalize=cfg.prior_normalize)
        _barrier("prior")
    q = priors.resize_prior(priors.load_prior(path, exp.config.num_classes), exp.canvas)
    return jax.device_put(q, shd.replicated(exp.mesh))


def _agree(flag: bool) -> bool:
    """Process 0's answer to a question about shared files, so every process takes the same
    branch (and so runs the same collectives) even while process 0 is writing those files."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.array(bool(flag))))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------- stages
def stage_list(config) -> list[tuple[str, int | None]]:
    stages = [(SOURCE_STAGE, None)]
    for method in config_lib.method_list(config):
        if method != "source_only":
            stages += [(method, r) for r in range(config.self_training.rounds)]
    return stages


def stage_key(method: str, round_idx) -> str:
    return method if round_idx is None else f"{method}/r{round_idx}"


def round_portion(config, r: int) -> float:
    p0, dp, pmax = config.self_training.portion
    return float(min(p0 + r * dp, pmax))


def _variables(state):
    return {"params": state.params, "batch_stats": state.batch_stats}


def _eval_batches(exp: Experiment, source, label_key=None):
    cfg = exp.config.input
    it = pipeline.EvalIterator(source, batch_size=_eval_batch(exp), canvas=exp.canvas, label_key=label_key,
                               workers=cfg.workers)
    for host in it:
        yield shd.to_global(host, exp.mesh), host


def _eval_batch(exp) -> int:
    n = exp.mesh.devices.size
    return max(n, -(-exp.config.input.eval_batch_size // n) * n)


def evaluate(exp: Experiment, state, keep: int = 4):
    cm, preds = exp.predictor.evaluate(_variables(state), _eval_batches(exp, exp.target_eval), keep)
    return cm, preds


def eval_row(exp: Experiment, seed, method, round_idx, cm, extra=None) -> dict:
    iou = metrics.per_class_iou(cm)
    row = {"kind": "eval", "seed": seed, "method": method, "round": round_idx,
           "iou": iou.tolist(), "miou": metrics.mean_iou(cm, exp.table_classes),
           "pixel_acc": metrics.pixel_accuracy(cm)}
    if exp.subset_classes is not None:
        row["miou_subset"] = metrics.mean_iou(cm, exp.subset_classes)
    row.update(extra or {})
    return row


def mining_classes(class_counts, num_classes: int, share: float = 1e-3, rarest: int = 3) -> list[int]:
    """Classes for rare-class patch mining (reference §1a.7): those whose predicted-pixel share is
    below ``share`` (rarest first); if none, the ``rarest`` rarest predicted classes."""
    counts = np.asarray(class_counts, np.float64)[:num_classes]
    total = counts.sum()
    if total <= 0:
        return []
    order = [int(c) for c in np.argsort(counts, kind="stable") if counts[c] > 0]
    rare = [c for c in order if counts[c] / total < share]
    return rare or order[:rarest]


def generate_pseudo_labels(exp: Experiment, state, method: str, round_idx: int, store: PseudoLabelStore) -> dict:
    """Thresholds at the round's portion, then pseudo-labels of the whole target train split."""
    cfg = exp.config
    portion = round_portion(cfg, round_idx)
    policy = "st" if method == "st" else "cbst"
    prior = exp.prior if method == "cbst_sp" else None
    variables = _variables(state)
    show = jax.process_index() == 0
    n_batches = -(-len(exp.target_train) // _eval_batch(exp))

    def batches():
        for g, _ in tqdm(_eval_batches(exp, exp.target_train, exp.pl_label_key), total=n_batches,
                         desc=f"{stage_key(method, round_idx)} λ", disable=not show, leave=False):
            yield g

    lam, class_counts = exp.predictor.thresholds(variables, batches, portion, policy, prior,
                                                 cfg.self_training.select_subsample)
    store.begin() if show else None
    _barrier("pl-begin")
    c = cfg.num_classes
    soft = method in config_lib.LABEL_REGULARIZERS
    stride = cfg.self_training.soft_label_stride
    picked, correct, valid_n = np.zeros(c, np.int64), np.zeros(c, np.int64), 0
    for g, host in tqdm(_eval_batches(exp, exp.target_train, exp.pl_label_key), total=n_batches,
                        desc=f"{stage_key(method, round_idx)} labels", disable=not show, leave=False):
        if soft:  # CRST LR*: soft labels from the same class-balanced λ
            lab, top, cells, p, k, v = exp.predictor.soft_pseudo_labels(
                variables, g, lam, kind=method, alpha=cfg.self_training.label_reg_weight[method], stride=stride,
                keep=cfg.self_training.label_reg_keep[method])
            for (row, t), (_, cell) in zip(local_rows(top, host), local_rows(cells, host, stride)):
                store.write_soft(int(host["index"][row]), t, cell)
        else:
            lab, p, k, v = exp.predictor.pseudo_labels(variables, g, lam, prior)
        for row, label in local_rows(lab, host):
            store.write(int(host["index"][row]), label)
        picked += np.asarray(p, np.int64)
        correct += np.asarray(k, np.int64)
        valid_n += int(v)
    _barrier("pl-written")
    manifest = {"method": method, "round": round_idx, "portion": portion, "policy": policy,
                "thresholds": lam.tolist(), "class_counts": np.asarray(class_counts).tolist(),
                "selected": picked.tolist(), "correct": correct.tolist(), "valid_pixels": valid_n,
                "mine_classes": mining_classes(class_counts, c), "num_records": len(exp.target_train),
                "has_ground_truth": exp.pl_label_key is not None,
                "soft_label_stride": stride if soft else None}
    if show:
        store.finish(manifest)
    _barrier("pl-done")
    return manifest


def pseudo_label_row(seed, manifest) -> dict:
    sel = np.asarray(manifest["selected"], np.float64)
    share = sel / max(sel.sum(), 1)
    row = {"kind": "pseudo_labels", "seed": seed, "method": manifest["method"], "round": manifest["round"],
           "portion": manifest["portion"], "thresholds": manifest["thresholds"], "share": share.tolist(),
           "selected_fraction": float(sel.sum() / max(manifest["valid_pixels"], 1))}
    if manifest["has_ground_truth"]:
        with np.errstate(invalid="ignore", divide="ignore"):
            row["precision"] = np.where(sel > 0, np.asarray(manifest["correct"]) / np.maximum(sel, 1),
                                        np.nan).tolist()
    return row


# ---------------------------------------------------------------------------- training
class Trainer:
    """Runs the jitted train step over a stage's mixed stream, with checkpoints inside it."""

    def __init__(self, exp: Experiment, ckpts: checkpointing.RunCheckpoints):
        self.exp, self.ckpts = exp, ckpts
        cfg = exp.config
        self.step_fn = train_lib.make_train_step(exp.model, train_lib.TrainConfig(
            loss_resolution=cfg.self_training.loss_resolution, stride=exp.model.output_stride,
            regularizer="none", reg_weight=0.0, train_bn=cfg.model.train_bn), exp.mesh)
        self._reg_steps = {}
        self.last_loss = None

    def step_for(self, method: str):
        cfg = self.exp.config
        if method not in config_lib.MODEL_REGULARIZERS:
            return self.step_fn
        if method not in self._reg_steps:
            self._reg_steps[method] = train_lib.make_train_step(self.exp.model, train_lib.TrainConfig(
                loss_resolution=cfg.self_training.loss_resolution, stride=self.exp.model.output_stride,
                regularizer=method, reg_weight=cfg.self_training.reg_weight, train_bn=cfg.model.train_bn),
                self.exp.mesh)
        return self._reg_steps[method]

    def run(self, state, *, stage: str, method: str, steps: int, lr: float, schedule: str,
            iterator: pipeline.MixedIterator, start_step: int, meta: dict, ckpt_index: int):
        """Trains ``steps - start_step`` steps; returns (state, next checkpoint index)."""
        cfg = self.exp.config
        step_fn = self.step_for(method)
        pending, losses_seen = None, list(meta.get("recent_losses", []))
        bar = tqdm(range(start_step, steps), desc=f"{stage} train", disable=jax.process_index() != 0,
                   leave=False, initial=start_step, total=steps)
        for k in bar:
            host = next(iterator)
            fields = {"image": host["image"], "label": host["label"], "is_target": host["domain"] == pipeline.TARGET}
            if "soft_label" in host:
                fields["soft_label"] = host["soft_label"]
            batch = shd.to_global(fields, self.exp.mesh)
            lr_k = lr * ((1.0 - k / steps) ** 0.9 if schedule == "poly" else 1.0)
            state, m = step_fn(state, batch, np.float32(lr_k))
            if pending is not None:
                self._check(stage, *pending, losses_seen)
            pending = (k, m)
            if (k + 1) % cfg.log_every == 0 or k + 1 == steps:
                self._check(stage, *pending, losses_seen)
                pending = None
                bar.set_postfix(loss=f"{np.mean(losses_seen[-cfg.log_every:]):.4f}")
                self.exp.log.scalars(f"train/{stage}", k + 1, {"loss": float(np.mean(losses_seen[-cfg.log_every:])),
                                                               "lr": lr_k})
            if (k + 1) % cfg.checkpoint_every == 0 and k + 1 < steps:
                if pending is not None:
                    self._check(stage, *pending, losses_seen)
                    pending = None
                ckpt_meta = dict(meta, phase="train", step=k + 1, iterator=iterator.get_state(), ckpt=ckpt_index,
                                 recent_losses=losses_seen[-cfg.log_every:])
                self.ckpts.save(ckpt_index, state, ckpt_meta)
                ckpt_index += 1
        if pending is not None:
            self._check(stage, *pending, losses_seen)
        self.last_loss = float(np.mean(losses_seen[-cfg.log_every:])) if losses_seen else None
        return state, ckpt_index

    def _check(self, stage, k, m, losses_seen):
        if not bool(m["finite"]):
            latest = self.ckpts.latest()
            raise RunError(f"non-finite loss in stage {stage} at step {k}: stopped; the last good "
                           f"checkpoint ({self.ckpts.directory}/{latest}) is intact")
        losses_seen.append(float(m["loss"]))


def _optimizer(exp: Experiment, params, kind: str):
    from cbst_jax import models

    labels = models.param_groups(exp.model, params, train_bn=exp.config.model.train_bn)
    o = exp.config.optim
    # lr=1: the absolute learning rate of each step is passed to the step as ``lr_scale``.
    return train_lib.make_optimizer(labels, lr=1.0, momentum=o.momentum, weight_decay=o.weight_decay,
                                    head_lr_mult=o.head_lr_mult, optimizer=kind)


def fresh_state(exp: Experiment, variables, rng, kind: str | None = None):
    """A train state with a new optimiser (both references reset SGD momentum every round).
    The variables are copied through the host, so donating the new state never frees the
    buffers of the state it came from (the source model is reused by every method)."""
    variables = jax.tree.map(lambda x: np.array(jax.device_get(x)), variables)
    tx = _optimizer(exp, variables["params"], kind or exp.config.self_training.optimizer)
    return train_lib.create_train_state(exp.model, variables, tx, rng, exp.mesh)


def mixed_iterator(exp: Experiment, round_idx: int | None, target_labels=None, mine_classes=(),
                   target_soft_labels=None):
    cfg = exp.config
    s0, ds, smax = cfg.input.source_portion
    if round_idx is None:  # source training: the whole source set
        sampler = pipeline.MixedSampler(tuple(range(len(exp.source))), 0, cfg.input.batch_size, "pooled",
                                        seed=int(np.random.SeedSequence([cfg.seed, 999]).generate_state(1)[0]))
    else:
        per_batch = int(round(cfg.input.source_share * cfg.input.batch_size)) if cfg.input.sampler == "paired" else None
        sampler = pipeline.round_sampler(
            len(exp.source), len(exp.target_train), round_idx, batch_size=cfg.input.batch_size,
            mode=cfg.input.sampler, source_per_batch=per_batch, s0=s0, ds=ds, s_max=smax,
            subset_schedule="cumulative" if cfg.input.source_subset == "nested" else "fresh", seed=cfg.seed)
    return pipeline.MixedIterator(exp.source, exp.target_train, sampler, crop_size=tuple(cfg.input.crop),
                                  target_labels=target_labels, scale_range=tuple(cfg.input.scale_range),
                                  flip=cfg.input.flip, mine_classes=mine_classes, p_mine=cfg.input.mine_prob,
                                  workers=cfg.input.workers, target_soft_labels=target_soft_labels,
                                  soft_stride=cfg.self_training.soft_label_stride, num_classes=cfg.num_classes)


def stage_steps(exp: Experiment, iterator) -> int:
    st = exp.config.self_training
    if st.steps_per_round > 0:
        return int(st.steps_per_round)
    return max(1, int(round(st.epochs_per_round * iterator.sampler.batches_per_epoch())))


# ---------------------------------------------------------------------------- the run
def _rows_done(exp: Experiment, kind: str) -> set:
    return {(r["method"], r.get("round")) for r in reporting.read_rows(exp.log.path, kind)
            if r.get("seed") == exp.config.seed}


def run(config, workdir: str) -> list[dict]:
    """One seed: source model, then every method's rounds; resumes from ``workdir``."""
    config = copy.deepcopy(config)
    os.makedirs(workdir, exist_ok=True)
    _check_workdir(config, workdir)
    exp = build(config, workdir)
    if "cbst_sp" in config_lib.method_list(config):
        exp.prior = spatial_prior(exp)
    seed = config.seed
    source_ck = checkpointing.RunCheckpoints(os.path.join(workdir, "checkpoints", "source"), max_to_keep=1)
    run_ck = checkpointing.RunCheckpoints(os.path.join(workdir, "checkpoints", "rounds"), max_to_keep=2)
    trainer = Trainer(exp, run_ck)
    rng = jax.random.key(seed)
    variables = init_variables(config, exp.model, rng, tuple(config.input.crop))
    template = fresh_state(exp, variables, jax.random.fold_in(rng, 1), config.source_training.optimizer)
    abstract_source = checkpointing.abstract_like(template)
    abstract = checkpointing.abstract_like(fresh_state(exp, variables, jax.random.fold_in(rng, 1)))
    t_start = time.time()

    # ---- round 0: the source model
    if _agree(source_ck.latest() is None):
        state, start, meta, ckpt = template, 0, None, (run_ck.latest() or 0) + 1
        latest = run_ck.restore_meta()
        if latest is not None and latest.get("stage") == SOURCE_STAGE:
            state, meta = run_ck.restore(abstract_source)
            start, ckpt = meta["step"], meta["ckpt"] + 1
        if not config.model.init_is_source_model and config.source_training.steps > 0:
            it = mixed_iterator(exp, None)
            if meta is not None:
                it.set_state(meta["iterator"])
            with it:
                state, ckpt = trainer.run(state, stage=SOURCE_STAGE, method="source_only",
                                          steps=config.source_training.steps, lr=config.source_training.lr,
                                          schedule=config.source_training.schedule, iterator=it,
                                          start_step=start, ckpt_index=ckpt,
                                          meta={"stage": SOURCE_STAGE,
                                                "recent_losses": (meta or {}).get("recent_losses", [])})
        source_ck.save(0, state, {"stage": SOURCE_STAGE, "phase": "done"})
    source_state, _ = source_ck.restore(abstract_source)
    if _agree(("source_only", None) not in _rows_done(exp, "eval")):
        cm, preds = evaluate(exp, source_state)
        exp.log.write(eval_row(exp, seed, "source_only", None, cm, {"wall_s": time.time() - t_start}))
        _save_preds(exp, "source_only", preds)

    # ---- self-training rounds
    latest = run_ck.restore_meta()
    resume = latest if latest is not None and latest.get("stage") != SOURCE_STAGE else None
    done = set(resume.get("done", [])) if resume else set()
    ckpt = (run_ck.latest() or 0) + 1
    state = None
    if resume is not None and resume["phase"] == "done":
        method, r = resume["stage"].split("/r")
        if _agree((method, int(r)) not in _rows_done(exp, "eval")):
            state, _ = run_ck.restore(abstract)
            finish_stage(exp, state, method, int(r), resume, t_start)
    for method, r in stage_list(config)[1:]:
        key = stage_key(method, r)
        if key in done:
            continue
        start_step, iter_state, recent = 0, None, []
        if resume is not None and resume["stage"] == key and resume["phase"] == "train":
            state, meta = run_ck.restore(abstract)
            start_step, iter_state, recent = meta["step"], meta["iterator"], meta.get("recent_losses", [])
        else:
            if r == 0:
                state = source_state
            elif state is None or (resume is not None and resume["stage"] == stage_key(method, r - 1)):
                state, _ = run_ck.restore(abstract)
            state = fresh_state(exp, _variables(state), jax.random.fold_in(rng, zlib.crc32(key.encode()) % (2**31)))
        resume = None
        store = PseudoLabelStore(os.path.join(workdir, "pseudo_labels", method, f"round_{r}"))
        if not _agree(store.complete()):
            manifest = generate_pseudo_labels(exp, state, method, r, store)
        else:
            manifest = store.manifest()
        if (method, r) not in _rows_done(exp, "pseudo_labels"):
            exp.log.write(pseudo_label_row(seed, manifest))
        mine = manifest["mine_classes"] if config.self_training.mine_rare else ()
        soft = store.read_soft if manifest.get("soft_label_stride") else None
        it = mixed_iterator(exp, r, target_labels=store.read, mine_classes=mine, target_soft_labels=soft)
        if iter_state is not None:
            it.set_state(iter_state)
        steps = stage_steps(exp, it)
        lr = config.self_training.lr * config.self_training.lr_round_decay ** r
        meta = {"stage": key, "done": sorted(done), "pseudo_labels": store.directory, "recent_losses": recent}
        with it:
            state, ckpt = trainer.run(state, stage=key, method=method, steps=steps, lr=lr,
                                      schedule=config.self_training.schedule, iterator=it,
                                      start_step=start_step, meta=meta, ckpt_index=ckpt)
        done.add(key)
        stage_meta = {"stage": key, "phase": "done", "done": sorted(done), "ckpt": ckpt, "steps": steps,
                      "train_loss": trainer.last_loss, "pseudo_labels": store.directory}
        run_ck.save(ckpt, state, stage_meta)
        ckpt += 1
        finish_stage(exp, state, method, r, stage_meta, t_start)
    rows = [r for r in reporting.read_rows(exp.log.path, "eval") if r.get("seed") == seed]
    if jax.process_index() == 0:
        write_seed_report(exp, rows)
    exp.log.close()
    return rows


def finish_stage(exp: Experiment, state, method: str, r: int, stage_meta: dict, t_start: float) -> None:
    """Evaluation row, kept predictions and the pseudo-label figure of a finished stage."""
    cm, preds = evaluate(exp, state)
    exp.log.write(eval_row(exp, exp.config.seed, method, r, cm, {
        "portion": round_portion(exp.config, r), "steps": stage_meta["steps"],
        "train_loss": stage_meta["train_loss"], "wall_s": time.time() - t_start}))
    _save_preds(exp, f"{method}_r{r}", preds)
    _round_grid(exp, method, r, PseudoLabelStore(stage_meta["pseudo_labels"]))


# Keys that say how this process joins a multi-host run, not what the run computes: they differ
# between the processes of one run (process_id) and between launches (the coordinator's port).
LAUNCH_KEYS = ("process_id", "coordinator_address")


def _check_workdir(config, workdir):
    """Refuses to resume a workdir written by a different configuration (launch keys aside)."""
    path = os.path.join(workdir, "config.json")
    mine = {k: v for k, v in json.loads(config.to_json(sort_keys=True)).items() if k not in LAUNCH_KEYS}
    text = json.dumps(mine, sort_keys=True, indent=1)
    if os.path.exists(path):
        with open(path) as f:
            old = {k: v for k, v in json.load(f).items() if k not in LAUNCH_KEYS}
        if old != mine:
            diff = [k for k, v in _flat(mine).items() if _flat(old).get(k) != v]
            raise RunError(f"{workdir} holds a run with another configuration (differs in {', '.join(diff[:4])}); "
                           f"use another --workdir or --fresh")
    elif jax.process_index() == 0:
        atomic_write_bytes(path, text.encode())


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _save_preds(exp: Experiment, name: str, preds) -> None:
    if jax.process_index() != 0 or not preds:
        return
    os.makedirs(os.path.join(exp.workdir, "predictions"), exist_ok=True)
    path = os.path.join(exp.workdir, "predictions", f"{name}.npz")
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, *preds)
    os.replace(tmp, path)


def _load_preds(exp: Experiment, name: str):
    path = os.path.join(exp.workdir, "predictions", f"{name}.npz")
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda s: int(s.split("_")[1]))]


def _round_grid(exp: Experiment, method: str, r: int, store: PseudoLabelStore, n: int = 4) -> None:
    """Per round: target-train images, their hidden ground truth (synthetic only) and pseudo-labels."""
    if jax.process_index() != 0:
        return
    idx = range(min(n, len(exp.target_train)))
    recs = [exp.target_train[i] for i in idx]
    cols = {"target image": [rec["image"] for rec in recs]}
    if exp.pl_label_key:
        cols["ground truth"] = [rec[exp.pl_label_key] for rec in recs]
    cols[f"{method} r{r} pseudo-labels"] = [store.read(i) for i in idx]
    os.makedirs(os.path.join(exp.workdir, "figures"), exist_ok=True)
    reporting.prediction_grid(cols, os.path.join(exp.workdir, "figures", f"pseudo_labels_{method}_r{r}.png"),
                              exp.config.num_classes)


def write_seed_report(exp: Experiment, rows) -> None:
    """Table, curves and the prediction grid (image, GT, source-only, each method's last round)."""
    cfg = exp.config
    names = labels_lib.class_names(cfg.num_classes)
    shown = [names[c] for c in exp.table_classes]
    sub_rows = [dict(r, iou=[r["iou"][c] for c in exp.table_classes]) for r in rows]
    table = reporting.eval_table(sub_rows, shown, exp.subset_classes and exp.subset_classes,
                                 subset_name="mIoU*")
    figs = os.path.join(exp.workdir, "figures")
    os.makedirs(figs, exist_ok=True)
    reporting.plot_miou_curves(rows, os.path.join(figs, "miou_per_round.png"))
    pl_rows = [r for r in reporting.read_rows(exp.log.path, "pseudo_labels") if r.get("seed") == cfg.seed]
    reporting.plot_pseudo_label_stats(pl_rows, names, os.path.join(figs, "pseudo_label_stats.png"),
                                      methods=[m for m in config_lib.method_list(cfg) if m != "source_only"])
    cols = {}
    k = 4
    recs = [exp.target_eval[i] for i in range(min(k, len(exp.target_eval)))]
    cols["image"] = [rec["image"] for rec in recs]
    cols["ground truth"] = [rec["label"] for rec in recs]
    src = _load_preds(exp, "source_only")
    if src:
        cols["source-only"] = src[:len(recs)]
    for method in config_lib.method_list(cfg):
        if method == "source_only" or cfg.self_training.rounds == 0:
            continue
        p = _load_preds(exp, f"{method}_r{cfg.self_training.rounds - 1}")
        if p:
            cols[method] = p[:len(recs)]
    reporting.prediction_grid(cols, os.path.join(figs, "predictions.png"), cfg.num_classes)
    note = ""
    if cfg.select_by_eval:
        best = max((r for r in rows if r.get("round") is not None), key=lambda r: r["miou"], default=None)
        if best:
            note = (f"\nBest round picked ON THE EVALUATION SPLIT (config.select_by_eval=True): "
                    f"{best['method']} r{best['round']} mIoU {100 * best['miou']:.1f}.\n")
    text = f"# Results, seed {cfg.seed}\n\n{table}\n{note}"
    atomic_write_bytes(os.path.join(exp.workdir, "results.md"), text.encode())
    print(f"\n{table}{note}", flush=True)


def run_seeds(config, workdir: str, seeds, fresh: bool = False) -> int:
    """Runs every seed (``workdir/seed_<s>``) and aggregates mean ± std over seeds."""
    if config.distributed:
        kwargs = {}
        if config.coordinator_address:
            kwargs = dict(coordinator_address=config.coordinator_address, num_processes=config.num_processes,
                          process_id=config.process_id)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only; no-op elsewhere
        shd.maybe_initialize_distributed(True, **kwargs)
    if fresh and jax.process_index() == 0 and os.path.isdir(workdir):
        shutil.rmtree(workdir)
    _barrier("fresh")
    all_rows = []
    t0 = time.time()
    for s in seeds:
        cfg = copy.deepcopy(config)
        cfg.seed = int(s)
        all_rows += run(cfg, os.path.join(workdir, f"seed_{s}"))
    if jax.process_index() == 0:
        write_aggregate(config, workdir, seeds, all_rows, time.time() - t0)
    return 0


def write_aggregate(config, workdir, seeds, rows, wall_s) -> None:
    names = labels_lib.class_names(config.num_classes)
    table_classes, _ = _class_lists(config)
    sub = [dict(r, iou=[r["iou"][c] for c in table_classes]) for r in rows]
    table = reporting.seed_aggregate_table(sub, [names[c] for c in table_classes])
    os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
    reporting.plot_miou_curves(rows, os.path.join(workdir, "figures", "miou_per_round.png"))
    pl = []
    for s in seeds:
        pl += [r for r in reporting.read_rows(os.path.join(workdir, f"seed_{s}", "metrics.jsonl"), "pseudo_labels")]
    reporting.plot_pseudo_label_stats(pl, names, os.path.join(workdir, "figures", "pseudo_label_stats.png"),
                                      methods=[m for m in config_lib.method_list(config) if m != "source_only"])
    text = (f"# Results over seeds {list(seeds)}\n\n{table}\n\nwall time {wall_s / 60:.1f} min "
            f"on {jax.device_count()} {jax.devices()[0].platform} device(s)\n")
    atomic_write_bytes(os.path.join(workdir, "results.md"), text.encode())
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(reporting._jsonable({"seeds": list(seeds), "wall_s": wall_s, "rows": rows}), f)
    if len(seeds) > 1:
        print(f"\n{text}", flush=True)
