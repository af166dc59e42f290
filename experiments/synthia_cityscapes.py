"""`python -m experiments.synthia_cityscapes`: the command line of `cbst_jax.cli.run` with
experiments/configs/synthia_cityscapes.py as its config (`--config=<variant>` picks a variant of it)."""
import os

from cbst_jax.cli.run import launch

if __name__ == "__main__":
    launch(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "synthia_cityscapes.py"))
