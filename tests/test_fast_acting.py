"""NumpyActor: the rollout's acting in NumPy gives the torch path's actions, values and log-probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.backends import ClosedFormBackend
from sb3_ppo_ext.fast.acting import MAX_ROWS, NumpyActor


def _kernel(env_id: str, **kwargs):
    model = ClippedPPO("MlpPolicy", make_vec_env(env_id, n_envs=4, seed=0), seed=0, device="cpu", **kwargs)
    backend = ClosedFormBackend(model.policy)
    return model, backend.kernel


def _torch_act(kernel, obs: th.Tensor):
    """The torch path of MLPActorCriticKernel.act (the NumPy actor switched off)."""
    actor, kernel.numpy_actor = kernel.numpy_actor, None
    try:
        return kernel.act(obs)
    finally:
        kernel.numpy_actor = actor


@pytest.mark.parametrize(
    "env_id, kwargs",
    [
        ("CartPole-v1", {}),
        ("CartPole-v1", dict(policy_kwargs=dict(activation_fn=th.nn.ReLU, net_arch=[32, 16]))),
        ("Pendulum-v1", {}),
        ("Pendulum-v1", dict(policy_kwargs=dict(activation_fn=th.nn.ReLU, log_std_init=-1.0))),
    ],
)
def test_numpy_acting_equals_the_torch_path(env_id, kwargs) -> None:
    model, kernel = _kernel(env_id, **kwargs)
    assert kernel.numpy_actor is not None
    generator = np.random.default_rng(0)
    for rows in (1, 4, MAX_ROWS):
        dtype = np.float32 if rows != 4 else np.float64  # float64: what a MuJoCo env returns unnormalised
        obs = th.as_tensor(generator.normal(size=(rows, *model.observation_space.shape)).astype(dtype))
        th.manual_seed(7)
        with th.inference_mode():
            actions, values, log_prob = kernel.act(obs)
        th.manual_seed(7)  # the same noise: both draw it from torch's generator, in the same amount
        with th.inference_mode():
            expected_actions, expected_values, expected_log_prob = _torch_act(kernel, obs)
        assert actions.shape == expected_actions.shape and actions.dtype == expected_actions.dtype
        if actions.dtype == th.int64:
            assert th.equal(actions, expected_actions)
        else:
            th.testing.assert_close(actions, expected_actions, rtol=1e-5, atol=1e-5)
        th.testing.assert_close(values, expected_values, rtol=1e-5, atol=1e-5)
        th.testing.assert_close(log_prob, expected_log_prob, rtol=1e-5, atol=1e-5)
        assert values.shape == (rows, 1) and log_prob.shape == (rows,)


def test_categorical_samples_follow_the_softmax() -> None:
    """Independent of the torch path: the sampled frequencies match softmax(logits) of the policy."""
    model, kernel = _kernel("CartPole-v1")
    with th.no_grad():
        model.policy.action_net.weight.mul_(200.0)  # a policy far from uniform
    obs = th.as_tensor(np.tile(np.array([[0.1, -0.2, 0.05, 0.3]], dtype=np.float32), (MAX_ROWS, 1)))
    counts = np.zeros(2)
    th.manual_seed(0)
    for _ in range(200):
        actions, _, log_prob = kernel.act(obs)
        counts += np.bincount(actions.numpy(), minlength=2)
    with th.no_grad():
        probs = th.softmax(model.policy.action_net(model.policy.mlp_extractor.forward_actor(obs[:1])), -1)[0]
    frequencies = counts / counts.sum()
    assert np.allclose(frequencies, probs.numpy(), atol=0.01)
    np.testing.assert_allclose(np.exp(log_prob.numpy()), probs.numpy()[actions.numpy()], rtol=1e-5)


def test_views_follow_parameters_that_moved_and_learning_still_works() -> None:
    model, kernel = _kernel("CartPole-v1")
    obs = th.zeros((2, 4))
    kernel.act(obs)
    weight = model.policy.mlp_extractor.value_net[0].weight
    weight.data = weight.data.clone() + 1.0  # what re-homing into flat buffers or a load does
    th.manual_seed(1)
    _, values, _ = kernel.act(obs)
    th.manual_seed(1)
    _, expected, _ = _torch_act(kernel, obs)
    th.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)


def test_unsupported_inputs_take_the_torch_path(monkeypatch) -> None:
    model, kernel = _kernel("CartPole-v1")
    calls = []
    monkeypatch.setattr(kernel.numpy_actor, "act", lambda obs: calls.append(obs))
    kernel.act(th.zeros((MAX_ROWS + 1, 4)))  # many rows: torch's matrix products
    kernel.act(th.zeros((2, 4), dtype=th.float16))
    assert not calls
    kernel.act(th.zeros((2, 4), dtype=th.float64))  # a float64 Box (MuJoCo without VecNormalize): cast, as .float()
    assert len(calls) == 1
    monkeypatch.setenv("SB3_PPO_EXT_NUMPY_ACTING", "0")
    assert not NumpyActor.supports(kernel)


def test_a_seeded_run_is_reproducible_with_numpy_acting() -> None:
    final = []
    for _ in range(2):
        model = ClippedPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=4, seed=0), n_steps=32, seed=3)
        model.learn(256)
        final.append(th.cat([p.detach().flatten() for p in model.policy.parameters()]))
    assert th.equal(final[0], final[1])


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_stacked_acting_equals_the_networks_one_by_one(env_id) -> None:
    model, kernel = _kernel(env_id, n_steps=16, batch_size=32)
    model.learn(64)  # the optimizer's flat buffers: both networks' layers can be read as a batch of two
    actor = kernel.numpy_actor
    assert actor._views()[2] is not None
    obs = th.as_tensor(np.random.default_rng(1).normal(size=(5, *model.observation_space.shape)).astype(np.float32))
    th.manual_seed(3)
    stacked = actor.act(obs)
    arrays = actor._views()
    actor._arrays = (*arrays[:2], None, *arrays[3:])  # the per-network path
    th.manual_seed(3)
    separate = actor.act(obs)
    for a, b in zip(stacked, separate, strict=True):
        assert th.equal(a, b)
