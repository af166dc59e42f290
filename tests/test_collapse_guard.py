"""The collapse guard (issue 18): each signal against hand-computed values and a brute-force
reading of its definition; the verdict on constructed collapsing rounds; evaluation rows and the
hidden-label precision never reaching it; the health table; the keys' validation.

End to end on the smallest embedded-pair runs (tests/test_reliability.py's SMALL settings, in
subprocesses): a healthy run fires nothing and reports its table, and its health rows stay the
same when evaluation is replaced by a collapsed model's; a forced all-one-class pseudo-label
store fires, and with self_training.on_collapse=stop the run stops after the recorded round with
one line and exit 2, stops the same way when run again, and goes on with resume_from_stage;
a learning rate that diverges but stays finite fires the loss and entropy checks."""
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from cbst_jax import collapse_guard as cg
from cbst_jax import config_lib, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = cg.Settings(min_share=1e-4, share_fraction=0.25, loss_rise=0.5, loss_windows=3, entropy_fraction=0.25)


def pl_row(method, rnd, share, predicted=None, entropy=None, **extra):
    row = {"kind": "pseudo_labels", "seed": 0, "method": method, "round": rnd, "portion": 0.2 + 0.05 * rnd,
           "thresholds": [0.5] * len(share), "share": list(share), "selected_fraction": 0.2}
    if predicted is not None:
        row["predicted"] = list(predicted)
    if entropy is not None:
        row["mean_entropy"] = entropy
    row.update(extra)
    return row


# ------------------------------------------------------------------------------ each signal
def test_unselected_classes_hand_computed():
    predicted = [600, 300, 99, 1, 0]        # shares 0.6, 0.3, 0.099, 0.001, 0
    share = [0.7, 0.0, 0.0, 0.0, 0.0]
    assert cg.unselected_classes(predicted, share, min_share=0.05) == [(1, 0.3), (2, 0.099)]
    assert cg.unselected_classes(predicted, share, min_share=0.0005) == [(1, 0.3), (2, 0.099), (3, 0.001)]
    assert cg.unselected_classes(predicted, [0.5, 0.2, 0.2, 0.1, 0.0], 0.0) == []
    assert cg.unselected_classes([0, 0, 0], [0, 0, 0], 0.0) == []  # nothing predicted: nothing to judge


def test_share_drops_hand_computed():
    previous = [0.5, 0.3, 0.2, 0.4, 0.00005]
    share = [0.9, 0.07, 0.03, 0.1, 0.0]     # ratios 1.8, 0.2333, 0.15, 0.25 (not below), class 4 not judged
    assert cg.share_ratios(share, previous, 1e-4) == pytest.approx({0: 1.8, 1: 0.07 / 0.3, 2: 0.15, 3: 0.25})
    assert cg.share_drops(share, previous, 0.25, 1e-4) == [(1, 0.3, 0.07), (2, 0.2, 0.03)]
    assert cg.share_drops(share, previous, 0.25, 0.0) == [(1, 0.3, 0.07), (2, 0.2, 0.03), (4, 0.00005, 0.0)]
    assert cg.share_drops(share, previous, 0.0, 0.0) == []  # fraction 0: off


def brute_force_loss_rise(windows, rise):
    """The definition read literally: every stretch of consecutive windows, each above its best
    earlier window by more than ``rise`` of that window's magnitude."""
    def risen(i):
        best = min(windows[:i])
        return windows[i] - best > rise * abs(best)

    n = len(windows)
    stretch = max([j - i for i in range(1, n + 1) for j in range(i, n + 1) if all(risen(k) for k in range(i, j))],
                  default=0)
    peak = max([0.0] + [(windows[i] - min(windows[:i])) / abs(min(windows[:i])) for i in range(1, n)])
    return stretch, peak


