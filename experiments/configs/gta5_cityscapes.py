"""GTA5 -> Cityscapes with DeepLab-v2 ResNet-101, the CRST/PyTorch settings (reference §3-§4).

Round 0 is a source-only model: import one (`--config.model.init=src.npz
--config.model.init_is_source_model=True`) or train it here from ImageNet weights
(`--config.model.init=resnet101_imagenet.npz`, 100k steps, batch 4, poly LR 2.5e-4, as CRST's
train.py). Target: Cityscapes train (optionally the references' 505-image list via
`--config.target.list_file`), evaluation on Cityscapes val at 1024x2048.
"""
from cbst_jax import config_lib


def get_config(variant: str = ""):
    c = config_lib.base_config()
    c.methods = "cbst"
    c.model.name = "deeplabv2_resnet101"
    c.source.name, c.source.split = "gta5", "train"
    c.target.name, c.target.train_split, c.target.eval_split = "cityscapes", "train", "val"
    c.input.crop = (512, 1024)
    c.input.scale_range = (0.5, 1.5)
    c.input.batch_size = 2
    c.input.sampler = "pooled"
    c.input.source_portion = (0.03, 0.0025, 0.06)
    c.input.source_subset = "fresh"            # CRST draws a new source subset each round
    c.input.eval_size = (1024, 2048)
    c.source_training.steps = 100_000
    c.source_training.lr = 2.5e-4
    c.source_training.schedule = "poly"
    c.self_training.rounds = 3
    c.self_training.portion = (0.2, 0.05, 0.5)
    c.self_training.epochs_per_round = 2.0
    c.self_training.lr = 5e-5
    c.self_training.lr_round_decay = 1.0
    c.self_training.loss_resolution = "upsample"
    c.self_training.prior_size = (256, 512)
    c.self_training.prior_sigma = 8.0
    c.self_training.reg_weight = 0.01          # MRKLD: the repository's effective weight (reference §7)
    c.predict.scales = (1.0,)
    c.predict.flip = True
    c.checkpoint_every = 1000
    return config_lib.apply_variant(c, variant, {})
