"""cbst_jax: class-balanced self-training (CBST, CBST-SP, CRST) for domain-adaptive
semantic segmentation, in JAX/Flax.

Importing the package is cheap and never imports tensorflow or torch; submodules are
imported on demand (``from cbst_jax import selection``).
"""
__version__ = "0.1.0"