def test_loss_rise_hand_computed_and_against_brute_force():
    # best 1.0, then 0.8; 1.3, 1.25, 1.21 are 62.5 %, 56.25 %, 51.25 % above 0.8; 0.9 is 12.5 %
    got = cg.loss_rise([1.0, 0.8, 1.3, 1.25, 1.21, 0.9], 0.5)
    assert (got.stretch, got.windows) == (3, 6) and got.peak == pytest.approx(0.625)
    # rising every window, but never 50 % above the first: not a sustained rise
    got = cg.loss_rise([1.0, 1.1, 1.2, 1.3, 1.4], 0.5)
    assert got.stretch == 0 and got.peak == pytest.approx(0.4)
    # a jump that stays up (a diverging step size): no two windows rise, yet it is sustained
    got = cg.loss_rise([0.6, 0.5, 2.9, 2.8, 2.9, 2.85], 0.5)
    assert got.stretch == 4 and got.peak == pytest.approx(4.8)
    assert cg.loss_rise([0.4], 0.5) == cg.LossRise(0, 0.0, 1)
    assert cg.loss_rise([], 0.5) == cg.LossRise(0, 0.0, 0)
    assert cg.loss_rise([0.0, 0.5], 0.5).stretch == 1  # above a best of 0
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 12))
        windows = list(np.round(rng.uniform(0.1, 3.0, n), 2))
        rise = float(rng.choice([0.1, 0.5, 1.0]))
        got = cg.loss_rise(windows, rise)
        stretch, peak = brute_force_loss_rise(windows, rise)
        assert got.stretch == stretch and got.peak == pytest.approx(peak), (windows, rise)


