"""TFDS builders: build the fixtures without TensorFlow and read them back as open_dataset records."""
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from cbst_jax.data import DatasetError, open_dataset  # noqa: E402
from cbst_jax.data.tfds_builders import BUILDERS, build  # noqa: E402
from fixtures_layouts import (make_bdd100k, make_cityscapes, make_gta5, make_nthu, make_synthia,  # noqa: E402
                              write_list_file)

FIXTURES = {
    "gta5": lambda root: make_gta5(root, n=3, mismatched=1),
    "cityscapes": lambda root: make_cityscapes(root, n_train=3, n_val=2, n_test=1),
    "synthia": lambda root: make_synthia(root, n=2),
    "bdd100k": lambda root: make_bdd100k(root, layout="10k"),
    "nthu": lambda root: make_nthu(root, cities=("Rio",)),
}
OPTIONS = {"nthu": {"city": "Rio"}}
pytestmark = pytest.mark.filterwarnings("ignore::cbst_jax.data.io.DatasetWarning")  # the resized GTA5 label


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every dataset's fixture folder, built once into one TFDS data_dir."""
    base = tmp_path_factory.mktemp("tfds")
    for name, make in FIXTURES.items():
        make(base / name)
        build(name, base / name, base / "data", config="rio" if name == "nthu" else None)
    return base


def test_builds_and_reads_without_tensorflow(built):
    assert "tensorflow" not in sys.modules
    assert sorted(p.name for p in (built / "data").iterdir() if p.name.startswith("cbst_")) == \
        sorted(f"cbst_{n}" for n in BUILDERS)
    assert any((built / "data/cbst_cityscapes/1.0.0").glob("*.array_record-*"))


@pytest.mark.parametrize("name,split", [("gta5", "train"), ("cityscapes", "val"), ("cityscapes", "test"),
                                        ("synthia", "train"), ("bdd100k", "validation"), ("bdd100k", "test"),
                                        ("nthu", "train"), ("nthu", "test")])
def test_round_trip_equals_folder_records(built, name, split):
    options = OPTIONS.get(name, {})
    folder = open_dataset(name, built / name, split, **options)
    stored = open_dataset(name, "tfds:" + str(built / "data"), split, **options)
    assert stored.names == folder.names and len(stored) == len(folder)
    assert (stored.num_classes, stored.has_labels) == (folder.num_classes, folder.has_labels)
    for i in range(len(folder)):
        a, b = folder[i], stored[i]
        assert a.keys() == b.keys() and a["name"] == b["name"]
        assert b["image"].dtype == np.uint8 and np.array_equal(a["image"], b["image"])
        if "label" in a:
            assert b["label"].dtype == np.uint8 and np.array_equal(a["label"], b["label"])


def test_options_on_built_datasets(built):
    data = built / "data"
    # a built data_dir is detected without the tfds: prefix; a version dir works too
    val16 = open_dataset("cityscapes", data, "validation", num_classes=16)
    folder16 = open_dataset("cityscapes", built / "cityscapes", "val", num_classes=16)
    assert np.array_equal(val16[1]["label"], folder16[1]["label"])
    version_dir = data / "cbst_gta5" / "1.0.0"
    gta = open_dataset("gta5", version_dir, "train")
    assert gta.names == ["00001", "00002", "00003"] and gta[0]["label"].shape == (32, 64)
    lst = write_list_file(built / "cs.lst", ["bochum/bochum_000001_000038", "aachen_000000_000019"])
    subset = open_dataset("cityscapes", data, "train", list_file=lst, labelled=False)
    assert subset.names == ["bochum_000001_000038", "aachen_000000_000019"] and "label" not in subset[0]
    rio13 = open_dataset("nthu", data, "validation", city="rio", num_classes=13)
    assert rio13.num_classes == 13 and set(np.unique(rio13[0]["label"])) <= set(range(13)) | {255}
    meta = tfds.builder_from_directory(str(version_dir)).info.metadata
    assert meta["stats"]["train"]["resized_labels"] == 1 and meta["stats"]["train"]["resized_label_names"] == ["00001"]


def test_tfds_errors(built):
    data = built / "data"
    with pytest.raises(DatasetError, match=r"no built TFDS dataset at .*cbst_synthia/lanemarking_road"):
        open_dataset("synthia", data, "train", lanemarking_as_road=True)
    with pytest.raises(DatasetError, match="label_encoding='trainid' but .* built with 'labelid'"):
        open_dataset("nthu", data, "test", city="Rio", label_encoding="trainid")
    with pytest.raises(DatasetError, match="split 'test' has no labels"):
        open_dataset("bdd100k", data, "test", labelled=True)
    with pytest.raises(DatasetError, match="num_classes=19, the built dataset has 16 classes"):
        open_dataset("synthia", data, "train", num_classes=19)
    with pytest.raises(DatasetError, match="holds TFDS dataset 'cbst_gta5', expected cbst_bdd100k"):
        open_dataset("bdd100k", data / "cbst_gta5" / "1.0.0", "train")


def test_cityscapes_builds_the_splits_that_exist(tmp_path):
    written = make_cityscapes(tmp_path / "cs", n_train=0, n_val=2)  # val only, as for evaluation
    assert not (tmp_path / "cs/leftImg8bit/train").exists()
    build("cityscapes", tmp_path / "cs", tmp_path / "data")
    val = open_dataset("cityscapes", tmp_path / "data", "val")
    assert val.names == written["val"] and val.has_labels
    folder = open_dataset("cityscapes", tmp_path / "cs", "val", num_classes=13)
    assert np.array_equal(open_dataset("cityscapes", tmp_path / "data", "val", num_classes=13)[1]["label"],
                          folder[1]["label"])
    with pytest.raises(DatasetError, match=r"split 'train' not in .* \(has validation\)"):
        open_dataset("cityscapes", tmp_path / "data", "train")
    (tmp_path / "other" / "gtFine").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no leftImg8bit/train, val or test folder under"):
        build("cityscapes", tmp_path / "other", tmp_path / "data2")
    with pytest.raises(DatasetError, match="missing is not a folder holding the extracted dataset"):
        build("cityscapes", tmp_path / "missing", tmp_path / "data2")


def test_builtin_list_on_a_built_dataset(built):
    from cbst_jax.data import lists

    stems = [line.split("/")[3][: -len("_leftImg8bit.png\tgtFine")] for line in
             open(lists.find("cityscapes_train_ClsConfSet")).read().splitlines()]
    assert len(stems) == 505
    with pytest.raises(DatasetError, match="builtin:cityscapes_train_ClsConfSet line 1: .*aachen_000010_000019.* "
                                           "is not in this cityscapes split"):
        open_dataset("cityscapes", built / "data", "train", list_file="builtin:cityscapes_train_ClsConfSet")


def test_corrupt_image_fails_the_build_naming_it(tmp_path):
    make_gta5(tmp_path / "gta5", n=2)
    path = tmp_path / "gta5/images/00002.png"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"images/00002.png: corrupt or truncated"):
        build("gta5", tmp_path / "gta5", tmp_path / "data")
