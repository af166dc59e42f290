"""SYNTHIA-RAND-CITYSCAPES -> Cityscapes, the 16-class protocol; every table reports mIoU (16
classes) and mIoU* (13: without wall, fence, pole; CBST#7, ref §5).

Default (``:crst_deeplabv2``): CRST's SYNTHIA settings, as its maintainer listed them in CRST#14,
on the DeepLab-v2 recipe of ``gta5_cityscapes.py``. ``:cbst_resnet38``: CBST's SYNTHIA values on
its ResNet-38 recipe, with the rows of the seed's SYNTHIA table (source-only, ST, CBST: it has no
CBST-SP, and no MST row). SYNTHIA images are 760x1280; the source set is all 9,400 (not filtered,
CRST#7). Neither reference published a SYNTHIA source model for DeepLab-v2 (CRST#24) nor the
source-training recipe (CRST#35): source_training keeps the GTA5 recipe's values.

Per-domain training scales (CRST#14: source 0.8-1.2, target 0.6-1.5) are set in
``input.source_scale_range`` / ``input.target_scale_range``; ``input.scale_range`` is the
target's range, used for both domains wherever the per-domain ranges are not applied.
"""
import math

from experiments.configs import gta5_cityscapes

VARIANTS = gta5_cityscapes.VARIANTS


def get_config(variant: str = ""):
    c = gta5_cityscapes.get_config(variant)
    c.num_classes = 16                         # SYNTHIA protocol: 16 classes (ref §5, §6)
    c.eval_classes = "miou13"                  # mIoU* over 13 of the 16 (CBST#7, ref §5)
    c.source.name, c.source.split = "synthia", "train"
    c.source.list_file = ""                    # SYNTHIA is not filtered (CRST#7, ref §3)
    c.self_training.prior_size = (190, 320)    # project choice (the paper's prior is GTA5-only, ref §2)
    if c.variant == "cbst_resnet38":
        c.methods = "source_only,st,cbst"      # paper table (SYNTHIA -> Cityscapes, ResNet-38 rows: no CBST-SP)
        c.evaluate.mst_methods = ""            # ... and no MST row
        c.source.lanemarking_as_road = False   # CBST labels_synthia: lanemarking (22) -> 255 (ref §6)
        c.self_training.portion = (0.2, 0.05, 0.5)     # p0 0.20 for SYNTHIA (ref §3)
        c.input.source_portion = (0.02, 0.0025, 0.06)  # source portion 0.02 for SYNTHIA (ref §3)
        c.source_training.steps = math.ceil(50 * 9_400 / 16)  # 50 epochs of SYNTHIA at batch 16 (ref §4)
        return c
    c.source.lanemarking_as_road = True        # CRST dataset/helpers/labels_synthia.py: 22 -> road (ref §6)
    c.input.crop = (600, 900)                  # CRST#14 INPUT_SIZE '600,900' (h, w)
    c.input.source_scale_range = (0.8, 1.2)    # CRST#14 TRAIN_SCALE_SRC
    c.input.target_scale_range = (0.6, 1.5)    # CRST#14 TRAIN_SCALE_TGT
    c.input.scale_range = (0.6, 1.5)           # the target's (see the module docstring)
    c.input.source_portion = (0.02, 0.0025, 0.06)  # CRST#14 INIT_SRC_PORT, SRC_PORT_STEP, MAX_SRC_PORT
    c.self_training.portion = (0.2, 0.05, 0.5)     # CRST#14 INIT_TGT_PORT, TGT_PORT_STEP, MAX_TGT_PORT
    c.self_training.rounds = 4                 # CRST#14 NUM_ROUNDS=5, whose last round only evaluates (ref §3)
    c.predict.scales = (0.9,)                  # CRST#14 TEST_SCALE = 0.9; crst_seg.py EVAL_SCALE 0.9
    c.evaluate.scales = (0.9, 1.0, 1.2)        # crst_seg.py TEST_SCALE (CRST#14 names no MST scales)
    return c