def test_loss_rise_is_quiet_on_noisy_decreasing_losses():
    """Per-step losses decaying from 2.0 towards 0.5 with 30 % multiplicative noise, windows of
    10 steps as log_every would log them: the default 3 windows above 1.5 x the best earlier
    window never happen in 200 such rounds; the same losses jumping to ln(19) halfway fire."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        steps = np.arange(300)
        losses = (0.5 + 1.5 * np.exp(-steps / 80)) * rng.lognormal(0.0, 0.3, 300)
        windows = losses.reshape(30, 10).mean(1)
        assert cg.loss_rise(windows, SETTINGS.loss_rise).stretch < SETTINGS.loss_windows
        losses[150:] = math.log(19) * rng.lognormal(0.0, 0.05, 150)
        windows = losses.reshape(30, 10).mean(1)
        assert cg.loss_rise(windows, SETTINGS.loss_rise).stretch >= SETTINGS.loss_windows


def test_entropy_ratio():
    assert cg.entropy_ratio(0.3, 1.2) == pytest.approx(0.25)
    assert cg.entropy_ratio(None, 1.2) is None and cg.entropy_ratio(0.3, None) is None
    assert cg.entropy_ratio(0.3, 0.0) is None


# ------------------------------------------------------------------------------ the verdict
HEALTHY = [pl_row("cbst", 0, [0.6, 0.3, 0.1], predicted=[550, 350, 100], entropy=0.8),
           pl_row("cbst", 1, [0.55, 0.33, 0.12], predicted=[520, 360, 120], entropy=0.6)]
ONE_CLASS = [HEALTHY[0], pl_row("cbst", 1, [1.0, 0.0, 0.0], predicted=[700, 250, 50], entropy=0.16)]


def test_a_healthy_round_fires_nothing():
    h = cg.verdict(HEALTHY, "cbst", 1, [1.2, 1.0, 0.9, 0.95, 0.85], SETTINGS)
    assert h.fired == () and h.unselected == [] and h.share_drops == []
    assert h.lowest_share_ratio == (0, pytest.approx(0.55 / 0.6))
    assert h.entropy_ratio == pytest.approx(0.75) and h.loss.stretch == 0
    assert cg.warning_line("cbst/r1", h, ["road", "building", "sky"]) is None
    h0 = cg.verdict(HEALTHY, "cbst", 0, [1.0], SETTINGS)
    assert h0.fired == () and h0.share_drops is None and h0.entropy_ratio is None  # round 0: no previous round


def test_an_all_one_class_round_and_a_diverging_loss_fire_every_check():
    h = cg.verdict(ONE_CLASS, "cbst", 1, [0.5, 0.45, 2.6, 2.9, 2.8], SETTINGS)
    assert h.fired == ("unselected", "share_drop", "loss_rise", "entropy_drop")
    assert h.unselected == [(1, 0.25), (2, 0.05)]
    assert h.share_drops == [(1, 0.3, 0.0), (2, 0.1, 0.0)]
    assert h.loss == cg.LossRise(3, pytest.approx(2.9 / 0.45 - 1), 5)
    assert h.entropy_ratio == pytest.approx(0.2)
    line = cg.warning_line("cbst/r1", h, ["road", "building", "sky"])
    assert "\n" not in line and line.startswith("warning: collapse guard, stage cbst/r1: unselected: building "
                                                "predicted on 25.00 % of the target, no pixel selected")
    for words in ("share_drop: building 30.00 % -> 0.00 % of the pseudo-labels, sky 10.00 % -> 0.00 %",
                  "loss_rise: 3 consecutive loss windows above (1 + 0.5) x the best earlier window",
                  "entropy_drop: mean prediction entropy 0.1600 nats = 0.200 x round 0's (< 0.25)"):
        assert words in line, line
    row = cg.health_row(0, h, line)
    assert row["kind"] == "health" and row["fired"] == list(h.fired) and row["warning"] == line
    assert json.loads(json.dumps(row)) == row
    off = cg.Settings(1e-4, 0.0, 0.5, 0, 0.0)  # share, loss and entropy checks off
    assert cg.verdict(ONE_CLASS, "cbst", 1, [0.5, 0.45, 2.6, 2.9, 2.8], off).fired == ("unselected",)


def test_each_method_is_judged_against_its_own_rounds():
    rows = [pl_row("st", 0, [1.0, 0.0, 0.0], predicted=[900, 90, 10], entropy=0.1)] + HEALTHY
    h = cg.verdict(rows, "cbst", 1, None, SETTINGS)
    assert h.fired == () and h.loss is None and h.entropy_ratio == pytest.approx(0.75)
    assert cg.verdict(rows, "st", 0, None, SETTINGS).fired == ("unselected",)


def test_rows_written_before_the_guard_existed_leave_signals_unjudged():
    rows = [pl_row("cbst", 0, [0.6, 0.4, 0.0]), pl_row("cbst", 1, [0.6, 0.4, 0.0])]
    h = cg.verdict(rows, "cbst", 1, None, SETTINGS)
    assert h.fired == () and h.unselected is None and h.mean_entropy is None and h.entropy_ratio is None


def test_evaluation_rows_and_hidden_label_precision_never_reach_the_guard():
    eval_row = {"kind": "eval", "seed": 0, "method": "cbst", "round": 1, "iou": [0.0] * 3, "miou": 0.01}
    with pytest.raises(TypeError, match="pseudo-label rows only, not 'eval'"):
        cg.verdict(HEALTHY + [eval_row], "cbst", 1, None, SETTINGS)
    with pytest.raises(TypeError, match="not 'health'"):
        cg.Labelling.from_row({"kind": "health", "method": "cbst", "round": 0})
    # the pseudo-label rows' precision (from the target's hidden labels) and anything else in them is not read
    spoiled = [dict(r, precision=[0.0] * 3, miou=0.0, iou=[0.0] * 3) for r in ONE_CLASS]
    windows = [0.5, 0.45, 2.6, 2.9, 2.8]
    assert cg.verdict(spoiled, "cbst", 1, windows, SETTINGS) == cg.verdict(ONE_CLASS, "cbst", 1, windows, SETTINGS)
    assert set(cg.Labelling.__dataclass_fields__) == {"method", "round", "predicted", "share", "mean_entropy"}


def test_stop_message_names_the_stage_the_checks_and_how_to_go_on():
    line = cg.stop_message("cbst/r1", "cbst/r0", ["unselected", "share_drop"], "/w/seed_0/results.md")
    assert "\n" not in line and line.startswith("collapse guard: stage cbst/r1 fired unselected, share_drop and "
                                                "self_training.on_collapse=stop")
    assert "--config.resume_from_stage=cbst/r0 and the changed keys" in line
    assert "--config.resume_from_stage=cbst/r1 --config.self_training.on_collapse=warn" in line


def test_health_table_cells():
    h1 = cg.verdict(ONE_CLASS, "cbst", 1, [0.5, 0.45, 2.6, 2.9, 2.8], SETTINGS)
    h0 = cg.verdict(ONE_CLASS, "cbst", 0, [1.0, 0.9], SETTINGS)
    old = cg.verdict([pl_row("st", 0, [1.0, 0.0, 0.0])], "st", 0, None, SETTINGS)
    blown = cg.verdict([pl_row("st", 0, [1.0, 0.0, 0.0])], "st", 0, [0.5, 30.0, 40.0, 50.0], SETTINGS)
    rows = [cg.health_row(0, h, None) for h in (h0, h1, old, blown)]
    table = tables.health_table(rows, ["road", "building", "sky"])
    lines = table.splitlines()
    assert lines[0] == ("| round | predicted, none selected | share / previous round (lowest) | risen loss windows | "
                        "mean entropy, nats (/ round 0) | fired |")
    assert lines[2] == "| cbst r0 | – | n/a | 0 of 2, peak +0 % | 0.8000 (baseline) | – |"
    assert lines[3] == ("| cbst r1 | building (25.00 %), sky (5.00 %) | building 0.00, sky 0.00 | 3 of 5, peak +544 % | "
                        "0.1600 (0.20) | unselected, share_drop, loss_rise, entropy_drop |")
    assert lines[4] == "| st r0 | n/a | n/a | n/a | n/a | – |"
    assert lines[5] == "| st r0 | n/a | n/a | 3 of 4, peak 100 x | n/a | loss_rise |"  # 50 / 0.5
    assert "self_training.collapse_guard" in table and tables.health_table([], ["road"]) == ""


# ------------------------------------------------------------------------------ the keys
@pytest.mark.parametrize("key, value, expected", [
    ("on_collapse", "halt", "config.self_training.on_collapse='halt': expected 'warn' or 'stop'"),
    ("collapse_guard.min_share", 1.0, "config.self_training.collapse_guard.min_share=1.0: expected a share in [0, 1)"),
    ("collapse_guard.share_fraction", 1.5, "expected a fraction in [0, 1] (0: off)"),
    ("collapse_guard.loss_rise", 0.0, "config.self_training.collapse_guard.loss_rise=0.0: expected a relative rise > 0"),
    ("collapse_guard.loss_windows", -1, "expected a number of loss windows >= 0 (0: off)"),
    ("collapse_guard.entropy_fraction", float("nan"), "config.self_training.collapse_guard.entropy_fraction=nan"),
])
def test_guard_keys_are_validated(key, value, expected):
    from experiments.configs import synthetic

    config = synthetic.get_config("quick")
    node = config.self_training
    *path, leaf = key.split(".")
    for part in path:
        node = node[part]
    node[leaf] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, need_roots=False)
    assert expected in str(e.value)
    config_lib.validate(synthetic.get_config("quick"), need_roots=False)


def test_a_restart_may_change_every_guard_key():
    from cbst_jax.run_ledger import REWIND_KEYS

    keys = {k for k in config_lib.KEY_HELP if k.startswith(("self_training.on_collapse",
                                                            "self_training.collapse_guard."))}
    assert len(keys) == 6 and keys <= set(REWIND_KEYS), keys - set(REWIND_KEYS)


# ------------------------------------------------------------------------------ end to end
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_reliability import SMALL, one_line_error, tree_hashes  # noqa: E402

LAUNCH = "\nfrom cbst_jax.cli.run import launch\nlaunch({config!r})\n"
# Every pixel a round >= FROM selects is labelled class 0 (road), its statistics saying so: an
# all-one-class pseudo-label store, made in the run's own process.
FORCE_ONE_CLASS = """
import numpy as np, jax.numpy as jnp
from cbst_jax import predictor, self_training
real_label, real_split = self_training.label_target, predictor.Predictor.label_split

