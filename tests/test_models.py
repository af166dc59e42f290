"""Model zoo without torch: registry, sizes (via eval_shape), options, parameter groups,
weight files. Numeric parity with PyTorch lives in test_convert.py."""
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbst_jax import models
from cbst_jax.models.layers import CAFFE_MEAN_BGR, normalize_images

KEY = jax.random.key(0, impl="rbg")  # compiles ~3x faster than threefry on CPU
PARAM_COUNTS_19 = {  # equal to the torch references' counts (test_convert.py)
    "deeplabv2_resnet101": 43_901_068,
    "resnet38": 124_033_363,
    "fcn8s_vgg16": 134_456_985,
    "deeplabv2_resnet_small": 303_572,
    "resnet38_small": 1_241_019,
    "fcn8s_vgg16_small": 398_745,
    # 3x3 convs: stem 3->16, 16->32 (s2), 32->32, 32->64 (s2), 5 x 64->64, fuse 96->32; 1x1: 32->19, 16->19
    "demo_segnet": (27 * 16 + 16) + (144 * 32 + 32) + (288 * 32 + 32) + (288 * 64 + 64) + 5 * (576 * 64 + 64)
                   + (864 * 32 + 32) + (32 * 19 + 19) + (16 * 19 + 19),
    # equal to transformers' SegformerForSemanticSegmentation, and to its encoder + the DAFormer
    # head re-statement (tests/test_mit.py)
    "segformer_mit_b0": 3_719_027, "segformer_mit_b1": 13_682_131, "segformer_mit_b2": 27_361_235,
    "segformer_mit_b3": 47_237_075, "segformer_mit_b4": 64_007_635, "segformer_mit_b5": 84_607_955,
    "daformer_mit_b0": 6_900_595, "daformer_mit_b1": 16_863_699, "daformer_mit_b2": 27_908_563,
    "daformer_mit_b3": 47_784_403, "daformer_mit_b4": 64_554_963, "daformer_mit_b5": 85_155_283,
}


def abstract_variables(module, shape=(1, 64, 64, 3)):
    return jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.uint8))


def output_shape(module, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.uint8)
    return jax.eval_shape(lambda v, x: module.apply(v, x), abstract_variables(module, shape), x).shape


def size(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


def images(n, h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3)).astype(np.uint8)


def test_registry_names_and_unknown():
    assert set(PARAM_COUNTS_19) == set(models.MODELS)
    with pytest.raises(KeyError, match="unknown model"):
        models.get_model("unet", 19)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS_19))
def test_param_counts(name):
    variables = abstract_variables(models.get_model(name, 19))
    assert size(variables["params"]) == PARAM_COUNTS_19[name]
    assert set(variables) <= {"params", "batch_stats"}


def test_output_strides():
    # ceil-mode stem pool: 512 -> 256 -> 129 -> 65 (H/8 + 1 for H divisible by 8)
    assert output_shape(models.get_model("deeplabv2_resnet101", 19), (2, 512, 1024, 3)) == (2, 65, 129, 19)
    assert output_shape(models.get_model("deeplabv2_resnet_small", 4), (1, 64, 128, 3)) == (1, 9, 17, 4)
    assert output_shape(models.get_model("resnet38", 19), (1, 504, 504, 3)) == (1, 63, 63, 19)
    assert output_shape(models.get_model("resnet38_small", 4), (1, 61, 100, 3)) == (1, 8, 13, 4)
    # FCN-8s: full input resolution
    assert output_shape(models.get_model("fcn8s_vgg16", 19), (1, 500, 375, 3)) == (1, 500, 375, 19)
    assert output_shape(models.get_model("fcn8s_vgg16_small", 4), (1, 64, 128, 3)) == (1, 64, 128, 4)
    assert output_shape(models.get_model("fcn8s_vgg16_small", 4), (1, 50, 75, 3)) == (1, 50, 75, 4)
    assert [models.get_model(n, 2).output_stride for n in ("deeplabv2_resnet101", "resnet38", "fcn8s_vgg16")] == [8, 8, 1]


