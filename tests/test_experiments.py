"""The experiment entry points: config validation messages, the real-dataset path run end to
end on fixture folders in the official layouts, and refusal of mismatched weights."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cbst_jax import config_lib
from experiments.configs import cityscapes_nthu, gta5_bdd, gta5_cityscapes, synthetic, synthia_cityscapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fixtures_layouts import make_cityscapes, make_gta5  # noqa: E402


def cli(module, *args, devices=2, env=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


RECIPES = ("", "crst_deeplabv2", "cbst_resnet38")


@pytest.mark.parametrize("module", [gta5_cityscapes, synthia_cityscapes, cityscapes_nthu, gta5_bdd])
@pytest.mark.parametrize("variant", RECIPES)
def test_shipped_configs_validate(module, variant):
    config_lib.validate(module.get_config(variant), need_roots=False)


@pytest.mark.parametrize("variant", ["", "quick", "gpu"])
def test_synthetic_configs_validate(variant):
    config_lib.validate(synthetic.get_config(variant), need_roots=False)


@pytest.mark.parametrize("module", [gta5_cityscapes, synthia_cityscapes, cityscapes_nthu, gta5_bdd, synthetic])
def test_recipes_default_to_the_platforms_compute_path(module):
    """Every recipe leaves dtype and atrous to the platform; on this CPU the network is built in
    float32 with dilated convolutions (the references' numerics); bad values are refused."""
    from cbst_jax import experiment, model_init
    from cbst_jax.models.registry import resolve_compute

    c = module.get_config()
    assert (c.model.dtype, c.model.atrous) == ("auto", "auto")
    assert resolve_compute(c.model.name, c.model.dtype, c.model.atrous, "gpu")[0] == "bfloat16"
    if jax.default_backend() == "cpu":
        c.model.init = ""
        model = model_init.build_model(c)
        path = experiment.compute_path(model)
        assert (path["dtype"], path["atrous"], path["platform"]) == ("float32", "dilated", "cpu")
    for key, bad in (("dtype", "float16"), ("atrous", "winograd")):
        c = module.get_config()
        c.model[key] = bad
        with pytest.raises(config_lib.ConfigError, match=f"config.model.{key}='{bad}': expected 'auto'"):
            config_lib.validate(c, need_roots=False)
    c = synthetic.get_config()
    c.model.atrous = "space_to_batch"  # the demo net has no dilated stage to move
    with pytest.raises(config_lib.ConfigError, match="config.model.atrous='space_to_batch'"):
        config_lib.validate(c, need_roots=False)


def test_recipes_carry_the_references_values():
    """Spot checks of each recipe against reference-cbst.md §3-§5, crst_seg.py and CRST#14."""
    crst, cbst = gta5_cityscapes.get_config(), gta5_cityscapes.get_config("cbst_resnet38")
    assert crst.variant == "" and cbst.variant == "cbst_resnet38"
    assert (crst.model.name, cbst.model.name) == ("deeplabv2_resnet101", "resnet38")
    assert tuple(crst.predict.scales) == (0.9,) and tuple(crst.evaluate.scales) == (0.9, 1.0, 1.2)
    assert crst.target.list_file == cbst.target.list_file == "builtin:cityscapes_train_ClsConfSet"
    assert crst.source.list_file == "builtin:gta5_crst_19984" and cbst.source.list_file == ""
    assert (crst.source_training.batch_size, tuple(crst.source_training.crop)) == (4, (500, 500))
    assert tuple(cbst.self_training.portion) == (0.15, 0.05, 0.5) and cbst.self_training.rounds == 6
    assert cbst.self_training.lr == 1e-4 and abs(cbst.self_training.lr_round_decay - 2 ** -0.5) < 1e-15
    assert tuple(cbst.input.crop) == (504, 504) and tuple(cbst.input.scale_range) == (0.7, 1.3)
    assert cbst.self_training.loss_resolution == "stride" and cbst.input.source_subset == "nested"
    assert crst.input.mine_domains == "target" and cbst.input.mine_domains == "both"
    assert tuple(cbst.predict.scales) == (1850 / 2048,) and tuple(cbst.evaluate.scales) == (1.0,)
    syn = synthia_cityscapes.get_config()
    assert syn.num_classes == 16 and syn.eval_classes == "miou13" and syn.source.lanemarking_as_road
    assert tuple(syn.input.source_scale_range) == (0.8, 1.2) and tuple(syn.input.target_scale_range) == (0.6, 1.5)
    assert tuple(syn.input.crop) == (600, 900) and tuple(syn.input.source_portion) == (0.02, 0.0025, 0.06)
    assert not synthia_cityscapes.get_config("cbst_resnet38").source.lanemarking_as_road
    assert gta5_bdd.get_config().methods == "source_only,st,st_sp,cbst,cbst_sp"
    nthu = cityscapes_nthu.get_config()
    assert (nthu.num_classes, nthu.target.city, nthu.target.list_file, nthu.source.list_file) == (13, "all", "", "")
    assert config_lib.nthu_cities(nthu) == ["Rome", "Rio", "Tokyo", "Taipei"]
    nthu.target.city = "rio"
    assert config_lib.nthu_cities(nthu) is None


@pytest.mark.parametrize("key, value, message", [
    ("self_training.portion", (0.0, 0.05, 0.5), "a portion in (0, 1]"),
    ("self_training.portion", (0.2, 0.05, 1.5), "a portion in (0, 1]"),
    ("self_training.portion", (0.6, 0.05, 0.5), "p0 <= p_max"),
    ("methods", "cbst,bogus", "one of source_only"),
    ("input.sampler", "mixed", "pooled or paired"),
    ("model.init", "/nonexistent/weights.npz", "existing converted-weights file"),
    # issue 12, items 5 and 6
    ("source_training.steps", -1, "a step count >= 0"),
    ("self_training.steps_per_round", -5, "a step count >= 0"),
    ("self_training.epochs_per_round", -1.0, "a number of epochs >= 0"),
    ("self_training.epochs_per_round", float("nan"), "a number of epochs >= 0"),
    ("input.eval_batch_size", 0, "a positive global batch size"),
    ("checkpoint_every", 0, "a positive number of training steps"),
    ("log_every", 0, "a positive number of training steps"),
    ("model.name", "resnet9000", "one of deeplabv2_resnet101"),
    ("synthetic.num_target_train", 0, "a positive image count"),
    ("synthetic.num_source", 0, "a positive image count"),
    # the keys the recipes need
    ("source_training.batch_size", -2, "a positive global batch size, or 0 for input.batch_size's"),
    ("source_training.crop", (500,), "(height, width), two positive integers, or () for input.crop's"),
    ("source_training.crop", (0, 500), "(height, width), two positive integers"),
    ("source_training.scale_range", (1.5, 0.5), "(low, high) with 0 < low <= high"),
    ("input.source_scale_range", (0.0, 1.2),
     "(low, high) with 0 < low <= high, or () for input.scale_range's"),
    ("input.target_scale_range", (0.6, 1.5, 2.0), "(low, high) with 0 < low <= high"),
    ("input.mine_domains", "source", "'both' or 'target'"),
    ("input.crop", (64, -1), "(height, width), two positive integers"),
    ("input.eval_size", (64,), "(height, width), two positive integers"),
    ("input.workers", 0, "a positive number of data workers"),
    ("input.source_share", 1.5, "a share in [0, 1]"),
    ("evaluate.scales", (), "positive scales"),
    ("evaluate.scales", (1.0, -0.5), "positive scales"),
    ("predict.scales", (0.0,), "positive scales"),
    ("model.normalization", "bgr", "'auto' or 'imagenet' or 'caffe' or 'unit'"),
    ("optim.momentum", 1.0, "a momentum in [0, 1)"),
    ("optim.weight_decay", -1e-4, "a weight decay >= 0"),
    ("optim.bias_lr_mult", 0.0, "a multiplier > 0"),
    ("optim.bias_weight_decay_mult", -1.0, "a multiplier >= 0"),
    ("self_training.lr", -1e-4, "a learning rate >= 0"),
    ("self_training.lr_round_decay", 0.0, "a factor > 0"),
    ("self_training.prior_sigma", 0.0, "a Gaussian sigma > 0"),
    ("self_training.prior_size", (0, 128), "(height, width), two positive integers"),
    ("source.lanemarking_as_road", True, "False unless source.name='synthia'"),
    ("target.city", "Rome", "'' (cities exist only for target.name='nthu')"),
    ("eval_classes", "miou13", "'miou13' only with num_classes=16"),
])
def test_invalid_values_are_named(key, value, message):
    c = synthetic.get_config()
    _set(c, key, value)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c)
    text = str(e.value)
    assert f"config.{key}" in text and message in text and "\n" not in text


