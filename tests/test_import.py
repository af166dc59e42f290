"""`import cbst_jax` (and its runtime submodules) must not pull in tensorflow or torch."""
import subprocess
import sys


def test_no_tensorflow_or_torch():
    code = ("import sys, cbst_jax, cbst_jax.labels, cbst_jax.metrics, cbst_jax.priors, cbst_jax.sharding\n"
            "for m in ('cbst_jax.selection', 'cbst_jax.models', 'cbst_jax.data', 'cbst_jax.train',"
            " 'cbst_jax.predict', 'cbst_jax.self_training'):\n"
            "    try:\n        __import__(m)\n    except ModuleNotFoundError as e:\n"
            "        if not e.name.startswith('cbst_jax'): raise\n"
            "bad = [m for m in ('tensorflow', 'torch', 'tensorflow_datasets') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
