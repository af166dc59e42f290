"""`python -m experiments.cityscapes_nthu --workdir=... --config.source.root=... --config.target.root=...`

Class-balanced self-training for cityscapes_nthu; settings in experiments/configs/cityscapes_nthu.py, overridable
with `--config.<key>=<value>`; `--seeds=0,1,2` runs and aggregates several seeds.
"""
import sys

from cbst_jax import config_lib
from experiments.configs.cityscapes_nthu import get_config

main = config_lib.main_for(get_config, "cityscapes_nthu self-training")

if __name__ == "__main__":
    sys.exit(main())
