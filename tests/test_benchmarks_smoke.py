"""The GPU benchmarks' code paths, run tiny on CPU so a lent GPU's few minutes are never spent on
a broken script (their figures are measured on the GPU, not here)."""
import json
import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_env(tmp_path, **extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", XLA_FLAGS="", PYTHONPATH=ROOT,
                OUT=str(tmp_path), **extra)


def run_json(args, tmp_path, timeout=900):
    res = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=cpu_env(tmp_path), capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def test_train_step_benchmark_both_atrous_modes(tmp_path):
    rows = run_json(["benchmarks.bench_train_step", "--smoke", "--configs", "2:float32", "--atrous",
                     "dilated,space_to_batch", "--rounds", "2", "--save-hlo", str(tmp_path / "hlo")], tmp_path)
    assert [(r["step"], r["atrous"], r["loss_resolution"]) for r in rows] == [
        ("project", "dilated", "upsample"), ("project", "space_to_batch", "upsample")]
    assert all("error" not in r and r["finite"] and r["steps"] == 4 and r["ms_median"] > 0 for r in rows)
    # same variables, same batches, the same function: the same loss after the same steps
    assert np.isclose(rows[0]["loss"], rows[1]["loss"], rtol=1e-5)
    assert rows[0]["speed_vs_first"] == 1.0 and rows[1]["tflop_per_step"] > rows[0]["tflop_per_step"] > 0
    assert rows[0]["hlo"]["lowered_convolutions"] == {"f32xf32xf32": 62}
    assert len(os.listdir(tmp_path / "hlo")) == 2
    assert json.loads((tmp_path / "bench_jax.json").read_text()) == rows


def test_train_step_benchmark_aot_accounting(tmp_path):
    rows = run_json(["benchmarks.bench_train_step", "--smoke", "--aot", "--configs", "2:bfloat16", "--atrous",
                     "space_to_batch", "--loss", "stride", "--step", "both"], tmp_path)
    assert [(r["step"], r["loss_resolution"]) for r in rows] == [("project", "stride"), ("minimal", "resize")]
    for r in rows:
        assert "error" not in r, r
        assert r["aot"] and r["tflop_per_step"] > 0 and r["temp_gib"] >= 0 and "ms_median" not in r
        assert set(r["hlo"]["lowered_convolutions"]) == {"bf16xbf16xbf16"}  # bfloat16 compute throughout


def test_online_step_benchmark_smoke(tmp_path):
    """Both policies' online steps timed on the demo network, the offline row beside them, and the
    window the class-balanced state carries: conf float32 + pred uint8 per pixel of W batches."""
    env = dict(cpu_env(tmp_path), XLA_FLAGS="--xla_backend_optimization_level=0")  # compiles in half the time
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_online_step", "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [(r["step"], r.get("policy")) for r in rows] == [("offline", None), ("online", "fixed"),
                                                            ("online", "class_balanced")]
    offline, fixed, balanced = rows
    assert offline["batch"] == 4 and offline["tflop_per_step"] > 0 and "ms_median" not in offline
    for r in (fixed, balanced):
        assert r["finite"] and r["steps"] == 4 and r["ms_median"] >= r["ms_min"] > 0 and r["compile_s"] > 0
        assert np.isclose(r["img_per_s"], 4000 / r["ms_median"])
        assert r["tflop_per_step"] > 0 and r["temp_bytes"] > 0 and r["argument_bytes"] > 0
    # one more forward of half the rows (the teacher's) than the offline step's forward + backward
    # (about 3 forwards) of all rows: 1 + 2 / (4 * 3) = 1.17
    assert 1.1 < fixed["lowered_flop_ratio_to_offline"] < 1.3
    W, B, H, Wd = 2, 2, 32, 64
    assert fixed["window_bytes"] == 0 and balanced["window_batches"] == W
    assert balanced["window_layout"] == {"conf": [[W, B, H, Wd], "float32"], "pred": [[W, B, H, Wd], "uint8"],
                                         "filled": [[W], "bool"], "cursor": [[], "int32"]}
    assert balanced["window_bytes"] == W * B * H * Wd * 5 + W + 4
    # what the compiled programs take: the window, and the portion's two uint32 words, which the
    # fixed policy's program never reads (jit drops unused arguments)
    assert balanced["argument_bytes"] - fixed["argument_bytes"] == balanced["window_bytes"] + 8
    assert json.loads((tmp_path / "bench_online.json").read_text()) == rows


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


