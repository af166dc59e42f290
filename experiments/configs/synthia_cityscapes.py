"""SYNTHIA-RAND-CITYSCAPES -> Cityscapes, 16-class protocol; reports mIoU (16) and mIoU* (13).

CBST's SYNTHIA settings: target portion from 0.2, source portion 0.02 (+0.0025 per round),
5 rounds (CRST issue #14); crop 600x900 as CRST. SYNTHIA images are 760x1280.
"""
from experiments.configs import gta5_cityscapes


def get_config(variant: str = ""):
    c = gta5_cityscapes.get_config(variant)
    c.num_classes = 16
    c.eval_classes = "miou13"
    c.source.name = "synthia"
    c.input.crop = (600, 900)
    c.input.scale_range = (0.6, 1.5)
    c.input.source_portion = (0.02, 0.0025, 0.06)
    c.self_training.rounds = 5
    c.self_training.prior_size = (190, 320)
    return c
