"""cbst_jax.infer on image files of varied sizes: fixed-shape batches (two compiled programs),
outputs equal to a direct model call on the same fitted input, unreadable files skipped and
counted, atomic outputs, the comparison figure, and one-line errors."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from cbst_jax import infer, labels, models

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
    summary = infer.run([str(tmp_path / "dl.npz")], [str(photos / "a.jpg"), str(photos / "sub/c.jpg")], str(out),
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
    summary = infer.run([str(tmp_path / "src.npz"), str(tmp_path / "cbst.npz")], [str(photos / "a.jpg"),
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
    fig = infer.comparison_figure([image], maps, tile_width=40, gap=2)
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
