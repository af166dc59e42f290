"""cbst-infer (cbst_jax.cli.infer over cbst_jax.segment_images) on image files of varied sizes: fixed-shape
batches (two compiled programs),
outputs equal to a direct model call on the same fitted input, unreadable files skipped and
counted, atomic outputs, the comparison figure, and one-line errors."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from cbst_jax import labels, models
from cbst_jax import segment_images as infer_lib
from cbst_jax.cli import infer

CANVAS = (32, 48)
SIZES = {"a": (30, 50), "b": (20, 24), "sub/c": (45, 21), "sub/deeper/d": (33, 57)}  # (h, w); c is portrait


def save_weights(path, name="demo_segnet", num_classes=19, seed=0, normalization="unit"):
    module = models.get_model(name, num_classes, normalization=normalization)
    variables = jax.device_get(module.init(jax.random.key(seed, impl="rbg"), np.zeros((1, 32, 32, 3), np.uint8)))
    models.save_variables(path, variables, models.make_metadata(name, num_classes, normalization))
    return module, variables


@pytest.fixture()
def photos(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    for name, (h, w) in SIZES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        ext = ".png" if name == "b" else ".jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / (name + ext))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image")
    return folder


def expected_fit(h, w, canvas):
    """The fitted size worked out independently: portrait images go to the transposed canvas,
    then the largest size of the same aspect ratio inside it."""
    H, W = canvas if (h > w) == (canvas[0] > canvas[1]) else canvas[::-1]
    scale = min(H / h, W / w)
    return (H, W), (min(H, int(h * scale + 0.5)), min(W, int(w * scale + 0.5)))


def direct_labels(module, variables, image, canvas):
    """Reference: PIL bilinear fit, top-left on a zero canvas, one plain model call, argmax,
    crop, PIL nearest back to the image size."""
    h, w = image.shape[:2]
    bucket, (fh, fw) = expected_fit(h, w, canvas)
    fitted = np.asarray(Image.fromarray(image).resize((fw, fh), Image.BILINEAR))
    x = np.zeros((1, *bucket, 3), np.uint8)
    x[0, :fh, :fw] = fitted
    logits = np.asarray(module.apply(variables, x, train=False))[0]
    label = np.argmax(logits, -1).astype(np.uint8)[:fh, :fw]
    return np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))


def test_folder_of_varied_sizes_matches_direct_model_calls(tmp_path, photos, capsys):
    module, variables = save_weights(tmp_path / "w.npz")
    out = tmp_path / "out"
    status = infer.main(["--weights", str(tmp_path / "w.npz"), "--out", str(out), "--canvas", "32,48",
                         "--batch-size", "3", str(photos)])
    err = capsys.readouterr().err
    assert status == 1  # one unreadable file
    assert f"skipped {photos / 'broken.jpg'}: " in err
    assert "4 of 5 images segmented" in err and "1 unreadable (skipped)" in err
    summary = json.loads((out / "infer_summary.json").read_text())
    assert (summary["images"], summary["segmented"], len(summary["failed"])) == (5, 4, 1)
    assert summary["failed"][0]["file"] == str(photos / "broken.jpg")
    assert summary["batch_size"] == 8  # rounded up to a multiple of the 8 devices
    assert summary["weights"][0]["compiled_programs"] == 2  # landscape and portrait canvas, not one per size
    assert not [f for f in out.rglob("*") if ".tmp" in f.name]
    for name, (h, w) in SIZES.items():
        ext = ".png" if name == "b" else ".jpg"
        image = np.asarray(Image.open(photos / (name + ext)).convert("RGB"))
        got = np.asarray(Image.open(out / f"{name}_trainid.png"))
        assert got.shape == (h, w) and got.dtype == np.uint8
        want = direct_labels(module, variables, image, CANVAS)
        assert np.array_equal(got, want), name
        color = np.asarray(Image.open(out / f"{name}_color.png"))
        assert np.array_equal(color, labels.CITYSCAPES_PALETTE[got])
        assert np.asarray(Image.open(out / f"{name}_overlay.jpg")).shape == (h, w, 3)
    assert not (out / "broken_trainid.png").exists() and not (out / "comparison.png").exists()


def test_stride_8_model_against_torch_upsampling(tmp_path, photos):
    torch = pytest.importorskip("torch")
    module, variables = save_weights(tmp_path / "dl.npz", "deeplabv2_resnet_small", 19, seed=3,
                                     normalization="caffe")
    out = tmp_path / "out"
    summary = infer_lib.run([str(tmp_path / "dl.npz")], [str(photos / "a.jpg"), str(photos / "sub/c.jpg")], str(out),
                        canvas=CANVAS, progress=False)
    assert summary["segmented"] == 2 and summary["weights"][0]["normalization"] == "caffe"
    for name in ("a", "sub/c"):
        image = np.asarray(Image.open(photos / f"{name}.jpg").convert("RGB"))
        h, w = image.shape[:2]
        bucket, (fh, fw) = expected_fit(h, w, CANVAS)
        x = np.zeros((1, *bucket, 3), np.uint8)
        x[0, :fh, :fw] = np.asarray(Image.fromarray(image).resize((fw, fh), Image.BILINEAR))
        logits = np.array(module.apply(variables, x, train=False))  # (1, h/8+1, w/8+1, C)
        up = torch.nn.functional.interpolate(torch.from_numpy(logits).permute(0, 3, 1, 2), size=bucket,
                                             mode="bilinear", align_corners=True)
        label = up.argmax(1)[0].numpy().astype(np.uint8)[:fh, :fw]
        want = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
        got = np.asarray(Image.open(out / f"{os.path.basename(name)}_trainid.png"))
        assert got.shape == (h, w)
        assert (got == want).mean() > 0.995, (name, (got == want).mean())


def test_several_models_and_ground_truth_give_the_comparison_figure(tmp_path, photos):
    save_weights(tmp_path / "src.npz", seed=0)
    save_weights(tmp_path / "cbst.npz", seed=1)
    gt = tmp_path / "gt"
    gt.mkdir()
    Image.fromarray(np.full((30, 50), 13, np.uint8)).save(gt / "a.png")  # a car everywhere
    out = tmp_path / "cmp"
    summary = infer_lib.run([str(tmp_path / "src.npz"), str(tmp_path / "cbst.npz")], [str(photos / "a.jpg"),
                        str(photos / "b.png"), str(photos / "sub")], str(out), canvas=CANVAS,
                        names=["NoAdapt", "CBST"], gt_dir=str(gt), figure_rows=3, progress=False)
    assert summary["segmented"] == 4 and summary["failed"] == []
    for model in ("NoAdapt", "CBST"):
        assert (out / model / "a_trainid.png").exists() and (out / model / "deeper/d_color.png").exists()
    a0 = np.asarray(Image.open(out / "NoAdapt/a_trainid.png"))
    a1 = np.asarray(Image.open(out / "CBST/a_trainid.png"))
    assert not np.array_equal(a0, a1)  # two different models
    fig = np.asarray(Image.open(out / "comparison.png"))
    tile = 320
    assert fig.shape[1] == 4 * tile + 3 * 4  # image | ground truth | NoAdapt | CBST
    # row 1 (a, 30x50 -> 320 wide): the ground-truth tile is all car-blue, the model tiles its labels
    y0 = 18 + 4
    gt_tile = fig[y0:y0 + round(30 * tile / 50), tile + 4:2 * tile + 4]
    assert (gt_tile == labels.CITYSCAPES_PALETTE[13]).all()
    model_tile = fig[y0:y0 + round(30 * tile / 50), 2 * (tile + 4):3 * tile + 2 * 4]
    want = labels.CITYSCAPES_PALETTE[np.asarray(Image.fromarray(a0).resize((tile, round(30 * tile / 50)),
                                                                            Image.NEAREST))]
    assert np.array_equal(model_tile, want)


def test_comparison_figure_layout_without_ground_truth():
    image = np.zeros((10, 20, 3), np.uint8)
    maps = {"ST": [np.zeros((10, 20), np.uint8)], "CBST": [np.full((10, 20), 255, np.uint8)]}
    fig = infer_lib.comparison_figure([image], maps, tile_width=40, gap=2)
    assert fig.shape == (18 + 2 + 20, 3 * 40 + 2 * 2, 3)  # header, gap, one row
    assert (fig[20:40, 42:82] == labels.CITYSCAPES_PALETTE[0]).all() and (fig[20:40, 84:124] == 0).all()


def test_bad_weights_and_inputs_are_one_line_errors(tmp_path, photos, capsys):
    save_weights(tmp_path / "ok.npz")
    module = models.get_model("demo_segnet", 19)
    variables = jax.device_get(module.init(jax.random.key(0, impl="rbg"), np.zeros((1, 32, 32, 3), np.uint8)))
    models.save_variables(tmp_path / "backbone.npz", variables, models.make_metadata("demo_segnet", None, "unit"))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--weights", str(tmp_path / "backbone.npz")], "backbone.npz: a backbone-only init"),
        (["--weights", str(tmp_path / "notes.txt")], "notes.txt: not a converted-weights .npz (a text file)"),
        (["--weights", str(tmp_path / "missing.npz")], "missing.npz: weights file not found"),
        (["--weights", str(tmp_path / "ok.npz"), "--names", "a,b"], "--names gives 2 names for 1 weights files"),
    ]
    for extra, message in cases:
        status = infer.main(extra + ["--out", str(tmp_path / "o"), "--canvas", "32,48", str(photos / "a.jpg")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and lines == [f"error: {lines[0][7:]}"] and message in lines[0], (extra, lines)
    status = infer.main(["--weights", str(tmp_path / "ok.npz"), "--out", str(tmp_path / "o"), str(tmp_path / "empty")])
    assert status == 2 and "no jpg/jpeg/png images in" in capsys.readouterr().err
    status = infer.main(["--weights", str(tmp_path / "ok.npz"), "--out", str(tmp_path / "o"), str(tmp_path / "nope")])
    assert status == 2 and "nope: no such file or folder" in capsys.readouterr().err


# ---------------------------------------------------------------- issue 23

def test_inputs_are_checked_before_the_output_folder_exists(tmp_path, photos, capsys):
    """A named file that is not an image, or is missing: one line, exit 2, nothing created."""
    save_weights(tmp_path / "ok.npz")
    out = tmp_path / "o"
    for named, message in ((photos / "notes.txt", f"error: {photos / 'notes.txt'}: not an image; expected "
                                                 f"jpg/jpeg/png images or folders of them"),
                           (photos / "gone.jpg", f"error: {photos / 'gone.jpg'}: no such file or folder")):
        status = infer.main(["--weights", str(tmp_path / "ok.npz"), "--out", str(out), str(photos / "a.jpg"),
                             str(named)])
        assert status == 2 and capsys.readouterr().err.strip().splitlines() == [message]
        assert not out.exists()
    (tmp_path / "file").write_text("")
    assert infer.main(["--weights", str(tmp_path / "ok.npz"), "--out", str(tmp_path / "file"),
                       str(photos / "a.jpg")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path / 'file'}: a file, expected a folder"


def test_defaults_follow_the_settings_the_weights_file_records(tmp_path, photos, capsys):
    """A file recording its run's evaluation settings (canvas 32x48, flip on): infer without
    --canvas/--flip uses them; the labels are the flip-averaged softmax's argmax, computed here."""
    module = models.get_model("demo_segnet", 19, normalization="unit")
    variables = jax.device_get(module.init(jax.random.key(4, impl="rbg"), np.zeros((1, 32, 32, 3), np.uint8)))
    record = {"canvas": [32, 48], "scales": [1.0], "flip": True}
    models.save_variables(tmp_path / "run.npz", variables,
                          models.make_metadata("demo_segnet", 19, "unit", inference=record))
    out = tmp_path / "out"
    assert infer.main(["--weights", str(tmp_path / "run.npz"), "--out", str(out), str(photos / "a.jpg")]) == 0
    assert ("canvas 32x48, scales 1, flip on (canvas, scales, flip: the run's evaluation settings, recorded in "
            "the weights file)") in capsys.readouterr().err
    summary = json.loads((out / "infer_summary.json").read_text())
    assert (summary["canvas"], summary["scales"], summary["flip"]) == ([32, 48], [1.0], True)
    image = np.asarray(Image.open(photos / "a.jpg").convert("RGB"))
    bucket, (fh, fw) = expected_fit(*image.shape[:2], (32, 48))
    x = np.zeros((1, *bucket, 3), np.uint8)
    x[0, :fh, :fw] = np.asarray(Image.fromarray(image).resize((fw, fh), Image.BILINEAR))

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    logits = np.asarray(module.apply(variables, x, train=False), np.float64)[0]
    flipped = np.asarray(module.apply(variables, x[:, :, ::-1], train=False), np.float64)[0][:, ::-1]
    label = np.argmax(softmax(logits) + softmax(flipped), -1).astype(np.uint8)[:fh, :fw]
    want = np.asarray(Image.fromarray(label).resize(image.shape[1::-1], Image.NEAREST))
    got = np.asarray(Image.open(out / "a_trainid.png"))
    assert got.shape == want.shape and (got == want).mean() > 0.995
    no_flip = np.argmax(logits, -1).astype(np.uint8)[:fh, :fw]
    assert not np.array_equal(label, no_flip)  # the flip changes labels here, so the check above can fail