def test_param_groups():
    module = models.get_model("deeplabv2_resnet_small", 3)
    params = abstract_variables(module)["params"]
    groups = models.param_groups("deeplabv2_resnet_small", params)
    assert jax.tree_util.tree_structure(groups) == jax.tree_util.tree_structure(params)
    assert groups["layer5"]["conv2d_list_3"] == {"kernel": "head", "bias": "head"}
    assert groups["bn1"] == {"scale": "frozen", "bias": "frozen"}
    assert groups["layer2_0"]["conv1"]["kernel"] == "backbone"
    assert groups["layer2_0"]["downsample_1"]["scale"] == "frozen"
    trained = models.param_groups(module, params, train_bn=True)
    assert trained["bn1"]["scale"] == "backbone"
    r38 = models.param_groups("resnet38_small", abstract_variables(models.get_model("resnet38_small", 3))["params"])
    assert r38["conv6a"]["kernel"] == r38["linear"]["bias"] == "head"
    assert r38["bn7"]["bias"] == "frozen" and r38["res5a_branch2b1"]["kernel"] == "backbone"
    fcn = models.param_groups("fcn8s_vgg16_small", abstract_variables(models.get_model("fcn8s_vgg16_small", 3))["params"])
    assert {fcn[n]["kernel"] for n in ("score_fr", "score_pool3", "upscore8")} == {"head"}
    assert set(jax.tree_util.tree_leaves(fcn)) == {"head", "backbone"}


def test_frozen_and_trained_batchnorm():
    x = images(2, 32, 48)
    frozen = models.get_model("deeplabv2_resnet_small", 3)
    variables = frozen.init(KEY, x)
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a + 0.3, variables["batch_stats"])
    eval_out = frozen.apply(variables, x)
    train_out, updates = frozen.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(eval_out, train_out)  # running statistics in training too
    chex_equal = jax.tree_util.tree_map(np.array_equal, updates["batch_stats"], variables["batch_stats"])
    assert all(jax.tree_util.tree_leaves(chex_equal))

    trained = models.get_model("deeplabv2_resnet_small", 3, train_bn=True)
    out, updates = trained.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(out, eval_out)
    mean = updates["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(mean, variables["batch_stats"]["bn1"]["mean"])
    np.testing.assert_array_equal(trained.apply(variables, x), eval_out)  # eval: running statistics


def test_bfloat16_activations_keep_float32_params_and_logits():
    x = images(1, 32, 32)
    f32 = models.get_model("resnet38_small", 3)
    bf16 = models.get_model("resnet38_small", 3, dtype="bfloat16")
    variables = f32.init(KEY, x)
    out32, out16 = f32.apply(variables, x), bf16.apply(variables, x)
    assert out16.dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(bf16.init(KEY, x)))
    assert np.linalg.norm(out16 - out32) / np.linalg.norm(out32) < 0.05


def test_normalizations_and_uint8_or_float_input():
    x = images(1, 4, 5)
    caffe = normalize_images(x, "caffe")
    np.testing.assert_allclose(caffe[..., 0], x[..., 2] - CAFFE_MEAN_BGR[0], rtol=1e-6)
    imagenet = normalize_images(x, "imagenet")
    np.testing.assert_allclose(imagenet[..., 1], (x[..., 1] / 255 - 0.456) / 0.224, rtol=1e-5)
    with pytest.raises(ValueError):
        normalize_images(x, "bgr")
    module = models.get_model("fcn8s_vgg16_small", 3)
    x = images(1, 32, 32)
    variables = module.init(KEY, x)
    np.testing.assert_array_equal(module.apply(variables, x), module.apply(variables, x.astype(np.float32)))


def test_small_fcn_train_step_with_dropout():
    module = models.get_model("fcn8s_vgg16_small", 3)
    x, y = images(2, 32, 64), np.random.RandomState(1).randint(0, 3, (2, 32, 64))
    params = module.init(KEY, x)["params"]

    def loss(p):
        logits = module.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)})
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1).mean()

    grads = jax.grad(loss)(params)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    assert np.abs(grads["conv1_1"]["kernel"]).sum() > 0