def forced_split(self, variables, batches_fn, portion, policy, prior=None, subsample=1, write_fn=None, **kw):
    def write(host, out):
        write_fn(host, out._replace(labels=jnp.where(out.labels != 255, 0, 255).astype(jnp.uint8)))
    res = real_split(self, variables, batches_fn, portion, policy, prior, subsample, write, **kw)
    selected = np.zeros_like(res.selected)
    selected[0] = res.selected.sum()
    return res._replace(selected=selected, correct=np.zeros_like(res.correct))

def label_target(exp, variables, method, stage, portion, store):
    predictor.Predictor.label_split = forced_split if stage.round >= FROM else real_split
    try:
        return real_label(exp, variables, method, stage, portion, store)
    finally:
        predictor.Predictor.label_split = real_split

self_training.label_target = label_target
"""
# Evaluation replaced by a collapsed model's: every evaluation pixel counted as predicted road.
EVAL_COLLAPSED = """
import numpy as np
from cbst_jax import self_training
real_evaluate = self_training.evaluate

def evaluate(exp, variables, *args, **kwargs):
    cm, predictions = real_evaluate(exp, variables, *args, **kwargs)
    cm = np.asarray(cm)
    collapsed = np.zeros_like(cm)
    collapsed[:, 0] = cm.sum(1)
    return collapsed, predictions

