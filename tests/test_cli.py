"""``python -m sb3_ppo_ext``: argument parsing, settings resolution, and tiny end-to-end runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext import __main__ as cli
from sb3_ppo_ext.benchmark import cli as benchmark_cli
from sb3_ppo_ext.schedules import LinearDecay

RESULT_LINE = re.compile(
    r"^ClippedPPO (?P<env>\S+): mean return (?P<mean>-?[\d.]+) (±|\+/-) (?P<std>[\d.]+) over (?P<n>\d+) episodes"
    r" \(deterministic\) \| (?P<steps>\d+) steps, seed \S+ \| saved (?P<path>\S+).* \| wall time [\d.]+ s"
)


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# -- --hyperparams parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("n_epochs=4", ("n_epochs", 4)),
        ("gamma=0.995", ("gamma", 0.995)),
        ("learning_rate=lin_1e-3", ("learning_rate", "lin_1e-3")),
        ("target_kl=None", ("target_kl", None)),
        ("use_sde=true", ("use_sde", True)),
        ("normalize_advantage=batch", ("normalize_advantage", "batch")),
        ("normalize_advantage='batch'", ("normalize_advantage", "batch")),
        ("policy_kwargs=dict(net_arch=[64])", ("policy_kwargs", "dict(net_arch=[64])")),
        (" clip_range = 0.1 ", ("clip_range", 0.1)),
    ],
)
def test_hyperparam_values_are_python_literals_or_strings(item, expected):
    assert cli.parse_hyperparam(item) == expected


@pytest.mark.parametrize("item", ["n_epochs", "=4", ""])
def test_hyperparam_without_key_or_equals_is_rejected(item):
    with pytest.raises(Exception, match="key=value"):
        cli.parse_hyperparam(item)


def test_bad_hyperparam_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--hyperparams", "oops"])
    assert exc.value.code == 2
    assert "key=value" in capsys.readouterr().err


def test_unknown_subcommand_exits_with_usage_error():
    with pytest.raises(SystemExit) as exc:
        cli.main(["fly"])
    assert exc.value.code == 2


# -- settings resolution -----------------------------------------------------------------------------


def _assert_cartpole_zoo(settings):
    kwargs = settings.model_kwargs
    assert settings.policy == "MlpPolicy"
    assert settings.n_envs == 8
    assert settings.n_timesteps == 100_000
    assert settings.normalize is None
    assert {k: kwargs[k] for k in ("n_steps", "batch_size", "gae_lambda", "gamma", "n_epochs", "ent_coef")} == {
        "n_steps": 32,
        "batch_size": 256,
        "gae_lambda": 0.8,
        "gamma": 0.98,
        "n_epochs": 20,
        "ent_coef": 0.0,
    }
    assert isinstance(kwargs["learning_rate"], LinearDecay)
    assert kwargs["learning_rate"](1.0) == pytest.approx(1e-3) and kwargs["learning_rate"](0.0) == 0.0
    assert isinstance(kwargs["clip_range"], LinearDecay)
    assert kwargs["clip_range"](1.0) == pytest.approx(0.2)


def test_default_env_uses_rl_zoo_cartpole_settings():
    settings, source = cli.resolve_settings(cli.DEFAULT_ENV)
    assert source == "RL Zoo"
    _assert_cartpole_zoo(settings)


def test_unlisted_env_falls_back_to_clippedppo_defaults():
    settings, source = cli.resolve_settings("FrozenLake-v1")
    assert source == "ClippedPPO defaults"
    assert settings.model_kwargs == {}
    assert settings.n_envs == 1
    assert settings.policy == "MlpPolicy"
    assert settings.n_timesteps == cli.DEFAULT_TIMESTEPS


def test_listed_env_uses_its_zoo_block():
    settings, source = cli.resolve_settings("Pendulum-v1")
    assert source == "RL Zoo"
    assert settings.n_envs == 4
    assert settings.model_kwargs["use_sde"] is True
    assert settings.model_kwargs["gamma"] == 0.9


def test_overrides_win_and_are_parsed():
    overrides = [
        cli.parse_hyperparam(item)
        for item in (
            "learning_rate=lin_5e-4",
            "n_epochs=3",
            "policy_kwargs=dict(net_arch=[16], activation_fn=nn.ReLU)",
            "normalize=True",
        )
    ]
    settings, source = cli.resolve_settings("CartPole-v1", overrides, n_envs=2, n_timesteps=1000)
    assert source == "RL Zoo + overrides"
    assert settings.n_envs == 2
    assert settings.n_timesteps == 1000
    assert settings.model_kwargs["n_epochs"] == 3
    assert settings.model_kwargs["learning_rate"](1.0) == pytest.approx(5e-4)
    assert settings.model_kwargs["policy_kwargs"] == {"net_arch": [16], "activation_fn": nn.ReLU}
    assert settings.normalize == {"gamma": 0.98}
    assert settings.model_kwargs["batch_size"] == 256  # untouched Zoo value


def test_seed_presets_give_the_seed_table():
    atari, source = cli.resolve_settings("PongNoFrameskip-v4", preset="atari")
    assert source == "seed preset 'atari'"
    assert atari.policy == "CnnPolicy"
    assert atari.n_envs == 8
    assert atari.frame_stack == 4
    assert atari.wrapper_class() is not None
    assert atari.n_timesteps == cli.DEFAULT_TIMESTEPS  # the seed's table has no budget
    assert {k: atari.model_kwargs[k] for k in ("n_steps", "batch_size", "n_epochs", "clip_range", "ent_coef")} == {
        "n_steps": 128,
        "batch_size": 256,
        "n_epochs": 4,
        "clip_range": 0.1,
        "ent_coef": 0.01,
    }
    mujoco, _ = cli.resolve_settings("Hopper-v5", preset="mujoco")
    assert mujoco.policy == "MlpPolicy"
    assert mujoco.model_kwargs["n_steps"] == 2048 and mujoco.model_kwargs["batch_size"] == 64


@pytest.mark.parametrize("env_id", ["BreakoutNoFrameskip-v4", "ALE/Breakout-v5"])
def test_atari_ids_use_the_zoo_atari_block(env_id):
    settings, source = cli.resolve_settings(env_id)
    assert source == "RL Zoo"
    assert settings.policy == "CnnPolicy"
    assert settings.frame_stack == 4


def test_device_defaults_to_cpu_for_mlps():
    assert cli._device(None, "MlpPolicy") == "cpu"
    assert cli._device(None, "CnnPolicy") == "auto"
    assert cli._device("cuda", "MlpPolicy") == "cuda"


@pytest.mark.parametrize(
    ("model_path", "stats"),
    [("out/model.zip", "out/model_vecnormalize.pkl"), ("out/model", "out/model_vecnormalize.pkl")],
)
def test_vecnormalize_stats_live_next_to_the_model(model_path, stats):
    assert cli.vecnormalize_path(model_path) == Path(stats)


# -- end to end --------------------------------------------------------------------------------------


def test_train_subprocess_trains_evaluates_saves_and_prints_one_line(tmp_path):
    save = tmp_path / "model"
    cmd = [sys.executable, "-m", "sb3_ppo_ext", "train", "--timesteps", "512", "--eval-episodes", "2"]
    cmd += ["--save-path", str(save), "--threads", "1", "--seed", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    match = RESULT_LINE.match(lines[0])
    assert match, lines[0]
    assert match["env"] == "CartPole-v1"
    assert match["n"] == "2"
    assert int(match["steps"]) == 512  # 2 rollouts of 8 envs x 32 steps
    assert match["path"] == f"{save}.zip"
    model = ClippedPPO.load(f"{save}.zip", device="cpu")
    assert model.n_steps == 32 and model.n_epochs == 20 and model.gamma == 0.98
    assert model.num_timesteps == 512


def test_train_with_vecnormalize_saves_stats_and_enjoy_loads_them(tmp_path, capsys):
    save = tmp_path / "pendulum.zip"
    hyperparams = ["normalize=True", "n_steps=64", "batch_size=64", "n_epochs=1", "n_envs=2"]
    code = cli.main(
        ["train", "--env", "Pendulum-v1", "--timesteps", "128", "--eval-episodes", "1", "--save-path", str(save)]
        + ["--hyperparams", *hyperparams]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "ClippedPPO Pendulum-v1: mean return -" in out
    assert save.exists()
    assert (tmp_path / "pendulum_vecnormalize.pkl").exists()
    model = ClippedPPO.load(save, device="cpu")
    assert model.use_sde  # the Zoo's Pendulum block, under the overrides
    assert model.n_steps == 64

    assert cli.main(["enjoy", "--load", str(save), "--env", "Pendulum-v1", "--episodes", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    returns = [float(x) for x in re.findall(r"episode \d: return (-?[\d.]+), length 200", out)]
    assert len(returns) == 2
    assert f"mean return {np.mean(returns):.2f}" in out


def test_enjoy_with_an_env_the_statistics_do_not_fit_says_what_to_pass(tmp_path, capsys):
    save = tmp_path / "pendulum.zip"
    hyperparams = ["normalize=True", "n_steps=64", "batch_size=64", "n_epochs=1", "n_envs=1"]
    train = ["train", "--env", "Pendulum-v1", "--timesteps", "64", "--eval-episodes", "1", "--save-path", str(save)]
    assert cli.main([*train, "--hyperparams", *hyperparams]) == 0
    # Pendulum's statistics are of 3 observation dims, MountainCarContinuous has 2
    with pytest.raises(SystemExit, match=r"do not fit MountainCarContinuous-v0 .*\(3,\) != \(2,\).*--preset"):
        cli.main(["enjoy", "--load", str(save), "--env", "MountainCarContinuous-v0", "--episodes", "1"])


def test_train_accepts_policy_kwargs_and_extra_clippedppo_args(tmp_path, capsys):
    save = tmp_path / "cartpole"
    hyperparams = [
        "policy_kwargs=dict(net_arch=dict(pi=[8], vf=[8]), activation_fn=nn.ReLU)",
        "normalize_advantage=batch",
        "vf_clip_mode=sb3",
        "clip_range_vf=0.5",
        "max_grad_norm=None",
        "batch_size=32",
    ]
    args = ["train", "--timesteps", "256", "--n-envs", "2", "--eval-episodes", "1", "--save-path", str(save)]
    assert cli.main([*args, "--hyperparams", *hyperparams]) == 0
    assert "ClippedPPO CartPole-v1" in capsys.readouterr().out
    model = ClippedPPO.load(f"{save}.zip", device="cpu")
    assert model.normalize_advantage == "batch"
    assert model.vf_clip_mode == "sb3"
    assert model.max_grad_norm is None
    assert model.policy.net_arch == {"pi": [8], "vf": [8]}
    assert model.n_envs == 2


def test_benchmark_subcommand_calls_the_benchmark_main(monkeypatch):
    seen = []
    monkeypatch.setattr(benchmark_cli, "main", lambda argv: seen.append(argv) or 3)
    assert cli.main(["benchmark", "--envs", "CartPole-v1", "--help"]) == 3
    assert seen == [["--envs", "CartPole-v1", "--help"]]


def test_benchmark_subcommand_help_is_the_benchmarks(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["benchmark", "--help"])
    assert exc.value.code == 0
    assert "python -m sb3_ppo_ext.benchmark" in capsys.readouterr().out


def test_benchmark_subcommand_reports_a_missing_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sb3_ppo_ext.benchmark.cli", None)  # import raises ImportError
    assert cli.main(["benchmark"]) == 2
    assert "not available" in capsys.readouterr().err


# -- torch threads -----------------------------------------------------------------------------------


@pytest.fixture
def set_threads_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.torch, "set_num_threads", calls.append)
    return calls


def test_mlp_policies_default_to_one_thread_and_explicit_threads_win(set_threads_calls):
    mlp = ClippedPPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, device="cpu").policy
    cli._set_threads(None, mlp)
    cli._set_threads(3, mlp)
    assert set_threads_calls == [1, 3]


def test_cnn_policies_keep_torchs_default_threads(set_threads_calls):
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    cli._set_threads(None, cnn)
    assert set_threads_calls == []
    cli._set_threads(2, cnn)
    assert set_threads_calls == [2]


def test_threads_default_is_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: 1 for MLP policies" in help_text
