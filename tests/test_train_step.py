"""Optimiser groups against torch.optim.SGD / numpy, the schedule, and the jitted data-parallel step
(direct-loss parity, frozen/trained BN, 1 vs 8 devices, non-finite guard, no recompilation)."""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbst_jax import losses, train_step
from cbst_jax.sharding import make_mesh, to_global

K = 5


class TinySeg(nn.Module):
    """conv(stride 2) → BN → ReLU → dropout → 1×1 head; uint8 images in, float32 logits out."""
    num_classes: int = K
    train_bn: bool = False
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = images.astype(self.dtype) / 255.0
        x = nn.Conv(8, (3, 3), strides=2, dtype=self.dtype, name="stem")(x)
        x = nn.BatchNorm(use_running_average=not (self.train_bn and train), momentum=0.5,
                         dtype=self.dtype, name="bn")(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
        return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="head")(x).astype(jnp.float32)


def tiny_labels(params, train_bn=False):
    return {k: jax.tree.map(lambda _: {"stem": "backbone", "head": "head"}.get(k, "backbone" if train_bn else "frozen"), v)
            for k, v in params.items()}


def init_variables(model, hw=(16, 16), seed=0):
    v = model.init(jax.random.key(seed), jnp.zeros((1, *hw, 3), jnp.uint8))
    rng = np.random.default_rng(seed)  # non-trivial BN statistics
    bs = {"bn": {"mean": rng.normal(size=8).astype(np.float32) * 0.1,
                 "var": rng.uniform(0.5, 2, size=8).astype(np.float32)}}
    return {"params": jax.tree.map(np.asarray, v["params"]), "batch_stats": bs}


def make_batch(b=8, hw=(16, 16), seed=0, soft=False):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, K, (b, *hw)).astype(np.uint8)
    label[rng.random((b, *hw)) < 0.2] = 255
    batch = {"image": rng.integers(0, 256, (b, *hw, 3)).astype(np.uint8), "label": label,
             "is_target": np.arange(b) % 2 == 1}
    if soft:
        batch["soft_label"] = rng.dirichlet(np.ones(K), size=(b, *hw)).astype(np.float32)
    return batch


def host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


# ---------------------------------------------------------------------------- optimiser
def sgd_reference(params, labels, grads_seq, scales, *, lr, momentum, wd, head_mult, bias_mult, bias_wd,
                  schedule, total):
    """torch.optim.SGD semantics in numpy: d = g + wd·w; buf = m·buf + d (buf₀ = d); w −= lr·buf."""
    flat_p, tdef = jax.tree.flatten(params)
    flat_l = jax.tree.leaves(labels)
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    w = [np.array(p, np.float64) for p in flat_p]
    buf = [None] * len(w)
    for t, (g_tree, s) in enumerate(zip(grads_seq, scales)):
        base = lr * ((1 - t / total) ** 0.9 if schedule == "poly" else 1.0) * s
        for i, g in enumerate(jax.tree.leaves(g_tree)):
            if flat_l[i] == "frozen":
                continue
            bias = names[i].endswith("'bias']")
            mult = (head_mult if flat_l[i] == "head" else 1.0) * (bias_mult if bias else 1.0)
            d = np.asarray(g, np.float64) + (bias_wd if bias else wd) * w[i]
            buf[i] = d if buf[i] is None else momentum * buf[i] + d
            w[i] = w[i] - base * mult * buf[i]
    return jax.tree.unflatten(tdef, w)


OPT_CASES = [dict(bias_mult=1.0, bias_wd=None, schedule="constant"),
             dict(bias_mult=2.0, bias_wd=0.0, schedule="poly")]  # CBST 'alex'; DeepLab poly


def _opt_problem():
    rng = np.random.default_rng(1)
    params = {"stem": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)},
              "bn": {"scale": rng.normal(size=4), "bias": rng.normal(size=4)},
              "head": {"kernel": rng.normal(size=(4, 2)), "bias": rng.normal(size=2)}}
    params = jax.tree.map(lambda x: x.astype(np.float32), params)
    labels = tiny_labels(params)
    grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params) for _ in range(5)]
    scales = [1.0, 1.0, 0.5, 0.5, 1 / math.sqrt(2)]
    return params, labels, grads, scales


