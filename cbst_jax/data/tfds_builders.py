"""TFDS builders for the five datasets, and ``open_tfds`` to read what they build.

Each builder's manual_dir is the extracted official folder; ``_generate_examples`` reuses the
folder readers, so a built dataset holds exactly the records ``open_dataset`` gives from the
folder: "image" (the original PNG/JPEG bytes, re-encoded as PNG only when not 8-bit RGB),
"label" (PNG of the trainIds of the dataset's protocol: 19 classes, 16 for SYNTHIA; a 1x1 map of
255 on unlabelled splits) and "name". Files are array_record with shuffling disabled, so records
keep the readers' sorted order and ``info.metadata["names"][split]`` lists them; this is how
``list_file`` selects records without decoding any. Building and reading need no TensorFlow:

    python -c "from cbst_jax.data.tfds_builders import build; build('cityscapes', '/data/cityscapes', '/data/tfds')"

This module imports tensorflow_datasets at import time; ``cbst_jax.data`` imports it lazily.
"""
from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import tensorflow_datasets as tfds

from cbst_jax.data import bdd100k, cityscapes, gta5, nthu, synthia
from cbst_jax.data.io import (DatasetError, Item, encode_png, read_list_file, read_rgb,
                              select_by_list, trainid19_lut)

_HOMEPAGES = {
    "gta5": "https://download.visinf.tu-darmstadt.de/data/from_games/",
    "cityscapes": "https://www.cityscapes-dataset.com/",
    "synthia": "https://synthia-dataset.net/",
    "bdd100k": "https://bdd-data.berkeley.edu/",
    "nthu": "https://yihsinchen.github.io/segmentation_adaptation/",
}


def image_bytes(path: str, image_format: str) -> tuple[bytes, tuple[int, int]]:
    """(encoded bytes, (H, W)) of an image file: the file itself if it is an 8-bit RGB ``image_format``
    file, else a PNG of its RGB decoding. Decoding first means a corrupt file fails the build, named."""
    from PIL import Image

    rgb = read_rgb(path)
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        passthrough = (im.format or "").lower() == image_format and im.mode == "RGB"
    return (data if passthrough else encode_png(rgb)), rgb.shape[:2]


class _CbstBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared builder: features, metadata and example generation. Each dataset's subclass
    defines ``_folder_sources(root) -> {split: folder reader}`` over the extracted archives."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: trainId labels, array_record, records in name order."}
    DATASET = ""
    IMAGE_FORMAT = "png"
    NUM_CLASSES = 19

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.DATASET} for cbst_jax: RGB images and {self.NUM_CLASSES}-class trainId labels "
                        f"(255 = ignore).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format=self.IMAGE_FORMAT),
                "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "name": tfds.features.Text(),
            }),
            homepage=_HOMEPAGES[self.DATASET],
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        sources = self._folder_sources(os.fspath(dl_manager.manual_dir))
        meta = self.info.metadata
        meta["dataset"] = self.DATASET
        meta["num_classes"] = self.NUM_CLASSES
        meta["names"] = {split: source.names for split, source in sources.items()}
        meta["has_labels"] = {split: source.has_labels for split, source in sources.items()}
        meta["stats"] = {}
        return {split: self._generate_examples(split, source) for split, source in sources.items()}

    def _generate_examples(self, split, source):
        unlabelled = encode_png(np.full((1, 1), 255, np.uint8))
        for item in source._items:
            data, shape = image_bytes(item.image, self.IMAGE_FORMAT)
            label = encode_png(source.label_for(item, shape)) if source.has_labels else unlabelled
            yield item.name, {"image": data, "label": label, "name": item.name}
        self.info.metadata["stats"][split] = dict(source.stats, resized_label_names=source.resized_label_names)


class CbstGta5(_CbstBuilder):
    """GTA5 (24,966 images, Cityscapes labelIds -> 19 trainIds); one split, train."""

    name = "cbst_gta5"
    DATASET = "gta5"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download 01_images.zip ... 10_images.zip and 01_labels.zip ... 10_labels.zip from "
        "https://download.visinf.tu-darmstadt.de/data/from_games/ and extract them all into manual_dir, "
        "giving manual_dir/images/*.png and manual_dir/labels/*.png.")

    def _folder_sources(self, root):
        return {"train": gta5.open_gta5(root, "train")}


