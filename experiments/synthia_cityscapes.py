"""`python -m experiments.synthia_cityscapes --workdir=... --config.source.root=... --config.target.root=...`

Class-balanced self-training for synthia_cityscapes; settings in experiments/configs/synthia_cityscapes.py, overridable
with `--config.<key>=<value>`; `--seeds=0,1,2` runs and aggregates several seeds.
"""
import sys

from cbst_jax import config_lib
from experiments.configs.synthia_cityscapes import get_config

main = config_lib.main_for(get_config, "synthia_cityscapes self-training")

if __name__ == "__main__":
    sys.exit(main())
