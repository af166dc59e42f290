"""Nothing lost, nothing silently wrong (issue 12), on small embedded-pair runs in subprocesses:

* a fault-injection campaign: one run killed (SIGKILL, by failpoints) at seven points -
  inside source training, while a checkpoint is written, while pseudo-labels are written,
  between a file's write and its rename, between a stage's weights file and its record,
  between a row's log line and its record, inside a round - then its newest checkpoint
  damaged; the same command resumes it to bit-identical rows and pseudo-label files;
* damaged, replaced and deleted files (checkpoints truncated / emptied / without metadata,
  pseudo-labels replaced by valid all-ignore PNGs, a weights file with flipped bytes) are
  detected, named, skipped or redone, in a workdir moved to another place;
* --fresh and a workdir that is not ours; one-line errors and exit 2 for bad inputs, with the
  workdir's files hashed before and after; a non-finite loss, then a restart from the last
  finished stage with a lower learning rate; a full disk;
* (issue 22) one run's life: a --fresh over a finished run stopped by SIGTERM while a second run
  on its workdir is refused, resumed and stopped by Ctrl-C once the moved-aside run is gone,
  killed inside a round after its checkpoint, a pseudo-label of that round deleted (labelled
  again by the model before, the checkpoint resumed on identical labels), killed between a
  prediction file's write and its rename, outputs of finished stages lost; every row, label,
  weights, prediction and figure identical to the unbroken run; refusals on a finished run
  (another run holds it, a stage it does not have) leave it unchanged.
"""
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--config.methods=source_only,cbst",
    "--config.synthetic.num_source=32", "--config.synthetic.num_target_train=16",
    "--config.synthetic.num_target_val=8",
    "--config.source_training.steps=16", "--config.self_training.rounds=2",
    "--config.self_training.steps_per_round=8", "--config.input.batch_size=8",
    "--config.source_training.batch_size=8",
    "--config.input.eval_batch_size=8", "--config.checkpoint_every=4", "--config.log_every=4",
    "--config.input.workers=1",
]


def command(workdir, *extra, failpoint=None, small=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=ROOT)
    env.pop("CBST_JAX_FAILPOINT", None)
    if failpoint:
        env["CBST_JAX_FAILPOINT"] = failpoint
    return [sys.executable, "-m", "experiments.synthetic", f"--workdir={workdir}", *(SMALL if small else ()),
            *extra], env


def run(workdir, *extra, failpoint=None, small=True, cwd=ROOT, timeout=900):
    cmd, env = command(workdir, *extra, failpoint=failpoint, small=small)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def start(workdir, err_path, *extra):
    """The run in the background, its stderr into ``err_path`` (a pipe would fill and block it)."""
    cmd, env = command(workdir, *extra)
    with open(err_path, "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


def wait_for(condition, proc, what, timeout=600):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def stopped_by(proc, err_path, name, status):
    """The run stopped by signal ``name``: exit ``status``, one line saying so, no traceback."""
    assert proc.wait(timeout=600) == status, (proc.returncode, open(err_path).read()[-3000:])
    text = open(err_path).read()
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line
             and "s/it]" not in line and "?it/s" not in line]
    assert "Traceback" not in text and lines[-1].startswith(f"stopped by {name}") and \
        lines[-1].endswith("rerun the same command to resume"), text[-3000:]
    return lines[-1]


def ledger(seed_dir):
    with open(os.path.join(seed_dir, "ledger.json")) as f:
        return json.load(f)


