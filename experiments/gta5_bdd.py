"""`python -m experiments.gta5_bdd --workdir=... --config.source.root=... --config.target.root=...`

Class-balanced self-training for gta5_bdd; settings in experiments/configs/gta5_bdd.py, overridable
with `--config.<key>=<value>`; `--seeds=0,1,2` runs and aggregates several seeds.
"""
import sys

from cbst_jax import config_lib
from experiments.configs.gta5_bdd import get_config

main = config_lib.main_for(get_config, "gta5_bdd self-training")

if __name__ == "__main__":
    sys.exit(main())