class CbstCityscapes(_CbstBuilder):
    """Cityscapes fine annotations as 19 trainIds; splits train, validation, test (unlabelled): those present."""

    name = "cbst_cityscapes"
    DATASET = "cityscapes"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Log in at https://www.cityscapes-dataset.com/downloads/ and download leftImg8bit_trainvaltest.zip and "
        "gtFine_trainvaltest.zip; extract both into manual_dir, giving manual_dir/leftImg8bit/{train,val,test}/ "
        "and manual_dir/gtFine/{train,val,test}/.")

    def _folder_sources(self, root):
        """Every split whose ``leftImg8bit/<split>`` folder exists (e.g. only val for evaluation)."""
        sources = {split: cityscapes.open_cityscapes(root, folder)
                   for split, folder in (("train", "train"), ("validation", "val"), ("test", "test"))
                   if os.path.isdir(os.path.join(root, "leftImg8bit", folder))}
        if not sources:
            raise DatasetError(f"cityscapes: no leftImg8bit/train, val or test folder under {root}; "
                               f"expected layout: {cityscapes.LAYOUT}")
        return sources


@dataclasses.dataclass
class SynthiaConfig(tfds.core.BuilderConfig):
    """SYNTHIA label mapping choice: lanemarking (id 22) ignored (CBST) or mapped to road (CRST)."""

    lanemarking_as_road: bool = False


class CbstSynthia(_CbstBuilder):
    """SYNTHIA-RAND-CITYSCAPES (9,400 images) in the 16-class protocol; one split, train."""

    name = "cbst_synthia"
    DATASET = "synthia"
    NUM_CLASSES = 16
    BUILDER_CONFIGS = [
        SynthiaConfig(name="lanemarking_ignore", description="id 22 lanemarking -> 255 (CBST)"),
        SynthiaConfig(name="lanemarking_road", description="id 22 lanemarking -> road (CRST)",
                      lanemarking_as_road=True),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download SYNTHIA_RAND_CITYSCAPES.rar (SYNTHIA-RAND-CITYSCAPES, CVPR16) from https://synthia-dataset.net/ "
        "and extract it; use the extracted RAND_CITYSCAPES folder (holding RGB/ and GT/LABELS/) or its parent "
        "as manual_dir.")

    def _folder_sources(self, root):
        return {"train": synthia.open_synthia(root, "train", lanemarking_as_road=self.builder_config.lanemarking_as_road)}


class CbstBdd100k(_CbstBuilder):
    """BDD100K semantic segmentation (7,000 / 1,000 / 2,000 images); splits train, validation, test (unlabelled)."""

    name = "cbst_bdd100k"
    DATASET = "bdd100k"
    IMAGE_FORMAT = "jpeg"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "From https://bdd-data.berkeley.edu/ download bdd100k_images_10k.zip and "
        "bdd100k_sem_seg_labels_trainval.zip (or the older bdd100k_seg.zip) and extract them into manual_dir, "
        "giving manual_dir/bdd100k/images/10k/ and manual_dir/bdd100k/labels/sem_seg/masks/ "
        "(or manual_dir/bdd100k/seg/{images,labels}/).")

    def _folder_sources(self, root):
        sources = {"train": bdd100k.open_bdd100k(root, "train"), "validation": bdd100k.open_bdd100k(root, "val")}
        try:
            sources["test"] = bdd100k.open_bdd100k(root, "test")
        except DatasetError:
            pass  # the test images are optional
        return sources


@dataclasses.dataclass
class NthuConfig(tfds.core.BuilderConfig):
    """One NTHU city and the encoding of its ``_eval.png`` label maps."""

    city: str = "Rome"
    label_encoding: str = "labelid"


