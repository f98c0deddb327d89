"""sb3_ppo_ext.zoo.presets: the seed's table, the Zoo YAML files we ship, and the Zoo-block parser."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gymnasium as gym
import pytest
import yaml
from torch import nn

from sb3_ppo_ext.schedules import LinearDecay
from sb3_ppo_ext.zoo import presets
from sb3_ppo_ext.zoo.presets import Settings, parse_zoo_block, preset, zoo_settings

BENCHMARK_ENVS = [
    "CartPole-v1",
    "Acrobot-v1",
    "Pendulum-v1",
    "LunarLander-v3",
    "HalfCheetah-v5",
    "Hopper-v5",
    "Walker2d-v5",
]


# -- the Zoo-block parser -------------------------------------------------------------------------------


def test_lin_strings_become_linear_schedules_and_numbers_stay():
    s = parse_zoo_block({"learning_rate": "lin_1e-3", "clip_range": "lin_0.2", "clip_range_vf": 0.5})
    assert s.model_kwargs["learning_rate"] == LinearDecay(1e-3)
    assert s.model_kwargs["learning_rate"](0.5) == pytest.approx(5e-4)
    assert s.model_kwargs["clip_range"] == LinearDecay(0.2)
    assert s.model_kwargs["clip_range_vf"] == 0.5


def test_yaml_float_tags_and_env_keys_are_split_from_model_kwargs():
    block = yaml.safe_load(
        """
        n_envs: 8
        n_timesteps: !!float 1e5
        policy: 'MlpPolicy'
        n_steps: 32
        gamma: 0.98
        env_kwargs: {max_episode_steps: 100}
        """
    )
    s = parse_zoo_block(block)
    assert (s.n_envs, s.n_timesteps, s.policy, s.env_kwargs) == (8, 100_000, "MlpPolicy", {"max_episode_steps": 100})
    assert s.model_kwargs == {"n_steps": 32, "gamma": 0.98}
    assert s.raw["n_timesteps"] == 1e5


def test_policy_kwargs_string_is_evaluated_with_dict_and_nn():
    s = parse_zoo_block(
        {
            "policy_kwargs": "dict(log_std_init=-2, ortho_init=False, activation_fn=nn.ReLU,"
            " net_arch=dict(pi=[256], vf=[256]))"
        }
    )
    assert s.model_kwargs["policy_kwargs"] == {
        "log_std_init": -2,
        "ortho_init": False,
        "activation_fn": nn.ReLU,
        "net_arch": {"pi": [256], "vf": [256]},
    }


def test_policy_kwargs_string_cannot_reach_builtins():
    with pytest.raises(ValueError, match="policy_kwargs"):
        parse_zoo_block({"policy_kwargs": "__import__('os').getcwd()"})


@pytest.mark.parametrize(
    ("normalize", "expected"),
    [
        (None, None),
        (False, None),
        (True, {"gamma": 0.9}),
        ("dict(norm_obs=True, norm_reward=False)", {"norm_obs": True, "norm_reward": False, "gamma": 0.9}),
        ({"norm_obs": False}, {"norm_obs": False, "gamma": 0.9}),
    ],
)
def test_normalize_becomes_vecnormalize_kwargs_with_the_algorithms_gamma(normalize, expected):
    block = {"gamma": 0.9} if normalize is None else {"gamma": 0.9, "normalize": normalize}
    assert parse_zoo_block(block).normalize == expected


def test_unknown_schedule_string_is_an_error():
    with pytest.raises(ValueError):
        parse_zoo_block({"learning_rate": "exp_1e-3"})


def test_env_wrappers_apply_in_order_with_kwargs():
    s = parse_zoo_block(
        {
            "env_wrapper": [
                "gymnasium.wrappers.FlattenObservation",
                {"gymnasium.wrappers.TimeLimit": {"max_episode_steps": 7}},
            ]
        }
    )
    env = s.wrapper_class()(gym.make("CartPole-v1"))
    assert isinstance(env, gym.wrappers.TimeLimit) and env._max_episode_steps == 7
    assert isinstance(env.env, gym.wrappers.FlattenObservation)
    assert parse_zoo_block({}).wrapper_class() is None


# -- the shipped files -----------------------------------------------------------------------------------


def test_zoo_settings_reads_the_tuned_cartpole_block():
    s = zoo_settings("clipped_ppo", "CartPole-v1")
    assert (s.n_envs, s.n_timesteps, s.normalize) == (8, 100_000, None)
    assert s.model_kwargs["n_steps"] == 32 and s.model_kwargs["gae_lambda"] == 0.8
    assert s.model_kwargs["learning_rate"] == LinearDecay(1e-3)


def test_unlisted_env_falls_back_to_the_default_block():
    s = zoo_settings("clipped_ppo", "MountainCar-v99")
    assert (s.policy, s.n_timesteps, s.model_kwargs) == ("MlpPolicy", 1_000_000, {})


@pytest.mark.parametrize("env_id", ["PongNoFrameskip-v4", "ALE/Breakout-v5"])
def test_atari_games_get_the_atari_block_as_in_rl_zoo3(env_id):
    key, block = presets.zoo_block("clipped_ppo", env_id)
    assert key == "atari"
    s = zoo_settings("clipped_ppo", env_id)
    assert (s.policy, s.frame_stack, s.n_timesteps) == ("CnnPolicy", 4, 10_000_000)
    assert s.env_wrapper == ("stable_baselines3.common.atari_wrappers.AtariWrapper",)


def test_a_listed_env_wins_over_the_atari_and_default_blocks(tmp_path):
    path = tmp_path / "mine.yml"
    path.write_text("PongNoFrameskip-v4:\n  n_envs: 3\natari:\n  n_envs: 8\ndefault:\n  n_envs: 1\n")
    assert presets.zoo_block("x", "PongNoFrameskip-v4", path) == ("PongNoFrameskip-v4", {"n_envs": 3})
    assert presets.zoo_block("x", "ALE/Pong-v5", path) == ("atari", {"n_envs": 8})
    assert presets.zoo_block("x", "CartPole-v1", path) == ("default", {"n_envs": 1})


def test_shipped_files_live_next_to_presets():
    assert presets.HYPERPARAMS_DIR == Path(presets.__file__).parent / "hyperparams"
    assert {p.name for p in presets.HYPERPARAMS_DIR.glob("*.yml")} == set(presets.HYPERPARAMS_FILES.values())


def test_ppo_and_clipped_ppo_read_identical_settings():
    assert presets.HYPERPARAMS_FILES["ppo"] == presets.HYPERPARAMS_FILES["clipped_ppo"]


@pytest.mark.parametrize("algo", ["clipped_ppo", "a2c", "trpo"])
def test_mujoco_v5_blocks_equal_the_zoo_v4_blocks(algo):
    blocks = presets.load_zoo_file(presets.HYPERPARAMS_DIR / presets.HYPERPARAMS_FILES[algo])
    for name in ["HalfCheetah", "Hopper", "Walker2d"]:
        assert blocks[f"{name}-v5"] == blocks[f"{name}-v4"]


@pytest.mark.skipif(importlib.util.find_spec("rl_zoo3") is None, reason="rl_zoo3 not installed")
@pytest.mark.parametrize(
    ("ours", "zoo"),
    [
        ("clipped_ppo.yml", "ppo.yml"),
        ("clipped_ppo_lstm.yml", "ppo_lstm.yml"),
        ("a2c.yml", "a2c.yml"),
        ("trpo.yml", "trpo.yml"),
    ],
)
def test_shipped_files_mirror_the_installed_zoo(ours, zoo):
    import rl_zoo3

    mine = presets.load_zoo_file(presets.HYPERPARAMS_DIR / ours)
    theirs = presets.load_zoo_file(Path(rl_zoo3.__file__).parent / "hyperparams" / zoo)
    assert {env: mine[env] for env in theirs} == theirs


@pytest.mark.parametrize("env_id", BENCHMARK_ENVS)
@pytest.mark.parametrize("algo", ["clipped_ppo", "ppo", "a2c", "trpo"])
def test_every_benchmark_block_builds_its_algorithm(algo, env_id):
    from stable_baselines3.common.env_util import make_vec_env

    from sb3_ppo_ext.benchmark.runs import ALGOS

    s = zoo_settings(algo, env_id)
    try:
        env = make_vec_env(env_id, n_envs=s.n_envs)
    except gym.error.DependencyNotInstalled as exc:
        pytest.skip(str(exc))
    assert s.n_timesteps is not None
    model = presets.import_object(ALGOS[algo])(s.policy, env, device="cpu", **s.model_kwargs)
    assert model.gamma == s.model_kwargs.get("gamma", 0.99)
    env.close()


RECURRENT_BENCHMARK_ENVS = ["CartPoleNoVel-v1", "PendulumNoVel-v1", "MountainCarNoVel-v0", "MaskedMemory-v0"]


@pytest.mark.parametrize("env_id", RECURRENT_BENCHMARK_ENVS)
@pytest.mark.parametrize("algo", ["clipped_ppo_lstm", "recurrent_ppo"])
def test_every_recurrent_benchmark_block_builds_its_algorithm(algo, env_id):
    from sb3_ppo_ext.benchmark.runs import ALGOS
    from sb3_ppo_ext.zoo.envs import make_env

    s = zoo_settings(algo, env_id)
    env = make_env(env_id, s, seed=0)  # registers the NoVel and MaskedMemory ids
    assert s.policy == "MlpLstmPolicy" and s.n_timesteps is not None
    model = presets.import_object(ALGOS[algo])(s.policy, env, device="cpu", **s.model_kwargs)
    hidden = s.model_kwargs.get("policy_kwargs", {}).get("lstm_hidden_size", 256)  # both classes' default
    assert model.policy.lstm_actor.hidden_size == hidden
    env.close()


def test_masked_memory_settings_are_shared_by_the_recurrent_and_maskable_runs():
    lstm_key, lstm = presets.zoo_block("clipped_ppo_lstm", "MaskedMemory-v0")
    ff_key, feed_forward = presets.zoo_block("maskable_ppo", "MaskedMemory-v0")
    assert lstm_key == ff_key == "MaskedMemory-v0"
    lstm_only = {"lstm_hidden_size", "enable_critic_lstm"}
    assert {k: v for k, v in lstm.items() if k not in ("policy", "policy_kwargs")} == {
        k: v for k, v in feed_forward.items() if k not in ("policy", "policy_kwargs")
    }
    lstm_policy = zoo_settings("clipped_ppo_lstm", "MaskedMemory-v0").model_kwargs["policy_kwargs"]
    ff_policy = zoo_settings("maskable_ppo", "MaskedMemory-v0").model_kwargs["policy_kwargs"]
    assert {k: v for k, v in lstm_policy.items() if k not in lstm_only} == ff_policy
    assert (lstm["policy"], feed_forward["policy"]) == ("MlpLstmPolicy", "MlpPolicy")


# -- the seed's presets ----------------------------------------------------------------------------------


def test_atari_preset_is_the_seeds_atari_column():
    s = preset("atari")
    assert (s.policy, s.n_envs, s.frame_stack) == ("CnnPolicy", 8, 4)
    assert s.env_wrapper == ("stable_baselines3.common.atari_wrappers.AtariWrapper",)
    kw = s.model_kwargs
    assert (kw["n_steps"], kw["batch_size"], kw["n_epochs"], kw["clip_range"]) == (128, 256, 4, 0.1)
    assert (kw["gamma"], kw["gae_lambda"], kw["ent_coef"]) == (0.99, 0.95, 0.01)
    assert kw["learning_rate"] == LinearDecay(2.5e-4)


def test_mujoco_preset_is_the_seeds_mujoco_column():
    s = preset("mujoco")
    assert (s.policy, s.n_envs, s.normalize) == ("MlpPolicy", 1, {"gamma": 0.99})
    kw = s.model_kwargs
    assert (kw["n_steps"], kw["batch_size"], kw["n_epochs"], kw["clip_range"]) == (2048, 64, 10, 0.2)
    assert (kw["gamma"], kw["gae_lambda"], kw["ent_coef"]) == (0.99, 0.95, 0.0)
    assert kw["learning_rate"] == LinearDecay(3e-4)


def test_presets_are_fresh_copies():
    preset("mujoco").model_kwargs["n_steps"] = 1
    assert preset("mujoco").model_kwargs["n_steps"] == 2048
    assert presets.preset_names() == ["atari", "mujoco", "mujoco-tuned"]


def test_unknown_preset_and_algorithm_are_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("robotics")
    with pytest.raises(ValueError, match="no shipped hyperparameters"):
        zoo_settings("sac", "Pendulum-v1")


def test_custom_yaml_file(tmp_path):
    path = tmp_path / "mine.yml"
    path.write_text("Pendulum-v1:\n  n_envs: 2\n  learning_rate: lin_5e-4\n")
    s = zoo_settings("anything", "Pendulum-v1", path)
    assert isinstance(s, Settings) and s.n_envs == 2 and s.model_kwargs["learning_rate"] == LinearDecay(5e-4)
    with pytest.raises(ValueError, match="no 'default' block"):
        zoo_settings("anything", "CartPole-v1", path)