def test_count_compiles_second_run_compiles_nothing(tmp_path):
    command = ["experiments.synthetic", "--config=quick", "--config.methods=source_only,cbst",
               "--config.source_training.steps=4", "--config.self_training.rounds=2",
               "--config.self_training.steps_per_round=2", "--config.synthetic.num_source=16",
               "--config.synthetic.num_target_train=8", "--config.synthetic.num_target_val=8",
               "--config.input.eval_batch_size=8", "--config.log_every=1000"]
    env = cpu_env(tmp_path)
    res = subprocess.run([sys.executable, "-m", "benchmarks.count_compiles", "--cache", str(tmp_path / "cache"),
                          "--workdir", str(tmp_path / "runs"), "--", *command], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "compiles.json").read_text())
    first, second = result["runs"]
    assert first["compiled"] > 5 and second["compiled"] == 0 and second["loaded"] == first["programs"]
    assert result["later_runs_compiled"] == 0 and result["cache_files"] >= first["compiled"]
    assert {"source_model source", "label cbst/r0"} <= set(first["stages"])
    assert first["stages"]["source_model source"]["functions"] == {"jit(train_step)": 1}


def test_full_scale_benchmark_smoke(tmp_path):
    rows = run_json(["benchmarks.bench_full_scale", "--smoke"], tmp_path, timeout=1200)
    r = rows[-1]
    assert json.loads((tmp_path / "full_scale.json").read_text()) == r
    # pseudo-labels and predictions at the evaluation canvas, one per target image
    assert r["outputs"]["pseudo_label 64x128"] == 2
    assert [2, 32, 64, 3] in [s[0] for s in r["network_shapes"]]  # training crops, batch 2
    # flip: each (image, scale) is 2 forwards, and the labelling runs the network once over the split
    assert r["forwards_per_pseudo_labelled_image"] == 2
    # evaluation at the recipe's test scales 0.9 / 1.0 / 1.2 with flip: 6 forwards
    assert set(r["forwards_per_evaluated_image"].values()) == {6}
    assert 0.1 < r["peak_rss_gib"] < 12 and r["child_vm_hwm_gib"] <= r["peak_rss_gib"] + 0.01
    assert {"source_model source", "label cbst/r0", "retrain cbst/r0"} <= set(r["stages"])


def test_parity_check_smoke(tmp_path):
    """The references are plain torch.nn (torchvision's key names, no torchvision needed); where
    torchvision is installed they also match its own networks."""
    rows = run_json(["benchmarks.check_parity_gpu", "--smoke"], tmp_path)
    compared = [r for r in rows if "precision" in r]
    assert {(r["model"], r["atrous"], r["bn_folded"]) for r in compared} >= {
        ("deeplabv2_resnet101", "dilated", True), ("deeplabv2_resnet101", "space_to_batch", True),
        ("deeplabv2_resnet101", "dilated", False), ("fcn8s_vgg16", "-", None)}
    assert all(r["rel_err_l2"] < 1e-4 for r in compared if r["precision"] == "highest")
    checks = [r["torchvision_check"] for r in rows if "torchvision_check" in r]
    assert len(checks) == 2
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert checks == [None, None]
    else:
        assert all(isinstance(c, float) and c < 1e-5 for c in checks), checks
    assert json.loads((tmp_path / "parity_gpu.json").read_text()) == rows


def test_real_size_round_smoke(tmp_path):
    """benchmarks.real_size_round end to end at the smallest size: fixtures, a weights file that
    claims to be a source model, one round through the launcher, per-phase figures, the projection."""
    bench = tmp_path / "bench_jax.json"  # a step benchmark's rows: the round's configuration is picked
    row = dict(model="deeplabv2_resnet_small", batch=2, dtype="float32", atrous="dilated", hw=[32, 64])
    bench.write_text(json.dumps([dict(row, bn_folded=False, ms_median=70.0), dict(row, bn_folded=True, ms_median=50.0),
                                 dict(row, bn_folded=True, batch=8, ms_median=90.0)]))
    r = run_json(["benchmarks.real_size_round", "--smoke", "--gta5", "2", "--label", "2", "--steps", "1",
                  "--evaluate", "1", "--workers", "1", "--step-bench", str(bench)], tmp_path, timeout=1200)[-1]
    assert r["step_bench_ms"] == 50.0 and r["step_vs_bench"] == round(r["step_ms"] / 50.0, 3)
    assert json.loads((tmp_path / "real_size_round.json").read_text()) == r
    assert r["compute"] == {"dtype": "float32", "atrous": "dilated", "bn_folded": True, "platform": "cpu"}
    assert r["outputs"]["pseudo_label 64x128"] == 2 and r["predict_scales"] == [0.9, 1.0, 1.2]
    phases = r["phases"]
    assert {"label cbst/r0", "retrain cbst/r0", "evaluate_and_record cbst/r0",
            "evaluate_and_record source"} <= set(phases)
    assert phases["label cbst/r0"]["images_per_s"] > 0 and phases["retrain cbst/r0"]["batches"] == 1
    assert phases["retrain cbst/r0"]["compile_s"] > 0 and r["programs_compiled"] > 0 and r["step_ms"] > 0
    assert r["device_peak_gib"] is None and 0.1 < r["peak_rss_gib"] < 12  # the CPU reports no device memory
    p = r["paper_round_projection"]
    assert (p["images_labelled"], p["images_evaluated"]) == (2975, 500) and p["steps"] > 2975  # 2 epochs, batch 2
    assert abs(p["total_s"] - (p["label_s"] + p["retrain_s"] + p["evaluate_s"] + p["compile_s"])) < 0.5


