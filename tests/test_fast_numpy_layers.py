"""NumpyLayers: both networks' hidden layers in NumPy give the torch path's gradients, written in place.

Every CPU runs these (the NumPy layers are switched on here whatever ``fast/cpu.py`` picks for the machine).
"""

from __future__ import annotations

import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.backends import ClosedFormBackend
from sb3_ppo_ext.fast.numpy_layers import NumpyLayers
from sb3_ppo_ext.losses import PPOBatch, PPOLoss


def _backend(env_id: str, monkeypatch, learn: bool = True, **kwargs) -> tuple[ClippedPPO, ClosedFormBackend]:
    monkeypatch.setenv("SB3_PPO_EXT_NUMPY_HEAD", "1")
    monkeypatch.setenv("SB3_PPO_EXT_NUMPY_LAYERS", "1")
    model = ClippedPPO(
        "MlpPolicy", make_vec_env(env_id, n_envs=4, seed=0), n_steps=32, batch_size=64, seed=0, device="cpu", **kwargs
    )
    if learn:
        model.learn(256)  # the optimizer's flat buffers: parameters and gradients as [2, ...] views
    backend = ClosedFormBackend(model.policy)
    with th.no_grad():
        for p in model.policy.parameters():
            p.add_(th.randn_like(p) * 0.05)
    return model, backend


def _batch(model: ClippedPPO) -> PPOBatch:
    samples = next(model.rollout_buffer.get(model.batch_size))
    discrete = model.action_space.__class__.__name__ == "Discrete"
    return PPOBatch.from_minibatch(samples, samples.advantages, discrete_actions=discrete)


def _gradients(backend: ClosedFormBackend, batch: PPOBatch, layers: NumpyLayers | None) -> tuple[dict, bool]:
    backend.kernel.numpy_layers, backend._later = layers, None
    loss = PPOLoss(0.2, None, "max", 0.01, 0.5)  # no value clipping: every network gets a gradient
    grad_views = [p.grad for p in backend.kernel.policy.parameters()]
    with th.no_grad():
        evaluation, activations = backend.kernel.evaluate(batch.observations, batch.actions)
        _, grads = loss.with_gradients(evaluation, batch)
        backend.kernel.backward(activations, grads)
    # written in place: still the views of the flat gradient buffer the optimizer steps on
    assert all(p.grad is g for p, g in zip(backend.kernel.policy.parameters(), grad_views, strict=True))
    named = {name: p.grad.clone() for name, p in backend.kernel.policy.named_parameters()}
    return named, activations.numpy_layers is not None


@pytest.mark.parametrize(
    "env_id, policy_kwargs",
    [
        ("CartPole-v1", {}),
        ("CartPole-v1", dict(activation_fn=th.nn.ReLU, net_arch=[32, 32])),
        ("Pendulum-v1", dict(activation_fn=th.nn.ReLU, net_arch=[256, 256])),
        ("Pendulum-v1", dict(net_arch=[8, 16, 4])),
    ],
)
def test_numpy_layers_give_the_torch_layers_gradients(env_id, policy_kwargs, monkeypatch) -> None:
    model, backend = _backend(env_id, monkeypatch, policy_kwargs=policy_kwargs)
    layers = backend.kernel.numpy_layers
    assert layers is not None
    batch = _batch(model)
    numpy_grads, used = _gradients(backend, batch, layers)
    assert used
    torch_grads, used = _gradients(backend, batch, None)
    assert not used
    for name, expected in torch_grads.items():
        # float32 rounding of sums over the minibatch whose terms partly cancel (log_std's): tolerance of their scale
        scale = float(expected.abs().max())
        th.testing.assert_close(numpy_grads[name], expected, rtol=0, atol=1e-5 * scale + 1e-6, msg=name)
    assert all(float(g.abs().max()) > 0 for g in numpy_grads.values())


@pytest.mark.parametrize("policy_kwargs", [{}, dict(activation_fn=th.nn.ReLU, net_arch=[32, 16, 8])])
def test_layers_not_yet_in_the_flat_buffers_compute_the_same_bits(policy_kwargs, monkeypatch) -> None:
    # before the optimizer's first step, and after a load, each network's own tensors: a resumed run must compute
    # what the uninterrupted one does
    model, backend = _backend("CartPole-v1", monkeypatch, policy_kwargs=policy_kwargs)
    layers = backend.kernel.numpy_layers
    assert layers.arrays()[0]  # the [2, ...] views of the flat buffers
    batch = _batch(model)
    stacked, _ = _gradients(backend, batch, layers)
    monkeypatch.setattr(layers.stacked, "views", lambda: None)
    assert not layers.arrays()[0]
    separate, used = _gradients(backend, batch, layers)
    assert used
    for name, expected in stacked.items():
        assert th.equal(separate[name], expected), name


def test_a_fresh_policy_and_float64_observations_run_the_numpy_layers(monkeypatch) -> None:
    model, backend = _backend("CartPole-v1", monkeypatch, learn=False)
    model.policy.optimizer.zero_grad(set_to_none=True)  # no gradients yet: the NumPy layers create them
    model.learn(64)
    batch = _batch(model)
    with th.no_grad():
        evaluation, activations = backend.kernel.evaluate(batch.observations, batch.actions)
        assert activations.numpy_layers is not None
        values = evaluation.values.copy()
        # float64 observations: preprocessing's cast to float32 first, then the same NumPy layers
        evaluation, activations = backend.kernel.evaluate(batch.observations.double(), batch.actions)
        assert activations.numpy_layers is not None and (evaluation.values == values).all()


def test_supports_follows_the_rule_and_the_layers(monkeypatch) -> None:
    _, backend = _backend("CartPole-v1", monkeypatch)
    assert NumpyLayers.supports(backend.kernel)
    monkeypatch.setattr("sb3_ppo_ext.fast.numpy_layers.NUMPY_LAYERS_MAX_WIDTH", 32)
    assert not NumpyLayers.supports(backend.kernel)  # 64 units: wider than allowed
    _, unstacked = _backend("CartPole-v1", monkeypatch, policy_kwargs=dict(net_arch=dict(pi=[64], vf=[32, 64])))
    assert unstacked.kernel.stacked is None and unstacked.kernel.numpy_layers is None
    monkeypatch.setenv("SB3_PPO_EXT_NUMPY_LAYERS", "0")
    assert ClosedFormBackend(backend.kernel.policy).kernel.numpy_layers is None
    monkeypatch.setenv("SB3_PPO_EXT_NUMPY_LAYERS", "1")
    monkeypatch.setenv("SB3_PPO_EXT_NUMPY_HEAD", "0")  # the layers hand their gradient to the NumPy heads
    assert ClosedFormBackend(backend.kernel.policy).kernel.numpy_layers is None