def test_save_and_load_variables_with_metadata(tmp_path):
    module = models.get_model("deeplabv2_resnet_small", 2)
    variables = jax.device_get(module.init(KEY, images(1, 32, 32)))
    meta = models.make_metadata("deeplabv2_resnet_small", 2, "caffe", kind="test")
    models.save_variables(tmp_path / "v.npz", variables, meta)
    assert sorted(os.listdir(tmp_path)) == ["v.npz"]  # written via a temporary name, renamed
    loaded = models.load_variables(tmp_path / "v.npz")
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(variables)
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, loaded, variables)))
    got = models.read_metadata(tmp_path / "v.npz")
    assert got == meta and got["class_names"] is None and got["num_classes"] == 2


def test_metadata_tables_for_known_protocols():
    from cbst_jax import labels

    m19 = models.make_metadata("resnet38", 19, "imagenet")
    assert m19["class_names"][13] == "car" and m19["palette"][0] == [128, 64, 128]
    m13 = models.make_metadata("resnet38", 13, "imagenet")
    assert m13["class_names"] == list(labels.NTHU13_CLASSES) and m13["palette"][3] == [250, 170, 30]
    assert models.make_metadata("resnet38", 16, "imagenet")["class_names"][9] == "sky"
    backbone = models.make_metadata("deeplabv2_resnet101", None, "imagenet")
    assert backbone["num_classes"] is None and backbone["class_names"] is None and backbone["palette"] is None


@pytest.mark.parametrize("change, message", [
    ({"architecture": "unet"}, "architecture 'unet', expected one of"),
    ({"normalization": "bgr"}, "normalization 'bgr', expected one of imagenet, caffe, unit"),
    ({"num_classes": 0}, "num_classes 0, expected a positive integer or null"),
    ({"num_classes": "19"}, "num_classes '19'"),
    ({"format": "other"}, "format 'other'"),
    ({"class_names": ["road"]}, "class_names must be a list of num_classes=19 strings"),
    ({"palette": [[0, 0, 300]] * 19}, "palette must be num_classes=19"),
])
def test_bad_metadata_is_refused_naming_the_file(tmp_path, change, message):
    variables = {"params": {"a": {"kernel": np.zeros(2, np.float32)}}}
    good = models.make_metadata("demo_segnet", 19, "unit")
    with pytest.raises(models.WeightFileError, match=f"bad.npz: bad weights metadata: {message}"):
        models.save_variables(tmp_path / "bad.npz", variables, dict(good, **change))
    assert not (tmp_path / "bad.npz").exists()
    # a file written by something else with the same bad metadata is refused on reading
    import json
    np.savez(tmp_path / "bad.npz", **{"params/a/kernel": np.zeros(2), "__metadata__": np.array(json.dumps(
        dict(good, **change)))})
    for read in (models.read_metadata, models.load_variables):
        with pytest.raises(models.WeightFileError, match=f"bad.npz: bad weights metadata: {message}") as err:
            read(tmp_path / "bad.npz")
        assert "\n" not in str(err.value)


def test_files_that_are_not_weights_files_give_one_line_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("learning rate 1e-4\n")
    np.savez(tmp_path / "plain.npz", **{"params/a/kernel": np.zeros(2)})  # no metadata (e.g. an old file)
    import pickle
    (tmp_path / "model.pth").write_bytes(pickle.dumps({"conv1.weight": [1.0, 2.0]}, protocol=2))
    good = tmp_path / "good.npz"
    models.save_variables(good, {"params": {"a": {"kernel": np.ones((64, 64), np.float32)}}},
                          models.make_metadata("demo_segnet", 19, "unit"))
    (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "empty.npz").write_bytes(b"")
    cases = {
        "missing.npz": "weights file not found",
        "notes.txt": r"not a converted-weights .npz \(a text file\); convert it with: "
                     r"python -m cbst_jax.cli.convert_weights",
        "plain.npz": r"not a converted-weights .npz \(a zip archive without cbst_jax weights metadata\)",
        "model.pth": r"not a converted-weights .npz \(a Python pickle, e.g. a PyTorch .pth\)",
        "truncated.npz": r"not a converted-weights .npz \(a damaged or truncated zip archive\)",
        "empty.npz": r"not a converted-weights .npz \(an empty file\)",
    }
    for name, message in cases.items():
        for read in (models.read_metadata, models.load_variables):
            with pytest.raises(models.WeightFileError, match=f"{name}: {message}") as err:
                read(tmp_path / name)
            assert "\n" not in str(err.value)
            assert isinstance(err.value, models.WeightMismatchError)  # caught by the runners' handler