def test_settings_rules():
    """Flags win; files that record nothing get the old defaults; files that disagree need flags."""
    def model(record=None):
        meta = {"inference": record} if record else {}
        return infer_lib.Model("m", "m.npz", None, None, 19, None, meta)

    a = {"canvas": [32, 48], "scales": [0.9, 1.0], "flip": True}
    b = {"canvas": [64, 64], "scales": [1.0], "flip": False}
    assert infer_lib.run_settings([model()])[:3] == ((1024, 2048), (1.0,), False)
    assert infer_lib.run_settings([model(a), model()])[:3] == ((32, 48), (0.9, 1.0), True)
    assert infer_lib.run_settings([model(a)], canvas=(16, 16), flip=False)[:3] == ((16, 16), (0.9, 1.0), False)
    assert infer_lib.run_settings([model(a), model(b)], (8, 8), (1.0,), True) == ((8, 8), (1.0,), True, "as given")
    with pytest.raises(infer_lib.InferError, match=r"the weights files record different evaluation settings .*; "
                                               r"give --scales, --flip$"):
        infer_lib.run_settings([model(a), model(b)], canvas=(8, 8))


@pytest.mark.parametrize("record", [{"canvas": [32], "scales": [1.0], "flip": True},
                                    {"canvas": [32, 48], "scales": [], "flip": True},
                                    {"canvas": [32, 48], "scales": [1.0], "flip": "yes"},
                                    {"canvas": [32, 48], "scales": [1.0]}])
def test_a_malformed_settings_record_is_refused(tmp_path, record):
    with pytest.raises(models.WeightFileError, match=r"w.npz: bad weights metadata: inference .*expected"):
        models.save_variables(tmp_path / "w.npz", {"params": {}}, models.make_metadata("demo_segnet", 19, "unit",
                                                                                       inference=record))
