"""The command lines, each a thin layer over library functions (``args``: what they share):

    python -m cbst_jax.cli.run               an experiment (``experiments/<name>.py`` launch it)
    python -m cbst_jax.cli.evaluate          cbst-evaluate: a stage of a run, or any weights file
    python -m cbst_jax.cli.export            cbst-export: a stage of a run as one weights file
    python -m cbst_jax.cli.infer             cbst-infer: segment your own images
    python -m cbst_jax.cli.convert_weights   cbst-convert-weights: PyTorch / MXNet checkpoints
"""
