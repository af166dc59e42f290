"""GTA5 -> Cityscapes, 19 classes, with the two published recipes as variants.

``--config=experiments/configs/gta5_cityscapes.py`` (or ``:crst_deeplabv2``, the default): CRST's
PyTorch recipe, DeepLab-v2 ResNet-101. ``:cbst_resnet38``: CBST's MXNet recipe, ResNet-38 (the
seed's tables). ``:daformer_mit_b5``: DAFormer's network (MiT-B5 + context-aware fusion) with
DAFormer's training values (AdamW, poly with linear warm-up, 512x512 crops) in this project's
rounds. Each value names its source: "ref §N" is the section of the shared reference
spec (reference-cbst.md), "crst_seg.py NAME" a default of CRST's script, "CBST README" the
command in yzou2/CBST's README, "paper table" the seed's result tables (paper-tables.md);
values without a source are this project's choices and say so.

Round 0 is a source-only model: import one (``--config.model.init=src.npz
--config.model.init_is_source_model=True``; convert it first with ``python -m
cbst_jax.cli.convert_weights``: the weights file carries the input normalisation, which
``model.normalization="auto"`` takes) or train it here from ImageNet weights
(``--config.model.init=imagenet.npz``; the source_training keys below are each recipe's
source-only training). Data: GTA5 at 1052x1914 as both references ask (CBST README, CRST#21),
Cityscapes at 1024x2048; the target images adapted on are the references' 505-image
``train_ClsConfSet`` list, evaluation is Cityscapes val (500 images).

Compute path (``model.dtype`` / ``model.atrous``, "auto" in every recipe): bfloat16 activations and
the dilated stages on space-to-batch phase grids on a GPU/TPU, float32 and dilated convolutions on a
CPU; ``--config.model.dtype=float32 --config.model.atrous=dilated`` reproduces the references'
numerics on any platform. Parameters, loss, softmax and threshold statistics are float32 either way.

Not reproduced: CRST's random scale is ``lo + randint(0, 10)/10`` (steps of 0.1), here uniform in
the range; CBST upsamples the stride-8 softmax with PIL bicubic per class for pseudo-labels,
here bilinearly (align_corners, as CRST).
"""
import math

from cbst_jax import config_lib


