"""rl_zoo3 plug-in: ``clipped_ppo`` registered, trained and replayed by rl_zoo3's own scripts."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import yaml

rl_zoo3 = pytest.importorskip("rl_zoo3")

from sb3_ppo_ext import ClippedPPO, zoo  # noqa: E402
from sb3_ppo_ext.zoo import plugin  # noqa: E402

TRAIN_ARGS = ["--algo", "clipped_ppo", "--env", "CartPole-v1", "-n", "512", "--eval-freq", "-1", "--seed", "0"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_register_adds_clipped_ppo_to_every_registry():
    zoo.register()
    zoo.register()  # idempotent
    from rl_zoo3.exp_manager import ExperimentManager
    from rl_zoo3.hyperparams_opt import HYPERPARAMS_CONVERTER, HYPERPARAMS_SAMPLER

    assert rl_zoo3.ALGOS["clipped_ppo"] is ClippedPPO
    assert HYPERPARAMS_SAMPLER["clipped_ppo"] is HYPERPARAMS_SAMPLER["ppo"]
    assert HYPERPARAMS_CONVERTER["clipped_ppo"] is HYPERPARAMS_CONVERTER["ppo"]
    assert ExperimentManager.__init__._sb3_ppo_ext_patched


def test_default_config_is_the_shipped_clipped_ppo_yml():
    from sb3_ppo_ext.zoo import presets

    assert zoo.HYPERPARAMS_PATH == presets.HYPERPARAMS_DIR / presets.HYPERPARAMS_FILES["clipped_ppo"]
    assert zoo.HYPERPARAMS_PATH.is_file()


def test_module_top_level_needs_only_the_standard_library():
    # setup.py loads zoo/plugin.py on its own, in a build environment without torch or this package, to write the hook
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("standalone_zoo", {plugin.__file__!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        heavy = sorted(m for m in ("torch", "numpy", "yaml", "stable_baselines3", "sb3_ppo_ext") if m in sys.modules)
        assert not heavy, heavy
        print(module.hook_line(), end="")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout == zoo.hook_line()


def test_shipped_hyperparameters_cover_every_zoo_ppo_env():
    ours = yaml.safe_load(zoo.HYPERPARAMS_PATH.read_text())
    theirs = yaml.safe_load((Path(rl_zoo3.__file__).parent / "hyperparams" / "ppo.yml").read_text())
    assert set(theirs) <= set(ours)


def test_train_and_enjoy_through_the_wrapper(tmp_path, capsys):
    zoo.main(["train", *TRAIN_ARGS, "-f", str(tmp_path), "--verbose", "0"])
    run = tmp_path / "clipped_ppo" / "CartPole-v1_1"
    assert (run / "CartPole-v1.zip").exists()
    # rl_zoo3 took clipped_ppo.yml by default: the Zoo's tuned CartPole block
    config = yaml.unsafe_load((run / "CartPole-v1" / "config.yml").read_text())
    assert dict(config)["n_steps"] == 32 and dict(config)["learning_rate"] == "lin_0.001"
    assert ClippedPPO.load(run / "CartPole-v1.zip").n_steps == 32

    capsys.readouterr()
    zoo.main(["enjoy", "--algo", "clipped_ppo", "--env", "CartPole-v1", "-f", str(tmp_path), "-n", "60", "--no-render"])
    assert "Mean reward" in capsys.readouterr().out


def test_hook_line_is_one_import_line(tmp_path):
    line = zoo.hook_line()
    assert line.startswith("import ") and line.count("\n") == 1
    path = zoo.install_hook(tmp_path)
    assert path == tmp_path / zoo.PTH_NAME and path.read_text() == line
    assert zoo.uninstall_hook(tmp_path) == path and not path.exists()
    assert zoo.uninstall_hook(tmp_path) is None


def test_pth_hook_makes_plain_rl_zoo3_train_accept_clipped_ppo(tmp_path):
    # site.addsitedir processes .pth files as site-packages does at start-up; then run rl_zoo3.train
    # exactly as `python -m rl_zoo3.train ...` would
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    zoo.install_hook(site_dir)
    script = textwrap.dedent(
        f"""
        import site, sys, runpy
        site.addsitedir({str(site_dir)!r})
        assert "torch" not in sys.modules and "sb3_ppo_ext" not in sys.modules  # the hook is lazy
        sys.argv = ["rl_zoo3.train", *{TRAIN_ARGS!r}, "-f", {str(tmp_path / "logs")!r}, "--verbose", "0"]
        runpy.run_module("rl_zoo3.train", run_name="__main__", alter_sys=True)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=_env(), cwd=tmp_path, timeout=300)
    assert (tmp_path / "logs" / "clipped_ppo" / "CartPole-v1_1" / "CartPole-v1.zip").exists()


@pytest.mark.skipif(
    (Path(sysconfig.get_path("purelib")) / zoo.PTH_NAME).exists(), reason="the hook is installed in this environment"
)
def test_without_the_hook_rl_zoo3_rejects_clipped_ppo(tmp_path):
    script = (
        "import sys, runpy; sys.argv = ['t', '--algo', 'clipped_ppo']; "
        "runpy.run_module('rl_zoo3.train', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0 and "invalid choice: 'clipped_ppo'" in proc.stderr