class CbstNthu(_CbstBuilder):
    """NTHU Cross-City, one config per city; splits train (unlabelled) and test (100 labelled images)."""

    name = "cbst_nthu"
    DATASET = "nthu"
    IMAGE_FORMAT = "jpeg"
    BUILDER_CONFIGS = [NthuConfig(name=city.lower(), description=f"NTHU Cross-City {city}", city=city)
                       for city in nthu.CITIES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the NTHU Cross-City dataset (NTHU_Datasets, linked from "
        "https://yihsinchen.github.io/segmentation_adaptation/) and extract it; manual_dir is the NTHU_Datasets "
        "folder holding Rome/, Rio/, Tokyo/, Taipei/, each with Images/{Train,Test}/ and Labels/Test/.")

    def _folder_sources(self, root):
        cfg = self.builder_config
        sources = {split: nthu.open_nthu(root, split, city=cfg.city, label_encoding=cfg.label_encoding)
                   for split in ("train", "test")}
        self.info.metadata["label_encoding"] = cfg.label_encoding
        return sources


BUILDERS = {"gta5": CbstGta5, "cityscapes": CbstCityscapes, "synthia": CbstSynthia, "bdd100k": CbstBdd100k,
            "nthu": CbstNthu}


def build(name: str, manual_dir, data_dir, config: str | None = None):
    """Build dataset ``name`` from the extracted official folder ``manual_dir`` into ``data_dir``; returns the builder.

    ``config``: SYNTHIA "lanemarking_ignore" (default) / "lanemarking_road"; NTHU "rome", "rio", "tokyo", "taipei".
    """
    if name not in BUILDERS:
        raise DatasetError(f"no TFDS builder for {name!r}, expected one of {', '.join(BUILDERS)}")
    if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
        raise DatasetError(f"{name}: {manual_dir} is not a folder holding the extracted dataset "
                           f"(see docs/datasets.md for the layout)")
    builder = BUILDERS[name](data_dir=os.fspath(data_dir), config=config, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return builder


# ---------------------------------------------------------------- reading

_SPLIT_ALIASES = {"val": "validation", "all": "train"}
_NTHU_SPLITS = {"val": "test", "validation": "test"}
_LIST_SUFFIXES = {"bdd100k": ("_train_id",), "nthu": ("_eval",)}


def _config_name(name: str, options: dict) -> str | None:
    if name == "synthia":
        return "lanemarking_road" if options.pop("lanemarking_as_road", False) else "lanemarking_ignore"
    if name == "nthu":
        return nthu.canonical_city(options.pop("city", None)).lower()
    return None


def _version_dir(name: str, path: str, config: str | None) -> str:
    """The dataset directory (holding dataset_info.json) of ``cbst_<name>`` under ``path``."""
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    base = os.path.join(path, f"cbst_{name}")
    if config is not None:
        base = os.path.join(base, config)
    versions = []
    if os.path.isdir(base):
        for v in os.listdir(base):
            if os.path.isfile(os.path.join(base, v, "dataset_info.json")):
                versions.append(tfds.core.Version(v))
    if not versions:
        raise DatasetError(f"{name}: no built TFDS dataset at {base} (expected <data_dir>/cbst_{name}/"
                           f"{config + '/' if config else ''}<version>/dataset_info.json; build it with "
                           f"cbst_jax.data.tfds_builders.build)")
    return os.path.join(base, str(max(versions)))


def _select(name: str, names: list[str], list_file) -> list[int]:
    """Record indices named by ``list_file``, parsed as the folder reader of ``name`` parses it."""
    if name == "cityscapes":
        position = {n: i for i, n in enumerate(names)}
        chosen = []
        for lineno, token in read_list_file(list_file):
            stem = cityscapes.parse_list_entry(token)
            if stem not in position:
                raise DatasetError(f"list_file {list_file} line {lineno}: {token!r} is not in this cityscapes split")
            chosen.append(position[stem])
        return chosen
    items = [Item(n, str(i)) for i, n in enumerate(names)]
    return [int(item.image) for item in select_by_list(items, list_file, name, _LIST_SUFFIXES.get(name, ()))]


class TfdsSource:
    """A built cbst_* TFDS split served as ``open_dataset`` records (same keys, dtypes and names)."""

    def __init__(self, dataset, split, data_source, names, indices, has_labels, num_classes, lut):
        self.dataset = dataset
        self.split = split
        self.num_classes = num_classes
        self.has_labels = has_labels
        self.stats = {"resized_labels": 0, "unknown_label_pixels": 0, "unknown_label_images": 0}
        self._ds = data_source
        self._all_names = names
        self._indices = list(indices)
        self._lut = lut

    @property
    def names(self) -> list[str]:
        return [self._all_names[i] for i in self._indices]

    def __len__(self) -> int:
        return len(self._indices)

    def __repr__(self) -> str:
        return (f"TfdsSource({self.dataset!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, has_labels={self.has_labels})")

    def __getitem__(self, index: int) -> dict:
        n = len(self._indices)
        if not -n <= index < n:
            raise IndexError(f"{self.dataset} {self.split}: index {index} out of range for {n} records")
        j = self._indices[index]
        raw = self._ds[j]
        name = raw["name"].decode() if isinstance(raw["name"], bytes) else str(raw["name"])
        if name != self._all_names[j]:
            raise DatasetError(f"{self.dataset} TFDS {self.split}: record {j} is {name!r}, metadata says "
                               f"{self._all_names[j]!r}; rebuild the dataset")
        record = {"image": np.asarray(raw["image"], np.uint8), "name": name}
        if self.has_labels:
            record["label"] = self._lut[np.asarray(raw["label"], np.uint8)[..., 0]]
        return record


def open_tfds(name: str, path, split: str = "train", *, list_file=None, num_classes: int | None = None,
              labelled: bool | None = None, **options) -> TfdsSource:
    """Open split ``split`` of the built ``cbst_<name>`` dataset at ``path`` (a data_dir or a version dir).

    Options as for the folder readers: ``list_file``, ``num_classes`` (converted from the stored
    protocol), ``labelled``; ``lanemarking_as_road`` (SYNTHIA) and ``city`` (NTHU) pick the config;
    ``label_encoding`` (NTHU) must match the one built.
    """
    options = dict(options)
    config = _config_name(name, options)
    label_encoding = options.pop("label_encoding", None)
    if options:
        raise DatasetError(f"{name}: unknown TFDS option(s) {', '.join(sorted(options))}")
    path = _version_dir(name, os.fspath(path), config)
    builder = tfds.builder_from_directory(path)
    meta = builder.info.metadata or {}
    if builder.info.name != f"cbst_{name}" or "names" not in meta:
        raise DatasetError(f"{path}: holds TFDS dataset {builder.info.name!r}, expected cbst_{name} "
                           f"built by cbst_jax.data.tfds_builders")
    if label_encoding is not None and label_encoding != meta.get("label_encoding", label_encoding):
        raise DatasetError(f"{name}: label_encoding={label_encoding!r} but {path} was built with "
                           f"{meta['label_encoding']!r}")
    tfds_split = (_NTHU_SPLITS if name == "nthu" else _SPLIT_ALIASES).get(split, split)
    if tfds_split not in meta["names"]:
        raise DatasetError(f"{name}: split {split!r} not in {path} (has {', '.join(sorted(meta['names']))})")
    names = list(meta["names"][tfds_split])
    stored = int(meta["num_classes"])
    num_classes = stored if num_classes is None else num_classes
    if stored == 19:
        lut = trainid19_lut(num_classes, name)
    elif num_classes == stored:
        lut = np.arange(256, dtype=np.uint8)
    else:
        raise DatasetError(f"{name}: num_classes={num_classes!r}, the built dataset has {stored} classes")
    has_labels = bool(meta["has_labels"][tfds_split])
    if labelled and not has_labels:
        raise DatasetError(f"{name}: split {split!r} has no labels; use labelled=False")
    if labelled is False:
        has_labels = False
    indices = range(len(names)) if list_file is None else _select(name, names, list_file)
    data_source = builder.as_data_source(tfds_split)
    if len(data_source) != len(names):
        raise DatasetError(f"{path}: split {tfds_split} has {len(data_source)} records, metadata lists {len(names)}")
    return TfdsSource(name, tfds_split, data_source, names, indices, has_labels, num_classes, lut)
