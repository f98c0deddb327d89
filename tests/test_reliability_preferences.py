"""Issue 28: preference segments with NaN/inf or values outside their space are refused, the reward model untouched."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from sb3_ppo_ext.errors import NonFiniteError, PreferenceDataError
from sb3_ppo_ext.rlhf.preferences import PreferenceDataset, RewardModel, evaluate, fit

OBS = spaces.Box(-1, 1, (2,), np.float32)
L = 4


def _segment(rng: np.random.Generator, action_space: spaces.Space) -> tuple[np.ndarray, np.ndarray]:
    obs = rng.uniform(-1, 1, (L, 2)).astype(np.float32)
    actions = np.stack([action_space.sample() for _ in range(L)])
    return obs, actions


def _dataset(action_space: spaces.Space, n_pairs: int = 6) -> PreferenceDataset:
    action_space.seed(0)
    rng = np.random.default_rng(0)
    dataset = PreferenceDataset()
    for index in range(n_pairs):
        dataset.add(*_segment(rng, action_space), *_segment(rng, action_space), float(index % 2))
    return dataset


def _weights(model: RewardModel) -> dict[str, th.Tensor]:
    return copy.deepcopy(model.state_dict())


def _assert_unchanged(model: RewardModel, before: dict[str, th.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert th.equal(value, before[key]), key


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["obs1", "act1", "obs2", "act2"])
def test_segments_with_nan_or_inf_are_refused_when_added(where: str, bad: float) -> None:
    action_space = spaces.Box(-1, 1, (2,), np.float32)
    dataset = _dataset(action_space)
    rng = np.random.default_rng(1)
    (obs1, act1), (obs2, act2) = _segment(rng, action_space), _segment(rng, action_space)
    arrays = {"obs1": obs1, "act1": act1, "obs2": obs2, "act2": act2}
    arrays[where] = arrays[where].copy()
    arrays[where][2, 1] = bad
    segment = "1" if where.endswith("1") else "2"
    what = "observations" if where.startswith("obs") else "actions"
    with pytest.raises(NonFiniteError, match=rf"segment {segment}: {what} contain NaN or inf \(first at step 2 of 4\)"):
        dataset.add(arrays["obs1"], arrays["act1"], arrays["obs2"], arrays["act2"], 1.0)
    assert len(dataset) == 6  # nothing added
    model = RewardModel(OBS, action_space)
    before = _weights(model)
    fit(model, dataset, epochs=1, seed=0)  # the dataset is still clean: fitting works and keeps weights finite
    assert all(th.isfinite(value).all() for value in model.state_dict().values())
    assert any(not th.equal(value, before[key]) for key, value in model.state_dict().items())


def test_pairs_are_copied_so_a_reused_array_cannot_put_nan_into_them() -> None:
    rng = np.random.default_rng(0)
    obs, actions = _segment(rng, spaces.Discrete(3))
    dataset = PreferenceDataset()
    dataset.add(obs, actions, obs, actions, 0.5)
    obs[0, 0] = np.nan
    assert np.isfinite(dataset.arrays()[0]).all()
    with pytest.raises(ValueError, match="must be numbers"):
        dataset.add(obs.astype(object), actions, obs, actions, 0.5)


@pytest.mark.parametrize(
    ("action_space", "bad", "shown"),
    [
        (spaces.Discrete(3), 5, "5"),
        (spaces.Discrete(3), -1, "-1"),
        (spaces.Discrete(3, start=1), 0, "0"),
        (spaces.Discrete(3), 1.5, "1.5"),
        (spaces.MultiDiscrete([2, 3]), [1, 3], "3"),
        (spaces.MultiBinary(2), [0, 2], "2"),
    ],
    ids=["above", "negative", "below-start", "fraction", "multidiscrete", "multibinary"],
)
def test_actions_outside_the_action_space_are_a_clear_error_before_any_weight_changes(
    action_space: spaces.Space, bad: object, shown: str
) -> None:
    dataset = _dataset(action_space, n_pairs=8)
    rng = np.random.default_rng(2)
    obs, actions = _segment(rng, action_space)
    actions = actions.astype(np.float64)
    actions[3] = bad
    dataset.add(obs, actions, *_segment(rng, action_space), 1.0)  # the last pair: minibatches before it are fine
    model = RewardModel(OBS, action_space)
    before = _weights(model)
    optimizer = th.optim.Adam(model.parameters())
    match = rf"actions hold {shown}(\.0)?, outside the action space {re.escape(str(action_space))}"
    with pytest.raises(PreferenceDataError, match=match):
        fit(model, dataset, epochs=2, batch_size=2, optimizer=optimizer, seed=0)
    _assert_unchanged(model, before)
    assert not optimizer.state  # not a single step was taken
    with pytest.raises(PreferenceDataError, match=match):
        evaluate(model, dataset)
    with pytest.raises(PreferenceDataError, match=match):
        model.predict_reward(obs, actions)


def test_discrete_observations_outside_their_space_are_refused_too() -> None:
    model = RewardModel(spaces.Discrete(4), spaces.Discrete(2))
    with pytest.raises(PreferenceDataError, match=r"observations hold 4, outside the observation space Discrete\(4\)"):
        model.predict_reward(np.array([0, 4]), np.array([0, 1]))
    np.testing.assert_array_equal(model.predict_reward(np.array([0, 3]), np.array([0, 1])).shape, (2,))