def _run_optax(params, labels, grads, scales, case, lr=0.01, total=10):
    """The optimiser at unit rate, its updates scaled by the step's rate (as the train step)."""
    tx = train_step.make_optimizer(labels, momentum=0.9, weight_decay=5e-4, head_lr_mult=10.0,
                              bias_lr_mult=case["bias_mult"], bias_weight_decay=case["bias_wd"])
    state = tx.init(params)
    p = params
    for t, (g, s) in enumerate(zip(grads, scales)):
        u, state = tx.update(g, state, p)
        rate = train_step.learning_rate(lr, case["schedule"], t, total) * np.float32(s)
        p = jax.tree.map(lambda w, d: w + rate * d, p, u)
    return p


@pytest.mark.parametrize("case", OPT_CASES)
def test_param_groups_match_numpy_sgd(case):
    params, labels, grads, scales = _opt_problem()
    got = _run_optax(params, labels, grads, scales, case)
    bias_wd = 5e-4 if case["bias_wd"] is None else case["bias_wd"]
    ref = sgd_reference(params, labels, grads, scales, lr=0.01, momentum=0.9, wd=5e-4, head_mult=10.0,
                        bias_mult=case["bias_mult"], bias_wd=bias_wd, schedule=case["schedule"], total=10)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, ref)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got["bn"], params["bn"])  # frozen


