"""``python -m experiments.<name> --help``: exit 0, the config file's variants, the launcher's
flags and every config key with its default (of the chosen variant) and its one-line meaning,
from ``config_lib.KEY_HELP``, which must cover the schema exactly."""
import os
import subprocess
import sys

import ml_collections
import pytest

from cbst_jax import config_lib
from cbst_jax.cli.run import FLAG_HELP
from experiments.configs import gta5_cityscapes, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leaves(node, prefix=""):
    """Every (dotted key, value) of a ConfigDict, written out here rather than taken from the code."""
    out = {}
    for key in node.keys():
        if isinstance(node[key], ml_collections.ConfigDict):
            out.update(leaves(node[key], f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = node[key]
    return out


def launcher(module, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_key_help_covers_every_key_of_the_schema():
    keys = set(leaves(config_lib.base_config()))
    assert set(config_lib.KEY_HELP) == keys, (keys - set(config_lib.KEY_HELP), set(config_lib.KEY_HELP) - keys)
    for key, text in config_lib.KEY_HELP.items():
        assert text.strip() and "\n" not in text, key


@pytest.mark.parametrize("variant", ["", "cbst_resnet38"])
def test_launcher_help_lists_variants_flags_and_every_key_with_its_default(variant):
    res = launcher("experiments.gta5_cityscapes", *([f"--config={variant}"] if variant else []), "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout.splitlines()
    assert out[0].startswith("usage: python -m experiments.gta5_cityscapes [--config=<variant>]")
    heading = next(i for i, line in enumerate(out) if line.startswith("--config=<variant>: a variant of "))
    assert [line.split()[0] for line in out[heading + 1:heading + 3]] == ["crst_deeplabv2", "cbst_resnet38"]
    for flag, text in FLAG_HELP.items():
        assert f"  --{flag:<18} {text}" in out
    defaults = leaves(gta5_cityscapes.get_config(variant))
    for key, text in config_lib.KEY_HELP.items():
        line = next((ln for ln in out if ln.startswith(f"  {key} = ")), None)
        assert line is not None, key
        left, _, meaning = line.partition(f"{defaults[key]!r}")
        assert left == f"  {key} = " and meaning.strip() == text, line
    # the variant's defaults, not the file's: CBST's recipe reports the seed's CBST-SP + MST row
    mst = next(ln for ln in out if ln.startswith("  evaluate.mst_methods = "))
    assert ("'cbst_sp'" in mst) == (variant == "cbst_resnet38")


def test_synthetic_help_names_its_variants():
    res = launcher("experiments.synthetic", "-h")
    assert res.returncode == 0 and res.stderr == "", res.stderr[-2000:]
    names = [line.split()[0] for line in res.stdout.splitlines() if line.startswith("  ")
             and line.split()[0] in synthetic.VARIANTS]
    assert names == ["quick", "gpu", "camera_shift", "online"]
    assert "default: none, the recipe as the file sets it" in res.stdout
    assert "  methods = 'source_only,st,st_sp,cbst,cbst_sp,mrkld'" in res.stdout


def test_help_of_the_bare_command_shows_the_schema():
    res = launcher("cbst_jax.cli.run", "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "with the defaults of the schema (cbst_jax.config_lib.base_config):" in res.stdout
    assert res.stdout.startswith("usage: python -m cbst_jax.cli.run --config=<file>.py[:<variant>] [--config.<key>")
    assert "  model.name = 'deeplabv2_resnet101'" in res.stdout and "a variant of" not in res.stdout
