"""sb3_ppo_ext.envs: rl_zoo3's Atari rule and env building, shared by the CLI, the benchmark and throughput.py."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from conftest import ImageEnv
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import (
    DummyVecEnv,
    VecFrameStack,
    VecNormalize,
    VecTransposeImage,
    sync_envs_normalization,
)

from sb3_ppo_ext.envs import is_atari, make_env
from sb3_ppo_ext.presets import parse_zoo_block

IMAGE_ID = "SB3PPOExtTestImage-v0"
FAKE_ATARI_ID = "SB3PPOExtFakeGame-v0"
if IMAGE_ID not in gym.registry:
    gym.register(IMAGE_ID, entry_point=ImageEnv)
if FAKE_ATARI_ID not in gym.registry:
    # registered, never made: is_atari reads the entry point only, as rl_zoo3 does
    gym.register(FAKE_ATARI_ID, entry_point="ale_py.env:AtariEnv")


# -- is_atari ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env_id", "expected"),
    [
        (FAKE_ATARI_ID, True),  # rl_zoo3's rule: the AtariEnv entry point, whatever the name
        ("ALE/Pong-v5", True),  # by name where ale_py is not installed, by entry point where it is
        ("PongNoFrameskip-v4", True),
        ("CartPole-v1", False),
        ("HalfCheetah-v5", False),
        ("NoSuchEnv-v0", False),
        ("no_such_module:Thing-v0", False),
    ],
)
def test_is_atari(env_id, expected):
    assert is_atari(env_id) is expected


# -- make_env ------------------------------------------------------------------------------------------


def test_plain_settings_give_monitored_envs_seeded_one_apart():
    settings = parse_zoo_block({"n_envs": 3, "env_kwargs": {"max_episode_steps": 7}})
    env = make_env("CartPole-v1", settings, seed=5)
    assert isinstance(env, DummyVecEnv) and env.num_envs == 3
    assert all(isinstance(e, Monitor) for e in env.envs)
    assert env.envs[0].spec.max_episode_steps == 7
    again = make_env("CartPole-v1", settings, n_envs=1, seed=6)
    np.testing.assert_array_equal(env.reset()[1], again.reset()[0])  # env i is seeded with seed + i


def test_env_kwargs_argument_goes_over_the_settings():
    settings = parse_zoo_block({"env_kwargs": {"max_episode_steps": 7}})
    env = make_env("CartPole-v1", settings, env_kwargs={"max_episode_steps": 9})
    assert env.envs[0].spec.max_episode_steps == 9


def test_normalize_is_inside_frame_stack_as_in_the_zoo():
    settings = parse_zoo_block({"n_envs": 2, "normalize": "dict(norm_reward=False)", "gamma": 0.9, "frame_stack": 3})
    env = make_env("Pendulum-v1", settings, seed=0)
    assert isinstance(env, VecFrameStack) and isinstance(env.venv, VecNormalize)
    assert env.venv.gamma == 0.9 and env.venv.training and not env.venv.norm_reward
    assert env.observation_space.shape == (9,)
    assert not isinstance(make_env("Pendulum-v1", settings, normalize=False), VecNormalize)


def test_evaluation_envs_freeze_statistics_and_take_the_training_ones(tmp_path):
    settings = parse_zoo_block({"normalize": True, "gamma": 0.95})
    train_env = make_env("Pendulum-v1", settings, seed=0)
    train_env.reset()
    for _ in range(20):
        train_env.step(np.zeros((1, 1), dtype=np.float32))
    eval_env = make_env("Pendulum-v1", settings, 1, 1, evaluation=True)
    assert not eval_env.training and not eval_env.norm_reward
    sync_envs_normalization(train_env, eval_env)
    np.testing.assert_allclose(eval_env.obs_rms.mean, train_env.obs_rms.mean)

    path = tmp_path / "stats.pkl"
    train_env.save(str(path))
    loaded = make_env("Pendulum-v1", parse_zoo_block({}), 1, 2, normalize=path, evaluation=True)
    assert isinstance(loaded, VecNormalize) and not loaded.training and not loaded.norm_reward
    np.testing.assert_allclose(loaded.obs_rms.mean, train_env.obs_rms.mean)


@pytest.mark.filterwarnings("ignore:.*render_mode")  # make_vec_env asks every env for rgb_array
def test_channel_last_images_are_transposed_after_frame_stacking():
    settings = parse_zoo_block({"n_envs": 2, "frame_stack": 2, "policy": "CnnPolicy"})
    env = make_env(IMAGE_ID, settings, seed=0)
    assert isinstance(env, VecTransposeImage) and isinstance(env.venv, VecFrameStack)
    assert env.observation_space.shape == (6, 36, 36)
    assert env.reset().shape == (2, 6, 36, 36)


def test_env_wrappers_of_the_settings_are_applied():
    settings = parse_zoo_block({"env_wrapper": [{"gymnasium.wrappers.TimeLimit": {"max_episode_steps": 4}}]})
    env = make_env("CartPole-v1", settings, seed=0)
    env.reset()
    for _ in range(3):
        _, _, dones, _ = env.step(np.zeros(1, dtype=np.int64))
        assert not dones[0]
    _, _, dones, infos = env.step(np.zeros(1, dtype=np.int64))
    assert dones[0] and infos[0]["TimeLimit.truncated"]  # the wrapper (outside Monitor) cut the episode