def test_resolve_normalization():
    meta = models.make_metadata("deeplabv2_resnet101", None, "imagenet")
    resolve = models.resolve_normalization
    assert resolve("auto", meta, "deeplabv2_resnet101") == "imagenet"
    assert resolve("imagenet", meta, "deeplabv2_resnet101") == "imagenet"
    # no weights file: the architecture's own default, or the explicit choice
    assert resolve("auto", None, "deeplabv2_resnet101") == "caffe"
    assert resolve("auto", None, "resnet38") == "imagenet"
    assert resolve("auto", None, "demo_segnet") == "unit"
    assert resolve("unit", None, "deeplabv2_resnet101") == "unit"
    with pytest.raises(models.WeightFileError, match=r"w.npz: the weights expect normalization 'imagenet', but "
                                                     r"model.normalization='caffe'; use 'auto' or 'imagenet'"):
        resolve("caffe", meta, "deeplabv2_resnet101", path="w.npz")
    with pytest.raises(models.WeightFileError, match=r"w.npz: weights of 'deeplabv2_resnet101', but "
                                                     r"model.name='resnet38' \(another architecture\)"):
        resolve("auto", meta, "resnet38", path="w.npz")
    with pytest.raises(models.WeightFileError, match="model.normalization='bgr', expected 'auto' or one of"):
        resolve("bgr", meta, "deeplabv2_resnet101")
    with pytest.raises(models.WeightFileError, match="model.name='unet'"):
        resolve("auto", None, "unet")


def test_importing_models_pulls_no_torch_or_tensorflow():
    code = ("import sys, cbst_jax, cbst_jax.models, cbst_jax.models.conversion, cbst_jax.cli.convert_weights; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'mxnet') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- atrous="space_to_batch"
def small_deeplab(**options):
    # two blocks in the dilated stages, so padding garbage left by one block would reach the next
    return models.DeepLabV2(5, layers=(1, 1, 2, 2), width=8, normalization="unit", **options)


def small_resnet38(**options):
    return models.ResNet38(5, widths=(8, 16, 32, 64, (64, 128), (64, 128, 256), (128, 256, 512)),
                           blocks=(1, 1, 1, 2), head_width=32, normalization="unit", **options)


def randomized(variables, seed):
    """Random BN statistics and affine maps (else BN is near identity and hides mistakes)."""
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32) if a.ndim == 1 else a, variables)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_phase_grid_against_numpy_slicing():
    from cbst_jax.models.layers import PhaseGrid

    x = np.random.RandomState(0).randn(2, 7, 10, 3).astype(np.float32)
    grid = PhaseGrid.of(x, 3)
    assert grid.padded == (9, 12)
    phases = np.asarray(grid.to_phases(x))
    assert phases.shape == (18, 3, 4, 3)
    for p in range(3):
        for q in range(3):
            for i in range(2):
                want = np.zeros((3, 4, 3), np.float32)
                part = x[i, p::3, q::3]
                want[:part.shape[0], :part.shape[1]] = part
                np.testing.assert_array_equal(phases[(p * 3 + q) * 2 + i], want)
    np.testing.assert_array_equal(grid.from_phases(phases), x)
    valid = np.asarray(grid.valid)[..., 0]
    assert valid.sum() == 2 * 7 * 10 and set(np.unique(valid)) == {0.0, 1.0}
    assert PhaseGrid.of(np.zeros((1, 8, 12, 1)), 4).valid is None  # no padding, no mask


