"""The embedded benchmark's quick version, as the README's demo runs it, with two seeds: it
completes, writes the tables and plots, and its metrics are finite and in range. The ordering of
the methods is not asserted (at this size it is noise)."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_two_seeds(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", XLA_FLAGS="", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "experiments.synthetic", "--config=quick", "--seeds=0,1",
                          f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    methods = {(r["method"], r["round"]) for r in summary["rows"]}
    assert methods == {("source_only", None)} | {(m, k) for m in ("st", "st_sp", "cbst", "cbst_sp", "cbst_sp+mst", "mrkld")
                                                for k in (0, 1)}
    assert sorted({r["seed"] for r in summary["rows"]}) == [0, 1]
    for r in summary["rows"]:
        assert math.isfinite(r["miou"]) and 0.0 <= r["miou"] <= 1.0
        assert all(v is None or 0.0 <= v <= 1.0 for v in r["iou"])
    text = (tmp_path / "results.md").read_text()
    assert "over seeds [0, 1]" in text and "cbst_sp r1" in text and "cbst − st" in text
    for f in ("figures/miou_per_round.png", "figures/pseudo_label_stats.png", "seed_0/figures/predictions.png"):
        assert (tmp_path / f).stat().st_size > 1000, f
    assert "| cbst_sp r1 |" in (tmp_path / "seed_1" / "results.md").read_text()
    for line in (tmp_path / "seed_0" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "pseudo_labels":
            assert 0.0 < row["selected_fraction"] <= 1.0
            assert abs(sum(row["share"]) - 1.0) < 1e-6