def get_config(variant: str = ""):
    c = config_lib.base_config()
    # ------------------------------------------------------------------ CRST (PyTorch, DeepLab-v2)
    c.methods = "cbst,lrent,mrkld"             # CRST README's rows (cbst.sh, lrent.sh, mrkld.sh); the
                                               # source-only row is always reported
    c.model.name = "deeplabv2_resnet101"       # crst_seg.py MODEL='DeeplabRes' (Res_Deeplab), ref §4
    c.model.normalization = "auto"             # CRST: ImageNet mean/std (crst_seg.py IMG_MEAN/IMG_STD);
                                               # the converted weights file records it
    c.source.name, c.source.split = "gta5", "train"
    c.source.list_file = "builtin:gta5_crst_19984"   # CRST's filtered GTA5 (CRST#1, #32; ref §3); see the
                                                     # caveat in cbst_jax/data/lists/README.md
    c.target.name, c.target.train_split, c.target.eval_split = "cityscapes", "train", "val"
    c.target.list_file = "builtin:cityscapes_train_ClsConfSet"  # crst_seg.py DATA_TGT_TRAIN_LIST_PATH
                                                               # (505 images; CRST#11, #16; ref §3)
    c.input.crop = (512, 1024)                 # crst_seg.py INPUT_SIZE '512,1024' (h, w)
    c.input.scale_range = (0.5, 1.5)           # crst_seg.py TRAIN_SCALE_SRC = TRAIN_SCALE_TGT '0.5,1.5'
    c.input.flip = True                        # cbst.sh --random-mirror
    c.input.mine_prob = 0.8                    # crst_seg.py MINE_CHANCE
    c.input.mine_domains = "target"            # CRST mines target crops only (datasets.py; ref §4)
    c.input.batch_size = 2                     # crst_seg.py BATCH_SIZE
    c.input.sampler = "pooled"                 # ConcatDataset([src, tgt]) shuffled (ref §4)
    c.input.source_portion = (0.03, 0.0025, 0.06)  # crst_seg.py INIT_SRC_PORT, SRC_PORT_STEP, MAX_SRC_PORT
    c.input.source_subset = "fresh"            # crst_seg.py SRC_SAMPLING_POLICY 'r': a new subset per round
    c.input.eval_size = (1024, 2048)           # crst_seg.py TEST_IMAGE_SIZE '1024,2048'
    c.source_training.steps = 100_000          # CRST train.py: 100k iterations (ref §4)
    c.source_training.lr = 2.5e-4              # CRST train.py: LR 2.5e-4, poly 0.9 (ref §4)
    c.source_training.schedule = "poly"
    c.source_training.batch_size = 4           # CRST train.py: batch 4 (ref §4)
    c.source_training.crop = (500, 500)        # CRST train.py: crop 500x500 (ref §4)
    c.source_training.scale_range = (0.5, 1.5)  # CRST train.py: scale 0.5-1.5 (ref §4)
    c.self_training.rounds = 3                 # crst_seg.py NUM_ROUNDS=4, whose last round only evaluates
                                               # (ref §3)
    c.self_training.portion = (0.2, 0.05, 0.5)  # crst_seg.py INIT_TGT_PORT, TGT_PORT_STEP, MAX_TGT_PORT
    c.self_training.epochs_per_round = 2.0     # crst_seg.py EPR
    c.self_training.steps_per_round = 0
    c.self_training.lr = 5e-5                  # crst_seg.py LEARNING_RATE
    c.self_training.lr_round_decay = 1.0       # constant over rounds (ref §3)
    c.self_training.schedule = "constant"      # crst_seg.py POWER=0
    c.self_training.loss_resolution = "upsample"  # logits upsampled to the crop before the CE (ref §4)
    c.self_training.select_subsample = 4       # crst_seg.py DS_RATE: every 4th confidence (ref §1b)
    c.self_training.reg_weight = 0.01          # MRKLD: mrkld.sh's effective weight 0.1 x 0.1 (ref §7, CRST#38)
    c.self_training.label_reg_weight.lrent = 0.25  # lrent.sh --lr-weight-ent (ref §7)
    c.self_training.prior_size = (256, 512)    # project choice: the prior's construction is unreleased (ref §2)
    c.self_training.prior_sigma = 8.0          # project choice (ref §2)
    c.optim.momentum = 0.9                     # crst_seg.py MOMENTUM
    c.optim.weight_decay = 5e-4                # crst_seg.py WEIGHT_DECAY
    c.optim.head_lr_mult = 10.0                # layer5 at 10x the backbone's LR (ref §4)
    c.predict.scales = (0.9,)                  # crst_seg.py EVAL_SCALE: pseudo-labels at 0.9 (ref §1b)
    c.predict.flip = True                      # cbst.sh --test-flipping
    c.evaluate.scales = (0.9, 1.0, 1.2)        # crst_seg.py TEST_SCALE (MST; ref §5)
    c.evaluate.flip = True                     # cbst.sh --test-flipping
    c.checkpoint_every = 1000                  # project choice
    return config_lib.apply_variant(c, variant, VARIANTS)


def crst_deeplabv2(c):
    """CRST's recipe, DeepLab-v2 ResNet-101 (PyTorch): the values get_config sets, unchanged."""