def test_atrous_conv_equals_brute_force_dilated_conv():
    from cbst_jax.models.layers import atrous_conv, conv

    rng = np.random.RandomState(1)
    x = rng.randn(2, 11, 14, 3).astype(np.float32)
    layer = conv(4, 3, "c", use_bias=True)
    variables = layer.init(KEY, x)
    kernel, bias = np.asarray(variables["params"]["kernel"]), np.asarray(variables["params"]["bias"])
    for rate in (2, 3, 5, 12):
        got = atrous_conv(lambda v: layer.apply(variables, v), x, rate)
        xp = np.pad(x, ((0, 0), (rate, rate), (rate, rate), (0, 0)))
        want = np.zeros((2, 11, 14, 4)) + bias
        for a in range(3):
            for b in range(3):
                want += xp[:, a * rate:a * rate + 11, b * rate:b * rate + 14] @ kernel[a, b]
        assert rel_err(got, want) < 1e-6, rate


@pytest.mark.parametrize("family, hw", [("deeplabv2", (60, 100)), ("resnet38", (70, 106))])
def test_space_to_batch_equals_dilated(family, hw):
    """Same variables, same inputs: logits, parameter gradients (frozen BN, dropout on for
    ResNet-38) and batch statistics (train_bn) agree to float32 rounding. The sizes leave stride-8
    maps (8x13, 9x14) that are not multiples of the rates, so the padding is exercised."""
    make = small_deeplab if family == "deeplabv2" else small_resnet38
    x = images(2, *hw, seed=2)
    dilated, phases = make(), make(atrous="space_to_batch")
    variables = randomized(dilated.init(KEY, x), 3)
    out = dilated.apply(variables, x)
    assert out.shape[1:3] in ((8, 13), (9, 14))
    assert rel_err(phases.apply(variables, x), out) < 1e-5

    weights = jnp.asarray(np.random.RandomState(4).randn(*out.shape), jnp.float32)
    rngs = {"dropout": jax.random.key(5)}

    def grads(module):
        def loss(params):
            logits = module.apply({**variables, "params": params}, x, train=True, rngs=rngs)
            return jnp.sum(logits * weights)
        return jax.grad(loss)(variables["params"])

    g_dilated, g_phases = grads(dilated), grads(phases)
    worst = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(rel_err, g_phases, g_dilated)))
    assert worst < 1e-4

    outs = [make(atrous=a, train_bn=True).apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
            for a in ("dilated", "space_to_batch")]
    assert rel_err(outs[1][0], outs[0][0]) < 1e-5
    stats = jax.tree_util.tree_map(rel_err, outs[1][1], outs[0][1])
    assert max(jax.tree_util.tree_leaves(stats)) < 1e-5


@pytest.mark.parametrize("name", ["deeplabv2_resnet101", "resnet38"])
def test_space_to_batch_programs_hold_no_dilated_convolution(name):
    x = jax.ShapeDtypeStruct((1, 128, 256, 3), jnp.uint8)
    texts = {}
    for atrous in ("dilated", "space_to_batch"):
        module = models.get_model(name, 19, atrous=atrous, dtype="bfloat16")
        variables = abstract_variables(module, (1, 128, 256, 3))
        texts[atrous] = jax.jit(module.apply).lower(variables, x).as_text()
    dilations = {a: {tuple(map(int, d)) for d in re.findall(r"rhs_dilate = \[(\d+), (\d+)\]", t)}
                 for a, t in texts.items()}
    assert dilations["dilated"] >= {(1, 1), (2, 2), (4, 4), (12, 12) if name == "resnet38" else (24, 24)}
    assert dilations["space_to_batch"] == {(1, 1)}
    convs = {a: re.findall(r"stablehlo.convolution.*: \((tensor<\S+>), (tensor<\S+>)\) -> (tensor<\S+>)", t)
             for a, t in texts.items()}
    assert len(convs["space_to_batch"]) == len(convs["dilated"]) == (108 if name == "deeplabv2_resnet101" else 45)
    # bfloat16 compute: every convolution reads and writes bfloat16 (params are cast once)
    assert all(t.endswith("xbf16>") for c in convs["space_to_batch"] + convs["dilated"] for t in c)


