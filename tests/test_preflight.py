"""Every input a run cannot use is refused before its workdir exists (issue 18 items 1 and 3,
issue 22 item 5): each phase's split against its batch (counts computed by hand here), the
labelling batch against the threshold histograms, the evaluation canvas against the images, a
target train split that is the evaluation split, a bad seed list, and every image or label file
cut short (PNG IEND / JPEG EOI, checked against what Pillow makes of the same bytes). Most checks
run in-process; two run the command line on fixture folders in the official layouts (exit 2,
one line, no workdir)."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fixtures_layouts import make_cityscapes, make_nthu  # noqa: E402

from cbst_jax import config_lib  # noqa: E402
from cbst_jax.config_lib import ConfigError  # noqa: E402
from cbst_jax.data.io import DatasetError  # noqa: E402


def synthetic_config(**overrides):
    from experiments.configs import synthetic

    cfg = synthetic.get_config()
    cfg.methods = "source_only,cbst"
    cfg.synthetic.num_source, cfg.synthetic.num_target_train, cfg.synthetic.num_target_val = 32, 16, 8
    cfg.input.batch_size = cfg.source_training.batch_size = 8
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


# ---------------------------------------------------------------------------- batches
@pytest.mark.parametrize("sampler, share, portion, num_target, refused, words", [
    # pooled: round 0 draws from int(32 * 0.1) = 3 source + the target images; batch 8
    ("pooled", 0.5, 0.1, 4, True, ["3 source images", "the 4 target train images", "7 in all"]),
    ("pooled", 0.5, 0.1, 5, False, []),
    # paired, half the batch from each side: 4 target images a batch
    ("paired", 0.5, 1.0, 3, True, ["takes 4 target train images", "holds 3; expected at least 4"]),
    ("paired", 0.5, 1.0, 4, False, []),
    # paired, all 8 rows source: round 0 uses int(32 * 0.2) = 6 source images
    ("paired", 1.0, 0.2, 16, True, ["takes 8 source images", "round 0 uses 6", "expected at least 8"]),
    ("paired", 1.0, 0.25, 16, False, []),
])
def test_round_batches_against_the_splits(sampler, share, portion, num_target, refused, words):
    from cbst_jax.preflight import check_phase_sizes

    cfg = synthetic_config(**{"input.sampler": sampler, "input.source_share": share,
                              "input.source_portion": (portion, 0.0, portion)})
    if not refused:
        check_phase_sizes(cfg, 32, num_target)
        return
    with pytest.raises(ConfigError) as e:
        check_phase_sizes(cfg, 32, num_target)
    assert str(e.value).startswith("config.input.batch_size=8: ") and "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_source_phase_batch_against_the_source_split():
    from cbst_jax.preflight import check_phase_sizes

    cfg = synthetic_config(**{"source_training.batch_size": 16, "self_training.rounds": 0})
    with pytest.raises(ConfigError, match=r"config.source_training.batch_size=16: the source split of "
                                          r"synthetic/source holds 15 images"):
        check_phase_sizes(cfg, 15, 16)
    check_phase_sizes(cfg, 16, 16)
    cfg.source_training.batch_size = 0  # the input batch then, named as such
    with pytest.raises(ConfigError, match=r"config.input.batch_size=8: the source split .* holds 7 images"):
        check_phase_sizes(cfg, 7, 16)
    cfg.model.init_is_source_model = True  # no source phase: nothing to fill
    check_phase_sizes(cfg, 1, 16)


def test_adaptation_split_after_leaving_out_evaluation_images():
    from cbst_jax.data.splits import Splits
    from cbst_jax.preflight import check_adaptation_split

    cfg = synthetic_config()
    data = Splits(range(32), range(3), range(8), [], None, None,
                          {"excluded_train_images": 13})
    with pytest.raises(ConfigError, match="holds 3; expected at least 4 .after leaving out the 13 target train"):
        check_adaptation_split(cfg, data)


def test_labelling_batch_against_the_histograms():
    """2**30 pixels a batch at most: 512 images of 1024x2048; the batch is rounded up to the 8 devices."""
    import jax

    from cbst_jax.preflight import check_batches

    assert jax.device_count() == 8
    cfg = synthetic_config(**{"input.eval_size": (1024, 2048), "input.eval_batch_size": 512})
    check_batches(cfg)
    cfg.input.eval_batch_size = 505  # -> 512
    check_batches(cfg)
    cfg.input.eval_batch_size = 513  # -> 520
    with pytest.raises(ConfigError, match=r"eval_batch_size=513: a labelling batch of 520 images .* holds "
                                          r"1090519040 pixels.* at most 512 images"):
        check_batches(cfg)
    cfg.methods = "source_only"  # nothing is labelled
    check_batches(cfg)


def test_canvas_and_splits_in_preflight(monkeypatch):
    import importlib.util

    from cbst_jax.preflight import preflight

    preflight(synthetic_config())
    with pytest.raises(ConfigError, match=r"config.input.eval_size=\(32, 128\): smaller than a target evaluation "
                                          r"image \(64x128\)"):
        preflight(synthetic_config(**{"input.eval_size": (32, 128)}))
    with pytest.raises(ConfigError, match="config.target.train_split='val' is also config.target.eval_split: every "
                                          "one of its 8 images"):
        preflight(synthetic_config(**{"target.train_split": "val"}))
    preflight(synthetic_config(**{"target.train_split": "val", "target.allow_eval_overlap": True}))
    with pytest.raises(ConfigError, match="holds 1; expected at least 4"):
        preflight(synthetic_config(**{"synthetic.num_target_train": 1}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grain" else real(name, *a))
    with pytest.raises(ConfigError, match="worker_kind='processes': needs grain"):
        preflight(synthetic_config(**{"input.worker_kind": "processes"}))


def test_no_image_left_after_the_overlap_exclusion():
    """A train split whose every image is an evaluation image (another name, the same pixels):
    one line instead of an IndexError."""
    from cbst_jax.data.overlap import without_eval_overlap

    class Split:
        def __init__(self, images, prefix):
            self.images, self.names = images, [f"{prefix}{i}" for i in range(len(images))]

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return {"image": self.images[i]}

    images = [np.full((4, 4, 3), i, np.uint8) for i in range(3)]
    with pytest.raises(DatasetError, match="every one of the 3 target train images is also an evaluation image"):
        without_eval_overlap(Split(images, "t"), Split(images[::-1], "e"), progress=False)
    adapt, report = without_eval_overlap(Split(images, "t"), Split(images, "e"), allow_overlap=True, progress=False)
    assert len(adapt) == 3 and report["eval_images_in_train"] == 3


def test_seed_lists():
    from cbst_jax.config_lib import parse_seeds

    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds(str(2**63 - 1)) == [2**63 - 1]
    for text, message in (("-1", "-1 is not a seed"), (str(2**63), f"{2**63} is not a seed"),
                          ("0,1,0", "seed 0 is listed twice"), ("a", "expected a comma-separated list")):
        with pytest.raises(config_lib.ConfigError, match=message):
            parse_seeds(text)


# ---------------------------------------------------------------------------- files cut short
def _encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _pillow_decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - whatever Pillow raises on a broken file
        return False


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncation_finds_every_cut(tmp_path, fmt):
    """A whole file passes; a cut (each of 1-39 bytes, then every 7th up to all but 16) is named,
    including every cut that Pillow cannot decode; bytes appended after the end marker are accepted, as decoders do."""
    from cbst_jax.data.io import truncation

    whole = _encoded(fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(whole)
    assert _pillow_decodes(whole) and truncation(str(path)) is None
    undecodable, cuts = 0, sorted(set(range(1, 40)) | set(range(40, len(whole) - 16, 7)))
    for cut in cuts:
        path.write_bytes(whole[:-cut])
        problem = truncation(str(path))
        assert problem is not None and problem.startswith(f"{path}: truncated {fmt}"), cut
        undecodable += not _pillow_decodes(whole[:-cut])
    assert undecodable > len(cuts) // 2  # the cuts include many a decoder rejects
    path.write_bytes(whole + b"\0" * 100)
    assert truncation(str(path)) is None
    path.write_bytes(b"")
    assert truncation(str(path)) == f"{path}: empty file"
    assert truncation(str(tmp_path / "gone.png")) == f"{tmp_path / 'gone.png'}: file not found"


def test_damaged_file_of_a_folder_split(tmp_path):
    from cbst_jax.data import open_dataset

    make_nthu(tmp_path, cities=("Rome",), n_train=3, n_test=2)
    test = open_dataset("nthu", str(tmp_path), "test", city="Rome")
    train = open_dataset("nthu", str(tmp_path), "train", city="Rome", labelled=False)
    assert test.damaged_file() is None and train.damaged_file() is None
    last_label = tmp_path / "Rome" / "Labels" / "Test" / "pic_001_eval.png"
    last_label.write_bytes(last_label.read_bytes()[:-5])
    assert test.damaged_file() == f"{last_label}: truncated PNG (no IEND chunk at its end: " \
                                  f"{last_label.stat().st_size} bytes, cut short?)"
    image = tmp_path / "Rome" / "Images" / "Train" / "pic_002.jpg"
    image.write_bytes(image.read_bytes()[:-300])
    assert train.damaged_file().startswith(f"{image}: truncated JPEG")


def test_an_image_larger_than_the_canvas_inside_a_run_is_one_line():
    from cbst_jax.data.pipeline import EvalIterator

    class Split:
        names = ["small", "large"]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": np.zeros((8 + 8 * i, 8, 3), np.uint8), "label": np.zeros((8 + 8 * i, 8), np.uint8)}

    with pytest.raises(DatasetError, match=r"record 1 \(large\) is 16x8, larger than the 8x8 canvas .*eval_size"):
        list(EvalIterator(Split(), batch_size=2, canvas=(8, 8), prefetch=0))


# ---------------------------------------------------------------------------- command line
def cli(workdir, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=ROOT)
    env.pop("CBST_JAX_FAILPOINT", None)
    return subprocess.run([sys.executable, "-m", "experiments.cityscapes_nthu", f"--workdir={workdir}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def one_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (res.returncode, res.stderr)
    return lines[0]


def test_cityscapes_nthu_refused_before_the_workdir(tmp_path):
    """Issue 18 item 1 as reported: the recipe's source batch of 16 on a Cityscapes folder of 4
    train images; issue 22 item 5: the last NTHU test label cut short. One line each, exit 2,
    no workdir."""
    make_cityscapes(tmp_path / "cityscapes", n_train=4, n_val=1)
    make_nthu(tmp_path / "nthu", cities=("Rome",), n_train=3, n_test=2)
    workdir = tmp_path / "run"
    roots = [f"--config.source.root={tmp_path / 'cityscapes'}", f"--config.target.root={tmp_path / 'nthu'}",
             "--config.target.city=Rome", "--config.model.init=none"]
    line = one_line(cli(workdir, *roots))
    assert line == ("error: config.source_training.batch_size=16: the source split of cityscapes holds 4 images, "
                    "fewer than one batch of the source phase; expected at least 16 images, or a smaller batch")
    assert not workdir.exists()
    last_label = tmp_path / "nthu" / "Rome" / "Labels" / "Test" / "pic_001_eval.png"
    last_label.write_bytes(last_label.read_bytes()[:-20])
    line = one_line(cli(workdir, *roots, "--config.source_training.batch_size=2", "--config.input.batch_size=2"))
    assert line.startswith(f"error: {last_label}: truncated PNG"), line
    assert not workdir.exists()