def cbst_resnet38(c):
    """CBST's own recipe (MXNet, ResNet-38 model A1 at stride 8): ref §1a, §3-§5, CBST README."""
    c.methods = "source_only,st,cbst,cbst_sp"  # paper table (GTA5 -> Cityscapes, ResNet-38 rows)
    c.model.name = "resnet38"                  # fcrna_model_a1(classes, 8) (ref §4)
    c.model.normalization = "auto"             # /255 then ImageNet mean/std, RGB (ref §4)
    c.source.list_file = ""                    # CBST trains on all 24,966 GTA5 images (ref §3)
    c.target.list_file = "builtin:cityscapes_train_ClsConfSet"  # CBST's data_list/cityscapes/train.lst,
                                                               # the same 505 images (ref §3)
    c.input.crop = (504, 504)                  # --crop-size 500, rounded up to a multiple of 8 (ref §4)
    c.input.scale_range = (0.7, 1.3)           # --scale-rate-range 0.7,1.3 of native size (ref §4)
    c.input.flip = True                        # data.py: flip with p=0.5 (ref §4)
    c.input.mine_prob = 0.8                    # --mine-port 0.8 (ref §4)
    c.input.mine_domains = "both"              # mining on source and target alike (ref §4)
    c.input.batch_size = 2                     # --batch-images 2 (ref §4)
    c.input.sampler = "pooled"                 # RandomSampler over source subset + target (ref §4)
    c.input.source_portion = (0.03, 0.0025, 0.06)  # --init-src-port 0.03; solve_AO +0.0025, max 0.06 (ref §3)
    c.input.source_subset = "nested"           # --source-sample-policy cumulative: nested subsets (ref §3)
    c.input.eval_size = (1024, 2048)           # Cityscapes at full resolution (ref §5)
    c.source_training.steps = math.ceil(30 * 24_966 / 16)  # 30 epochs of GTA5 at batch 16 (ref §4)
    c.source_training.lr = 1.6e-3              # fixed LR 1.6e-3 (ref §4)
    c.source_training.schedule = "constant"
    c.source_training.batch_size = 16          # 4 GPUs x batch 16 as ref §4 quotes the README; read here
                                               # as 16 in all (the README does not settle it)
    c.source_training.crop = (504, 504)        # crop 500 (ref §4), rounded up to a multiple of 8
    c.source_training.scale_range = (0.7, 1.3)  # scale 0.7-1.3 (ref §4)
    c.self_training.rounds = 6                 # --num-round 6 (ref §3)
    c.self_training.portion = (0.15, 0.05, 0.5)  # --init-tgt-port 0.15 (GTA); solve_AO +0.05, max 0.5 (ref §3)
    c.self_training.epochs_per_round = 2.0     # --epoch-per-round 2 (ref §3)
    c.self_training.steps_per_round = 0
    c.self_training.lr = 1e-4                  # --base-lr 1e-4 in round 0 (ref §4)
    c.self_training.lr_round_decay = 1 / math.sqrt(2)  # solve_AO: lr /= sqrt(2) each round (ref §3)
    c.self_training.schedule = "constant"      # fixed within a round (ref §4)
    c.self_training.loss_resolution = "stride"  # labels subsampled rlabel[4::8, 4::8], loss at stride 8 (ref §4)
    c.self_training.select_subsample = 4       # every 4th confidence of each class (ref §1a)
    c.optim.momentum = 0.9                     # (ref §4)
    c.optim.weight_decay = 5e-4                # (ref §4)
    c.optim.head_lr_mult = 1.0                 # one LR for all layers (ref §4: only biases differ)
    c.optim.bias_lr_mult = 2.0                 # lr_type 'alex': biases lr x2 ... (ref §4)
    c.optim.bias_weight_decay_mult = 0.0       # ... and wd 0 (ref §4)
    c.predict.scales = (1850 / 2048,)          # --test-scales 1850: longer side 1850 of 2048 (ref §1a)
    c.predict.flip = True                      # flip-averaged softmax (ref §1a)
    c.evaluate.scales = (1.0,)                 # evaluate.py --test-scales 2048, single scale (ref §5)
    c.evaluate.flip = True                     # evaluate.py --test-flipping (ref §5)
    c.evaluate.mst_methods = "cbst_sp"         # paper table: the CBST-SP+MST row (47.0); the paper's MST
                                               # scales are unpublished (ref §5): CRST's 0.9/1.0/1.2 + flip


