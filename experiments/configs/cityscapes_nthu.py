"""Cityscapes -> NTHU Cross-City (Rome, Rio, Tokyo, Taipei), the 13 shared classes.

`--config.target.city=Rome` adapts to one city; empty adapts to all four pooled. The source is
Cityscapes train with its 19 classes mapped to the 13 NTHU classes.
"""
from experiments.configs import gta5_cityscapes


def get_config(variant: str = ""):
    c = gta5_cityscapes.get_config(variant)
    c.num_classes = 13
    c.source.name, c.source.split = "cityscapes", "train"
    c.target.name, c.target.train_split, c.target.eval_split = "nthu", "train", "test"
    c.target.city = "Rome"
    c.input.eval_size = (1024, 2048)
    c.self_training.prior_size = (256, 512)
    return c