def _set(config, key, value):
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


@pytest.mark.parametrize("city, ok", [("Rome", True), ("taipei", True), ("all", True), ("", True),
                                      ("Paris", False)])
def test_nthu_city_is_one_of_four_or_all(city, ok):
    c = cityscapes_nthu.get_config()
    c.target.city = city
    if ok:
        config_lib.validate(c, need_roots=False)
        return
    with pytest.raises(config_lib.ConfigError, match=r"config.target.city='Paris': expected one of Rome, Rio, "
                                                     r"Tokyo, Taipei, or 'all'"):
        config_lib.validate(c, need_roots=False)


def test_new_keys_default_to_the_input_values():
    """Empty source-training and per-domain keys mean "as input"; a shipped SYNTHIA recipe sets them."""
    c = config_lib.base_config()
    assert c.source_training.batch_size == 0 and tuple(c.source_training.crop) == ()
    assert tuple(c.source_training.scale_range) == () and tuple(c.input.source_scale_range) == ()
    assert tuple(c.input.target_scale_range) == () and tuple(c.evaluate.scales) == tuple(c.predict.scales)


def test_missing_roots_say_where_to_download():
    with pytest.raises(config_lib.ConfigError, match="GTA5.*from_games.*experiments.synthetic"):
        config_lib.validate(gta5_cityscapes.get_config())
    c = gta5_cityscapes.get_config()
    c.source.root, c.target.root = "/nonexistent/gta5", "/nonexistent/cs"
    with pytest.raises(config_lib.ConfigError, match="config.source.root='/nonexistent/gta5'"):
        config_lib.validate(c)


