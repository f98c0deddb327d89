"""Our GAE rollout buffers: same advantages as SB3's buffers, aligned shuffled minibatches, Dict observations."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import CounterEnv, DictObsEnv, collect_rollout
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.buffers import DictGAERolloutBuffer, GAERolloutBuffer

T, N = 10, 3
OBS = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
DICT_OBS = spaces.Dict(
    {"x": spaces.Box(-np.inf, np.inf, (2,), np.float32), "img": spaces.Box(0, 255, (1, 4, 4), np.uint8)}
)


def fill(buffers: list, action_space: spaces.Space, dict_obs: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Add the same random rollout to every buffer; ``obs[..., 0]`` encodes the flat sample index."""
    rng = np.random.default_rng(seed)
    episode_starts = (rng.random((T, N)) < 0.2).astype(np.float32)
    for t in range(T):
        index = (t * N + np.arange(N)).astype(np.float32)
        x = np.stack([index, rng.normal(size=N)], axis=1).astype(np.float32)
        obs = {"x": x, "img": rng.integers(0, 256, (N, 1, 4, 4), dtype=np.uint8)} if dict_obs else x
        action = np.stack([action_space.sample() for _ in range(N)])
        if isinstance(action_space, spaces.Discrete):
            action = action.reshape(N, 1)
        reward = rng.normal(size=N).astype(np.float32)
        value = th.as_tensor(rng.normal(size=(N, 1)), dtype=th.float32)
        log_prob = th.as_tensor(rng.normal(size=N), dtype=th.float32)
        for buffer in buffers:
            buffer.add(obs, action, reward, episode_starts[t], value, log_prob)
    last_values = th.as_tensor(rng.normal(size=(N, 1)), dtype=th.float32)
    dones = (rng.random(N) < 0.5).astype(np.float32)
    for buffer in buffers:
        buffer.compute_returns_and_advantage(last_values=last_values, dones=dones)
    return dict(episode_starts=episode_starts)


ACTION_SPACES = [
    spaces.Discrete(3),
    spaces.Box(-1, 1, shape=(2,), dtype=np.float32),
    spaces.MultiDiscrete([2, 3]),
    spaces.MultiBinary(3),
]


@pytest.mark.parametrize("lam", [0.0, 0.9, 1.0])
def test_advantages_and_returns_equal_sb3_rollout_buffer(lam: float) -> None:
    ours = GAERolloutBuffer(T, OBS, spaces.Discrete(3), "cpu", gae_lambda=lam, gamma=0.95, n_envs=N)
    sb3 = RolloutBuffer(T, OBS, spaces.Discrete(3), "cpu", gae_lambda=lam, gamma=0.95, n_envs=N)
    fill([ours, sb3], spaces.Discrete(3))
    np.testing.assert_allclose(ours.advantages, sb3.advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.returns, sb3.returns, rtol=1e-5, atol=1e-5)
    assert np.abs(ours.advantages).sum() > 0


