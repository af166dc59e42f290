"""Cityscapes -> NTHU Cross-City (Rome, Rio, Tokyo, Taipei), the 13 shared classes: the seed's
first table (one block per city: Source ResNet-38, ST, CBST).

``--config.target.city=all`` (the default, or empty) adapts to each city in turn, each in
``<workdir>/<City>/``, and writes the per-city table plus the mean over the cities to
``<workdir>/results.md``; ``--config.target.city=Rome`` adapts to one city. The source is
Cityscapes train (all 2,975 images) under the 13-class protocol; each city's target is its
3,200 unlabelled Train images, evaluated on its 100 labelled Test images at 1024x2048.
Neither reference has NTHU code (ref §6): every training value is CBST's ResNet-38 recipe of
``gta5_cityscapes.py`` (``--config=crst_deeplabv2`` for CRST's). Train images that are also test
images (by content) are left out of adaptation unless ``target.allow_eval_overlap=True``.
"""
import math

from experiments.configs import gta5_cityscapes

VARIANTS = gta5_cityscapes.VARIANTS


def get_config(variant: str = ""):
    c = gta5_cityscapes.get_config(variant or "cbst_resnet38")
    c.num_classes = 13                         # the NTHU classes (ref §6)
    c.methods = "source_only,st,cbst"          # paper table (Cityscapes -> NTHU rows)
    c.evaluate.mst_methods = ""                # the table has no MST row
    c.source.name, c.source.split, c.source.list_file = "cityscapes", "train", ""
    c.target.name, c.target.train_split, c.target.eval_split = "nthu", "train", "test"
    c.target.list_file = ""                    # NTHU: the Images/{Train,Test} folders, no list (ref §6)
    c.target.city = "all"
    c.input.eval_size = (1024, 2048)           # NTHU images are 2048x1024
    if c.variant == "cbst_resnet38":
        c.source_training.steps = math.ceil(30 * 2_975 / 16)  # project choice: 30 epochs as for GTA5
    c.self_training.prior_size = (256, 512)    # project choice (ref §2)
    return c