def test_training_batch_must_split_over_the_devices(tmp_path):
    """A batch the devices cannot share evenly is a one-line error before the workdir exists."""
    work = tmp_path / "w"
    res = cli("experiments.synthetic", "--config=quick", "--config.input.batch_size=6", f"--workdir={work}",
              devices=4)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()
    assert len(last) == 1 and last[0] == ("error: config.input.batch_size=6: expected a multiple of the 4 devices "
                                          "(each device takes an equal share of a training batch)")
    assert not work.exists()
    res = cli("experiments.synthetic", "--config=quick", "--config.source_training.batch_size=2",
              f"--workdir={work}", devices=4)
    assert res.returncode == 2 and "config.source_training.batch_size=2: expected a multiple of the 4" in res.stderr
    assert not work.exists()


def test_cli_rejects_unknown_keys_and_bad_values():
    res = cli("experiments.synthetic", "--config.input.nope=1")
    assert res.returncode == 2 and res.stderr.strip().startswith("error: unknown config key config.input.nope")
    res = cli("experiments.synthetic", "--config.self_training.portion=(0.6,0.05,0.5)")
    assert res.returncode == 2 and "expected p0 <= p_max" in res.stderr
    res = cli("experiments.gta5_cityscapes")
    assert res.returncode == 2 and "download GTA5" in res.stderr


TINY = ["--config.input.crop=(32, 64)", "--config.input.eval_size=(32, 64)", "--config.input.batch_size=2",
        "--config.input.eval_batch_size=2", "--config.input.source_portion=(0.5, 0.0, 0.5)",
        "--config.source_training.batch_size=2", "--config.source_training.crop=(32, 64)",
        "--config.self_training.rounds=1", "--config.self_training.steps_per_round=1", "--config.input.workers=1",
        "--config.source.list_file=", "--config.target.list_file="]


