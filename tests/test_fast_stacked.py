"""StackedLayers: actor and critic run as a batch of two give the two separate stacks' gradients, bit for bit."""

from __future__ import annotations

import sys

import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.backends import ClosedFormBackend
from sb3_ppo_ext.fast import cpu as cpu_module
from sb3_ppo_ext.fast import kernel as kernel_module
from sb3_ppo_ext.fast import stacked as stacked_module
from sb3_ppo_ext.fast.cpu import fused_tanh, numpy_head, numpy_tanh, transposed_narrow_grads
from sb3_ppo_ext.fast.stacked import StackedLayers
from sb3_ppo_ext.losses import PolicyEvaluation, PPOBatch, PPOLoss


def _trained(env_id: str, **kwargs) -> ClippedPPO:
    """A model after one update: its parameters and gradients live in the optimizer's flat buffers."""
    model = ClippedPPO(
        "MlpPolicy", make_vec_env(env_id, n_envs=2, seed=0), n_steps=64, batch_size=64, n_epochs=2, seed=0, **kwargs
    )
    model.learn(128)
    return model


def _gradients(model: ClippedPPO, kernel, batch: PPOBatch) -> list[th.Tensor]:
    loss = PPOLoss(0.2, 0.3, "max", 0.01, 0.5)
    with th.no_grad():
        evaluation, activations = kernel.evaluate(batch.observations, batch.actions)
        _, grads = loss.with_gradients(evaluation, batch)
        kernel.backward(activations, grads)
    return [p.grad.clone() for p in model.policy.parameters()]


@pytest.fixture(params=["sigmoid", "fused", "numpy"], ids=["sigmoid-form", "fused-tanh", "numpy-tanh"])
def tanh_form(request, monkeypatch) -> str:
    """Every tanh form, whichever this CPU picks (fast/cpu.py: sigmoid form, PyTorch's fused kernels, NumPy's)."""
    form = request.param
    monkeypatch.setattr(stacked_module, "FUSED_TANH", form == "fused")
    monkeypatch.setattr(stacked_module, "NUMPY_TANH", form == "numpy")
    for module in (stacked_module, kernel_module):
        monkeypatch.setattr(module, "_SMALL_TANH", 2048 if form == "sigmoid" else sys.maxsize)
    return form


@pytest.fixture(params=[False, True], ids=["g^T x", "(x^T g)^T"])
def narrow_route(request, monkeypatch) -> bool:
    """Both routes of narrow layers' weight gradients, whichever this CPU picks (fast/cpu.py)."""
    monkeypatch.setattr(stacked_module, "TRANSPOSED_NARROW_GRADS", request.param)
    return request.param


@pytest.mark.parametrize(
    "env_id, policy_kwargs",
    [
        ("CartPole-v1", {}),
        ("Pendulum-v1", dict(activation_fn=th.nn.ReLU, net_arch=[256, 256])),
        ("Pendulum-v1", dict(net_arch=[8, 16, 4])),  # small layers: torch.tanh_ instead of the sigmoid form
    ],
)
def test_stacked_gradients_equal_the_separate_stacks(env_id, policy_kwargs, tanh_form, narrow_route) -> None:
    model = _trained(env_id, policy_kwargs=policy_kwargs)
    kernel = ClosedFormBackend(model.policy).kernel
    assert kernel.stacked is not None and kernel.stacked.views() is not None
    sample = next(model.rollout_buffer.get(64))
    batch = PPOBatch.from_minibatch(sample, sample.advantages, discrete_actions=env_id == "CartPole-v1")
    grad_views = [p.grad for p in model.policy.parameters()]
    stacked = _gradients(model, kernel, batch)
    # written in place: still the views of the flat gradient buffer the optimizer steps on
    assert all(p.grad is g for p, g in zip(model.policy.parameters(), grad_views, strict=True))
    kernel.stacked = None
    separate = _gradients(model, kernel, batch)
    for a, b in zip(stacked, separate, strict=True):
        assert th.equal(a, b)
    # and both agree with autograd (independent of the hand-derived chain rule)
    model.policy.optimizer.zero_grad(set_to_none=True)
    values, log_prob, entropy = model.policy.evaluate_actions(batch.observations, batch.actions)
    terms = PPOLoss(0.2, 0.3, "max", 0.01, 0.5)(PolicyEvaluation(values.flatten(), log_prob, entropy), batch)
    terms.loss.backward()
    for a, p in zip(stacked, model.policy.parameters(), strict=True):
        th.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_layouts_that_do_not_stack_run_the_stacks_one_by_one() -> None:
    model = _trained("Pendulum-v1", policy_kwargs=dict(net_arch=dict(pi=[32], vf=[64, 64])))
    assert ClosedFormBackend(model.policy).kernel.stacked is None  # different shapes
    model = _trained("CartPole-v1")
    kernel = ClosedFormBackend(model.policy).kernel
    assert kernel.stacked.views() is not None
    weight = model.policy.mlp_extractor.value_net[2].weight
    weight.data = weight.data.clone()  # out of the shared storage
    assert kernel.stacked.views() is None
    obs = th.zeros((4, 4))
    evaluation, activations = kernel.evaluate(obs, th.zeros(4, dtype=th.long))
    assert activations.stacked is None and evaluation.values.shape == (4,)


