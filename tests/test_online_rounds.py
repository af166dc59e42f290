"""The online methods (docs/online.md) through the round loop: a tiny run of online_fixed and
online_cbst_sp on the embedded pair (8 fake devices), every file it writes claimed by the workdir
owner, the pseudo-label rows' counts against brute force, a run SIGKILLed (failpoints) at the start
of an online round and again inside it after a checkpoint that resumes to the same rows bit for
bit; the batches are pure functions of (seed, stage, step); the online keys are validated."""
import json
import os

import numpy as np
import pytest

from test_self_training import claims_of, comparable, rows
from test_self_training import run_experiment as run_synthetic

SMALL = ["--config.methods=source_only,online_fixed,online_cbst_sp", "--config.source_training.steps=4",
         "--config.self_training.steps_per_round=4", "--config.checkpoint_every=2", "--config.log_every=2",
         "--config.online.ignore_bottom=8", "--config.online.rcs_min_pixels=12"]
# failpoint counts of train.step in one process: 4 source steps, online_fixed 2 x 4, online_cbst_sp r0 4
FIRST_STEP_OF_LAST_ROUND = 4 + 8 + 4 + 1


def run(workdir, *extra, failpoint=None):
    env = {"CBST_JAX_FAILPOINT": failpoint} if failpoint else None
    return run_synthetic(workdir, [*SMALL, *extra], env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("online") / "run")
    res = run(workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    return workdir


def test_online_methods_run_through_the_loop(reference):
    seed = os.path.join(reference, "seed_0")
    stages = {("online_fixed", 0), ("online_fixed", 1), ("online_cbst_sp", 0), ("online_cbst_sp", 1)}
    ev, pl, health = rows(seed, "eval"), rows(seed, "pseudo_labels"), rows(seed, "health")
    assert set(ev) == stages | {("source_only", None)} and set(pl) == set(health) == stages
    for r in ev.values():
        assert np.isfinite(r["miou"]) and (r["round"] is None or r["steps"] == 4)
    for key, r in pl.items():
        assert r["online"] and r["steps"] == 4 and len(r["precision"]) == len(r["share"])
        assert r["portion"] == ([0.2, 0.25][key[1]] if key[0] == "online_cbst_sp" else None)
        pixels = 4 * 8 * 64 * 128  # steps x target crops x pixels
        assert sum(r["predicted"]) == pixels and 0 <= r["selected_fraction"] <= 1
        assert (r["thresholds"] is None) == (key[0] == "online_fixed")
    ledger = json.load(open(os.path.join(seed, "ledger.json")))
    for method, r in stages:
        trained = ledger["stages"][f"{method}/r{r}"]["trained"]
        assert trained["online_state"] == f"online_states/{method}_r{r}" and trained["steps"] == 4
        assert os.path.isfile(os.path.join(seed, "models", f"{method}_r{r}.npz"))
    assert not os.path.exists(os.path.join(seed, "pseudo_labels"))  # no offline labelling pass
    results = open(os.path.join(seed, "results.md")).read()
    assert "online_cbst_sp r1" in results and "## Collapse guard" in results


def test_every_file_of_an_online_run_is_claimed(reference):
    from cbst_jax.methods import Stage

    found = claims_of(reference)
    states = {c.stage for c in found.values() if c and c.kind == "online_state"}
    assert states == {Stage(m, r) for m in ("online_fixed", "online_cbst_sp") for r in (0, 1)}
    assert not any(c.kind in ("pseudo_labels", "pseudo_label_figure") for c in found.values())


def test_sigkill_in_online_rounds_resumes_bit_identically(reference, tmp_path):
    """Killed at the first step of online_cbst_sp/r1 (the next run starts it from r0's online
    state on disk), then inside r1 after its checkpoint at step 2 (the next run resumes that
    checkpoint and its pseudo-label tally): the same rows as the uninterrupted run."""
    workdir = str(tmp_path / "killed")
    assert run(workdir, failpoint=f"train.step:{FIRST_STEP_OF_LAST_ROUND}").returncode == -9
    assert run(workdir, failpoint="train.step:4").returncode == -9  # only r1's steps are left
    ledger = json.load(open(os.path.join(workdir, "seed_0", "ledger.json")))
    assert [c["step"] for c in ledger["checkpoints"].values()] == [2]
    res = run(workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    for kind in ("eval", "pseudo_labels", "health"):
        got, want = rows(os.path.join(workdir, "seed_0"), kind), rows(os.path.join(reference, "seed_0"), kind)
        assert set(got) == set(want)
        for key in want:
            assert comparable(got[key]) == comparable(want[key]), (kind, key)


def test_label_counts_against_brute_force():
    import jax

    from cbst_jax.online_step import label_counts

    rng = np.random.default_rng(0)
    c, shape = 5, (3, 6, 7)
    probs = rng.dirichlet(np.ones(c), size=shape).astype(np.float32)
    pred = probs.argmax(-1)
    label = np.where(rng.random(shape) < 0.7, pred, 255)
    weight = np.where(label == 255, 0.0, rng.choice([0.0, 0.5, 1.0], size=shape)).astype(np.float32)
    truth = rng.integers(0, c, size=shape).astype(np.uint8)
    truth[0, 0] = 255
    out = jax.device_get(jax.jit(label_counts, static_argnums=5)(probs, pred, label, weight, truth, c))
    sel = weight > 0
    np.testing.assert_array_equal(out["predicted"], np.bincount(pred.ravel(), minlength=c))
    np.testing.assert_array_equal(out["selected"], np.bincount(label[sel], minlength=c))
    np.testing.assert_array_equal(out["correct"], np.bincount(label[sel & (label == truth)], minlength=c))
    from scipy.stats import entropy
    np.testing.assert_allclose(out["entropy_sum"], entropy(probs.reshape(-1, c), axis=-1).sum(), rtol=1e-5)
    assert int(out["pixels"]) == probs[..., 0].size


def test_tally_round_trips_and_gives_the_row():
    from cbst_jax.online_pseudo_labels import Tally

    rng = np.random.default_rng(1)
    steps = [dict(predicted=rng.integers(0, 50, 4), selected=rng.integers(0, 20, 4), correct=rng.integers(0, 5, 4),
                  entropy_sum=np.float32(rng.random() * 100), pixels=np.int32(64), pseudo_weight=np.float32(0.3),
                  thresholds=rng.random(4).astype(np.float32)) for _ in range(5)]
    whole, parted = Tally(4), Tally(4)
    for m in steps:
        whole.add(m)
    for m in steps[:2]:
        parted.add(m)
    parted = Tally.restore(4, json.loads(json.dumps(parted.state())))
    for m in steps[2:]:
        parted.add(m)
    assert whole.row(0, "online_cbst", 1, 0.25) == parted.row(0, "online_cbst", 1, 0.25)
    row = whole.row(0, "online_cbst", 1, 0.25)
    sel = np.sum([m["selected"] for m in steps], 0)
    np.testing.assert_allclose(row["share"], sel / sel.sum())
    np.testing.assert_allclose(row["precision"], np.sum([m["correct"] for m in steps], 0) / np.maximum(sel, 1))
    assert row["selected_fraction"] == pytest.approx(sel.sum() / 320)
    assert row["mean_entropy"] == pytest.approx(sum(float(m["entropy_sum"]) for m in steps) / 320)
    assert row["thresholds"] == [float(t) for t in steps[-1]["thresholds"]]


def test_online_batches_are_pure_and_follow_rcs():
    from cbst_jax.data.online_batches import OnlineBatches
    from cbst_jax.rare_class_sampling import RareClassSampler, image_class_counts

    rng = np.random.default_rng(2)
    source = [{"image": rng.integers(0, 255, (20, 30, 3), np.uint8),
               "label": rng.choice([0, 1, 2, 255], size=(20, 30), p=[0.6, 0.3, 0.05, 0.05]).astype(np.uint8)}
              for _ in range(6)]
    target = [{"image": rng.integers(0, 255, (20, 30, 3), np.uint8),
               "hidden_label": rng.integers(0, 3, (20, 30)).astype(np.uint8)} for _ in range(5)]
    counts = image_class_counts([s["label"] for s in source], 3)
    sampler = RareClassSampler(counts, temperature=0.05, min_pixels=10, seed=7)

    def make():
        return OnlineBatches(source, target, batch_size=4, crop_size=(12, 16), source_scale_range=(0.8, 1.2),
                             target_scale_range=(1.0, 1.0), flip=True, seed=7, canvas=(20, 30), rcs=sampler,
                             min_pixels=10, min_crop_ratio=0.2, truth_key="hidden_label", workers=1)

    with make() as a, make() as b:
        first = [next(a) for _ in range(3)]
        b.set_state({"step": 2})
        again = next(b)
    for key in first[2]:
        np.testing.assert_array_equal(first[2][key], again[key])
    for step, batch in enumerate(first):
        classes, images = sampler.draw(step, 4)
        for j in range(4):  # the drawn image holds more than min_pixels of the drawn class
            assert counts[images[j], classes[j]] > 10
        _, _, targets = make().draws(step)
        for j in range(4):  # the truth and the image are the same crop of the drawn target record
            y, x = batch["target_origin"][j]
            assert 0 <= y <= 20 - 12 and 0 <= x <= 30 - 16
            crop = target[targets[j]]["image"][y:y + 12, x:x + 16]
            truth = target[targets[j]]["hidden_label"][y:y + 12, x:x + 16]
            flipped = not np.array_equal(batch["target_image"][j], crop)
            if flipped:
                crop, truth = crop[:, ::-1], truth[:, ::-1]
            np.testing.assert_array_equal(batch["target_image"][j], crop)
            np.testing.assert_array_equal(batch["target_truth"][j], truth)


@pytest.mark.parametrize("key, value, message", [
    ("online.alpha", 1.0, "config.online.alpha=1.0: expected an EMA weight in (0, 1)"),
    ("online.tau", 0.0, "config.online.tau=0.0: expected a confidence threshold in (0, 1]"),
    ("online.window_batches", 0, "config.online.window_batches=0: expected a number of target batches >= 1"),
    ("online.rcs_temperature", -1.0, "config.online.rcs_temperature=-1.0: expected a temperature >= 0"),
    ("online.fd_weight", 0.005, "config.online.fd_layer=(): expected the module path of the compared features"),
    ("self_training.steps_per_round", 0, "config.self_training.steps_per_round=0: expected a step count >= 1 "
                                         "for the online method online_fixed"),
    ("online.ignore_bottom", 64, "config.online.ignore_bottom=64: expected ignored rows (online.ignore_top + "
                                 "ignore_bottom = 64) fewer than the crop's 64 rows"),
    ("input.crop", (128, 128), "config.input.crop=(128, 128): expected a crop within input.eval_size (64, 128) "
                               "for online_cbst_sp"),
])
def test_online_keys_are_validated(key, value, message):
    from cbst_jax import config_lib
    from experiments.configs import synthetic

    c = synthetic.get_config("online")
    config_lib.validate(c, need_roots=False)
    node = c
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, need_roots=False)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