def rows(seed_dir, kind):
    out = {}
    with open(os.path.join(seed_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == kind:
                out[(r["method"], r["round"])] = {k: v for k, v in r.items() if k != "wall_s"}
    return out


def label_files(seed_dir):
    out = {}
    base = os.path.join(seed_dir, "pseudo_labels")
    for d, _, files in os.walk(base):
        for f in files:
            if f.endswith(".png"):
                with open(os.path.join(d, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(d, f), base)] = fh.read()
    return out


def npz_arrays(seed_dir, folder):
    """{file: {key: array}} of the .npz files in ``seed_dir/folder`` (weights, predictions: a zip
    stores its write time, so these compare by content)."""
    out = {}
    for f in sorted(os.listdir(os.path.join(seed_dir, folder))):
        with np.load(os.path.join(seed_dir, folder, f)) as z:
            out[f] = {k: z[k] for k in z.files}
    return out


def figure_files(seed_dir):
    d = os.path.join(seed_dir, "figures")
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def tree_hashes(path, exclude=()):
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            if f in exclude:
                continue
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def assert_same_results(seed_dir, reference):
    """Every row, pseudo-label file, weights file, kept prediction and figure of the seed as the
    unbroken reference's (rows without their wall time; .npz files by their arrays). The
    collapse guard's health rows hold the rounds' loss windows, so a round resumed from a
    checkpoint must have kept those logged before it."""
    assert rows(seed_dir, "eval") == rows(reference, "eval")
    assert rows(seed_dir, "pseudo_labels") == rows(reference, "pseudo_labels")
    assert rows(seed_dir, "health") == rows(reference, "health") and len(rows(reference, "health")) == 2
    assert label_files(seed_dir) == label_files(reference)
    for folder in ("models", "predictions"):
        got, want = npz_arrays(seed_dir, folder), npz_arrays(reference, folder)
        assert set(got) == set(want), folder
        for f in want:
            assert set(got[f]) == set(want[f]) and all(np.array_equal(got[f][k], want[f][k]) for k in want[f]), f
    assert figure_files(seed_dir) == figure_files(reference)


def one_line_error(res):
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert err and err[-1].startswith("error: ") and "Traceback" not in res.stderr, res.stderr[-2000:]
    return err[-1]


def checkpoints(seed_dir):
    d = os.path.join(seed_dir, "checkpoints")
    return sorted((int(n) for n in os.listdir(d) if n.isdigit()), reverse=True) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference") / "run"
    res = run(workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    return str(workdir / "seed_0")


def test_fault_injection_campaign(reference, tmp_path):
    workdir = tmp_path / "campaign"
    seed_dir = str(workdir / "seed_0")
    points = ["train.step:5",                 # inside source training (after its step-4 checkpoint)
              "checkpoint.save:2",            # while a checkpoint is being written
              "pseudo_labels.write:6",        # in the middle of a round's pseudo-label files
              "atomic_write.before_rename:3",  # a file written to its temporary name, not renamed
              "ledger.weights_written:1",     # a stage's weights file written, not yet recorded
              "ledger.row_logged:1",          # a row in metrics.jsonl, not yet in the ledger
              "train.step:6"]                 # inside round 1, after its step-4 checkpoint
    for point in points:
        res = run(workdir, failpoint=point)
        assert res.returncode == -9, (point, res.returncode, res.stderr[-2000:])
    newest = checkpoints(seed_dir)
    assert newest, "the last kill should leave a training checkpoint"
    from test_self_training import claims_of  # every file, the checkpoints too, named by cbst_jax.workdir

    assert "checkpoint" in {claim.kind for claim in claims_of(workdir).values()}
    victim = os.path.join(seed_dir, "checkpoints", str(newest[0]), "state", "_METADATA")
    with open(victim, "r+b") as f:  # one flipped byte
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0x01
        f.seek(0)
        f.write(data)
    res = run(workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "does not match the digest recorded" in res.stderr
    assert_same_results(seed_dir, reference)
    assert not [n for n in os.listdir(os.path.join(seed_dir, "checkpoints")) if "tmp" in n]


@pytest.mark.parametrize("damage", ["truncate_and_no_metadata", "empty_and_bad_meta"])
def test_damaged_checkpoints_fall_back_in_a_moved_workdir(reference, tmp_path, damage):
    """Killed in source training with two checkpoints kept; both damaged, the workdir moved:
    each damaged checkpoint is named and skipped, source training starts over, same results."""
    first = tmp_path / "first"
    res = run(first, failpoint="train.step:14")
    assert res.returncode == -9, res.stderr[-2000:]
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(first, moved)
    before = tree_hashes(first)
    seed_dir = str(moved / "seed_0")
    newest, older = checkpoints(seed_dir)[:2]
    ck = lambda i, *p: os.path.join(seed_dir, "checkpoints", str(i), *p)  # noqa: E731
    state_files = sorted(os.path.join(d, f) for d, _, fs in os.walk(ck(newest, "state", "d")) for f in fs)
    if damage == "truncate_and_no_metadata":
        with open(state_files[0], "r+b") as f:
            f.truncate(max(1, os.path.getsize(state_files[0]) // 2))
        os.remove(ck(older, "state", "_METADATA"))
    else:
        open(state_files[0], "wb").close()
        with open(ck(older, "meta", "metadata"), "r+b") as f:
            f.truncate(5)
    res = run(moved)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("does not match the digest recorded") == 2, res.stderr[-3000:]
    assert_same_results(seed_dir, reference)
    assert tree_hashes(first) == before  # the original was never read or written


def test_replaced_and_damaged_files_are_redone(reference, tmp_path):
    """Killed inside round 0 (its pseudo-labels complete): the round's PNGs replaced by valid
    all-ignore PNGs and one deleted, the source weights file's bytes flipped. The resume names
    both problems, trains the source again and labels the round again, to the same results."""
    workdir = tmp_path / "w"
    res = run(workdir, failpoint="train.step:18")
    assert res.returncode == -9, res.stderr[-2000:]
    seed_dir = str(workdir / "seed_0")
    labels = os.path.join(seed_dir, "pseudo_labels", "cbst_r0")
    pngs = sorted(f for f in os.listdir(labels) if f.endswith(".png"))
    assert len(pngs) == 16
    for f in pngs:
        Image.fromarray(np.full((64, 128), 255, np.uint8)).save(os.path.join(labels, f))
    os.remove(os.path.join(labels, pngs[3]))
    weights = os.path.join(seed_dir, "models", "source.npz")
    with open(weights, "r+b") as f:
        data = bytearray(f.read())
        for k in range(64):
            data[len(data) // 3 + k] ^= 0xFF
        f.seek(0)
        f.write(data)
    res = run(workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "models/source.npz does not match the sha256" in res.stderr
    assert "the pseudo-labels of stage cbst/r0 are made again" in res.stderr
    assert_same_results(seed_dir, reference)


def test_fresh_and_foreign_folders_lose_nothing(reference, tmp_path):
    finished = tmp_path / "finished"
    shutil.copytree(os.path.dirname(reference), finished)
    before = tree_hashes(finished)
    line = one_line_error(run(finished, "--fresh", "--config.model.name=resnet9000"))
    assert "model.name" in line and "resnet9000" in line
    assert tree_hashes(finished) == before and not list(tmp_path.glob("finished.replaced-*"))
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    for extra in (("--fresh",), ()):
        line = one_line_error(run(home, *extra))
        assert "not empty and holds no cbst_jax run" in line
        assert (home / "thesis.tex").read_text() == "years of work" and os.listdir(home) == ["thesis.tex"]
    res = run(finished, "--fresh", "--config.self_training.rounds=0")  # a valid --fresh
    assert res.returncode == 0, res.stderr[-3000:]
    assert set(rows(str(finished / "seed_0"), "eval")) == {("source_only", None)}
    assert not list(tmp_path.glob("finished.replaced-*"))  # the old run, moved aside, is gone now


@pytest.mark.parametrize("args, expected", [
    (("--config.seed=abc",), "config.seed=abc"),
    (("--config.input.crop=(640, 1280)",), "config.input.crop=(640, 1280)"),
    (("--config=nope",), "unknown variant 'nope'"),
    (("--config.input.nope=1",), "unknown config key config.input.nope"),
    (("--config.model.init=README.md",), "README.md"),
    (("--seeds=-1",), "--seeds=-1: -1 is not a seed"),  # issue 22 item 5 (created seed_-1/ before)
    (("--config.target.train_split=val",), "config.target.train_split='val' is also config.target.eval_split"),
    (("--config.synthetic.num_target_train=1",),  # issue 18 item 3: a round's batch of 4 takes 2 target images
     "config.input.batch_size=4: a round's batch takes 2 target train images (input.sampler='paired', "
     "input.source_share=0.5), but the target train split of synthetic/target holds 1; expected at least 2"),
])
def test_bad_inputs_are_one_line_and_touch_nothing(tmp_path, args, expected):
    workdir = tmp_path / "untouched"
    line = one_line_error(run(workdir, *args, small=False))
    assert expected in line, line
    assert not workdir.exists()


def test_non_finite_loss_then_resume_from_the_last_finished_stage(reference, tmp_path):
    workdir = tmp_path / "nan"
    seed_dir = str(workdir / "seed_0")
    line = one_line_error(run(workdir, "--config.self_training.lr=1e30"))
    assert "non-finite loss in stage cbst/r0" in line and "--config.resume_from_stage=source" in line, line
    res = run(workdir, "--config.self_training.lr=1e-3")  # not allowed without naming a stage
    assert "another configuration" in one_line_error(res)
    res = run(workdir, "--config.resume_from_stage=source", f"--config.self_training.lr={5e-4}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "restarting after stage source" in res.stderr
    assert rows(seed_dir, "eval")[("cbst", 1)] == rows(reference, "eval")[("cbst", 1)]
    assert os.listdir(os.path.join(seed_dir, "rewound"))  # the diverged stage's files were kept
    nan_source = tmp_path / "nan_source"
    line = one_line_error(run(nan_source, "--config.source_training.lr=1e30"))
    assert "non-finite loss in stage source" in line and "no stage has finished yet" in line, line


def test_full_disk_is_one_line_and_leaves_nothing_half_written(reference, tmp_path):
    """In a private mount namespace, the workdir on a 2 MiB tmpfs: the first training checkpoint
    does not fit. One line saying how much space it needs, no orbax temporary folder left; with
    the filesystem grown, the same command resumes to the same results."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"]).returncode:
        pytest.skip("no unprivileged mount namespaces here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = " ".join(f"'{a}'" for a in SMALL)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=ROOT)
    env.pop("CBST_JAX_FAILPOINT", None)
    script = (f"mount -t tmpfs -o size=2m tmpfs {mnt} && cd {ROOT} && "
              f"{{ {sys.executable} -m experiments.synthetic --workdir={mnt}/w {args} 2> {tmp_path}/full.err; "
              f"echo $? > {tmp_path}/full.rc; ls -a {mnt}/w/seed_0/checkpoints > {tmp_path}/full.ls; "
              f"mount -o remount,size=64m {mnt} && {sys.executable} -m experiments.synthetic --workdir={mnt}/w {args} "
              f"2> {tmp_path}/again.err; echo $? > {tmp_path}/again.rc; cp -r {mnt}/w {tmp_path}/result; }}")
    subprocess.run(["unshare", "-Urm", "sh", "-c", script], env=env, timeout=1800)
    err = (tmp_path / "full.err").read_text().strip().splitlines()
    assert (tmp_path / "full.rc").read_text().strip() == "2", err[-5:]
    assert err[-1].startswith("error: ") and "MiB" in err[-1] and "Traceback" not in "\n".join(err), err[-5:]
    assert "tmp" not in (tmp_path / "full.ls").read_text()
    assert (tmp_path / "again.rc").read_text().strip() == "0", (tmp_path / "again.err").read_text()[-3000:]
    assert_same_results(str(tmp_path / "result" / "seed_0"), reference)


def test_weights_that_are_not_ours_are_one_line(tmp_path):
    """A PyTorch pickle handed to model.init (instead of converting it) and a truncated weights
    file: one line naming the file, nothing created."""
    torch = pytest.importorskip("torch")
    pth = tmp_path / "deeplab.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(2, 3, 1, 1)}, "epoch": 3}, pth)
    truncated = tmp_path / "cut.npz"
    np.savez(truncated, w=np.zeros(1000, np.float32))
    truncated.write_bytes(truncated.read_bytes()[:300])
    for path in (pth, truncated):
        workdir = tmp_path / f"w_{path.stem}"
        line = one_line_error(run(workdir, f"--config.model.init={path}", small=False))
        assert str(path) in line, line
        assert not workdir.exists()


def test_a_runs_life_signals_fresh_lock_and_kills_after_a_round_checkpoint(reference, tmp_path):
    """Issue 22 items 1, 2, 3, 6, 7, 8 on one workdir, ending identical to the unbroken run."""
    workdir = tmp_path / "w"
    shutil.copytree(os.path.dirname(reference), workdir)  # a finished run, replaced with --fresh below
    seed_dir = str(workdir / "seed_0")
    marker = lambda: json.loads((workdir / "cbst_jax_run.json").read_text())  # noqa: E731

    # --fresh, stopped by SIGTERM once its source training has a checkpoint; just before, a
    # second run on the workdir is refused with one line naming the first (item 7)
    def has_checkpoint():
        try:  # the folder is moved aside and made again meanwhile
            return bool(ledger(seed_dir)["checkpoints"])
        except (OSError, ValueError):
            return False

    first = start(workdir, tmp_path / "first.err", "--fresh")
    wait_for(has_checkpoint, first, "a source checkpoint")
    first.send_signal(signal.SIGSTOP)  # held there (and its lock with it) while the second run tries
    line = one_line_error(run(workdir))
    assert f"--workdir={workdir} is in use by another run (pid {first.pid} on host " in line, line
    first.send_signal(signal.SIGTERM)  # delivered as it goes on
    first.send_signal(signal.SIGCONT)
    stopped_by(first, tmp_path / "first.err", "SIGTERM", 143)  # item 6
    asides = glob.glob(f"{workdir}.replaced-*")
    assert len(asides) == 1 and marker()["replaces"] == [os.path.basename(asides[0])]  # item 8: recorded

    # resumed without --fresh: the moved-aside run is deleted once the source model exists; Ctrl-C then
    second = start(workdir, tmp_path / "second.err")
    wait_for(lambda: not os.path.exists(asides[0]), second, "the moved-aside run's deletion")
    second.send_signal(signal.SIGINT)
    stopped_by(second, tmp_path / "second.err", "SIGINT (Ctrl-C)", 130)
    assert marker()["replaces"] == []

    # killed inside round 0 after its step-4 checkpoint (item 1 as reported: train.step:22 from the start)
    doc = ledger(seed_dir)
    assert "trained" in doc["stages"]["source"] and "trained" not in doc["stages"].get("cbst/r0", {})
    done = max([c["step"] for c in doc["checkpoints"].values() if c["stage"] == "cbst/r0"], default=0)
    assert run(workdir, failpoint=f"train.step:{6 - done}").returncode == -9
    (checkpoint,) = [c for c in ledger(seed_dir)["checkpoints"].values() if c["stage"] == "cbst/r0"]
    assert checkpoint["step"] == 4 and checkpoint["labels"]
    holder = int((workdir / "cbst_jax_run.lock").read_text().split()[1])
    with pytest.raises(ProcessLookupError):  # the killed run's lock died with it: the next run goes on
        os.kill(holder, 0)

    # one of round 0's labels deleted: labelled again by the source model, bit for bit what the
    # checkpoint trained on (else it would be skipped with a note); killed between the write of
    # predictions/cbst_r1.npz and its rename (item 2 as reported, at atomic_write.before_rename:59)
    labels = os.path.join(seed_dir, "pseudo_labels", "cbst_r0")
    os.remove(os.path.join(labels, "0000003.png"))
    res = run(workdir, failpoint="atomic_write.before_rename@predictions/cbst_r1.npz")
    assert res.returncode == -9, res.stderr[-3000:]
    assert "0000003.png is missing: the pseudo-labels of stage cbst/r0 are made again" in res.stderr
    assert "other pseudo-labels" not in res.stderr
    predictions = os.path.join(seed_dir, "predictions")
    assert len(glob.glob(os.path.join(predictions, "cbst_r1.npz.tmp*"))) == 1
    assert not os.path.exists(os.path.join(predictions, "cbst_r1.npz"))

    # files of finished stages lost or damaged: each made again with a note (item 2); the
    # temporary file removed (item 3); the figure of round 0 needs its labels, one deleted again
    os.remove(os.path.join(seed_dir, "figures", "pseudo_labels_cbst_r0.png"))
    os.remove(os.path.join(labels, "0000007.png"))
    with open(os.path.join(predictions, "source.npz"), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    res = run(workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    for note in ("note: removed 1 temporary file(s) a stopped run left (e.g. seed_0/predictions/cbst_r1.npz.tmp",
                 "predictions/source.npz does not match the sha256 recorded when it was written (damaged): made again "
                 "for stage source",
                 "pseudo_labels_cbst_r0.png is missing: made again for stage cbst/r0",
                 "0000007.png is missing: the pseudo-labels of stage cbst/r0 are made again"):
        assert note in res.stderr, (note, res.stderr[-3000:])
    assert not [p for d, _, fs in os.walk(workdir) for p in fs if ".tmp" in p]
    assert_same_results(seed_dir, reference)


def test_refusals_on_a_finished_run_change_nothing(reference, tmp_path):
    """A workdir another run holds (here: this test's process), and a restart from a stage the
    run does not have (issue 22 item 4: one line, without orbax's traceback after it)."""
    from cbst_jax.workdir import LOCK_FILE, WorkdirLock

    finished = tmp_path / "finished"
    shutil.copytree(os.path.dirname(reference), finished)
    lock = WorkdirLock(str(finished))
    before = tree_hashes(finished)
    line = one_line_error(run(finished))
    assert line == (f"error: --workdir={finished} is in use by another run (pid {os.getpid()} on host "
                    f"{os.uname().nodename}); wait for it to end, or pass another --workdir")
    lock.release()
    assert tree_hashes(finished) == before
    res = run(finished, "--config.resume_from_stage=cbst/r7")
    assert one_line_error(res) == ("error: config.resume_from_stage='cbst/r7': expected one of this run's stages "
                                   "(source, cbst/r0, cbst/r1)")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr[-3000:]
    # the refused run held the lock, so the lock file names it now; every other file is unchanged
    assert tree_hashes(finished, exclude=(LOCK_FILE,)) == {k: v for k, v in before.items() if k != LOCK_FILE}


def test_a_workdir_of_another_layout_is_refused(tmp_path):
    """A run of an older cbst_jax (workdir layout 1: its marker records no layout, its files are
    named otherwise) is refused with one line before anything in it is touched; the seed's
    ledger refuses it too, and so do the readers of a finished run."""
    from cbst_jax.config_lib import seed_record
    from cbst_jax.errors import RunError
    from cbst_jax.methods import SOURCE
    from cbst_jax.run_ledger import RunLedger, stage_weights_problem
    from cbst_jax.workdir import SeedDir
    from experiments.configs import synthetic

    old = tmp_path / "old"
    (old / "seed_0" / "pseudo_labels" / "cbst" / "round_0").mkdir(parents=True)
    (old / "cbst_jax_run.json").write_text(json.dumps({"created_by": "cbst_jax 0.1.0", "replaces": []}))
    (old / "seed_0" / "ledger.json").write_text(json.dumps({"version": 1, "stages": {}, "checkpoints": {},
                                                            "history": []}))
    before = tree_hashes(old)
    assert one_line_error(run(old)) == (
        f"error: --workdir={old} holds a run of an older cbst_jax (workdir layout 1; this version reads layout 2) "
        f"that it cannot resume; pass --fresh to start over (the old run is moved aside, then deleted) or another "
        f"--workdir")
    assert tree_hashes(old) == before
    with pytest.raises(RunError, match=r"ledger.json: written by an older cbst_jax \(workdir layout 1; this version "
                                       r"reads layout 2\); start over with --fresh, or use another --workdir$"):
        RunLedger(SeedDir(str(old / "seed_0")), seed_record(synthetic.get_config()), [SOURCE])
    assert stage_weights_problem(SeedDir(str(old / "seed_0")), SOURCE).endswith(
        "ledger.json: written by an older cbst_jax (workdir layout 1; this version reads layout 2)")
    assert tree_hashes(old) == before


def test_workdir_lock_and_stale_temporaries(tmp_path):
    """The lock is exclusive across processes and gone with a SIGKILLed holder; only files named
    as atomic_write names its temporaries are removed."""
    from cbst_jax.atomic_files import atomic_write_bytes, remove_stale_temporaries
    from cbst_jax.errors import RunError
    from cbst_jax.workdir import WorkdirLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from cbst_jax.workdir import WorkdirLock; WorkdirLock(sys.argv[2]); print(1, flush=True); "
                               "time.sleep(600)", ROOT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "1"
    with pytest.raises(RunError, match=f"is in use by another run \\(pid {holder.pid} on host "):
        WorkdirLock(str(tmp_path))
    holder.kill()
    holder.wait()
    WorkdirLock(str(tmp_path)).release()

    names = ["a.npz.tmp123", "results.md.tmp7", "keep.tmp", "tmp42", "keep.tmp12x", "results.md"]
    (tmp_path / "sub").mkdir()
    for name in names:
        (tmp_path / "sub" / name).write_text("x")
    atomic_write_bytes(str(tmp_path / "sub" / "new.json"), b"{}")
    removed = remove_stale_temporaries(str(tmp_path))
    assert removed == [str(tmp_path / "sub" / n) for n in ("a.npz.tmp123", "results.md.tmp7")]
    assert sorted(os.listdir(tmp_path / "sub")) == ["keep.tmp", "keep.tmp12x", "new.json", "results.md", "tmp42"]


@pytest.mark.parametrize("stuck", ["thread", "swallowed", "unwinding", "unwinding, signalled again"])
def test_a_stopped_run_ends_whatever_the_signal_interrupted(tmp_path, stuck):
    """Issue 22 item 6, the hang found under load: a signal's exception can stop a library half-way
    (a thread pool's worker started but never registered for shutdown: the interpreter's exit then
    waits for it for ever), be swallowed (raised inside a garbage-collection callback), or the
    unwinding itself can block. The stopped run still ends with its one line and 128 + the signal's
    number: at once in the first case, ``STOP_GRACE_S`` (1 s here) after the signal in the next
    two, at once on a second signal."""
    script = (
        "import os, signal, sys, threading, time\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from cbst_jax.cli import run\n"
        "run.STOP_GRACE_S = 1.0 if sys.argv[2] != 'unwinding, signalled again' else 600\n"
        "run.StopRequest().install()\n"
        "threading.Thread(target=threading.Event().wait).start()  # never ends, not a daemon\n"
        "try:\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(600)\n"
        "except run.Stopped as e:\n"
        "    if sys.argv[2] == 'swallowed':\n"
        "        time.sleep(600)  # the run goes on\n"
        "    if sys.argv[2].startswith('unwinding'):\n"
        "        print('unwinding', flush=True)\n"
        "        threading.Event().wait()  # a close that never returns\n"
        "    run._end_stopped(e)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, ROOT, stuck], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    if stuck == "unwinding, signalled again":
        assert proc.stdout.readline().strip() == "unwinding"
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["stopped by SIGTERM: everything finished so far is kept; rerun the same "
                                        "command to resume"], err
    assert time.time() - t0 < 30