self_training.evaluate = evaluate
"""


def run(workdir, *extra, patch=""):
    """The embedded-pair launcher at SMALL settings on 2 devices, with ``patch`` run first in its process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=ROOT)
    env.pop("CBST_JAX_FAILPOINT", None)
    code = patch + LAUNCH.format(config=os.path.join(ROOT, "experiments", "configs", "synthetic.py"))
    return subprocess.run([sys.executable, "-c", code, f"--workdir={workdir}", *SMALL, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def rows(seed_dir, kind):
    """The last row of each (method, round) of ``kind`` in metrics.jsonl, without its wall time."""
    out = {}
    with open(os.path.join(seed_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == kind:
                out[(r["method"], r["round"])] = {k: v for k, v in r.items() if k != "wall_s"}
    return out


def warnings(stderr):
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("warning: ")]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("healthy") / "run"
    res = run(workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    return str(workdir / "seed_0"), res


def test_a_healthy_run_fires_nothing_and_reports_its_table(healthy):
    seed_dir, res = healthy
    assert warnings(res.stderr) == []
    health = rows(seed_dir, "health")
    assert set(health) == {("cbst", 0), ("cbst", 1)}
    assert all(r["fired"] == [] and r["warning"] is None for r in health.values())
    ledger = json.load(open(os.path.join(seed_dir, "ledger.json")))
    assert ledger["stages"]["cbst/r1"]["health"] == health[("cbst", 1)]  # recorded, so a resume reports it
    trained = ledger["stages"]["cbst/r1"]["trained"]
    # 8 steps, log_every 4: the two logged windows, the last of them the stage's final loss
    assert len(trained["loss_windows"]) == health[("cbst", 1)]["loss_windows"] == 2
    assert trained["loss_windows"][-1] == trained["train_loss"]
    text = open(os.path.join(seed_dir, "results.md")).read()
    assert "## Collapse guard" in text and "| cbst r0 | – | n/a | 0 of 2" in text and "| cbst r1 | – | " in text


def test_evaluation_never_feeds_the_checks(healthy, tmp_path):
    """The same run with every evaluation replaced by a collapsed model's: its evaluation rows
    collapse, its health rows are the healthy run's."""
    seed_dir, _ = healthy
    res = run(tmp_path / "w", patch=EVAL_COLLAPSED)
    assert res.returncode == 0, res.stderr[-3000:]
    other = str(tmp_path / "w" / "seed_0")
    assert all(rows(other, "eval")[k]["miou"] < rows(seed_dir, "eval")[k]["miou"] for k in rows(seed_dir, "eval"))
    assert rows(other, "health") == rows(seed_dir, "health") and warnings(res.stderr) == []


def test_a_diverging_learning_rate_fires_loss_and_entropy_checks(tmp_path):
    """Adam at 0.05 (100 x the demo's): the loss jumps by orders of magnitude but stays finite
    (round 0: loss_rise); the model it leaves predicts one class almost everywhere with near-zero
    entropy (round 1's labels: share_drop, entropy_drop)."""
    res = run(tmp_path / "w", "--config.self_training.lr=0.05", "--config.log_every=1")
    assert res.returncode == 0, res.stderr[-3000:]
    health = rows(str(tmp_path / "w" / "seed_0"), "health")
    assert health[("cbst", 0)]["fired"] == ["loss_rise"] and health[("cbst", 0)]["loss_windows"] == 8
    assert {"share_drop", "entropy_drop"} <= set(health[("cbst", 1)]["fired"])
    assert health[("cbst", 1)]["entropy_ratio"] < 0.25
    lines = warnings(res.stderr)
    assert [line.split(":")[1] for line in lines] == [" collapse guard, stage cbst/r0", " collapse guard, stage cbst/r1"]
    assert lines == [health[k]["warning"] for k in sorted(health)]


def test_stop_on_an_all_one_class_store_then_go_on(healthy, tmp_path):
    """Round 0's store forced to one class with on_collapse=stop: the run stops after the round
    is recorded, with one line and exit 2; the same command stops the same way and changes
    nothing; resume_from_stage=cbst/r0 with on_collapse=warn goes on (round 1 warns); a restart
    from the source model without the forced store reaches the healthy run's rows."""
    workdir = tmp_path / "w"
    seed_dir = str(workdir / "seed_0")
    force = FORCE_ONE_CLASS.replace("FROM", "0")
    res = run(workdir, "--config.self_training.on_collapse=stop", patch=force)
    line = one_line_error(res)
    results = os.path.join(seed_dir, "results.md")
    assert line == "error: " + cg.stop_message("cbst/r0", "source", ["unselected"], results), line
    (warning,) = warnings(res.stderr)
    assert warning.startswith("warning: collapse guard, stage cbst/r0: unselected: building predicted on ")
    ledger = json.load(open(os.path.join(seed_dir, "ledger.json")))["stages"]
    assert set(ledger) == {"source", "cbst/r0"} and {"trained", "eval", "health"} <= set(ledger["cbst/r0"])
    assert ledger["cbst/r0"]["health"]["fired"] == ["unselected"]
    assert ledger["cbst/r0"]["health"]["unselected"][0][0] == 2  # building
    assert rows(seed_dir, "pseudo_labels")[("cbst", 0)]["share"][0] == 1.0
    assert "| cbst r0 | building (" in open(results).read()

    before = tree_hashes(str(workdir), exclude=("cbst_jax_run.lock",))
    again = run(workdir, "--config.self_training.on_collapse=stop", patch=force)
    assert one_line_error(again) == line and warnings(again.stderr) == []
    assert tree_hashes(str(workdir), exclude=("cbst_jax_run.lock",)) == before

    res = run(workdir, "--config.resume_from_stage=cbst/r0", "--config.self_training.on_collapse=warn", patch=force)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [w.split(":")[1] for w in warnings(res.stderr)] == [" collapse guard, stage cbst/r1"]
    assert rows(seed_dir, "health")[("cbst", 0)] == ledger["cbst/r0"]["health"]

    res = run(workdir, "--config.resume_from_stage=source", "--config.self_training.on_collapse=stop")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "restarting after stage source" in res.stderr and warnings(res.stderr) == []
    reference, _ = healthy
    for kind in ("eval", "pseudo_labels", "health"):
        assert rows(seed_dir, kind) == rows(reference, kind), kind
