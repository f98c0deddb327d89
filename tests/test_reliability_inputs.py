"""Issue 28: the inputs of the features' public entry points get clear errors (or warnings), never torch's.

Recurrent ``predict`` (``state``, ``episode_start``), masked ``predict`` (``action_masks``), and LSTM policies on
``MultiDiscrete`` observations with masks (settings whose feature is off: ``test_reliability_settings.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.errors import ActionMaskError, PredictInputError
from sb3_ppo_ext.policies import ActorCriticPolicy
from sb3_ppo_ext.recurrent.policies import RecurrentActorCriticPolicy

TINY = dict(n_steps=32, batch_size=16, n_epochs=1, device="cpu")
OBS_SPACE = spaces.Box(-1, 1, (3,), np.float32)
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _lr(_: float) -> float:
    return 1e-3


@functools.cache
def _recurrent_policy(hidden: int, layers: int, n_actions: int = 3) -> RecurrentActorCriticPolicy:
    th.manual_seed(0)
    return RecurrentActorCriticPolicy(
        OBS_SPACE, spaces.Discrete(n_actions), _lr, lstm_hidden_size=hidden, n_lstm_layers=layers, net_arch=[4]
    )


@functools.cache
def _policy(n_actions: int) -> ActorCriticPolicy:
    th.manual_seed(0)
    return ActorCriticPolicy(OBS_SPACE, spaces.Discrete(n_actions), _lr, net_arch=[4])


def _states(layers: int, batch: int, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(batch)
    shape = (layers, batch, hidden)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


# -- recurrent predict ----------------------------------------------------------------------------------------


@PROPERTY
@given(
    batch=st.integers(1, 5),
    hidden=st.integers(1, 6),
    layers=st.integers(1, 2),
    other=st.integers(1, 7),
    starts=st.integers(0, 7),
)
def test_recurrent_predict_takes_valid_inputs_and_names_each_bad_one(
    batch: int, hidden: int, layers: int, other: int, starts: int
) -> None:
    policy = _recurrent_policy(hidden, layers)
    obs = np.random.default_rng(0).uniform(-1, 1, (batch, 3)).astype(np.float32)
    state = _states(layers, batch, hidden)
    episode_start = np.zeros(batch, dtype=bool)
    actions, new_state = policy.predict(obs, state, episode_start)
    assert actions.shape == (batch,) and all(part.shape == (layers, batch, hidden) for part in new_state)
    # the same states given as a list, as tensors, or as float64 arrays work too
    for same in ([*state], tuple(th.as_tensor(s) for s in state), tuple(s.astype(np.float64) for s in state)):
        np.testing.assert_array_equal(policy.predict(obs, same, episode_start)[1][0], new_state[0])

    expected = rf"expected \({layers}, {batch}, {hidden}\) \(n_lstm_layers, n_envs, lstm_hidden_size\)"
    if other != hidden:  # another model's hidden size
        bad = np.zeros((layers, batch, other), np.float32)
        with pytest.raises(PredictInputError, match=rf"state\[0\] \(h\) has shape \({layers}, {batch}, {other}\), "):
            policy.predict(obs, (bad, state[1]), episode_start)
        with pytest.raises(PredictInputError, match=rf"{expected}: hidden size {other}, the model has .*state=None"):
            policy.predict(obs, (state[0], bad), episode_start)
    if other != batch:  # states of another number of envs
        bad = np.zeros((layers, other, hidden), np.float32)
        with pytest.raises(PredictInputError, match=rf"{expected}: states for {other} env\(s\), but {batch} obs"):
            policy.predict(obs, (bad, bad), episode_start)
    # one array instead of the (h, c) pair, and tuples of another length
    with pytest.raises(
        PredictInputError, match=rf"state is one array of shape \({layers}, {batch}, {hidden}\).*\(h, c\)"
    ):
        policy.predict(obs, state[0], episode_start)
    with pytest.raises(PredictInputError, match=r"state is a tuple of 3 item\(s\)"):
        policy.predict(obs, (*state, state[0]), episode_start)
    with pytest.raises(PredictInputError, match=r"state is one array of shape \(2, "):
        policy.predict(obs, np.stack(state), episode_start)
    if starts != batch:  # an episode_start of another length
        with pytest.raises(
            PredictInputError,
            match=rf"episode_start has shape \({starts},\) .* got {batch} observation.*shape \({batch},\)",
        ):
            policy.predict(obs, state, np.zeros(starts, dtype=bool))


def test_recurrent_predict_refuses_non_flags_and_non_finite_states() -> None:
    policy = _recurrent_policy(4, 1)
    obs = np.zeros((2, 3), np.float32)
    state = _states(1, 2, 4)
    with pytest.raises(PredictInputError, match=r"episode_start must be booleans \(or 0/1\); got \[0.5, 0.0\]"):
        policy.predict(obs, state, np.array([0.5, 0.0]))
    with pytest.raises(PredictInputError, match="episode_start=.* is not an array of booleans"):
        policy.predict(obs, state, ["yes", "no"])
    with pytest.raises(PredictInputError, match=r"state\[1\] \(c\) contains NaN or inf"):
        policy.predict(obs, (state[0], np.full_like(state[1], np.nan)), np.zeros(2))
    with pytest.raises(PredictInputError, match=r"state\[0\] \(h\) has shape \(2, 4\).*it has 2 dimension"):
        policy.predict(obs, (state[0][0], state[1]), np.zeros(2))
    # a single observation: a scalar episode_start and states for one env
    action, (h, _) = policy.predict(np.zeros(3, np.float32), _states(1, 1, 4), True)
    assert np.ndim(action) == 0 and h.shape == (1, 1, 4)


def test_errors_reach_the_user_through_the_model_and_are_value_errors() -> None:
    model = ClippedPPO("MlpLstmPolicy", "CartPole-v1", policy_kwargs=dict(lstm_hidden_size=8, net_arch=[8]), **TINY)
    obs = np.zeros((2, 4), np.float32)
    _, state = model.predict(obs)
    with pytest.raises(ValueError, match=r"episode_start has shape \(3,\)"):
        model.predict(obs, state, np.zeros(3))
    with pytest.raises(PredictInputError, match=r"hidden size 16, the model has lstm_hidden_size=8"):
        model.predict(obs, (np.zeros((1, 2, 16)), np.zeros((1, 2, 16))))


# -- masked predict ----------------------------------------------------------------------------------------------


@PROPERTY
@given(batch=st.integers(1, 6), rows=st.integers(1, 6), n_actions=st.integers(2, 5), data=st.data())
def test_masked_predict_needs_one_mask_row_per_observation(batch: int, rows: int, n_actions: int, data) -> None:
    policy = _policy(n_actions)
    obs = np.zeros((batch, 3), np.float32)
    allowed = data.draw(st.lists(st.integers(0, n_actions - 1), min_size=max(batch, rows), max_size=max(batch, rows)))
    masks = np.zeros((rows, n_actions), dtype=bool)
    masks[np.arange(rows), allowed[:rows]] = True
    if rows == batch:
        actions, _ = policy.predict(obs, action_masks=masks, deterministic=True)
        np.testing.assert_array_equal(actions, allowed[:rows])  # the only valid action of each row
        np.testing.assert_array_equal(
            policy.predict(obs, action_masks=masks.reshape(-1), deterministic=True)[0], actions
        )
    else:  # too few rows (one row for several observations included) or too many
        given = rf"action_masks has shape \({rows}, {n_actions}\), but predict\(\) got {batch} observation"
        match = rf"{given}.*pass one mask row per observation, shape \({batch}, {n_actions}\)"
        with pytest.raises(ActionMaskError, match=match):
            policy.predict(obs, action_masks=masks)
    recurrent = _recurrent_policy(2, 1, n_actions)
    if rows != batch:
        with pytest.raises(ActionMaskError, match=rf"action_masks has shape \({rows}, {n_actions}\)"):
            recurrent.predict(obs, action_masks=masks)


def test_one_mask_row_is_not_broadcast_through_the_model_and_a_single_observation_works() -> None:
    model = ClippedPPO("MlpPolicy", "CartPole-v1", **TINY)
    one_row = np.array([[True, False]])
    with pytest.raises(ActionMaskError, match=r"action_masks has shape \(1, 2\), but predict\(\) got 3 observation"):
        model.predict(np.zeros((3, 4), np.float32), action_masks=one_row)
    for masks in (one_row, one_row[0], np.array([[0, 1]])):
        action, _ = model.predict(np.zeros(4, np.float32), action_masks=masks, deterministic=True)
        assert np.ndim(action) == 0 and action == np.flatnonzero(np.asarray(masks).reshape(-1))[0]
    with pytest.raises(ActionMaskError, match=r"action_masks row 1 given to predict\(\) has no valid action"):
        model.predict(np.zeros((2, 4), np.float32), action_masks=np.array([[True, False], [False, False]]))
    with pytest.raises(ActionMaskError, match=r"the action space Box.*Pass action_masks=None"):
        ClippedPPO("MlpPolicy", "Pendulum-v1", **TINY).predict(np.zeros(3, np.float32), action_masks=np.ones(2))


def test_multidiscrete_observations_count_their_rows() -> None:
    env = _MultiDiscreteObsMaskedEnv()
    model = ClippedPPO("MlpPolicy", env, **TINY)
    obs = np.stack([env.observation_space.sample() for _ in range(4)])
    actions, _ = model.predict(obs, action_masks=np.tile([True, False, True], (4, 1)))
    assert actions.shape == (4,) and set(actions) <= {0, 2}
    with pytest.raises(ActionMaskError, match=r"action_masks has shape \(2, 3\), but predict\(\) got 4 obs"):
        model.predict(obs, action_masks=np.ones((2, 3), bool))


# -- LSTM on MultiDiscrete observations, with masks ------------------------------------------------------------


class _MultiDiscreteObsMaskedEnv(gym.Env):
    """MultiDiscrete observations (SB3 flattens them to a NumPy-integer size); action 1 is masked on odd steps."""

    observation_space = spaces.MultiDiscrete([3, 4])
    action_space = spaces.Discrete(3)

    def __init__(self) -> None:
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        return np.array([0, self._t % 4]), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        assert self.action_masks()[int(action)], "a masked action was taken"
        self._t += 1
        return np.array([int(action), self._t % 4]), float(action == 2), False, self._t >= 16, {}

    def action_masks(self) -> np.ndarray:
        return np.array([True, self._t % 2 == 0, True])


def test_lstm_policy_with_masks_on_multidiscrete_observations_constructs_and_learns() -> None:
    model = ClippedPPO(
        "MlpLstmPolicy", _MultiDiscreteObsMaskedEnv(), policy_kwargs=dict(lstm_hidden_size=8, net_arch=[8]), **TINY
    )
    assert type(model.policy.lstm_actor.input_size) is int
    model.learn(64)  # the env asserts that no masked action is taken
    obs = np.array([[1, 2], [0, 3]])
    actions, state = model.predict(obs, action_masks=np.array([[False, True, False], [True, False, False]]))
    np.testing.assert_array_equal(actions, [1, 0])
    assert state[0].shape == (1, 2, 8)