def run_experiment(module, tmp_path, *args, tiny=TINY):
    """A launcher on fixture folders, tiny; a persistent compilation cache of its own lets the
    four NTHU cities reuse the programs compiled for the first."""
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    res = cli(module, f"--workdir={tmp_path / 'work'}", *tiny, *args, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp_path / "work"


def test_gta5_cityscapes_cbst_resnet38_recipe_on_fixture_folders(tmp_path):
    """The real data path (folder readers, stride-8 logits and loss, source training at its own
    batch and crop) with the CBST recipe; the CRST default runs in tests/test_user_path.py."""
    make_gta5(tmp_path / "gta5", n=8, size=(32, 64))
    make_cityscapes(tmp_path / "cityscapes", n_train=4, n_val=2, size=(32, 64))
    work = run_experiment("experiments.gta5_cityscapes", tmp_path, "--config=cbst_resnet38",
                          f"--config.source.root={tmp_path / 'gta5'}",
                          f"--config.target.root={tmp_path / 'cityscapes'}",
                          "--config.model.name=deeplabv2_resnet_small", "--config.methods=source_only,cbst",
                          "--config.source_training.steps=2", "--config.model.init=none")
    seed = work / "seed_0"
    config = json.loads((seed / "config.json").read_text())
    assert config["variant"] == "cbst_resnet38" and config["self_training"]["loss_resolution"] == "stride"
    assert ("source model: deeplabv2_resnet_small trained here for 2 steps on gta5, from RANDOM INIT "
            "(model.init=none)") in (seed / "results.md").read_text().splitlines()
    assert (seed / "results.md").exists() and (seed / "pseudo_labels" / "cbst_r0" / "manifest.json").exists()
    assert "cbst r0" in (seed / "results.md").read_text() and (seed / "models" / "cbst_r0.npz").exists()


def test_daformer_variant_carries_daformer_values():
    """Spot checks of gta5_cityscapes:daformer_mit_b5 against lhoyer/DAFormer's configs (cited in the file)."""
    c = gta5_cityscapes.get_config("daformer_mit_b5")
    config_lib.validate(c, need_roots=False)
    assert c.variant == "daformer_mit_b5" and c.model.name == "daformer_mit_b5" and c.model.train_bn
    assert tuple(c.input.crop) == tuple(c.source_training.crop) == (512, 512)
    assert (c.source_training.batch_size, c.input.batch_size, c.input.sampler, c.input.source_share) == (
        2, 4, "paired", 0.5)
    st = c.source_training
    assert (st.optimizer, st.lr, st.schedule, st.power, st.warmup_steps, st.warmup_ratio, st.steps) == (
        "adam", 6e-5, "poly", 1.0, 1500, 1e-6, 40_000)
    assert (c.self_training.optimizer, c.self_training.lr, c.self_training.power) == ("adam", 6e-5, 1.0)
    assert (c.optim.weight_decay, c.optim.head_lr_mult) == (0.01, 10.0)
    assert tuple(c.input.target_scale_range) == (0.5, 0.5) and abs(c.input.source_scale_range[0] * 1914 - 1280) < 1e-9
    assert tuple(c.evaluate.scales) == tuple(c.predict.scales) == (0.5,) and not c.evaluate.flip


def test_gta5_cityscapes_daformer_variant_on_fixture_folders(tmp_path):
    """The transformer recipe end to end (DAFormer's head, AdamW groups with warm-up, BN statistics
    in the decoder, stride-4 logits, stochastic depth in the jitted step, MST-free 0.5-scale
    labelling and evaluation) at tiny sizes with MiT-B0; the canvas is 64x128 so that the 0.5 scale
    still gives the encoder its smallest input (29x29)."""
    make_gta5(tmp_path / "gta5", n=8, size=(32, 64))
    make_cityscapes(tmp_path / "cityscapes", n_train=4, n_val=2, size=(32, 64))
    work = run_experiment("experiments.gta5_cityscapes", tmp_path, "--config=daformer_mit_b5",
                          f"--config.source.root={tmp_path / 'gta5'}",
                          f"--config.target.root={tmp_path / 'cityscapes'}",
                          "--config.model.name=daformer_mit_b0", "--config.methods=cbst",
                          "--config.source_training.steps=2", "--config.input.eval_size=(64, 128)",
                          tiny=[a for a in TINY if not a.startswith("--config.input.eval_size=")])
    seed = work / "seed_0"
    config = json.loads((seed / "config.json").read_text())
    assert config["variant"] == "daformer_mit_b5" and config["source_training"]["warmup_steps"] == 1500
    assert "cbst r0" in (seed / "results.md").read_text() and (seed / "models" / "cbst_r0.npz").exists()
    from cbst_jax import models
    meta = models.read_metadata(seed / "models" / "cbst_r0.npz")
    assert (meta["architecture"], meta["normalization"]) == ("daformer_mit_b0", "imagenet")
    stats = models.load_variables(seed / "models" / "cbst_r0.npz")["batch_stats"]["decode_head"]
    assert not np.allclose(stats["fuse_layer"]["bottleneck"]["bn"]["mean"], 0)  # trained BN statistics


def test_gta5_cityscapes_daformer_online_variant_on_fixture_folders(tmp_path):
    """DAFormer's online recipe end to end on fixture folders at tiny sizes with MiT-B0: EMA
    teacher, ClassMix, jitter and blur, rare-class sampling (min_pixels shrunk to the 32x64
    fixtures), the ImageNet feature distance at the encoder's last stage (the initial network as
    the ImageNet model), the class-balanced thresholds with the spatial prior, trained decoder BN;
    the round's student is the stage's weights file and its online state is recorded."""
    make_gta5(tmp_path / "gta5", n=8, size=(32, 64))
    make_cityscapes(tmp_path / "cityscapes", n_train=4, n_val=2, size=(32, 64))
    work = run_experiment("experiments.gta5_cityscapes", tmp_path, "--config=daformer_online",
                          f"--config.source.root={tmp_path / 'gta5'}",
                          f"--config.target.root={tmp_path / 'cityscapes'}",
                          "--config.model.name=daformer_mit_b0", "--config.methods=online_cbst_sp",
                          "--config.source_training.steps=1", "--config.input.eval_size=(64, 128)",
                          "--config.online.rcs_min_pixels=10", "--config.online.ignore_bottom=8",
                          tiny=[a for a in TINY if not a.startswith("--config.input.eval_size=")])
    seed = work / "seed_0"
    config = json.loads((seed / "config.json").read_text())
    assert config["variant"] == "daformer_online" and config["online"]["fd_weight"] == 0.005
    assert config["online"]["fd_layer"] == ["backbone", "norm4"] and config["model"]["train_bn"]
    assert "online_cbst_sp r0" in (seed / "results.md").read_text()
    trained = json.loads((seed / "ledger.json").read_text())["stages"]["online_cbst_sp/r0"]["trained"]
    assert trained["online_state"] == "online_states/online_cbst_sp_r0" and trained["steps"] == 1
    from cbst_jax import models
    meta = models.read_metadata(seed / "models" / "online_cbst_sp_r0.npz")
    assert (meta["architecture"], meta["stage"]) == ("daformer_mit_b0", "online_cbst_sp/r0")
    pl = [json.loads(line) for line in (seed / "metrics.jsonl").read_text().splitlines()]
    pl = [r for r in pl if r["kind"] == "pseudo_labels"]
    assert len(pl) == 1 and pl[0]["online"] and sum(pl[0]["predicted"]) == 2 * 32 * 64


def test_synthia_cityscapes_on_fixture_folders(tmp_path):
    """16 classes, mIoU and mIoU* in the seed's table and in the table over seeds; CRST's
    lanemarking-as-road reaches the SYNTHIA reader."""
    from cbst_jax.data.splits import open_side
    from fixtures_layouts import make_synthia

    make_synthia(tmp_path / "synthia", n=8, size=(32, 64))
    make_cityscapes(tmp_path / "cityscapes", n_train=4, n_val=2, size=(32, 64))
    c = synthia_cityscapes.get_config()
    c.source.root = str(tmp_path / "synthia")
    c.source.list_file = ""
    road = [open_side(c, "source", "train")[i]["label"] for i in range(2)]
    c.source.lanemarking_as_road = False
    ignored = [open_side(c, "source", "train")[i]["label"] for i in range(2)]
    for a, b in zip(road, ignored):  # lanemarking pixels are road in one, ignored in the other; the rest agree
        assert ((a == 0) & (b == 255)).any() and np.array_equal(a[b != 255], b[b != 255])
    work = run_experiment("experiments.synthia_cityscapes", tmp_path, f"--config.source.root={tmp_path / 'synthia'}",
                          f"--config.target.root={tmp_path / 'cityscapes'}", "--config.model.name=demo_segnet",
                          "--config.methods=cbst", "--config.source_training.steps=1")
    for results in (work / "seed_0" / "results.md", work / "results.md"):
        header = next(ln for ln in results.read_text().splitlines() if ln.startswith("| method |"))
        assert header.endswith("| mIoU | mIoU* |") and "| wall |" in header and "| terrain |" not in header
    summary = json.loads((work / "summary.json").read_text())
    assert all("miou_subset" in r for r in summary["rows"])


def test_gta5_bdd_on_fixture_folders(tmp_path):
    """The seed's GTA5 -> BDD100K rows: source-only, ST, ST-SP, CBST, CBST-SP."""
    from fixtures_layouts import make_bdd100k

    make_gta5(tmp_path / "gta5", n=8, size=(32, 64))
    make_bdd100k(tmp_path / "bdd", n_train=4, n_val=2, size=(32, 64))
    work = run_experiment("experiments.gta5_bdd", tmp_path, f"--config.source.root={tmp_path / 'gta5'}",
                          f"--config.target.root={tmp_path / 'bdd'}", "--config.model.name=demo_segnet",
                          "--config.source_training.steps=1")
    results = (work / "seed_0" / "results.md").read_text()
    table = results[results.index("| method |"):].split("\n\n")[0]  # the results table (the health table follows)
    names = [ln.split("|")[1].strip() for ln in table.splitlines()
             if ln.startswith("| ") and not ln.startswith("| method") and "---" not in ln]
    assert names == ["source_only", "st r0", "st_sp r0", "cbst r0", "cbst_sp r0"]


def test_cityscapes_nthu_all_four_cities_on_fixture_folders(tmp_path):
    """target.city=all (the default): each city in <workdir>/<City>/, the per-city table with the
    mean over cities at <workdir>/results.md. The fixture's Train and Test images share names
    (as the real lists do) but not pixels, so nothing is left out of adaptation."""
    from fixtures_layouts import make_nthu

    cities = ("Rome", "Rio", "Tokyo", "Taipei")
    make_nthu(tmp_path / "nthu", cities=cities, n_train=3, n_test=2, size=(32, 64))
    make_cityscapes(tmp_path / "cityscapes", n_train=6, n_val=2, size=(32, 64))
    work = run_experiment("experiments.cityscapes_nthu", tmp_path, f"--config.source.root={tmp_path / 'cityscapes'}",
                          f"--config.target.root={tmp_path / 'nthu'}", "--config.model.name=demo_segnet",
                          "--config.source_training.steps=1")
    for city in cities:
        run = work / city / "seed_0"
        assert json.loads((run / "config.json").read_text())["target"]["city"] == city
        assert json.loads((run / "eval_overlap.json").read_text())["eval_images_in_train"] == 0
        assert "cbst r0" in (run / "results.md").read_text() and (work / city / "results.md").exists()
    text = (work / "results.md").read_text()
    rows = [ln.split("|")[1:3] for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [(a.strip(), b.strip()) for a, b in rows] == [(c, m) for c in cities + ("mean",)
                                                         for m in ("source_only", "st r0", "cbst r0")]
    header = next(ln for ln in text.splitlines() if ln.startswith("| city |"))
    assert header.count("|") == 2 + 13 + 2 and "| bicycle | mean |" in header
    summary = json.loads((work / "summary.json").read_text())
    rome = [r for r in summary["rows"]["Rome"] if r["method"] == "cbst"][0]
    line = next(ln for ln in text.splitlines() if ln.startswith("| Rome | cbst r0 |"))
    assert line.strip("|").split("|")[-1].strip() == f"{100 * rome['miou']:.1f}"


def test_weights_of_another_architecture_are_refused(tmp_path):
    import jax
    import numpy as np
    from cbst_jax import models

    other = models.get_model("deeplabv2_resnet_small", 19)
    variables = other.init(jax.random.key(0), np.zeros((1, 32, 64, 3), np.float32), train=False)
    path = tmp_path / "other.npz"
    models.save_variables(path, variables, models.make_metadata("deeplabv2_resnet_small", 19, "unit"))
    res = cli("experiments.synthetic", f"--workdir={tmp_path / 'w'}", f"--config.model.init={path}",
              "--config=quick")
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "other.npz" in last and "another architecture" in last


def test_source_phase_uses_source_training_batch_crop_and_scales():
    """trainer.mixed_iterator: the source phase at source_training's batch/crop/scale, a round at
    input's; rare-class mining on the domains of input.mine_domains."""
    import types

    import numpy as np

    from cbst_jax import settings
    from cbst_jax.data import pipeline
    from cbst_jax.data.splits import open_side
    from cbst_jax.trainer import mixed_iterator

    c = synthetic.get_config("quick")
    c.synthetic.num_source, c.synthetic.num_target_train = 12, 6
    c.input.batch_size, c.input.crop, c.input.workers = 2, (32, 48), 1
    c.source_training.batch_size, c.source_training.crop = 4, (40, 40)
    c.source_training.scale_range = (0.5, 0.5)
    c.input.mine_domains = "target"
    data = types.SimpleNamespace(source=open_side(c, "source", "train"), target_train=open_side(c, "target", "train"))
    with mixed_iterator(data, settings.source_phase(c, c.seed)) as it:
        batch = next(it)
        assert batch["image"].shape == (4, 40, 40, 3) and it.scale_range == (0.5, 0.5)
        assert np.all(batch["domain"] == pipeline.SOURCE)
    with mixed_iterator(data, settings.round_phase(c, c.seed), 0,
                        target_labels=lambda i: np.zeros((64, 128), np.uint8)) as it:
        assert next(it)["image"].shape == (2, 32, 48, 3) and it.scale_range == tuple(c.input.scale_range)
        assert it.mine_domains == (pipeline.TARGET,)
    c.source_training.batch_size, c.source_training.crop, c.source_training.scale_range = 0, (), ()
    c.input.mine_domains = "both"
    with mixed_iterator(data, settings.source_phase(c, c.seed)) as it:
        assert next(it)["image"].shape == (2, 32, 48, 3) and it.scale_range == tuple(c.input.scale_range)
        assert it.mine_domains == (pipeline.SOURCE, pipeline.TARGET)


def _eval_row(seed, method, rnd, iou, subset=None):
    import numpy as np

    row = {"kind": "eval", "seed": seed, "method": method, "round": rnd, "iou": list(iou),
           "miou": float(np.nanmean(iou))}
    if subset is not None:
        row["miou_subset"] = float(np.nanmean([iou[c] for c in subset]))
    return row


def _cells(table: str, first: str) -> list[str]:
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_multi_seed_table_has_sample_std_and_miou_star():
    """mean ± sample std (ddof=1, checked against statistics.stdev) per class, mIoU and mIoU*."""
    import statistics

    import numpy as np

    from cbst_jax import tables

    rng = np.random.default_rng(0)
    subset = [0, 2, 3]
    rows = []
    for seed in (0, 1, 2):
        rows.append(_eval_row(seed, "source_only", None, rng.uniform(0, 1, 4), subset))
        iou = rng.uniform(0, 1, 4)
        iou[1] = np.nan if seed == 0 else iou[1]  # a class absent in one seed
        rows.append(_eval_row(seed, "cbst", 0, iou, subset))
    table = tables.seed_aggregate_table(rows, ["a", "b", "c", "d"], subset, subset_name="mIoU*")
    assert "| method | a | b | c | d | mIoU | mIoU* |" in table
    assert "sample standard deviation (ddof=1)" in table
    cbst = [r for r in rows if r["method"] == "cbst"]
    cells = _cells(table, "cbst r0")
    for c, cell in enumerate(cells[1:5]):
        vals = [r["iou"][c] for r in cbst if not np.isnan(r["iou"][c])]
        assert cell == f"{100 * statistics.mean(vals):.1f} ± {100 * statistics.stdev(vals):.1f}"
    for key, cell in (("miou", cells[5]), ("miou_subset", cells[6])):
        vals = [r[key] for r in cbst]
        assert cell == f"{100 * statistics.mean(vals):.1f} ± {100 * statistics.stdev(vals):.1f}"
    one = tables.seed_aggregate_table(rows[:2], ["a", "b", "c", "d"], subset)
    assert "one seed: no standard deviation" in one and "±" not in _cells(one, "source_only")[1]


def test_city_table_is_per_city_plus_mean_over_cities():
    import numpy as np

    from cbst_jax import tables

    rng = np.random.default_rng(1)
    by_city = {}
    for city in ("Rome", "Rio", "Tokyo", "Taipei"):
        by_city[city] = [_eval_row(s, m, r, rng.uniform(0, 1, 3)) for s in (0, 1)
                         for m, r in (("source_only", None), ("cbst", 0), ("cbst", 1))]
    table = tables.city_table(by_city, ["road", "sw", "bus"], last_round=1)
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [ln.split("|")[1].strip() for ln in lines] == [c for c in by_city for _ in range(2)] + ["mean"] * 2
    assert "cbst r0" not in table  # only the last round, as the seed's table
    rome = [r for r in by_city["Rome"] if r["method"] == "cbst" and r["round"] == 1]
    cells = [ln for ln in lines if ln.startswith("| Rome | cbst r1 |")][0].strip("|").split("|")
    assert cells[2].strip() == f"{100 * np.mean([r['iou'][0] for r in rome]):.1f}"
    per_city = [np.mean([r["miou"] for r in rows if r["method"] == "cbst" and r["round"] == 1])
                for rows in by_city.values()]
    mean = [ln for ln in lines if ln.startswith("| mean | cbst r1 |")][0].strip("|").split("|")
    assert mean[-1].strip() == f"{100 * np.mean(per_city):.1f}"


# ---------------------------------------------------------------- issue 23: the user's path

def _random_variables(module, seed, mix_upscore=False):
    """Random variables of the shapes ``module`` has (BN variances positive, kernels at 1/sqrt(fan-in));
    FCN upsampling kernels stay per-class (a class feeds only itself) unless ``mix_upscore``."""
    import jax
    from flax import traverse_util

    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), np.zeros((1, 32, 64, 3), np.float32),
                                                train=False))
    rng = np.random.default_rng(seed)
    flat = {}
    for key, leaf in traverse_util.flatten_dict(shapes).items():
        noise = rng.normal(0, 1, leaf.shape).astype(np.float32)
        if key[-1] == "var":
            noise = 0.5 + np.abs(noise)
        elif key[-1] == "kernel":
            noise /= np.sqrt(np.prod(leaf.shape[:-1]))
        elif key[-1] == "scale":
            noise = 1 + 0.1 * noise
        else:
            noise *= 0.1
        if key[1].startswith("upscore") and not mix_upscore:
            noise *= np.eye(leaf.shape[-1], dtype=np.float32)  # (k, k, out, in)
        flat[key] = noise
    return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("name", ["demo_segnet", "deeplabv2_resnet_small", "fcn8s_vgg16_small"])
