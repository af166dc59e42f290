"""GTA5 -> BDD100K semantic segmentation (the CVPR'18 WAD challenge pairing CBST won).

BDD100K images are 720x1280 and its masks already hold the 19 Cityscapes trainIds.
"""
from experiments.configs import gta5_cityscapes


def get_config(variant: str = ""):
    c = gta5_cityscapes.get_config(variant)
    c.target.name, c.target.train_split, c.target.eval_split = "bdd100k", "train", "val"
    c.input.crop = (512, 896)
    c.input.eval_size = (720, 1280)
    c.self_training.prior_size = (180, 320)
    return c
