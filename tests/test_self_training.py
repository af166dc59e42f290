"""End to end on the embedded pair with a tiny network: source-only -> 2 rounds of CBST-SP on
8 fake devices, checkpoints, and a run killed with SIGKILL mid-round that resumes to
bit-identical final metrics; the same thresholds, pseudo-labels and loss from 2 processes
(jax.distributed on localhost) as from 1."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--config.methods=source_only,cbst_sp",
    "--config.synthetic.num_source=48", "--config.synthetic.num_target_train=32",
    "--config.synthetic.num_target_val=16",
    "--config.source_training.steps=16", "--config.self_training.rounds=2",
    "--config.self_training.steps_per_round=8", "--config.input.batch_size=8",
    "--config.source_training.batch_size=8",
    "--config.input.eval_batch_size=16", "--config.checkpoint_every=4", "--config.log_every=4",
    "--config.input.workers=1", "--config.evaluate.mst_methods=",
]


def run_experiment(workdir, extra=(), env_devices=8, wait=True, env=None):
    e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(env_devices),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={env_devices}", PYTHONPATH=ROOT)
    e.update(env or {})
    cmd = [sys.executable, "-m", "experiments.synthetic", f"--workdir={workdir}", *TINY, *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=900)


def rows(workdir, kind):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == kind:
                out[(r["method"], r["round"])] = r
    return out


def comparable(r):
    return {k: v for k, v in r.items() if k not in ("wall_s",)}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ref") / "run")
    res = run_experiment(workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    return os.path.join(workdir, "seed_0"), res


def test_end_to_end_outputs(reference_run):
    seed_dir, res = reference_run
    ev = rows(seed_dir, "eval")
    assert set(ev) == {("source_only", None), ("cbst_sp", 0), ("cbst_sp", 1)}
    for r in ev.values():
        assert 0.0 <= r["miou"] <= 1.0 and np.isfinite(r["miou"])
    pl = rows(seed_dir, "pseudo_labels")
    assert [pl[("cbst_sp", k)]["portion"] for k in (0, 1)] == [0.2, 0.25]
    for k in (0, 1):
        assert 0 < pl[("cbst_sp", k)]["selected_fraction"] <= 1
    for name in ("results.md", "figures/miou_per_round.png", "figures/predictions.png",
                 "figures/pseudo_label_stats.png", "figures/pseudo_labels_cbst_sp_r1.png", "spatial_prior.npz"):
        assert os.path.exists(os.path.join(seed_dir, name)), name
    ledger = json.load(open(os.path.join(seed_dir, "ledger.json")))
    assert set(ledger["stages"]) == {"source", "cbst_sp/r0", "cbst_sp/r1"}
    for stage in ("source", "cbst_sp_r0", "cbst_sp_r1"):
        assert os.path.exists(os.path.join(seed_dir, "models", f"{stage}.npz")), stage
    assert os.path.exists(os.path.join(seed_dir, "pseudo_labels", "cbst_sp_r1", "manifest.json"))
    assert "cbst_sp r1" in res.stdout and "mIoU" in res.stdout


def claims_of(workdir):
    """{file: what it is} of every file under a run's folder, asking ``cbst_jax.workdir`` alone;
    fails naming the files it does not claim."""
    from cbst_jax.workdir import RunDir

    found, unclaimed = {}, []
    for folder, _, files in os.walk(workdir):
        for name in files:
            relative = os.path.relpath(os.path.join(folder, name), workdir)
            claim = RunDir(str(workdir)).claim(relative)
            if claim is None:
                unclaimed.append(relative)
            found[relative] = claim
    assert not unclaimed, unclaimed[:10]
    return found


def test_every_file_of_a_run_is_found_through_the_workdir_owner(reference_run):
    """Every file the run wrote (weights, predictions, pseudo-label stores, figures, reports,
    the log) is claimed by cbst_jax.workdir, and each stage's files are where it says; files
    the layout has no place for (strays, layout-1 names) are not claimed."""
    import collections

    from cbst_jax.methods import SOURCE, Stage
    from cbst_jax.workdir import Claim, RunDir

    seed_path, _ = reference_run
    workdir = os.path.dirname(seed_path)
    found = claims_of(workdir)
    run = RunDir(workdir)
    seed = run.seed(0)
    rel = lambda path: os.path.relpath(path, workdir)  # noqa: E731
    rounds = [Stage("cbst_sp", 0), Stage("cbst_sp", 1)]
    for stage in [SOURCE] + rounds:
        assert found[rel(seed.weights(stage))] == Claim("weights", stage)
        assert found[rel(seed.predictions(stage))] == Claim("predictions", stage)
    for stage in rounds:
        store = [f for f, c in found.items() if c == Claim("pseudo_labels", stage)]
        assert sorted(store) == sorted(rel(os.path.join(seed.pseudo_labels(stage), n))
                                       for n in ["manifest.json"] + [f"{i:07d}.png" for i in range(32)])
        assert found[rel(seed.pseudo_label_figure(stage))] == Claim("pseudo_label_figure", stage)
    for path, kind in ((run.marker, "marker"), (run.lock, "lock"), (run.results, "results"),
                       (run.summary, "summary"), (seed.config, "config"), (seed.ledger, "ledger"),
                       (seed.metrics, "log"), (seed.results, "results"), (seed.eval_overlap, "eval_overlap"),
                       (seed.spatial_prior, "spatial_prior"), (seed.figure("predictions"), "figure"),
                       (run.figure("miou_per_round"), "figure"), (seed.figure("miou_per_round"), "figure")):
        assert found[rel(path)] == Claim(kind), path
    kinds = collections.Counter(c.kind for c in found.values())
    assert set(kinds) == {"marker", "lock", "results", "summary", "figure", "config", "ledger", "log",
                          "tensorboard", "eval_overlap", "spatial_prior", "weights", "predictions",
                          "pseudo_labels", "pseudo_label_figure"}, kinds
    for stray in ("seed_0/notes.txt", "seed_0/models/cbst_sp_r0.pth", "seed_0/models/bogus_r0.npz",
                  "seed_0/pseudo_labels/cbst_sp_r0/extra.png", "seed_0/figures/pseudo_labels_st_r", "notes.md",
                  "seed_0/predictions/source_only.npz", "seed_0/pseudo_labels/cbst_sp/round_0/0000000.png",
                  "Rome/cbst_jax_run.json", "seed_x/config.json"):
        assert run.claim(stray) is None, stray


def test_sigkill_mid_round_resumes_bit_identically(reference_run, tmp_path):
    seed_dir, _ = reference_run
    workdir = str(tmp_path / "killed")
    proc = run_experiment(workdir, wait=False)
    # Wait until round 1's pseudo-labels are being written, then kill without warning.
    target = os.path.join(workdir, "seed_0", "pseudo_labels", "cbst_sp_r0", "manifest.json")
    deadline = time.time() + 600
    while not os.path.exists(target) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into round 0's training
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = run_experiment(workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    got = rows(os.path.join(workdir, "seed_0"), "eval")
    want = rows(seed_dir, "eval")
    assert set(got) == set(want)
    for key in want:
        assert comparable(got[key]) == comparable(want[key]), key
    assert rows(os.path.join(workdir, "seed_0"), "pseudo_labels") == rows(seed_dir, "pseudo_labels")


def test_resume_of_finished_run_changes_nothing(reference_run):
    seed_dir, _ = reference_run
    before = rows(seed_dir, "eval")
    res = run_experiment(os.path.dirname(seed_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    assert rows(seed_dir, "eval") == before


def test_two_processes_match_one(tmp_path):
    """The code path of a TPU pod: 2 processes x 4 CPU devices, jax.distributed over localhost
    (gloo collectives), each process building only its own rows of every batch, against the
    same run in 1 process x 8 devices. Round 0 labels the target with the (untrained, seeded)
    source model, so its thresholds and pseudo-labels must agree exactly (the histograms are
    integer sums); the training losses then agree to float32 all-reduce rounding."""
    import socket

    from PIL import Image

    extra = ["--config.source_training.steps=0", "--config.self_training.rounds=1",
             "--config.methods=source_only,cbst_sp,lrent"]
    one_dir = str(tmp_path / "one")
    res = run_experiment(one_dir, extra)
    assert res.returncode == 0, res.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two_dir = str(tmp_path / "two")
    common = [*extra, "--config.distributed=True", f"--config.coordinator_address=127.0.0.1:{port}",
              "--config.num_processes=2"]
    procs = [run_experiment(two_dir, [*common, f"--config.process_id={i}"], env_devices=4, wait=False)
             for i in range(2)]
    errs = [p.communicate(timeout=900)[1].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    one, two = os.path.join(one_dir, "seed_0"), os.path.join(two_dir, "seed_0")
    pl1, pl2 = rows(one, "pseudo_labels")[("cbst_sp", 0)], rows(two, "pseudo_labels")[("cbst_sp", 0)]
    assert pl2["thresholds"] == pl1["thresholds"] and pl2["share"] == pl1["share"]
    d1, d2 = (os.path.join(d, "pseudo_labels", "cbst_sp_r0") for d in (one, two))
    files = sorted(f for f in os.listdir(d1) if f.endswith(".png"))
    assert files == sorted(f for f in os.listdir(d2) if f.endswith(".png")) and len(files) == 32
    for f in files:
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(d1, f))),
                                      np.asarray(Image.open(os.path.join(d2, f))))
    s1, s2 = (os.path.join(d, "pseudo_labels", "lrent_r0") for d in (one, two))
    soft = sorted(f for f in os.listdir(s1) if f.endswith(".soft.npz"))
    assert soft == sorted(f for f in os.listdir(s2) if f.endswith(".soft.npz")) and len(soft) == 32
    for f in soft:  # CRST soft labels written by each process for its own rows
        with np.load(os.path.join(s1, f)) as a, np.load(os.path.join(s2, f)) as b:
            np.testing.assert_array_equal(a["cells"], b["cells"])
            np.testing.assert_array_equal(a["top"], b["top"])
    e1, e2 = rows(one, "eval"), rows(two, "eval")
    assert e2[("source_only", None)]["iou"] == e1[("source_only", None)]["iou"]
    np.testing.assert_allclose(e2[("cbst_sp", 0)]["train_loss"], e1[("cbst_sp", 0)]["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(e2[("cbst_sp", 0)]["miou"], e1[("cbst_sp", 0)]["miou"], atol=5e-3)


def test_kill_between_checkpoint_and_evaluation(reference_run, tmp_path):
    """A run killed after a stage's final checkpoint but before its evaluation row was recorded
    (in the ledger, and so in the log) evaluates that stage on resume, to the same row."""
    import shutil

    seed_dir, _ = reference_run
    workdir = tmp_path / "copy"
    shutil.copytree(os.path.dirname(seed_dir), workdir)
    ledger = workdir / "seed_0" / "ledger.json"
    recorded = json.loads(ledger.read_text())
    del recorded["stages"]["cbst_sp/r1"]["eval"]
    ledger.write_text(json.dumps(recorded))
    path = workdir / "seed_0" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    kept = [l for l in lines if not ('"kind": "eval"' in l and '"method": "cbst_sp"' in l and '"round": 1' in l)]
    assert len(kept) == len(lines) - 1
    path.write_text("\n".join(kept) + "\n")
    res = run_experiment(str(workdir))
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = rows(str(workdir / "seed_0"), "eval"), rows(seed_dir, "eval")
    assert {k: comparable(v) for k, v in got.items()} == {k: comparable(v) for k, v in want.items()}


def test_label_regularised_rounds(tmp_path):
    """CRST LRENT end to end: soft labels stored as per-pixel top masses and residual cells next
    to the hard maps, carried into retraining, evaluated."""
    from PIL import Image

    workdir = str(tmp_path / "lr")
    res = run_experiment(workdir, ["--config.methods=source_only,lrent", "--config.self_training.rounds=1",
                                   "--config.self_training.soft_label_stride=4"])
    assert res.returncode == 0, res.stderr[-3000:]
    seed_dir = os.path.join(workdir, "seed_0")
    pl = rows(seed_dir, "pseudo_labels")[("lrent", 0)]
    assert 0 < pl["selected_fraction"] < 1
    ev = rows(seed_dir, "eval")[("lrent", 0)]
    assert np.isfinite(ev["train_loss"]) and 0 <= ev["miou"] <= 1
    d = os.path.join(seed_dir, "pseudo_labels", "lrent_r0")
    with open(os.path.join(d, "manifest.json")) as f:
        assert json.load(f)["soft_label_stride"] == 4
    for i in range(32):
        hard = np.asarray(Image.open(os.path.join(d, f"{i:07d}.png")))
        with np.load(os.path.join(d, f"{i:07d}.soft.npz")) as z:
            top, cells = z["top"], z["cells"]
        assert top.shape == (64, 128) and cells.shape == (16, 32, 19) and cells.dtype == np.uint8
        np.testing.assert_array_equal(top > 0, hard != 255)  # a mass exactly where a label is
        assert top[hard != 255].min() >= 255 // 19
        sums = cells.sum(-1).astype(int)
        assert ((sums == 0) | (np.abs(sums - 255) <= 19 // 2 + 1)).all()  # quantised distributions

    # benchmarks/lr_selection re-derives round 0's selection from the saved source model
    from benchmarks.lr_selection import measure

    got, portion = measure(seed_dir, [0.25], kinds=("lrent",), keeps=("objective",))
    assert portion == 0.2 and [r["method"] for r in got] == ["cbst", "lrent"]
    assert got[1]["kept_fraction"] == pl["selected_fraction"]
    # CBST keeps at least floor(N_c p) pixels of each class, and every pixel tied with λ_c on top
    assert 0.2 - 19 / (32 * 64 * 128) <= got[0]["kept_fraction"] < 0.3 and 1 / 19 <= got[1]["top_mass"] <= 1


def test_workdir_config_check_ignores_launch_keys(tmp_path):
    """The processes of one multi-host run differ in process_id (and relaunches in the
    coordinator's port): they share a workdir; any other difference is refused."""
    from cbst_jax.config_lib import seed_record
    from cbst_jax.errors import RunError
    from cbst_jax.run_ledger import check_workdir_config
    from cbst_jax.workdir import SeedDir
    from experiments.configs import synthetic

    cfg = synthetic.get_config()
    check_workdir_config(seed_record(cfg), SeedDir(str(tmp_path)))
    other = synthetic.get_config()
    other.process_id, other.coordinator_address = 1, "10.0.0.1:1234"
    check_workdir_config(seed_record(other), SeedDir(str(tmp_path)))  # accepted
    other.self_training.rounds = 5
    with pytest.raises(RunError, match="differs in self_training.rounds"):
        check_workdir_config(seed_record(other), SeedDir(str(tmp_path)))


def test_st_sp_round_end_to_end(tmp_path):
    """ST-SP (one pooled threshold over prior-weighted scores): a round's stored pseudo-labels
    are select_pseudo_labels' labels at the pooled λ of q·p, λ taken from a numpy sort of the
    prior-weighted confidences of the (untrained, seeded) source model on the target split."""
    import jax
    import ml_collections
    from PIL import Image

    from cbst_jax import model_init, priors, selection
    from cbst_jax.data.splits import open_splits
    from cbst_jax.predictor import Predictor
    from cbst_jax.sharding import make_mesh

    workdir = str(tmp_path / "stsp")
    res = run_experiment(workdir, ["--config.methods=source_only,st_sp", "--config.source_training.steps=0",
                                   "--config.self_training.rounds=1"])
    assert res.returncode == 0, res.stderr[-3000:]
    seed_dir = os.path.join(workdir, "seed_0")
    with open(os.path.join(seed_dir, "config.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    model = model_init.build_model(cfg)
    variables = model_init.init_variables(cfg, model, jax.random.key(cfg.seed), tuple(cfg.input.crop))
    canvas = tuple(cfg.input.eval_size)
    prior = priors.resize_prior(priors.load_prior(os.path.join(seed_dir, "spatial_prior.npz"), 19), canvas)
    target = open_splits(cfg).target_train
    images = np.stack([target[i]["image"] for i in range(len(target))])
    mesh = make_mesh(jax.devices()[:8])
    predictor = Predictor(model, 19, mesh, canvas, cfg.predict.scales, cfg.predict.flip)
    probs = np.concatenate([np.asarray(jax.jit(predictor.probs)(variables, images[i:i + 16]))
                            for i in range(0, len(images), 16)])
    conf = np.sort((probs * prior[None]).max(-1).ravel())[::-1]
    k = int(np.floor(conf.size * 0.2))
    lam = np.full(19, conf[k - 1], np.float32)
    pl = rows(seed_dir, "pseudo_labels")[("st_sp", 0)]
    np.testing.assert_array_equal(np.asarray(pl["thresholds"], np.float32), lam)
    want = np.asarray(selection.select_pseudo_labels(probs, lam, prior))
    d = os.path.join(seed_dir, "pseudo_labels", "st_sp_r0")
    got = np.stack([np.asarray(Image.open(os.path.join(d, f"{i:07d}.png"))) for i in range(len(target))])
    np.testing.assert_array_equal(got, want)
    assert 0 < pl["selected_fraction"] < 1
    assert ("st_sp", 0) in rows(seed_dir, "eval")
