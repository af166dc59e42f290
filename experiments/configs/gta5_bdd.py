"""GTA5 -> BDD100K semantic segmentation, 19 classes: the seed's table (Source ResNet-38, ST,
ST-SP, CBST, CBST-SP; the CVPR'18 WAD challenge pairing CBST won).

Default: CBST's ResNet-38 recipe of ``gta5_cityscapes.py`` (the table's network);
``--config=crst_deeplabv2`` puts the CRST recipe on this pair instead. No reference publishes
BDD100K settings (ref §6), so apart from the target every value is the recipe's. BDD100K images
are 720x1280 and its masks already hold the 19 Cityscapes trainIds; the target adapted on is
BDD100K train (7,000 images; no list is published), evaluation BDD100K val (1,000).
"""
from experiments.configs import gta5_cityscapes

VARIANTS = gta5_cityscapes.VARIANTS


def get_config(variant: str = ""):
    c = gta5_cityscapes.get_config(variant or "cbst_resnet38")
    c.methods = "source_only,st,st_sp,cbst,cbst_sp"  # paper table (GTA5 -> BDD100K rows)
    c.evaluate.mst_methods = ""                # the table has no MST row
    c.target.name, c.target.train_split, c.target.eval_split = "bdd100k", "train", "val"
    c.target.list_file = ""                    # no published BDD100K list
    c.input.eval_size = (720, 1280)            # BDD100K's resolution
    if c.variant == "crst_deeplabv2":
        c.input.crop = (512, 896)              # project choice: CRST's 512 rows, width cut to fit 1280
    c.self_training.prior_size = (180, 320)    # project choice (ref §2)
    return c