def test_nthu13_class_map_gives_the_19_class_logits_at_the_nthu_classes(tmp_path, name):
    """model.init_class_map=nthu13: the 13-class network built from a 19-class file gives, at every
    pixel, the 19-class network's logits at the 13 NTHU trainIds (labels.NTHU13_TRAINIDS). The
    classifiers: one conv (demo net; ResNet-38's is the same kind), DeepLab-v2's sum of four ASPP
    convs, FCN-8s' score convs mixed by per-class upsampling kernels."""
    import jax

    from cbst_jax import model_init, models

    nthu_trainids = [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]  # road ... bicycle, written out
    path = tmp_path / "src19.npz"
    module19 = models.get_model(name, 19, normalization="unit")
    variables19 = _random_variables(module19, seed=1)
    models.save_variables(path, variables19, models.make_metadata(name, 19, "unit"))
    c = cityscapes_nthu.get_config()
    c.model.name, c.model.init, c.model.init_is_source_model = name, str(path), True
    c.model.init_class_map = "nthu13"
    config_lib.validate(c, need_roots=False)
    model13 = model_init.build_model(c)
    shapes13 = jax.eval_shape(lambda: model13.init(jax.random.key(0), np.zeros((1, 32, 64, 3), np.float32),
                                                   train=False))
    variables13 = model_init.merge_variables(shapes13, models.load_variables(path), str(path),
                                             keep_classes=model_init.class_map(c.model.init_class_map))
    x = np.random.default_rng(2).integers(0, 256, (2, 32, 64, 3)).astype(np.uint8)
    want = np.asarray(jax.jit(lambda v: module19.apply(v, x, train=False))(variables19))[..., nthu_trainids]
    got = np.asarray(jax.jit(lambda v: model13.apply(v, x, train=False))(variables13))
    assert got.shape == want.shape and got.shape[-1] == 13 and np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_nthu13_class_map_refuses_a_classifier_that_mixes_classes(tmp_path):
    import jax

    from cbst_jax import model_init, models
    from cbst_jax.errors import RunError

    path = tmp_path / "fcn19.npz"
    module19 = models.get_model("fcn8s_vgg16_small", 19, normalization="unit")
    models.save_variables(path, _random_variables(module19, 0, mix_upscore=True),
                          models.make_metadata("fcn8s_vgg16_small", 19, "unit"))
    module13 = models.get_model("fcn8s_vgg16_small", 13, normalization="unit")
    shapes13 = jax.eval_shape(lambda: module13.init(jax.random.key(0), np.zeros((1, 32, 64, 3), np.float32),
                                                    train=False))
    with pytest.raises(RunError, match=r"fcn19.npz: cannot keep 13 of the classes of params/upscore\w*/kernel: it "
                                       r"mixes them with the dropped ones"):
        model_init.merge_variables(shapes13, models.load_variables(path), str(path),
                                   keep_classes=model_init.class_map("nthu13"))


