"""The GRU policies by name: ``ClippedPPO("MlpGruPolicy", env)`` and its Cnn / MultiInput siblings.

The names sit beside sb3-contrib's ``*LstmPolicy`` ones in :data:`sb3_ppo_ext.features.POLICY_ALIASES`; a model
built from one trains with GRUs, counts as recurrent (LSTM-layout buffers and states) and saves and loads as a GRU.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import SimpleMultiObsEnv
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.errors import ConfigurationError
from sb3_ppo_ext.features import POLICY_ALIASES, is_recurrent
from sb3_ppo_ext.recurrent.buffers import RecurrentDictGAERolloutBuffer, RecurrentGAERolloutBuffer
from sb3_ppo_ext.recurrent.policies import (
    CnnGruPolicy,
    MlpGruPolicy,
    MultiInputGruPolicy,
    PairedStateGRU,
    RecurrentActorCriticPolicy,
)

TINY = dict(n_steps=32, batch_size=16, n_epochs=2, device="cpu", seed=0)
SMALL_GRU = dict(lstm_hidden_size=8, net_arch=[16])


def test_the_gru_names_are_aliases_of_the_gru_classes() -> None:
    assert POLICY_ALIASES["MlpGruPolicy"] is MlpGruPolicy
    assert POLICY_ALIASES["CnnGruPolicy"] is CnnGruPolicy
    assert POLICY_ALIASES["MultiInputGruPolicy"] is MultiInputGruPolicy
    for name in ("MlpGruPolicy", "CnnGruPolicy", "MultiInputGruPolicy"):
        assert ClippedPPO.policy_aliases[name] is POLICY_ALIASES[name]
        assert is_recurrent(POLICY_ALIASES[name])
        lstm_name = name.replace("Gru", "Lstm")
        assert issubclass(POLICY_ALIASES[name], POLICY_ALIASES[lstm_name])


def test_mlp_gru_policy_by_name_learns_with_grus_and_saves_and_loads(tmp_path: Path) -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = ClippedPPO("MlpGruPolicy", env, policy_kwargs=SMALL_GRU, **TINY)
    policy = model.policy
    assert isinstance(policy, MlpGruPolicy) and policy.rnn_type == "gru"
    assert isinstance(policy.lstm_actor, PairedStateGRU) and isinstance(policy.lstm_critic, PairedStateGRU)
    assert isinstance(model.rollout_buffer, RecurrentGAERolloutBuffer)
    model.learn(64)
    assert model.num_timesteps == 64

    model.save(tmp_path / "gru.zip")
    loaded = ClippedPPO.load(tmp_path / "gru.zip", device="cpu")
    assert type(loaded.policy) is MlpGruPolicy and loaded.policy.rnn_type == "gru"
    assert isinstance(loaded.policy.lstm_actor, PairedStateGRU)
    obs, starts = env.reset(), np.ones(2, dtype=bool)
    state_a = state_b = None
    for _ in range(5):
        action_a, state_a = model.predict(obs, state_a, starts, deterministic=True)
        action_b, state_b = loaded.predict(obs, state_b, starts, deterministic=True)
        np.testing.assert_array_equal(action_a, action_b)
        np.testing.assert_array_equal(state_a[0], state_b[0])
        assert not state_a[1].any()  # a GRU has no cell state: c is zeros
        obs, _, starts, _ = env.step(action_a)
    loaded.set_env(env)
    loaded.learn(32, reset_num_timesteps=False)


def test_multi_input_gru_policy_by_name_reads_dict_observations() -> None:
    env = DummyVecEnv([SimpleMultiObsEnv])
    model = ClippedPPO("MultiInputGruPolicy", env, policy_kwargs=SMALL_GRU, **TINY)
    assert isinstance(model.policy, MultiInputGruPolicy) and isinstance(model.policy.lstm_actor, PairedStateGRU)
    assert isinstance(model.rollout_buffer, RecurrentDictGAERolloutBuffer)
    model.learn(32)


class ImageEnv(gym.Env):
    """The smallest images NatureCNN takes (36x36x1 uint8), random; two actions."""

    observation_space = spaces.Box(0, 255, (36, 36, 1), dtype=np.uint8)
    action_space = spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        return self.observation_space.sample(), 0.0, False, False, {}


def test_cnn_gru_policy_by_name_builds_a_gru_on_natures_cnn() -> None:
    env = DummyVecEnv([ImageEnv])
    model = ClippedPPO("CnnGruPolicy", env, policy_kwargs=SMALL_GRU, **TINY)
    assert isinstance(model.policy, CnnGruPolicy) and isinstance(model.policy.lstm_actor, PairedStateGRU)
    assert isinstance(model.policy, RecurrentActorCriticPolicy)


def test_the_gru_names_are_checked_against_the_observation_space_like_the_lstm_ones() -> None:
    with pytest.raises(ConfigurationError, match="needs a Dict observation space"):
        ClippedPPO("MultiInputGruPolicy", make_vec_env("CartPole-v1", n_envs=1), **TINY)
    with pytest.raises(ConfigurationError, match="MultiInputGruPolicy"):
        ClippedPPO("MlpGruPolicy", DummyVecEnv([SimpleMultiObsEnv]), **TINY)