@pytest.mark.parametrize("case", OPT_CASES)
def test_param_groups_match_torch_sgd(case):
    torch = pytest.importorskip("torch")
    params, labels, grads, scales = _opt_problem()
    got = _run_optax(params, labels, grads, scales, case)
    lr, bias_wd = 0.01, 5e-4 if case["bias_wd"] is None else case["bias_wd"]
    tp = {f"{m}.{n}": torch.nn.Parameter(torch.tensor(np.array(params[m][n]), dtype=torch.float64))
          for m in ("stem", "head") for n in ("kernel", "bias")}
    groups = [dict(params=[tp["stem.kernel"]], lr=lr, mult=1.0, weight_decay=5e-4),
              dict(params=[tp["stem.bias"]], lr=lr, mult=case["bias_mult"], weight_decay=bias_wd),
              dict(params=[tp["head.kernel"]], lr=lr, mult=10.0, weight_decay=5e-4),
              dict(params=[tp["head.bias"]], lr=lr, mult=10.0 * case["bias_mult"], weight_decay=bias_wd)]
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    for t, (g, s) in enumerate(zip(grads, scales)):
        poly = (1 - t / 10) ** 0.9 if case["schedule"] == "poly" else 1.0
        for group in opt.param_groups:
            group["lr"] = lr * poly * s * group["mult"]
        for name, p in tp.items():
            m, n = name.split(".")
            p.grad = torch.tensor(np.array(g[m][n]), dtype=torch.float64)
        opt.step()
    for name, p in tp.items():
        m, n = name.split(".")
        np.testing.assert_allclose(got[m][n], p.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_schedules():
    assert train_step.learning_rate(0.1, "constant", 57, 100) == np.float32(0.1)
    for t in (0, 1, 50, 99):
        assert train_step.learning_rate(0.1, "poly", t, 100) == pytest.approx(0.1 * (1 - t / 100) ** 0.9, rel=1e-6)
        assert train_step.learning_rate(0.1, "poly", t, 100).dtype == np.float32
    assert train_step.learning_rate(0.1, "poly", 100, 100) == 0.0 and train_step.learning_rate(0.1, "poly", 150, 100) == 0.0
    with pytest.raises(ValueError):
        train_step.learning_rate(0.1, "poly", 0, 0)
    with pytest.raises(ValueError):
        train_step.make_optimizer({"w": "neck"})


def test_poly_with_linear_warmup_is_mmcvs_and_optaxs():
    """SegFormer / DAFormer's ``poly10warm``: mmcv's PolyLrUpdaterHook with linear warm-up (the
    warm-up scales the poly rate: k = (1 − t/W)(1 − r), lr = poly(t)·(1 − k)), and the same as a
    product of optax's schedules."""
    import optax

    base, total, warm, ratio = 6e-5, 40_000, 1500, 1e-6
    poly = optax.polynomial_schedule(base, 0.0, 1.0, total)
    ramp = optax.linear_schedule(ratio, 1.0, warm)
    for t in (0, 1, 10, 749, 1499, 1500, 1501, 20_000, 39_999, 40_000):
        regular = base * (1 - t / total) ** 1.0
        mmcv = regular * (1 - (1 - t / warm) * (1 - ratio)) if t < warm else regular
        got = train_step.learning_rate(base, "poly", t, total, power=1.0, warmup_steps=warm, warmup_ratio=ratio)
        assert got.dtype == np.float32 and got == np.float32(mmcv), t
        # optax evaluates in float32: (r − 1)·(1 − t/W) + 1 cancels, 1.013e-6 instead of 1e-6 at t = 0
        assert got == pytest.approx(float(poly(t)) * float(ramp(t)), rel=1e-5, abs=1e-7 * base), t
    assert train_step.learning_rate(base, "poly", 0, total, 1.0, warm, ratio) == np.float32(base * ratio)
    # no warm-up: the rates of before
    for t in (0, 7, 99):
        assert train_step.learning_rate(0.1, "poly", t, 100, 0.9, 0, ratio) == train_step.learning_rate(0.1, "poly", t, 100)
    assert train_step.learning_rate(0.1, "constant", 2, 100, warmup_steps=4, warmup_ratio=0.5) == np.float32(0.075)


def test_adamw_groups_match_torch_adamw():
    """SegFormer / DAFormer's AdamW groups (mmcv paramwise_cfg): head LR x10, the encoder's norms
    without weight decay; the rate of each step from the poly schedule with warm-up."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    params = {"dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)},
              "norm": {"scale": rng.normal(size=4), "bias": rng.normal(size=4)},
              "head": {"kernel": rng.normal(size=(4, 2)), "bias": rng.normal(size=2)}}
    params = jax.tree.map(lambda x: x.astype(np.float32), params)
    labels = {"dense": {"kernel": "backbone", "bias": "backbone"},
              "norm": {"scale": "backbone_no_decay", "bias": "backbone_no_decay"},
              "head": {"kernel": "head", "bias": "head"}}
    grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params) for _ in range(6)]
    base, total, wd = 6e-3, 8, 0.01
    rates = [train_step.learning_rate(base, "poly", t, total, power=1.0, warmup_steps=3) for t in range(6)]

    tx = train_step.make_optimizer(labels, weight_decay=wd, head_lr_mult=10.0, optimizer="adam")
    state, p = tx.init(params), params
    for g, rate in zip(grads, rates):
        u, state = tx.update(g, state, p)
        p = jax.tree.map(lambda w, d: w + rate * d, p, u)

    tp = {f"{m}.{n}": torch.nn.Parameter(torch.tensor(np.array(params[m][n]), dtype=torch.float64))
          for m in params for n in params[m]}
    groups = [dict(params=[tp["dense.kernel"], tp["dense.bias"]], mult=1.0, weight_decay=wd),
              dict(params=[tp["norm.scale"], tp["norm.bias"]], mult=1.0, weight_decay=0.0),
              dict(params=[tp["head.kernel"], tp["head.bias"]], mult=10.0, weight_decay=wd)]
    opt = torch.optim.AdamW(groups, lr=base, betas=(0.9, 0.999), eps=1e-8)
    for g, rate in zip(grads, rates):
        for group in opt.param_groups:
            group["lr"] = float(rate) * group["mult"]
        for name, q in tp.items():
            m, n = name.split(".")
            q.grad = torch.tensor(np.array(g[m][n]), dtype=torch.float64)
        opt.step()
    for name, q in tp.items():
        m, n = name.split(".")
        np.testing.assert_allclose(p[m][n], q.detach().numpy(), rtol=1e-5, atol=1e-7)
    assert not np.allclose(p["norm"]["scale"], params["norm"]["scale"])


# ---------------------------------------------------------------------------- the step
LR = 0.05


def _setup(model, mesh, seed=0):
    variables = init_variables(model, seed=seed)
    labels = tiny_labels(variables["params"], train_bn=model.train_bn)
    tx = train_step.make_optimizer(labels, momentum=0.9, weight_decay=5e-4, head_lr_mult=10.0)
    return variables, train_step.create_train_state(variables, tx, jax.random.key(seed), mesh), tx, labels


def _step(model, tx, labels, cfg, mesh):
    return train_step.make_train_step(model, tx, cfg, mesh, labels)


@pytest.mark.parametrize("resolution,soft,reg", [("upsample", False, "mrkld"), ("stride", False, "none"),
                                                 ("upsample", True, "mrent")])
def test_step_matches_direct_loss_and_sgd(resolution, soft, reg):
    model = TinySeg()
    mesh = make_mesh(jax.devices()[:2])
    variables, state, tx, labels = _setup(model, mesh)
    batch = make_batch(4, soft=soft)
    cfg = train_step.TrainConfig(loss_resolution=resolution, stride=2, regularizer=reg, reg_weight=0.3)

    def direct(params):
        logits = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, batch["image"], train=True)
        return losses.segmentation_loss(logits, batch["label"], batch["is_target"], batch.get("soft_label"),
                                        resolution=resolution, stride=2, regularizer=reg, reg_weight=0.3)[0]

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(direct))(variables["params"])
    step = _step(model, tx, labels, cfg, mesh)
    new, m = step(state, to_global(batch, mesh), LR * 0.5)
    assert bool(m["finite"]) and int(new.step) == 1
    np.testing.assert_allclose(float(m["loss"]), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(float(m["ce"]) + 0.3 * float(m["reg"]), float(ref_loss), rtol=1e-5)
    # First SGD step: w − lr·scale·mult·(g + wd·w); frozen BN affine and statistics untouched.
    for name, mult in (("stem", 1.0), ("head", 10.0)):
        for leaf in ("kernel", "bias"):
            w = variables["params"][name][leaf]
            expect = w - 0.05 * 0.5 * mult * (np.asarray(ref_grads[name][leaf]) + 5e-4 * w)
            np.testing.assert_allclose(np.asarray(new.params[name][leaf]), expect, rtol=1e-4, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, host(new.params["bn"]), variables["params"]["bn"])
    jax.tree.map(np.testing.assert_array_equal, host(new.batch_stats), variables["batch_stats"])
    trainable = [ref_grads["stem"], ref_grads["head"]]
    np.testing.assert_allclose(float(m["grad_norm"]), float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(trainable)))),
                               rtol=1e-4)


def test_one_device_equals_eight_devices():
    """Same steps (trained BN, dropout, MRKLD) on a 1-device and an 8-device mesh."""
    model = TinySeg(train_bn=True, dropout=0.3)
    cfg = train_step.TrainConfig(loss_resolution="upsample", regularizer="mrkld", reg_weight=0.1, train_bn=True)
    results = []
    for n in (1, 8):
        mesh = make_mesh(jax.devices()[:n])
        _, state, tx, labels = _setup(model, mesh)
        step = _step(model, tx, labels, cfg, mesh)
        seen = []
        for k in range(3):
            state, m = step(state, to_global(make_batch(8, seed=k), mesh), np.float32(LR))
            seen.append(float(m["loss"]))
        assert len(state.params["head"]["kernel"].sharding.device_set) == n
        results.append((seen, host(state.params), host(state.batch_stats)))
    (l1, p1, b1), (l8, p8, b8) = results
    np.testing.assert_allclose(l1, l8, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p8)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), b1, b8)
    assert not np.allclose(b1["bn"]["mean"], init_variables(model)["batch_stats"]["bn"]["mean"])


def test_non_finite_step_returns_the_old_state():
    model = TinySeg(dropout=0.2)
    mesh = make_mesh()
    _, state, tx, labels = _setup(model, mesh)
    step = _step(model, tx, labels, train_step.TrainConfig(), mesh)
    batch = to_global(make_batch(8), mesh)
    state, m = step(state, batch, LR)
    before = host(state)
    state, m = step(state, batch, np.float32(np.inf))  # the update overflows
    assert not bool(m["finite"]) and np.isfinite(float(m["loss"]))
    jax.tree.map(np.testing.assert_array_equal, host(state), before)
    # A NaN loss (poisoned weights) is caught the same way.
    bad = state.replace(params=jax.device_put(jax.tree.map(lambda x: np.full_like(x, np.nan), before.params),
                                              state.params["head"]["kernel"].sharding))
    bad_host = host(bad)
    bad, m = step(bad, batch, LR)
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), host(bad), bad_host)
    assert int(bad.step) == 1
    state = train_step.create_train_state({"params": before.params, "batch_stats": before.batch_stats},
                                     tx, before.rng, mesh)
    state, m = step(state, batch, LR)
    assert bool(m["finite"]) and int(state.step) == 1


def test_no_recompilation_across_rounds_and_lr_scales():
    model = TinySeg(dropout=0.1)
    mesh = make_mesh()
    variables, state, tx, labels = _setup(model, mesh)
    step = _step(model, tx, labels, train_step.TrainConfig(regularizer="mrl2", reg_weight=0.1), mesh)
    batch = to_global(make_batch(8), mesh)
    for r in range(3):
        if r:  # a new round: fresh optimiser state from the same optimiser, smaller LR
            state = train_step.create_train_state({"params": host(state.params), "batch_stats": variables["batch_stats"]},
                                             tx, jax.random.key(r), mesh)
        for lr in (LR * 0.5 ** (r / 2), LR * 0.5, train_step.learning_rate(LR, "poly", r, 3)):
            state, m = step(state, batch, lr)
            assert bool(m["finite"])
    assert step.jitted._cache_size() == 1


def test_bfloat16_model_float32_loss():
    model = TinySeg(dtype=jnp.bfloat16)
    mesh = make_mesh()
    _, state, tx, labels = _setup(model, mesh)
    step = _step(model, tx, labels, train_step.TrainConfig(loss_resolution="stride", stride=2), mesh)
    state, m = step(state, to_global(make_batch(8), mesh), LR)
    assert m["loss"].dtype == jnp.float32 and bool(m["finite"])
    assert state.params["head"]["kernel"].dtype == jnp.float32


def test_uint8_soft_labels_are_renormalised():
    """The round loop ships LR* soft labels as uint8 rows (cbst_jax.soft_labels); the step must
    see them as the distributions they quantise: the same loss as the float rows ŷ_q / Σ ŷ_q."""
    from cbst_jax import soft_labels

    model = TinySeg()
    mesh = make_mesh(jax.devices()[:2])
    variables, state, tx, labels = _setup(model, mesh)
    batch = make_batch(4, soft=True)
    q = soft_labels.quantize(batch["soft_label"])
    q[:, :3] = 0  # ignored rows stay ignored
    as_float = dict(batch, soft_label=q.astype(np.float32) / np.maximum(q.sum(-1, keepdims=True), 1))
    step = _step(model, tx, labels, train_step.TrainConfig(), mesh)
    _, m_u8 = step(state, to_global(dict(batch, soft_label=q), mesh), LR)
    _, state2, _, _ = _setup(model, mesh)
    _, m_f = step(state2, to_global(as_float, mesh), LR)
    np.testing.assert_allclose(float(m_u8["loss"]), float(m_f["loss"]), rtol=1e-6)
    assert int(m_u8["n_valid"]) == int(m_f["n_valid"])


def test_folded_bn_bfloat16_step_trains_convs_and_leaves_frozen_bn():
    """The project's step on a DeepLab-v2 whose frozen BNs fold into their convolutions (the
    models' default) in bfloat16: a float32 loss, float32 parameters, the conv kernels updated and
    the BN scale/bias (frozen group) and running statistics exactly as they were."""
    from cbst_jax import models

    mesh = make_mesh()
    model = models.get_model("deeplabv2_resnet_small", K, dtype="bfloat16")
    assert model.fold_bn and not model.train_bn
    batch = make_batch(8, hw=(32, 48))
    variables = model.init(jax.random.key(0), batch["image"][:1])
    groups = models.param_groups(model, variables["params"])
    tx = train_step.make_optimizer(groups)
    state = train_step.create_train_state(variables, tx, jax.random.key(1), mesh)
    step = train_step.make_train_step(model, tx, train_step.TrainConfig(stride=8), mesh, groups)
    old, old_stats = host(state.params), host(state.batch_stats)  # the step donates the state
    new, m = step(state, to_global(batch, mesh), LR)
    assert m["loss"].dtype == jnp.float32 and bool(m["finite"])
    new_params = host(new.params)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(new_params))
    assert not np.array_equal(old["layer1_0"]["conv2"]["kernel"], new_params["layer1_0"]["conv2"]["kernel"])
    for bn in ("bn1", ("layer3_0", "bn2")):
        o, n = (old[bn], new_params[bn]) if isinstance(bn, str) else (old[bn[0]][bn[1]], new_params[bn[0]][bn[1]])
        np.testing.assert_array_equal(o["scale"], n["scale"])
        np.testing.assert_array_equal(o["bias"], n["bias"])
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, old_stats, host(new.batch_stats))))