def test_synthetic_round_smoke(tmp_path):
    r = run_json(["benchmarks.synthetic_round", "--", "--config=quick", "--config.methods=source_only,cbst",
                  "--config.source_training.steps=4", "--config.self_training.rounds=1",
                  "--config.self_training.steps_per_round=2", "--config.synthetic.num_source=16",
                  "--config.synthetic.num_target_train=8", "--config.synthetic.num_target_val=8",
                  "--config.input.eval_batch_size=8", "--config.input.batch_size=2",
                  "--config.source_training.batch_size=2"], tmp_path, timeout=1200)[-1]
    assert json.loads((tmp_path / "synthetic_round.json").read_text()) == r
    assert set(r["round_s"]) == {"cbst/r0"} and r["round_s"]["cbst/r0"] > 0
    assert r["phases"]["source_model source"]["steps_per_s"] > 0 and r["phases"]["retrain cbst/r0"]["batches"] == 2
    assert "build set-up" in r["phases"] and r["compute"]["dtype"] == "float32"
    assert (tmp_path / "results.md").exists() and (tmp_path / "metrics.jsonl").exists()


def gpu_session_lines():
    path = os.path.join(ROOT, "benchmarks", "gpu_session.sh")
    text = open(path).read().replace("\\\n", " ")
    return text, [l for l in text.splitlines() if "python3 -m " in l and not l.lstrip().startswith("#")]


def test_gpu_session_script_commands_are_valid():
    """The GPU call's script: shell syntax, the train-step lines' flags, the synthetic round's keys,
    the real-size round's flags, the peer's anchor."""
    from benchmarks import bench_online_step, bench_train_step
    from cbst_jax import config_lib
    from experiments.configs import synthetic

    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_session.sh")]).returncode == 0
    text, lines = gpu_session_lines()
    steps = [l.split("python3 -m benchmarks.bench_train_step", 1)[1] for l in lines if "bench_train_step" in l]
    assert len(steps) >= 3
    batches = set()
    for args in steps:
        args = args.replace('"$WORK/step8/hlo"', "/tmp/hlo").split()
        parsed = bench_train_step.parse_args(args)
        assert set(parsed.atrous.split(",")) <= {"dilated", "space_to_batch"} and parsed.configs
        assert set(parsed.fold.split(",")) <= {"on", "off"}
        batches |= {c.split(":")[0] for c in parsed.configs.split(",")}
    assert {"8", "2"} <= batches  # batch 8 and the CRST recipe's batch 2
    synthetic_line = next(l for l in lines if "benchmarks.synthetic_round" in l)
    overrides = [a for a in synthetic_line.split() if a.startswith("--config.")]
    assert "--config=gpu" in synthetic_line and len(overrides) >= 8
    assert config_lib.unknown_override(overrides, synthetic.get_config("gpu")) is None
    round_line = next(l for l in lines if "benchmarks.real_size_round" in l)
    assert "--step-bench" in round_line and "item real_size_round" in round_line
    assert "item peer" in text and "benchmarks.peer_step .devcarry/anchor_torch_deeplabv2.py" in text
    online = next(l for l in lines if "benchmarks.bench_online_step" in l)
    parsed = bench_online_step.parse_args(online.split("python3 -m benchmarks.bench_online_step", 1)[1].split())
    assert (parsed.model, parsed.size, parsed.batch, parsed.dtype) == ("daformer_mit_b5", "512,512", 2, "bfloat16")
    assert parsed.policy == "fixed,class_balanced" and "item online_step" in online
    assert not any(re.search(r"\bgit\b", l) for l in text.splitlines() if not l.lstrip().startswith("#"))


def test_gpu_session_packs_every_item_and_runs_extra_items(tmp_path):
    """The slot for later items (an EXTRA_ITEMS file) runs its items like the script's own, and
    every item's folder comes back inside results.tgz beside session.log."""
    import tarfile

    extra = tmp_path / "extra_items.txt"
    extra.write_text("# a comment line\n"
                     "tiny 30 python3 -c \"import json, os; print(json.dumps({'n': 1}));"
                     " open(os.path.join(os.environ['OUT'], 'x.json'), 'w').write('1')\"\n")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), WORK=str(tmp_path / "work"), EXTRA_ITEMS=str(extra), ONLY="tiny",
               JAX_PLATFORMS="cpu", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    res = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    log = (out / "session.log").read_text()
    assert "== tiny (limit 30s" in log and '{"n": 1}' in log and "== done" in log
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
    assert {"./tiny/log", "./tiny/x.json"} <= names
    assert sorted(p.name for p in out.iterdir()) in (["results.tgz", "session.log"],
                                                     ["jax_cache.tgz", "results.tgz", "session.log"])