def daformer_mit_b5(c):
    """DAFormer's network and training values (Hoyer et al., CVPR 2022), self-trained by this
    project's rounds. "DAF X" cites lhoyer/DAFormer's configs: "uda" = configs/daformer/
    gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py, "data" = _base_/datasets/
    uda_gta_to_cityscapes_512x512.py, "model" = _base_/models/daformer_sepaspp_mitb5.py (on
    daformer_conv1_mitb5.py), "adamw" / "poly10warm" = _base_/schedules/*.py. DAFormer's online
    teacher, ClassMix, rare-class sampling and ImageNet feature distance are not part of this
    variant; the round structure (rounds, portions, source subsets, mining) is the CRST recipe's
    above. Initialise from the ImageNet encoder: ``python -m cbst_jax.cli.convert_weights mit
    mit_b5.pth mit_b5.npz`` then ``--config.model.init=mit_b5.npz``."""
    c.methods = "st,cbst"                      # project choice: one threshold vs class-balanced ones
    c.model.name = "daformer_mit_b5"           # DAF model: backbone mit_b5, DAFormerHead, sep. ASPP 1/6/12/18
    c.model.normalization = "auto"             # DAF data img_norm_cfg: mean 123.675/116.28/103.53, std
                                               # 58.395/57.12/57.375, to_rgb ('imagenet'; mit_b5.pth records it)
    c.model.train_bn = True                    # DAF model norm_cfg=dict(type='BN', requires_grad=True): the
                                               # decoder's BN trains with batch statistics (the encoder has none)
    c.source.list_file = ""                    # DAF data: source data/gta/images, every GTA5 image
    c.target.list_file = ""                    # DAF data: target leftImg8bit/train, all 2975 images
    c.input.crop = (512, 512)                  # DAF data crop_size=(512, 512)
    c.input.source_scale_range = (1280 / 1914, 1280 / 1914)  # DAF data Resize img_scale=(1280, 720),
                                               # keep ratio: GTA5 1914x1052 -> 1280x704
    c.input.target_scale_range = (0.5, 0.5)    # DAF data Resize img_scale=(1024, 512): Cityscapes at half size
    c.input.flip = True                        # DAF data RandomFlip prob=0.5
    c.input.batch_size = 4                     # DAF data samples_per_gpu=2 per domain, 1 GPU (uda n_gpus=1):
    c.input.sampler = "paired"                 # 2 source + 2 target images per step
    c.input.source_share = 0.5
    c.source_training.steps = 40_000           # DAF uda runner max_iters=40000 (its source-only runs too)
    c.source_training.batch_size = 2           # DAF data samples_per_gpu=2 (source only)
    c.source_training.crop = (512, 512)        # DAF data crop_size
    c.source_training.scale_range = (1280 / 1914, 1280 / 1914)  # DAF data GTA5 Resize (1280, 720)
    c.source_training.optimizer = "adam"       # DAF adamw type='AdamW', betas=(0.9, 0.999)
    c.source_training.lr = 6e-5                # DAF adamw lr=0.00006; uda optimizer lr=6e-05
    c.source_training.schedule = "poly"        # DAF poly10warm policy='poly', power=1.0, min_lr=0
    c.source_training.power = 1.0
    c.source_training.warmup_steps = 1500      # DAF poly10warm warmup='linear', warmup_iters=1500,
    c.source_training.warmup_ratio = 1e-6      # warmup_ratio=1e-6
    c.self_training.optimizer = "adam"         # DAF adamw (a fresh AdamW state each round)
    c.self_training.lr = 6e-5                  # DAF uda optimizer lr=6e-05
    c.self_training.lr_round_decay = 1.0       # project choice: the same rate every round
    c.self_training.schedule = "poly"          # DAF poly10warm power=1.0, over each round
    c.self_training.power = 1.0
    c.self_training.warmup_steps = 0           # project choice: a round starts from a trained model, not
                                               # from ImageNet weights (DAFormer warms up once, from ImageNet)
    c.self_training.loss_resolution = "upsample"  # mmseg decode_head.losses: logits resized to the labels
    c.optim.weight_decay = 0.01                # DAF adamw weight_decay=0.01
    c.optim.head_lr_mult = 10.0                # DAF uda paramwise_cfg head=dict(lr_mult=10.0)
    c.optim.bias_lr_mult = 1.0                 # DAF uda paramwise_cfg has no bias rule; its norm=dict(decay_mult=0.0)
    c.optim.bias_weight_decay_mult = 1.0       # is the network's no_decay_names (models.param_groups)
    c.predict.scales = (0.5,)                  # DACS pseudo-labels: the teacher on the un-augmented 1024x512
    c.predict.flip = False                     # target image, no flip (mmseg/models/uda/dacs.py)
    c.evaluate.scales = (0.5,)                 # DAF data test_pipeline: whole image at 1024x512,
    c.evaluate.flip = False                    # flip=False


def daformer_online(c):
    """DAFormer's online recipe on MiT-B5 (``daformer_mit_b5`` above for the network, AdamW and its
    rates), with DAFormer's fixed τ and the seed's class-balanced λ_c online (+ spatial prior):
    EMA teacher α 0.999, ClassMix, colour jitter and blur, rare-class sampling (T 0.01, 3000 px,
    crop ratio 0.5), ImageNet feature distance 0.005 on thing classes at the encoder's last stage,
    pseudo-weight 0 in the top 15 / bottom 120 rows (DAF uda; docs/online.md cites each value).
    Source and target crops per step: 2 + 2 (DAF data samples_per_gpu=2). Rounds: this project's
    (3 x steps_per_round iterations, p_r on the seed's schedule); DAFormer trains 40,000
    iterations from ImageNet weights in one go, here the rounds start from the source model."""
    daformer_mit_b5(c)
    c.methods = "source_only,online_fixed,online_cbst,online_cbst_sp"
    c.online.batch_size = 2                    # DAF data samples_per_gpu=2 (each domain)
    c.online.fd_weight = 0.005                 # DAF uda imnet_feature_dist_lambda=0.005
    c.online.fd_layer = ("backbone", "norm4")  # DAF uda imnet_feature_dist: the encoder's last stage
    c.self_training.steps_per_round = 4000     # project choice: 3 rounds of 4000 online iterations


VARIANTS = {"crst_deeplabv2": crst_deeplabv2, "cbst_resnet38": cbst_resnet38, "daformer_mit_b5": daformer_mit_b5,
            "daformer_online": daformer_online}