def test_unknown_atrous_mode_is_refused():
    with pytest.raises(ValueError, match="atrous must be one of"):
        models.get_model("deeplabv2_resnet_small", 3, atrous="winograd").init(KEY, images(1, 32, 32))
    # families without the option: "dilated" is what they do, space_to_batch is refused
    assert isinstance(models.get_model("fcn8s_vgg16_small", 3, atrous="dilated"), models.FCN8s)
    with pytest.raises(ValueError, match="not available for 'demo_segnet'"):
        models.get_model("demo_segnet", 3, atrous="space_to_batch")


# ---------------------------------------------------------------- accelerator defaults
@pytest.mark.parametrize("platform, deeplab, demo", [
    ("cpu", ("float32", "dilated"), ("float32", "dilated")),
    ("gpu", ("bfloat16", "space_to_batch"), ("bfloat16", "dilated")),
    ("cuda", ("bfloat16", "space_to_batch"), ("bfloat16", "dilated")),
    ("tpu", ("bfloat16", "space_to_batch"), ("bfloat16", "dilated")),
    ("some_new_backend", ("float32", "dilated"), ("float32", "dilated")),  # unknown: the references' numerics
])
def test_auto_compute_path_per_platform(platform, deeplab, demo):
    from cbst_jax.models.registry import resolve_compute

    assert resolve_compute("deeplabv2_resnet101", "auto", "auto", platform) == deeplab
    assert resolve_compute("resnet38", "auto", "auto", platform) == deeplab
    assert resolve_compute("demo_segnet", "auto", "auto", platform) == demo  # no atrous option
    # explicit values are kept whatever the platform
    assert resolve_compute("deeplabv2_resnet101", "float32", "dilated", platform) == ("float32", "dilated")
    assert resolve_compute("deeplabv2_resnet101", "float32", "auto", platform) == ("float32", deeplab[1])
    assert resolve_compute("resnet38", "auto", "dilated", platform) == (deeplab[0], "dilated")


def test_bfloat16_model_gives_float32_probabilities():
    """The pseudo-labelling path of a bf16 network: float32 logits, float32 softmax (each
    pixel's probabilities sum to one at float32 precision), float32 thresholds' input."""
    from cbst_jax.predictor import Predictor
    from cbst_jax.sharding import make_mesh

    x = images(2, 40, 56)
    bf16 = models.get_model("deeplabv2_resnet_small", 5, dtype="bfloat16")
    variables = bf16.init(KEY, x)
    predictor = Predictor(bf16, 5, make_mesh(jax.devices()[:1]), (40, 56), scales=(1.0, 0.75), flip=True)
    logits = predictor.logits(variables, x)
    probs = jax.jit(predictor.probs)(variables, x)
    assert all(l.dtype == jnp.float32 for l in logits) and probs.dtype == jnp.float32
    assert probs.shape == (2, 40, 56, 5) and np.abs(np.asarray(probs).sum(-1) - 1).max() < 1e-5


def test_get_model_auto_is_this_platforms_path():
    from cbst_jax.models.registry import resolve_compute

    want_dtype, want_atrous = resolve_compute("deeplabv2_resnet_small", platform=jax.default_backend())
    m = models.get_model("deeplabv2_resnet_small", 3, dtype="auto", atrous="auto")
    assert (jnp.dtype(m.dtype).name, m.atrous) == (want_dtype, want_atrous)
    assert jax.default_backend() != "cpu" or (want_dtype, want_atrous) == ("float32", "dilated")
    assert isinstance(models.get_model("demo_segnet", 3, dtype="auto", atrous="auto"), nn.Module)


