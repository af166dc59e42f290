"""The experiment entry points: config validation messages, the real-dataset path run end to
end on fixture folders in the official layouts, and refusal of mismatched weights."""
import os
import subprocess
import sys

import pytest

from cbst_jax import config_lib
from experiments.configs import cityscapes_nthu, gta5_bdd, gta5_cityscapes, synthetic, synthia_cityscapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fixtures_layouts import make_cityscapes, make_gta5  # noqa: E402


def cli(module, *args, devices=2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("get_config", [gta5_cityscapes.get_config, synthia_cityscapes.get_config,
                                        cityscapes_nthu.get_config, gta5_bdd.get_config, synthetic.get_config])
def test_shipped_configs_validate(get_config):
    config_lib.validate(get_config(), need_roots=False)


@pytest.mark.parametrize("key, value, message", [
    ("self_training.portion", (0.0, 0.05, 0.5), "a portion in (0, 1]"),
    ("self_training.portion", (0.2, 0.05, 1.5), "a portion in (0, 1]"),
    ("self_training.portion", (0.6, 0.05, 0.5), "p0 <= p_max"),
    ("methods", "cbst,bogus", "one of source_only"),
    ("input.sampler", "mixed", "pooled or paired"),
    ("model.init", "/nonexistent/weights.npz", "existing converted-weights file"),
])
def test_invalid_values_are_named(key, value, message):
    c = synthetic.get_config()
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c)
    text = str(e.value)
    assert f"config.{key}" in text and message in text and "\n" not in text


def test_missing_roots_say_where_to_download():
    with pytest.raises(config_lib.ConfigError, match="GTA5.*from_games.*experiments.synthetic"):
        config_lib.validate(gta5_cityscapes.get_config())
    c = gta5_cityscapes.get_config()
    c.source.root, c.target.root = "/nonexistent/gta5", "/nonexistent/cs"
    with pytest.raises(config_lib.ConfigError, match="config.source.root='/nonexistent/gta5'"):
        config_lib.validate(c)


def test_cli_rejects_unknown_keys_and_bad_values():
    res = cli("experiments.synthetic", "--config.input.nope=1")
    assert res.returncode == 2 and res.stderr.strip().startswith("error: unknown config key config.input.nope")
    res = cli("experiments.synthetic", "--config.self_training.portion=(0.6,0.05,0.5)")
    assert res.returncode == 2 and "expected p0 <= p_max" in res.stderr
    res = cli("experiments.gta5_cityscapes")
    assert res.returncode == 2 and "download GTA5" in res.stderr


def test_gta5_cityscapes_on_fixture_folders(tmp_path):
    """The real data path (folder readers, DeepLab-v2 code, stride-8 logits) on tiny folders."""
    make_gta5(tmp_path / "gta5", n=8, size=(32, 64))
    make_cityscapes(tmp_path / "cityscapes", n_train=4, n_val=2, size=(32, 64))
    work = tmp_path / "work"
    res = cli("experiments.gta5_cityscapes", f"--workdir={work}",
              f"--config.source.root={tmp_path / 'gta5'}", f"--config.target.root={tmp_path / 'cityscapes'}",
              "--config.model.name=deeplabv2_resnet_small", "--config.methods=source_only,cbst",
              "--config.input.crop=(32, 64)", "--config.input.eval_size=(32, 64)", "--config.input.batch_size=2",
              "--config.input.eval_batch_size=2", "--config.input.source_portion=(0.5, 0.0, 0.5)",
              "--config.source_training.steps=3", "--config.self_training.rounds=1",
              "--config.self_training.steps_per_round=2", "--config.self_training.loss_resolution=stride",
              "--config.input.workers=1")
    assert res.returncode == 0, res.stderr[-3000:]
    seed = work / "seed_0"
    assert (seed / "results.md").exists() and (seed / "pseudo_labels" / "cbst" / "round_0" / "manifest.json").exists()
    assert "cbst r0" in (seed / "results.md").read_text()


def test_weights_of_another_architecture_are_refused(tmp_path):
    import jax
    import numpy as np
    from cbst_jax import models

    other = models.get_model("deeplabv2_resnet_small", 19)
    variables = other.init(jax.random.key(0), np.zeros((1, 32, 64, 3), np.float32), train=False)
    path = tmp_path / "other.npz"
    models.save_variables(path, variables, models.make_metadata("deeplabv2_resnet_small", 19, "unit"))
    res = cli("experiments.synthetic", f"--workdir={tmp_path / 'w'}", f"--config.model.init={path}",
              "--config=quick")
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "other.npz" in last and "another architecture" in last
