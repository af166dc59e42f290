"""Test session set-up: 8 fake CPU devices, declared before jax initialises its backend,
so that sharded code paths run for real on a 2-core CI machine."""
import os
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Experiment subprocesses of one test session share a persistent compilation cache (never the
# user's): their programs repeat, and compiling them again would dominate the suite's time.
os.environ.setdefault("CBST_JAX_COMPILATION_CACHE", tempfile.mkdtemp(prefix="cbst_jax_test_xla_"))
