"""The user's path, end to end, as the README spells it: a PyTorch DeepLab-v2 source model (built
and saved by torch, key names as CRST's ``src_model.pth``) -> ``cbst_jax.cli.convert_weights`` ->
``experiments.gta5_cityscapes`` on fixture folders in the official layouts, starting from those
weights -> ``cbst_jax.cli.export`` -> ``cbst_jax.cli.infer`` on a folder -> ``cbst_jax.cli.evaluate``.

The round-0 model of the run (its source model) must give the torch model's logits on the same
image to 1e-4, which holds only with the normalisation the weights were made for (ImageNet
mean/std, as CRST's); forced to the architecture's default (Caffe), the same check fails."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fixtures_layouts import make_cityscapes, make_gta5  # noqa: E402
from test_convert import TorchResDeeplab, randomize, torch_input  # noqa: E402

SIZE = (32, 64)


def cli(module, *args, devices=2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def run_args(tmp_path, init, work):
    return [f"--workdir={work}", f"--config.source.root={tmp_path / 'gta5'}",
            f"--config.target.root={tmp_path / 'cityscapes'}", "--config.source.list_file=",
            "--config.target.list_file=", "--config.model.name=deeplabv2_resnet_small", f"--config.model.init={init}",
            "--config.model.init_is_source_model=True", "--config.methods=cbst",
            f"--config.input.crop={SIZE}", f"--config.input.eval_size={SIZE}", "--config.input.batch_size=2",
            "--config.input.eval_batch_size=2", "--config.input.source_portion=(0.5, 0.0, 0.5)",
            "--config.self_training.rounds=1", "--config.self_training.steps_per_round=2",
            "--config.input.workers=1"]


def one_error_line(res):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and lines and lines[-1].startswith("error: "), res.stderr[-3000:]
    return lines[-1]


def test_weights_to_adapted_model(tmp_path, capsys):
    from cbst_jax import model_init, models
    from cbst_jax.cli import evaluate, export, infer
    from cbst_jax.workdir import SeedDir
    from cbst_jax.labels import CITYSCAPES_ID_TO_TRAINID

    # ---- a CRST-style source model: Res_Deeplab's keys, trained on ImageNet-normalised RGB input
    ref = randomize(TorchResDeeplab(19, layers=(1, 1, 1, 1), width=8), seed=3)
    torch.save(ref.state_dict(), tmp_path / "src_model.pth")
    assert "layer5.conv2d_list.0.weight" in torch.load(tmp_path / "src_model.pth", weights_only=True)

    # ---- convert: the file records architecture, classes and the ImageNet normalisation
    init = tmp_path / "src_model.npz"
    res = cli("cbst_jax.cli.convert_weights", "torchvision-resnet101", tmp_path / "src_model.pth", init,
              "--model", "deeplabv2_resnet_small")
    assert res.returncode == 0, res.stderr[-3000:]
    meta = models.read_metadata(init)
    assert (meta["architecture"], meta["num_classes"], meta["normalization"]) == (
        "deeplabv2_resnet_small", 19, "imagenet")

    # ---- run the experiment from those weights (round 0 = the imported source model)
    make_gta5(tmp_path / "gta5", n=8, size=SIZE)
    make_cityscapes(tmp_path / "cityscapes", n_train=4, n_val=4, size=SIZE)
    work = tmp_path / "work"
    res = cli("experiments.gta5_cityscapes", *run_args(tmp_path, init, work))
    assert res.returncode == 0, res.stderr[-3000:]
    seed = work / "seed_0"
    ledger = json.loads((seed / "ledger.json").read_text())["stages"]
    assert set(ledger) == {"source", "cbst/r0"} and "cbst r0" in (seed / "results.md").read_text()
    run_config = SeedDir(str(seed)).read_config()
    assert tuple(run_config.predict.scales) == (0.9,) and tuple(run_config.evaluate.scales) == (0.9, 1.0, 1.2)

    # ---- round-0 logits: the run's source model, built as the run built it, against torch
    image = np.asarray(Image.open(next((tmp_path / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))))[None]
    with torch.no_grad():
        want = ref(torch_input(image, "imagenet")).numpy().transpose(0, 2, 3, 1)
    model = model_init.build_model(run_config)
    source = models.load_variables(seed / "models" / "source.npz")
    assert model.normalization == "imagenet"
    assert models.read_metadata(seed / "models" / "source.npz")["normalization"] == "imagenet"
    got = np.asarray(model.apply(source, image, train=False))
    assert got.shape == want.shape and want.shape[-1] == 19
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    wrong = np.asarray(model.clone(normalization="caffe").apply(source, image, train=False))
    assert np.abs(wrong - want).max() > 1e-2  # the same check fails with the architecture's default
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(wrong, want, rtol=0, atol=1e-4)
    # an explicit normalisation that contradicts the weights is refused before anything runs
    res = cli("experiments.gta5_cityscapes", *run_args(tmp_path, init, tmp_path / "other"),
              "--config.model.normalization=caffe")
    assert "the weights expect normalization 'imagenet'" in one_error_line(res)

    # ---- export the adapted model: one file with its metadata
    out = tmp_path / "cbst_r0.npz"
    assert export.main(["--workdir", str(work), "--stage", "cbst/r0", "--out", str(out)]) == 0
    assert "stage cbst/r0 of seed 0" in capsys.readouterr().err
    exported = models.read_metadata(out)
    assert (exported["architecture"], exported["num_classes"], exported["normalization"]) == (
        "deeplabv2_resnet_small", 19, "imagenet")
    assert exported["class_names"][0] == "road" and exported["palette"][0] == [128, 64, 128]
    assert exported["stage"] == "cbst/r0" and exported["eval"]["miou"] == ledger["cbst/r0"]["eval"]["miou"]
    # the run's evaluation settings, infer's defaults for the file (CRST: MST 0.9/1.0/1.2 with flip)
    assert exported["inference"] == {"canvas": list(SIZE), "scales": [0.9, 1.0, 1.2], "flip": True}
    trained = models.load_variables(seed / "models" / "cbst_r0.npz")
    np.testing.assert_array_equal(models.load_variables(out)["params"]["layer5"]["conv2d_list_0"]["kernel"],
                                  trained["params"]["layer5"]["conv2d_list_0"]["kernel"])
    assert export.main(["--workdir", str(work), "--stage", "cbst/r3", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage cbst/r3 is not trained" in err[0] and "trained stages: source, cbst/r0" in err[0]
    assert not (tmp_path / "x.npz").exists()

    # ---- infer on the folder of validation images (canvas = their size: no resizing)
    val = tmp_path / "cityscapes" / "leftImg8bit" / "val"
    shown = tmp_path / "shown"
    assert infer.main(["--weights", str(out), "--out", str(shown), "--canvas", f"{SIZE[0]},{SIZE[1]}",
                       "--scales", "1.0", "--no-flip", "--gt", str(tmp_path / "cityscapes" / "gtFine" / "val"),
                       str(val)]) == 0
    summary = json.loads((shown / "infer_summary.json").read_text())
    assert summary["segmented"] == 4 and summary["weights"][0]["normalization"] == "imagenet"
    assert (shown / "comparison.png").exists()

    # ---- evaluate the exported file at one scale without flip: the confusion matrix of the
    # infer outputs (same forward pass) against the ground truth, counted here with numpy
    capsys.readouterr()
    assert evaluate.main(["--weights", str(out), "--dataset", "cityscapes", "--root", str(tmp_path / "cityscapes"),
                          "--split", "val", "--eval-size", f"{SIZE[0]},{SIZE[1]}", "--scales", "1.0", "--no-flip",
                          "--out", str(tmp_path / "eval")]) == 0
    assert "| method | road |" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    cm = np.zeros((19, 20), np.int64)  # column 19: predictions outside the classes (none from argmax)
    for gt_file in sorted((tmp_path / "cityscapes" / "gtFine" / "val").rglob("*_labelIds.png")):
        stem = gt_file.name[: -len("_gtFine_labelIds.png")]
        gt = CITYSCAPES_ID_TO_TRAINID[np.asarray(Image.open(gt_file))]
        pred = np.asarray(Image.open(shown / gt_file.parent.name / f"{stem}_leftImg8bit_trainid.png"))
        keep = gt != 255
        np.add.at(cm, (gt[keep].astype(int), pred[keep].astype(int)), 1)
    np.testing.assert_array_equal(np.asarray(result["confusion_matrix"]), cm)
    assert result["row"]["images"] == 4 and "| cbst_r0 |" in (tmp_path / "eval" / "evaluation.md").read_text()

    # ---- evaluate a stage of the workdir with the run's settings: the run's own evaluation row
    res = cli("cbst_jax.cli.evaluate", "--workdir", work, "--stage", "cbst/r0", "--out", tmp_path / "eval_stage")
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads((tmp_path / "eval_stage" / "evaluation.json").read_text())["row"]
    assert row["scales"] == [0.9, 1.0, 1.2] and row["flip"] is True and row["split"] == "val"
    assert row["iou"] == ledger["cbst/r0"]["eval"]["iou"] and row["miou"] == ledger["cbst/r0"]["eval"]["miou"]


def test_command_errors_are_one_line_with_exit_2(tmp_path, capsys):
    """cbst-evaluate / cbst-export on workdirs, stages and files they cannot use."""
    import jax

    from cbst_jax import config_lib, models
    from cbst_jax.cli import evaluate, export

    run = tmp_path / "run"
    for s in (0, 1):
        (run / f"seed_{s}" / "models").mkdir(parents=True)
        (run / f"seed_{s}" / "config.json").write_text(config_lib.base_config().to_json())
    (tmp_path / "cities" / "Rome" / "seed_0").mkdir(parents=True)
    (tmp_path / "cities" / "Rome" / "seed_0" / "config.json").write_text(config_lib.base_config().to_json())
    (tmp_path / "empty").mkdir()
    backbone = tmp_path / "backbone.npz"
    module = models.get_model("demo_segnet", 19)
    variables = jax.device_get(module.init(jax.random.key(0, impl="rbg"), np.zeros((1, 32, 32, 3), np.uint8)))
    models.save_variables(backbone, variables, models.make_metadata("demo_segnet", None, "unit"))
    (tmp_path / "notes.npz").write_text("not weights")
    trained = tmp_path / "trained.npz"
    models.save_variables(trained, variables, models.make_metadata("demo_segnet", 19, "unit"))
    from fixtures_layouts import make_nthu

    make_nthu(tmp_path / "nthu", cities=("Rome",), n_train=1, n_test=1)
    cases = [
        (export.main, ["--workdir", str(tmp_path / "nowhere"), "--stage", "source", "--out", "o.npz"],
         "no such folder"),
        (export.main, ["--workdir", str(run), "--stage", "source", "--out", "o.npz"], "holds seeds 0, 1: pass --seed"),
        (export.main, ["--workdir", str(run), "--seed", "7", "--stage", "source", "--out", "o.npz"],
         "no run of seed 7 (seeds there: 0, 1)"),
        (export.main, ["--workdir", str(tmp_path / "cities"), "--stage", "source", "--out", "o.npz"],
         "holds one run per sub-folder (Rome): pass --workdir"),
        (export.main, ["--workdir", str(tmp_path / "empty"), "--stage", "source", "--out", "o.npz"],
         "not a run's folder"),
        (export.main, ["--workdir", str(run), "--seed", "0", "--stage", "cbst/r1", "--out", "o.npz"],
         "stage cbst/r1 is not trained (no models/cbst_r1.npz); trained stages: none yet"),
        (export.main, ["--workdir", str(run), "--seed", "0", "--stage", "source_only/r0", "--out", "o.npz"],
         "--stage 'source_only/r0': expected 'source' or '<method>/r<round>'"),
        (export.main, ["--workdir", str(run), "--seed", "0", "--stage", "bogus", "--out", "o.npz"],
         "--stage 'bogus': expected"),
        (evaluate.main, [], "give either --workdir (with --stage) or --weights"),
        (evaluate.main, ["--workdir", str(run), "--weights", str(backbone)], "give either --workdir"),
        (evaluate.main, ["--workdir", str(run), "--seed", "0"], "--workdir needs --stage"),
        (evaluate.main, ["--workdir", str(run), "--seed", "0", "--stage", "source", "--dataset", "cityscapes"],
         "--dataset is for --weights"),
        (evaluate.main, ["--workdir", str(run), "--seed", "1", "--stage", "st/r0"], "stage st/r0 is not trained"),
        (evaluate.main, ["--weights", str(backbone), "--dataset", "cityscapes", "--root", str(tmp_path)],
         "backbone.npz: a backbone-only init"),
        (evaluate.main, ["--weights", str(tmp_path / "notes.npz"), "--dataset", "cityscapes", "--root", "x"],
         "notes.npz: not a converted-weights .npz (a text file)"),
        (evaluate.main, ["--weights", str(tmp_path / "missing.npz"), "--dataset", "cityscapes", "--root", "x"],
         "missing.npz: weights file not found"),
        (evaluate.main, ["--weights", str(trained), "--dataset", "nthu", "--root", str(tmp_path / "nthu"),
                         "--city", "Rome", "--split", "train"],
         "nthu: split 'train' has no labels to evaluate against"),
        (evaluate.main, ["--weights", str(trained), "--dataset", "nthu", "--root", str(tmp_path / "nthu"),
                         "--city", "Paris"], "nthu: city='Paris', expected one of Rome, Rio, Tokyo, Taipei"),
        (evaluate.main, ["--weights", str(trained), "--dataset", "kitti", "--root", str(tmp_path)],
         "--dataset 'kitti': expected one of"),
        (evaluate.main, ["--weights", str(trained), "--dataset", "nthu", "--root", str(tmp_path / "nthu"),
                         "--city", "Rome", "--scales", "0"], "--scales [0.0]: expected positive scales"),
    ]
    for main, argv, message in cases:
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, lines)
    assert not os.path.exists("o.npz")


# ---------------------------------------------------------------- issue 23: a new user's mistakes

def save_weights(path, name, num_classes, seed=0):
    """A random ``name`` network of ``num_classes`` classes as a weights file; returns (module, variables)."""
    import jax

    from cbst_jax import models

    module = models.get_model(name, num_classes, normalization="unit")
    variables = jax.device_get(jax.jit(lambda k: module.init(k, np.zeros((1, *SIZE, 3), np.float32),
                                                             train=False))(jax.random.key(seed)))
    models.save_variables(path, variables, models.make_metadata(name, num_classes, "unit"))
    return module, variables


def roots(tmp_path):
    """Empty dataset folders: preflight refuses the model before it opens any split."""
    for d in ("src", "tgt"):
        (tmp_path / d).mkdir(exist_ok=True)
    return [f"--config.source.root={tmp_path / 'src'}", f"--config.target.root={tmp_path / 'tgt'}"]


def test_a_source_model_of_another_class_count_is_refused(tmp_path):
    """experiments.gta5_cityscapes with a 16-class source model, experiments.cityscapes_nthu with a
    19-class one: one line naming both counts, exit 2, no workdir."""
    save_weights(tmp_path / "src16.npz", "demo_segnet", 16)
    work = tmp_path / "work"
    res = cli("experiments.gta5_cityscapes", f"--workdir={work}", *roots(tmp_path),
              "--config.model.name=demo_segnet", f"--config.model.init={tmp_path / 'src16.npz'}",
              "--config.model.init_is_source_model=True")
    assert one_error_line(res) == (f"error: config.model.init={tmp_path / 'src16.npz'}: a source model of 16 classes, "
                                   f"but this experiment has num_classes=19; pass a source model of 19 classes")
    assert not work.exists()
    save_weights(tmp_path / "src19.npz", "demo_segnet", 19)
    res = cli("experiments.cityscapes_nthu", f"--workdir={work}", *roots(tmp_path), "--config.model.name=demo_segnet",
              f"--config.model.init={tmp_path / 'src19.npz'}", "--config.model.init_is_source_model=True")
    assert one_error_line(res) == (
        f"error: config.model.init={tmp_path / 'src19.npz'}: a source model of 19 classes, but this experiment has "
        f"num_classes=13; pass a source model of 13 classes, or --config.model.init_class_map=nthu13 to keep its "
        f"classifier's rows of the 13 NTHU classes")
    assert not work.exists()


@pytest.mark.parametrize("variant, network, kinds", [
    ("", "deeplabv2_resnet101", "torchvision-resnet101 or deeplab-init"),
    ("cbst_resnet38", "resnet38", "mxnet-resnet38")])
def test_a_full_size_network_without_model_init_is_refused(tmp_path, variant, network, kinds):
    """No model.init would train the source model from random weights: refused unless
    model.init=none says so (then the run's log and report say RANDOM INIT)."""
    from cbst_jax import config_lib, preflight
    from experiments.configs import gta5_cityscapes

    work = tmp_path / "work"
    res = cli("experiments.gta5_cityscapes", f"--workdir={work}", *roots(tmp_path),
              *([f"--config={variant}"] if variant else []))
    steps = gta5_cityscapes.get_config(variant).source_training.steps
    assert one_error_line(res) == (
        f"error: config.model.init is empty: {network} would start from random weights ({steps} source-training "
        f"steps); pass --config.model.init=<weights.npz> (an ImageNet init converted with python -m "
        f"cbst_jax.cli.convert_weights {kinds} ..., or a source model with --config.model.init_is_source_model=True), "
        f"or --config.model.init=none to train from random weights on purpose")
    assert not work.exists()
    c = gta5_cityscapes.get_config(variant)
    c.model.init = "none"
    preflight.check_model_init(c)  # accepted
    assert config_lib.source_model_origin(c) == (f"source model: {network} trained here for {steps} steps on gta5, "
                                                 f"from RANDOM INIT (model.init=none)")


def test_a_real_data_run_needs_a_workdir(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "experiments.gta5_bdd", *roots(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one_error_line(res) == ("error: --workdir is required for a run on real datasets (it holds the run's "
                                   "checkpoints, pseudo-labels and results), e.g. --workdir=runs/gta5_bdd; only "
                                   "the embedded synthetic pair defaults to runs/<experiment>")
    assert sorted(os.listdir(tmp_path)) == ["src", "tgt"]


def nthu_iou(predict, nthu_root, num_classes=13, classes=range(13)):
    """Per-class IoU over Rome's test images, counted here: ``predict(image) -> (H, W)`` labels in
    the protocol of ``num_classes`` (13: NTHU indices; 19: trainIds, scored on the NTHU trainIds)."""
    from cbst_jax.labels import CITYSCAPES_ID_TO_NTHU13, CITYSCAPES_ID_TO_TRAINID

    table = CITYSCAPES_ID_TO_NTHU13 if num_classes == 13 else CITYSCAPES_ID_TO_TRAINID
    cm = np.zeros((num_classes, num_classes), np.int64)
    for label_file in sorted((nthu_root / "Rome" / "Labels" / "Test").glob("*_eval.png")):
        image = np.asarray(Image.open(nthu_root / "Rome" / "Images" / "Test" /
                                      label_file.name.replace("_eval.png", ".jpg")).convert("RGB"))
        gt = table[np.asarray(Image.open(label_file))]
        pred = predict(image)
        keep = gt != 255
        np.add.at(cm, (gt[keep].astype(int), pred[keep].astype(int)), 1)
    inter = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - inter
    return np.array([inter[c] / union[c] if union[c] else np.nan for c in classes])  # nan: absent, never predicted


def test_a_19_class_source_model_on_nthu_with_the_class_map(tmp_path):
    """experiments.cityscapes_nthu from a 19-class Cityscapes source model with
    model.init_class_map=nthu13: the source row is the 19-class model's argmax over the 13 NTHU
    classes, scored here with numpy; the log and results.md say where the source model came from."""
    import jax

    from fixtures_layouts import make_nthu
    from cbst_jax.labels import NTHU13_TRAINIDS

    make_nthu(tmp_path / "nthu", cities=("Rome",), n_train=2, n_test=3, size=SIZE)
    make_cityscapes(tmp_path / "cityscapes", n_train=2, n_val=1, size=SIZE)
    module, variables = save_weights(tmp_path / "cs19.npz", "demo_segnet", 19, seed=5)
    work = tmp_path / "work"
    res = cli("experiments.cityscapes_nthu", f"--workdir={work}", f"--config.source.root={tmp_path / 'cityscapes'}",
              f"--config.target.root={tmp_path / 'nthu'}", "--config.target.city=Rome",
              "--config.model.name=demo_segnet", f"--config.model.init={tmp_path / 'cs19.npz'}",
              "--config.model.init_is_source_model=True", "--config.model.init_class_map=nthu13",
              "--config.methods=source_only", "--config.self_training.rounds=0", "--config.evaluate.flip=False",
              f"--config.input.crop={SIZE}", f"--config.input.eval_size={SIZE}", "--config.input.batch_size=2",
              "--config.input.eval_batch_size=2", "--config.input.workers=1")
    assert res.returncode == 0, res.stderr[-3000:]
    origin = (f"source model: imported from {tmp_path / 'cs19.npz'} (its classifier's rows of the 13 NTHU classes) "
              f"(model.init_is_source_model=True)")
    assert origin in res.stdout.splitlines() and origin in (work / "seed_0" / "results.md").read_text()
    row = json.loads((work / "seed_0" / "ledger.json").read_text())["stages"]["source"]["eval"]
    apply = jax.jit(lambda x: module.apply(variables, x, train=False))
    restricted = lambda image: np.argmax(np.asarray(apply(image[None]))[0][..., list(NTHU13_TRAINIDS)], -1)
    np.testing.assert_allclose(row["iou"], nthu_iou(restricted, tmp_path / "nthu"), rtol=1e-6)


def test_evaluate_a_19_class_file_on_nthu_scores_the_13_classes(tmp_path, capsys):
    """cbst-evaluate --weights (19 classes) --dataset nthu: 13 columns and their mean, counted
    here with numpy from the file's own 19-class argmax; without --city: one line naming the flag."""
    import jax

    from fixtures_layouts import make_nthu
    from cbst_jax.cli import evaluate
    from cbst_jax.labels import NTHU13_CLASSES, NTHU13_TRAINIDS

    make_nthu(tmp_path / "nthu", cities=("Rome",), n_train=1, n_test=3, size=SIZE)
    module, variables = save_weights(tmp_path / "w19.npz", "demo_segnet", 19, seed=7)
    args = ["--weights", str(tmp_path / "w19.npz"), "--dataset", "nthu", "--root", str(tmp_path / "nthu")]
    assert evaluate.main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --dataset nthu needs --city: one of Rome, Rio, Tokyo, Taipei"]
    assert evaluate.main(args + ["--city", "Rome", "--eval-size", f"{SIZE[0]},{SIZE[1]}", "--scales", "1.0",
                                 "--no-flip", "--out", str(tmp_path / "eval")]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["method", *NTHU13_CLASSES, "mIoU"]
    apply = jax.jit(lambda x: module.apply(variables, x, train=False))
    iou = nthu_iou(lambda image: np.argmax(np.asarray(apply(image[None]))[0], -1), tmp_path / "nthu", 19,
                   NTHU13_TRAINIDS)
    row = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["row"]
    assert row["miou"] == pytest.approx(np.nanmean(iou), abs=1e-9)
    cells = next(line for line in table.splitlines() if line.startswith("| w19 |")).strip("|").split("|")[1:]
    assert [c.strip() for c in cells] == [f"{100 * v:.1f}" if v == v else "n/a" for v in (*iou, np.nanmean(iou))]


def test_evaluating_cityscapes_without_gtfine_says_which_archive(tmp_path, capsys):
    from cbst_jax.cli import evaluate

    make_cityscapes(tmp_path / "cs", n_train=1, n_val=1, size=SIZE)
    import shutil

    shutil.rmtree(tmp_path / "cs" / "gtFine" / "val")
    save_weights(tmp_path / "w.npz", "demo_segnet", 19)
    assert evaluate.main(["--weights", str(tmp_path / "w.npz"), "--dataset", "cityscapes", "--root",
                          str(tmp_path / "cs")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cityscapes: {tmp_path / 'cs' / 'gtFine' / 'val'} is not "
                                                   f"a directory; expected layout: ")
    assert lines[0].endswith(f"; the val split is read with its labels here (e.g. to evaluate on it): extract "
                             f"gtFine_trainvaltest.zip into {tmp_path / 'cs'}")
    assert "labelled=False" not in lines[0]
