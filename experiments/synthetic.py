"""`python -m experiments.synthetic` — the embedded benchmark and the README's demo.

Runs source-only, ST, CBST and CBST-SP on the procedural source/target street-scene pair (no
download needed) and prints the paper-style table; `--seeds=0,1,2` reports mean ± std over
seeds; `--config.quick=True` is a ~1 minute smoke version; `--config.preset=gpu` sizes it for a
GPU. Outputs (tables, plots, prediction grids, metrics.jsonl, TensorBoard) go to --workdir.
"""
import sys

from cbst_jax import config_lib
from experiments.configs.synthetic import get_config

main = config_lib.main_for(get_config, "synthetic self-training")

if __name__ == "__main__":
    sys.exit(main())
