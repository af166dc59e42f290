"""Writes tests/fixtures/mxnet_small.params with the real MXNet and the expected values as
tests/fixtures/mxnet_small_expected.npz, for the numpy reader's test.

MXNet 1.9.1 only runs with an old numpy, so use a throwaway venv:
  python3 -m venv /tmp/mxvenv && /tmp/mxvenv/bin/pip install mxnet==1.9.1 "numpy<1.24"
  /tmp/mxvenv/bin/python tools/make_mxnet_fixture.py
"""
import os

import mxnet as mx
import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def main():
    rng = np.random.RandomState(0)
    arrays = {
        "arg:conv1a_weight": mx.nd.array(rng.randn(4, 3, 3, 3), dtype="float32"),
        "arg:bn7_gamma": mx.nd.array(rng.randn(5), dtype="float32"),
        "aux:bn7_moving_var": mx.nd.array(rng.rand(5) + 0.5, dtype="float32"),
        "arg:linear19_weight": mx.nd.array(rng.randn(2, 7), dtype="float32"),
        "arg:half": mx.nd.array(rng.randn(3, 2), dtype="float16"),
        "arg:double": mx.nd.array(rng.randn(2, 2, 2), dtype="float64"),
        "arg:ints": mx.nd.array(np.arange(-3, 3), dtype="int32"),
        "arg:scalar": mx.nd.array([3.25], dtype="float32"),
    }
    path = os.path.join(FIXTURES, "mxnet_small.params")
    mx.nd.save(path, arrays)
    loaded = mx.nd.load(path)
    np.savez(os.path.join(FIXTURES, "mxnet_small_expected.npz"),
             **{k.replace(":", "__"): v.asnumpy() for k, v in loaded.items()})
    print(f"mxnet {mx.__version__}: wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
