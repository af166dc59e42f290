"""The embedded benchmark: the procedural source/target street-scene pair (no download), small
network, CPU-sized by default.

Default (`python -m experiments.synthetic`): the seed's table on the embedded pair -
source-only, ST, ST-SP, CBST, CBST-SP (also evaluated with multi-scale + flip testing: the
"cbst_sp+mst" rows) and CRST-MRKLD, all from one source model and with one set of
self-training settings (2 rounds, p = 0.20, 0.25) - 64x128 images, batch 4, sized for 10
minutes a seed on 2 CPU cores (measured: docs/results.md). Both domains share the camera layout (dashboard
cameras, as GTA5 and Cityscapes). Variants (`--config=<variant>` with the launcher, or
`--config=experiments/configs/synthetic.py:<variant>`): `quick` shrinks everything to a smoke
run (used by the tests); `camera_shift` raises the target camera (the case where a spatial
prior's shared-layout assumption fails) and runs source-only, CBST and CBST-SP; `gpu` is a
256x512 version for a lent GPU; `online` puts the online teacher-student rows (DAFormer's fixed τ,
the seed's class-balanced λ_c online, + spatial prior: docs/online.md) beside source-only, CBST
and CBST-SP, at the same rounds, steps and images per step.
"""
from cbst_jax import config_lib


def get_config(variant: str = ""):
    c = config_lib.base_config()
    c.methods = "source_only,st,st_sp,cbst,cbst_sp,mrkld"
    c.eval_classes = "synthetic"
    c.model.name = "demo_segnet"               # full-resolution branch: see cbst_jax/models/demo_net.py
    c.source.name, c.source.split = "synthetic/source", "train"
    c.target.name, c.target.train_split, c.target.eval_split = "synthetic/target", "train", "val"
    c.synthetic.height, c.synthetic.width = 64, 128
    c.synthetic.num_source, c.synthetic.num_target_train, c.synthetic.num_target_val = 1500, 320, 240
    c.input.crop = (64, 128)
    c.input.scale_range = (1.0, 1.0)
    c.input.mine_prob = 0.0
    c.input.batch_size = 4                     # the 10-minute budget: half batch 8's images, as fast per image
    c.input.sampler = "paired"                 # 2 source + 2 target per batch (feasibility study, config D)
    c.input.source_share = 0.5
    c.input.source_portion = (1.0, 0.0, 1.0)   # the synthetic source set is small: use all of it
    c.input.source_subset = "nested"
    c.input.eval_size = (64, 128)
    c.input.eval_batch_size = 64
    c.input.workers = 2
    c.input.worker_kind = "threads"            # 64x128 crops: worker processes cost more than they save
    c.source_training.steps = 1000
    c.source_training.batch_size = 4
    c.source_training.lr = 2e-3
    c.source_training.schedule = "poly"
    c.source_training.optimizer = "adam"       # from scratch: no ImageNet weights exist for the demo net
    c.self_training.rounds = 2
    c.self_training.portion = (0.2, 0.05, 0.5)
    c.self_training.steps_per_round = 60        # sized for the 10-minute budget (measured, docs/results.md)
    c.self_training.lr = 5e-4
    c.self_training.lr_round_decay = 0.7071067811865476   # 1/sqrt(2) per round, as CBST's solve_AO
    c.self_training.optimizer = "adam"         # a fresh optimiser each round, as both references
    c.self_training.schedule = "constant"
    c.self_training.loss_resolution = "upsample"
    c.self_training.prior_size = (64, 128)
    c.self_training.prior_sigma = 2.0
    c.self_training.mine_rare = False
    c.predict.scales = (1.0,)
    c.predict.flip = True
    c.evaluate.scales = (1.0,)
    c.evaluate.flip = True
    c.evaluate.mst_methods = "cbst_sp"         # CBST-SP + MST at CRST's test scales 0.9/1.0/1.2 + flip
    c.self_training.reg_weight = 0.01          # MRKLD: the CRST repository's effective weight (reference §7)
    c.optim.head_lr_mult = 1.0
    c.log_every = 50
    c.checkpoint_every = 150
    return config_lib.apply_variant(c, variant, VARIANTS)


def _quick(c):
    """A smoke run: 96 source images, 60 source steps, 2 rounds of 12 steps, batch 8 (the tests')."""
    c.input.batch_size = c.source_training.batch_size = 8   # the tests run it on 8 devices
    c.source_training.steps = 60
    c.self_training.rounds = 2
    c.self_training.steps_per_round = 12
    c.log_every = 10
    c.checkpoint_every = 25
    c.synthetic.num_source, c.synthetic.num_target_train, c.synthetic.num_target_val = 96, 48, 32
    c.input.eval_batch_size = 16


def _camera_shift(c):
    """The target camera sits higher (a spatial prior's shared layout fails): source-only, CBST, CBST-SP."""
    c.synthetic.camera_shift = True
    c.methods = "source_only,cbst,cbst_sp"
    c.evaluate.mst_methods = ""


def _gpu(c):
    """A 256x512 version for a GPU: 3,000 source and 500 + 500 target images, batch 8."""
    c.synthetic.height, c.synthetic.width = 256, 512
    c.input.crop = c.input.eval_size = (256, 512)
    c.synthetic.num_source, c.synthetic.num_target_train, c.synthetic.num_target_val = 3000, 500, 500
    c.input.eval_batch_size = 32
    c.input.batch_size = c.source_training.batch_size = 8   # the CPU's batch-4 choice does not apply on a GPU
    c.input.workers = -1                       # every core but one renders the pair (once per run) and crops


def _online(c):
    """Online teacher-student beside the offline rows, one setting for all (docs/online.md): every
    self-training method gets 2 rounds of 60 steps of 2 source + 2 target images (the offline
    rounds' paired batch of 4), at the same learning rate, schedule and portions p_r; the online
    methods keep DAFormer's published values except where they are sizes of GTA5/Cityscapes."""
    c.methods = "source_only,cbst,cbst_sp,online_fixed,online_cbst,online_cbst_sp"
    c.evaluate.mst_methods = ""
    c.online.batch_size = 2                    # 2 source + 2 target crops per step, as the paired batch 4
    c.online.rcs_min_pixels = 12               # DAFormer's 3000 px of a 1914x1052 GTA5 image, scaled to 64x128
    c.online.ignore_top = c.online.ignore_bottom = 0   # DAFormer's rows hide Cityscapes' ego car and
                                               # rectification border, which the embedded target has not


VARIANTS = {"quick": _quick, "gpu": _gpu, "camera_shift": _camera_shift, "online": _online}