def test_dict_buffer_advantages_equal_sb3_dict_rollout_buffer() -> None:
    ours = DictGAERolloutBuffer(T, DICT_OBS, spaces.Discrete(3), "cpu", gae_lambda=0.9, gamma=0.9, n_envs=N)
    sb3 = DictRolloutBuffer(T, DICT_OBS, spaces.Discrete(3), "cpu", gae_lambda=0.9, gamma=0.9, n_envs=N)
    fill([ours, sb3], spaces.Discrete(3), dict_obs=True)
    np.testing.assert_allclose(ours.advantages, sb3.advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.returns, sb3.returns, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("action_space", ACTION_SPACES, ids=lambda s: type(s).__name__)
def test_minibatches_cover_rollout_once_and_stay_aligned(action_space: spaces.Space) -> None:
    buffer = GAERolloutBuffer(T, OBS, action_space, "cpu", gae_lambda=0.9, gamma=0.9, n_envs=N)
    fill([buffer], action_space)
    flat_actions = buffer.actions.reshape(T * N, -1)
    seen = []
    sizes = []
    for batch in buffer.get(batch_size=8):
        index = batch.observations[:, 0].long().numpy()
        seen.extend(index.tolist())
        sizes.append(len(index))
        t, i = np.divmod(index, N)
        # every field of a sample comes from the same (step, env) cell
        np.testing.assert_allclose(batch.actions.numpy(), flat_actions[index])
        np.testing.assert_allclose(batch.old_values.numpy(), buffer.values[t, i])
        np.testing.assert_allclose(batch.old_log_prob.numpy(), buffer.log_probs[t, i])
        np.testing.assert_allclose(batch.advantages.numpy(), buffer.advantages[t, i])
        np.testing.assert_allclose(batch.returns.numpy(), buffer.returns[t, i])
    assert sorted(seen) == list(range(T * N))
    assert sizes == [8, 8, 8, 6]  # the last minibatch holds the remainder


def test_minibatch_shapes_per_action_space() -> None:
    expected = {spaces.Discrete: 1, spaces.Box: 2, spaces.MultiDiscrete: 2, spaces.MultiBinary: 3}
    for action_space in ACTION_SPACES:
        buffer = GAERolloutBuffer(T, OBS, action_space, "cpu", n_envs=N)
        fill([buffer], action_space)
        batch = next(buffer.get(batch_size=5))
        assert batch.observations.shape == (5, 2)
        assert batch.actions.shape == (5, expected[type(action_space)])
        for field in (batch.old_values, batch.old_log_prob, batch.advantages, batch.returns):
            assert field.shape == (5,)


def test_each_epoch_is_a_new_permutation_and_none_gives_one_batch() -> None:
    buffer = GAERolloutBuffer(T, OBS, spaces.Discrete(3), "cpu", n_envs=N)
    fill([buffer], spaces.Discrete(3))
    th.manual_seed(0)
    first = th.cat([b.observations[:, 0] for b in buffer.get(batch_size=10)])
    second = th.cat([b.observations[:, 0] for b in buffer.get(batch_size=10)])
    assert not th.equal(first, second)
    assert th.equal(first.sort().values, second.sort().values)
    batches = list(buffer.get())
    assert len(batches) == 1 and len(batches[0].advantages) == T * N


def test_dict_buffer_minibatches_keep_keys_dtypes_and_alignment() -> None:
    buffer = DictGAERolloutBuffer(T, DICT_OBS, spaces.Discrete(3), "cpu", n_envs=N)
    fill([buffer], spaces.Discrete(3), dict_obs=True)
    for batch in buffer.get(batch_size=7):
        assert set(batch.observations) == {"x", "img"}
        assert batch.observations["img"].dtype == th.uint8
        assert batch.observations["img"].shape[1:] == (1, 4, 4)
        index = batch.observations["x"][:, 0].long().numpy()
        t, i = np.divmod(index, N)
        np.testing.assert_array_equal(batch.observations["img"].numpy(), buffer.observations["img"][t, i])
        np.testing.assert_allclose(batch.advantages.numpy(), buffer.advantages[t, i])


def test_get_samples_explicit_indices_and_reset() -> None:
    buffer = GAERolloutBuffer(T, OBS, spaces.Box(-1, 1, (2,), np.float32), "cpu", n_envs=N)
    fill([buffer], spaces.Box(-1, 1, (2,), np.float32))
    samples = buffer._get_samples(np.array([0, 5, 29]))
    np.testing.assert_array_equal(samples.observations[:, 0].numpy(), [0, 5, 29])
    np.testing.assert_allclose(samples.advantages.numpy(), buffer.advantages.reshape(-1)[[0, 5, 29]])
    assert buffer.full
    buffer.reset()
    assert not buffer.full and buffer.pos == 0
    assert not buffer.observations.any() and not buffer.advantages.any()
    with pytest.raises(AssertionError):
        next(buffer.get(4))


def test_image_observations_keep_uint8() -> None:
    image = spaces.Box(0, 255, (3, 8, 8), np.uint8)
    buffer = GAERolloutBuffer(2, image, spaces.Discrete(2), "cpu", n_envs=1)
    for _ in range(2):
        buffer.add(image.sample()[None], np.array([[1]]), np.array([1.0]), np.array([0.0]), th.zeros(1, 1), th.zeros(1))
    buffer.compute_returns_and_advantage(th.zeros(1, 1), np.array([0.0]))
    assert buffer.observations.dtype == np.uint8
    assert next(buffer.get(2)).observations.dtype == th.uint8


def test_our_buffers_are_sb3_rollout_buffers() -> None:
    flat = GAERolloutBuffer(T, OBS, spaces.Discrete(2), "cpu", n_envs=N)
    assert isinstance(flat, RolloutBuffer) and not isinstance(flat, DictRolloutBuffer)
    dict_buffer = DictGAERolloutBuffer(T, DICT_OBS, spaces.Discrete(2), "cpu", n_envs=N)
    assert isinstance(dict_buffer, DictRolloutBuffer) and isinstance(dict_buffer, RolloutBuffer)
    # our storage and minibatches, not SB3's
    assert DictGAERolloutBuffer.get is GAERolloutBuffer.get and DictGAERolloutBuffer.add is GAERolloutBuffer.add
    assert isinstance(dict_buffer.observations, dict) and dict_buffer.observations["img"].dtype == np.uint8


def _image_buffer(channels_last: bool | None) -> GAERolloutBuffer:
    image = spaces.Box(0, 255, (3, 8, 8), np.uint8)
    buffer = GAERolloutBuffer(4, image, spaces.Discrete(2), "cpu", n_envs=2, channels_last=channels_last)
    rng = np.random.default_rng(0)
    for _ in range(4):
        obs = rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
        buffer.add(obs, np.array([[1], [0]]), np.ones(2), np.zeros(2), th.zeros(2, 1), th.zeros(2))
    buffer.compute_returns_and_advantage(th.zeros(2, 1), np.zeros(2))
    return buffer


def test_image_minibatches_are_channels_last_by_default_with_the_same_values() -> None:
    buffer = _image_buffer(None)
    assert buffer.channels_last  # an image space: the policy's convolutions run NHWC
    flat = buffer.observations.reshape(8, 3, 8, 8)
    for batch in buffer.get(batch_size=3):
        obs = batch.observations
        assert obs.shape[1:] == (3, 8, 8) and obs.is_contiguous(memory_format=th.channels_last)
        # every frame is one of the rollout's frames, unchanged
        assert all(any(np.array_equal(frame, stored) for stored in flat) for frame in obs.numpy())
    assert next(_image_buffer(False).get(batch_size=3)).observations.is_contiguous()
    assert not GAERolloutBuffer(T, OBS, spaces.Discrete(2), "cpu", n_envs=N).channels_last


def test_dict_buffer_rejects_flat_space() -> None:
    with pytest.raises(TypeError):
        DictGAERolloutBuffer(T, OBS, spaces.Discrete(2), "cpu")


def _first_rollout(buffer_class: type | None, env_fn, policy: str = "MlpPolicy") -> ClippedPPO:
    env = make_vec_env(env_fn, n_envs=2, seed=3)
    model = ClippedPPO(policy, env, n_steps=16, batch_size=16, gamma=0.9, rollout_buffer_class=buffer_class, seed=3)
    collect_rollout(model, 32)
    return model


def _time_limited_counter() -> gym.Env:
    return gym.wrappers.TimeLimit(CounterEnv(), max_episode_steps=5)


@pytest.mark.parametrize(
    ("ours", "sb3", "env_fn", "policy"),
    [
        (GAERolloutBuffer, RolloutBuffer, _time_limited_counter, "MlpPolicy"),
        (DictGAERolloutBuffer, DictRolloutBuffer, DictObsEnv, "MultiInputPolicy"),
    ],
    ids=["flat", "dict"],
)
def test_collected_rollout_gives_same_advantages_with_our_or_sb3_buffer(ours, sb3, env_fn, policy) -> None:
    default = _first_rollout(None, env_fn, policy)
    assert type(default.rollout_buffer) is ours
    reference = _first_rollout(sb3, env_fn, policy)
    assert type(reference.rollout_buffer) is sb3
    np.testing.assert_allclose(default.rollout_buffer.rewards, reference.rollout_buffer.rewards, rtol=1e-6)
    np.testing.assert_allclose(default.rollout_buffer.advantages, reference.rollout_buffer.advantages, rtol=1e-5)
    np.testing.assert_allclose(default.rollout_buffer.returns, reference.rollout_buffer.returns, rtol=1e-5)