# ---------------------------------------------------------------- frozen BN folded into its conv
def test_conv_equals_flax_conv():
    """``layers.conv`` has nn.Conv's parameters (names, shapes, the same random draws) and output."""
    from cbst_jax.models.layers import conv

    x = np.random.RandomState(0).randn(2, 9, 11, 5).astype(np.float32)
    for kw in (dict(use_bias=True, stride=2), dict(dilation=2), dict(kernel_init=nn.initializers.normal(0.01)),
               dict(use_bias=True, feature_group_count=5)):  # depthwise (MiT's Mix-FFN)
        features = 5 * 3 if "feature_group_count" in kw else 7
        ours = conv(features, 3, "c", **kw)
        dilation = kw.get("dilation", 1)
        theirs = nn.Conv(features, (3, 3), strides=(kw.get("stride", 1),) * 2, padding=((dilation, dilation),) * 2,
                         kernel_dilation=(dilation, dilation), use_bias=kw.get("use_bias", False),
                         feature_group_count=kw.get("feature_group_count", 1),
                         kernel_init=kw.get("kernel_init", nn.initializers.lecun_normal()), name="c")
        v_ours, v_theirs = ours.init(KEY, x), theirs.init(KEY, x)
        assert jax.tree_util.tree_structure(v_ours) == jax.tree_util.tree_structure(v_theirs)
        assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, v_ours, v_theirs)))
        np.testing.assert_array_equal(ours.apply(v_ours, x), theirs.apply(v_theirs, x))


@pytest.mark.parametrize("family, atrous", [("deeplabv2", "dilated"), ("deeplabv2", "space_to_batch"),
                                            ("resnet38", "dilated")])
def test_folded_batchnorm_equals_unfolded(family, atrous):
    """Frozen BN folded into its conv (scale into the kernel, shift as a bias): logits and every
    parameter's gradient (BN scale/bias included) agree with BN applied after the conv to float32
    rounding; with train_bn=True training keeps the unfolded path (the same program)."""
    make = small_deeplab if family == "deeplabv2" else small_resnet38
    x = images(2, 60, 100, seed=6)
    folded, plain = make(atrous=atrous), make(atrous=atrous, fold_bn=False)
    variables = randomized(plain.init(KEY, x), 7)
    out = plain.apply(variables, x)
    assert rel_err(folded.apply(variables, x), out) < 1e-5
    weights = jnp.asarray(np.random.RandomState(8).randn(*out.shape), jnp.float32)
    rngs = {"dropout": jax.random.key(9)}

    def grads(module):
        def loss(params):
            logits = module.apply({**variables, "params": params}, x, train=True, rngs=rngs)
            return jnp.sum(logits * weights)
        return jax.grad(loss)(variables["params"])

    errs = jax.tree_util.tree_map(rel_err, grads(folded), grads(plain))
    assert max(jax.tree_util.tree_leaves(errs)) < 1e-4
    trained = [make(atrous=atrous, train_bn=True, fold_bn=f).apply(variables, x, train=True, rngs=rngs,
                                                                    mutable=["batch_stats"]) for f in (True, False)]
    np.testing.assert_array_equal(trained[0][0], trained[1][0])
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, trained[0][1], trained[1][1])))


def test_folded_batchnorm_leaves_no_activation_multiply():
    """What folding removes: every BN's multiply of a (batch, H, W, C) map (DeepLab-v2: every BN
    follows a conv, so none is left); ResNet-38 keeps its pre-activation BNs."""
    x = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.uint8)

    def activation_multiplies(module):
        text = jax.jit(module.apply).lower(abstract_variables(module, x.shape), x).as_text()
        return len(re.findall(r"stablehlo.multiply .*-> tensor<2x\d+x\d+x\d+x", text)
                   + re.findall(r"stablehlo.multiply %\S+, %\S+ : tensor<2x\d+x\d+x\d+x", text))

    plain, folded = activation_multiplies(small_deeplab(fold_bn=False)), activation_multiplies(small_deeplab())
    assert (plain, folded) == (1 + 6 * 3 + 4, 0)  # stem, 6 blocks x 3, 4 projection shortcuts
    r_plain, r_folded = activation_multiplies(small_resnet38(fold_bn=False)), activation_multiplies(small_resnet38())
    assert 0 < r_folded < r_plain
