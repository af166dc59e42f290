"""The GPU benchmarks' code paths, run tiny on CPU so a lent GPU's few minutes are never spent on
a broken script (their figures are measured on the GPU, not here)."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_benchmark_project_step(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", XLA_FLAGS="", PYTHONPATH=ROOT,
               OUT=str(tmp_path))
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_train_step", "--smoke", "--step", "project",
                          "--configs", "2:float32"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")]
    assert len(rows) == 1 and "error" not in rows[0], rows
    r = rows[0]
    assert r["step"] == "project" and r["batch"] == 2 and r["finite"]
    assert np.isfinite(r["loss"]) and r["ms_median"] > 0
    assert json.loads((tmp_path / "bench_jax.json").read_text()) == rows


def test_pseudo_label_benchmark_smoke(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", XLA_FLAGS="", PYTHONPATH=ROOT,
               OUT=str(tmp_path))
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_pseudo_label", "--smoke", "--images", "2",
                          "--batch", "1", "--configs", "single,mst"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")]
    assert [len(r["scales"]) for r in rows] == [1, 3]
    assert all(r["img_per_s"] > 0 and r["images"] == 2 for r in rows)


def test_soft_label_crop_benchmark_smoke(capsys):
    from benchmarks import bench_soft_labels

    bench_soft_labels.main(["--size", "40,72", "--crop", "32,48", "--stride", "4", "--repeats", "2"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["out_shape"] == [32, 48, 19] and r["soft_ms_median"] > 0