def test_supports_needs_equal_shapes_and_activations() -> None:
    model = ClippedPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1), policy_kwargs=dict(net_arch=[16]))
    kernel = ClosedFormBackend(model.policy).kernel
    assert StackedLayers.supports(kernel.pi_layers, kernel.vf_layers)
    assert not StackedLayers.supports(kernel.pi_layers, kernel.vf_layers[:0])
    assert not StackedLayers.supports([], [])


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("in_features", [3, 11, 12, 40])
def test_weight_grad_is_grad_transposed_times_inputs(transposed, in_features, monkeypatch) -> None:
    monkeypatch.setattr(stacked_module, "TRANSPOSED_NARROW_GRADS", transposed)
    generator = th.Generator().manual_seed(in_features)
    grad = th.randn(2, 256, 64, generator=generator)
    inputs = th.randn(256, in_features, generator=generator).expand(2, 256, in_features)  # as the first layer
    exact = th.einsum("kbo,kbi->koi", grad.double(), inputs.double())  # independent of both routes
    out = th.full((2, 64, in_features), float("nan"))
    assert stacked_module.weight_grad(grad, inputs, out=out) is out
    th.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-4)
    single = stacked_module.weight_grad(grad[1], inputs[1])
    assert single.is_contiguous() and single.shape == (64, in_features)
    assert th.equal(single, out[1])  # one network alone rounds as the batch of two does


@pytest.mark.parametrize("numpy_form", [False, True])
def test_tanh_in_place_is_tanh(numpy_form, monkeypatch) -> None:
    monkeypatch.setattr(stacked_module, "NUMPY_TANH", numpy_form)
    z = th.linspace(-9.0, 9.0, 2 * 256 * 64).reshape(2, 256, 64)
    exact = th.tanh(z.double())  # float64: independent of either float32 kernel
    got = stacked_module.tanh_(z.clone())
    th.testing.assert_close(got.double(), exact, rtol=0, atol=4e-7)
    with_grad = z.clone().requires_grad_()
    assert stacked_module.tanh_(with_grad.clone()).grad_fn is not None  # autograd's own kernel there
    half = stacked_module.tanh_(z.clone().bfloat16())  # no NumPy dtype: PyTorch's kernel
    th.testing.assert_close(half.double(), exact, rtol=0, atol=1e-2)


@pytest.mark.parametrize("fused", [False, True])
def test_tanh_grad_is_the_derivative_of_tanh(fused, monkeypatch) -> None:
    monkeypatch.setattr(stacked_module, "FUSED_TANH", fused)
    monkeypatch.setattr(stacked_module, "NUMPY_TANH", False)  # it takes the fused derivative too
    z = th.linspace(-4.0, 4.0, 257, dtype=th.float64).float().requires_grad_()
    grad = th.randn(257)
    h = th.tanh(z)
    (expected,) = th.autograd.grad(h, z, grad)
    got = stacked_module.tanh_grad(grad, h.detach())
    # absolute tolerance: where tanh saturates, 1 - h^2 cancels and only |grad| sets the scale of the error
    exact = grad.double() * (1 - h.detach().double() ** 2)
    th.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-6)
    th.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not th.equal(got, th.zeros_like(got))


@pytest.mark.parametrize(
    ("capability", "model", "fused", "narrow"),
    [
        ("AVX512", "Intel(R) Xeon(R) Processor", True, False),
        ("AVX512", "AMD EPYC", False, True),  # Zen 4: tanh_ ~3x slower (NumPy's), MKL's narrow g^T x slow
        ("AVX2", "AMD EPYC", False, False),
        ("AVX2", "Intel(R) Xeon(R) Processor", False, False),  # no pins made there: AVX2 keeps its arithmetic
    ],
)
def test_the_arithmetic_follows_the_cpu_unless_forced(
    monkeypatch, capability: str, model: str, fused: bool, narrow: bool
) -> None:
    monkeypatch.delenv("SB3_PPO_EXT_FUSED_TANH", raising=False)
    monkeypatch.delenv("SB3_PPO_EXT_NARROW_GRAD", raising=False)
    monkeypatch.delenv("SB3_PPO_EXT_NUMPY_TANH", raising=False)
    monkeypatch.delenv("SB3_PPO_EXT_NUMPY_HEAD", raising=False)
    monkeypatch.setattr(cpu_module.th.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(cpu_module, "cpu_model", lambda: model)
    assert fused_tanh() is fused
    assert transposed_narrow_grads() is narrow
    assert numpy_tanh() is narrow  # the same CPUs measured all three NumPy and narrow choices
    assert numpy_head() is narrow
    variables = [f"SB3_PPO_EXT_{name}" for name in ("FUSED_TANH", "NARROW_GRAD", "NUMPY_TANH", "NUMPY_HEAD")]
    for value, forced in (("0", False), ("1", True)):
        for variable in variables:
            monkeypatch.setenv(variable, value)
        assert fused_tanh() is forced
        assert transposed_narrow_grads() is forced
        assert numpy_tanh() is forced
        assert numpy_head() is forced