@pytest.mark.parametrize("bad, message", [
    (dict(init_class_map="nthu19"), "config.model.init_class_map='nthu19': expected '' or 'nthu13'"),
    (dict(init_class_map="nthu13", init=""), "config.model.init_class_map='nthu13': expected '' unless "
                                             "num_classes=13 and model.init is a 19-class weights file"),
    (dict(init="none", init_is_source_model=True), "config.model.init_is_source_model=True: expected model.init"),
])
def test_model_init_keys_are_validated(tmp_path, bad, message):
    c = cityscapes_nthu.get_config()
    (tmp_path / "w.npz").write_bytes(b"")
    c.model.init = str(tmp_path / "w.npz")
    for key, value in bad.items():
        c.model[key] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, need_roots=False)
    assert message in str(e.value)


def test_the_recipes_report_the_seeds_rows():
    """CBST's recipe on GTA5 -> Cityscapes adds the seed's CBST-SP + MST row; the seed's SYNTHIA,
    NTHU and BDD tables have no CBST-SP + MST row (and SYNTHIA's ResNet-38 block no CBST-SP)."""
    cbst = gta5_cityscapes.get_config("cbst_resnet38")
    assert cbst.evaluate.mst_methods == "cbst_sp" and "cbst_sp" in cbst.methods.split(",")
    assert gta5_cityscapes.get_config().evaluate.mst_methods == ""
    syn = synthia_cityscapes.get_config("cbst_resnet38")
    assert syn.methods == "source_only,st,cbst" and syn.evaluate.mst_methods == ""
    assert synthia_cityscapes.get_config().evaluate.mst_methods == ""
    for module in (cityscapes_nthu, gta5_bdd):
        for variant in RECIPES:
            assert module.get_config(variant).evaluate.mst_methods == "", (module.__name__, variant)


def test_readme_quotes_the_multi_device_batch_refusal(tmp_path):
    """The recipes' batch of 2 on 4 devices: the launcher's one-line refusal is the one README's
    paragraph on batch and learning-rate scaling quotes; without --workdir the embedded pair's
    run says where it would write (runs/synthetic of the current folder)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
               XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "experiments.synthetic", "--config=quick",
                          "--config.input.batch_size=2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines == ["error: config.input.batch_size=2: expected a multiple of the 4 devices (each device takes an "
                     "equal share of a training batch)"]
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert f"`{lines[0]}`" in " ".join(readme.split())
    assert res.stdout.splitlines()[0] == (f"workdir: {tmp_path / 'runs' / 'synthetic'} (the embedded pair's "
                                          f"default; --workdir=DIR to choose)")
    assert not (tmp_path / "runs").exists()
