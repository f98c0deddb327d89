"""NumpyHead: the closed-form update's heads and loss derivatives in NumPy give the torch heads' values and gradients.

Every CPU runs these (the NumPy head is switched on here whatever ``fast/cpu.py`` picks for the machine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.backends import ClosedFormBackend
from sb3_ppo_ext.fast.numpy_head import BlasThreads, NumpyHead
from sb3_ppo_ext.loss_statistics import DeferredStatistics
from sb3_ppo_ext.losses import (
    PPOBatch,
    PPOLoss,
    clipped_surrogate_grad,
    entropy_loss_grad,
    probability_ratio,
    reference_kl_loss_grad,
    value_loss_grad,
)


def _backend(env_id: str, numpy_head: bool = True, **kwargs) -> tuple[ClippedPPO, ClosedFormBackend]:
    model = ClippedPPO(
        "MlpPolicy", make_vec_env(env_id, n_envs=4, seed=0), n_steps=32, batch_size=64, seed=0, device="cpu", **kwargs
    )
    model.learn(256)  # flat buffers in place, some training
    backend = ClosedFormBackend(model.policy)
    if numpy_head:
        backend.kernel.numpy_head = NumpyHead(backend.kernel)
    with th.no_grad():  # move the policy away from the rollout's: ratios leave 1, some clip
        for p in model.policy.parameters():
            p.add_(th.randn_like(p) * 0.05)
    return model, backend


def _batch(model: ClippedPPO) -> PPOBatch:
    samples = next(model.rollout_buffer.get(model.batch_size))
    advantages = (samples.advantages - samples.advantages.mean()) / (samples.advantages.std() + 1e-8)
    discrete = model.action_space.__class__.__name__ == "Discrete"
    return PPOBatch.from_minibatch(samples, advantages, discrete_actions=discrete)


def _step(backend: ClosedFormBackend, loss: PPOLoss, batch: PPOBatch, numpy: bool) -> tuple[dict, dict]:
    head, backend.kernel.numpy_head = backend.kernel.numpy_head, backend.kernel.numpy_head if numpy else None
    try:
        backend._later = None
        terms = backend.loss_and_grad(loss, batch)
        values = {name: float(getattr(terms, name)) for name in ("policy_loss", "value_loss", "entropy_loss")}
        values["approx_kl"] = float(terms.approx_kl)
        grads = {name: p.grad.clone() for name, p in backend.kernel.policy.named_parameters()}
        return values, grads
    finally:
        backend.kernel.numpy_head = head


@pytest.mark.parametrize(
    "env_id, kwargs",
    [
        ("CartPole-v1", {}),
        ("CartPole-v1", dict(policy_kwargs=dict(activation_fn=th.nn.ReLU, net_arch=[32, 16]))),
        ("CartPole-v1", dict(policy_kwargs=dict(net_arch=dict(pi=[64], vf=[32, 64])))),  # not stackable
        ("Pendulum-v1", {}),
        ("Pendulum-v1", dict(policy_kwargs=dict(activation_fn=th.nn.ReLU, log_std_init=-1.0))),
        ("MountainCarContinuous-v0", dict(policy_kwargs=dict(net_arch=[16]))),
    ],
)
@pytest.mark.parametrize(
    "loss",
    [
        PPOLoss(0.2, None, "max", 0.0, 0.5),
        PPOLoss(0.1, 0.2, "max", 0.01, 0.5),
        PPOLoss(0.2, 0.1, "sb3", 0.05, 1.0, dual_clip=3.0),
    ],
)
def test_numpy_head_gives_the_torch_heads_losses_and_gradients(env_id, kwargs, loss) -> None:
    model, backend = _backend(env_id, **kwargs)
    batch = _batch(model)
    numpy_terms, numpy_grads = _step(backend, loss, batch, numpy=True)
    torch_terms, torch_grads = _step(backend, loss, batch, numpy=False)
    assert numpy_terms == pytest.approx(torch_terms, rel=1e-5, abs=1e-6)
    assert numpy_grads.keys() == torch_grads.keys()
    for name, expected in torch_grads.items():
        # float32 rounding of sums whose terms cancel (the two logits' bias gradients are opposite): an absolute floor
        scale = float(expected.abs().max())
        th.testing.assert_close(numpy_grads[name], expected, rtol=0, atol=2e-6 * scale + 1e-7, msg=name)
    assert any(float(g.abs().max()) > 0 for g in numpy_grads.values())


def test_numpy_head_evaluation_equals_the_torch_heads() -> None:
    for env_id in ("CartPole-v1", "Pendulum-v1"):
        model, backend = _backend(env_id)
        batch = _batch(model)
        kernel = backend.kernel
        with th.no_grad():
            evaluation, activations = kernel.evaluate(batch.observations, batch.actions)
            assert activations.numpy_head is not None and isinstance(evaluation.log_prob, np.ndarray)
            values, log_prob, entropy = model.policy.evaluate_actions(batch.observations, batch.actions)
        np.testing.assert_allclose(evaluation.values, values.flatten().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(evaluation.log_prob, log_prob.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(evaluation.entropy, entropy.numpy(), rtol=1e-5, atol=1e-6)
        assert all(a.dtype == np.float32 for a in evaluation[:3])


def test_masked_or_reference_steps_keep_the_torch_heads() -> None:
    model, backend = _backend("CartPole-v1")
    kernel = backend.kernel
    batch = _batch(model)
    masks = th.ones((len(batch.actions), 2), dtype=th.bool)
    with th.no_grad():
        assert kernel.evaluate(batch.observations, batch.actions)[1].numpy_head is not None
        assert kernel.evaluate(batch.observations, batch.actions, action_masks=masks)[1].numpy_head is None
        params = kernel._forward(batch.observations)[2]
        assert kernel.evaluate(batch.observations, batch.actions, reference_params=params)[1].numpy_head is None


def test_numpy_blas_runs_on_torchs_threads_during_a_step_and_is_restored() -> None:
    blas = BlasThreads.find()
    assert blas is not None  # NumPy's wheels bundle OpenBLAS
    before, threads = blas.controller.get_num_threads(), th.get_num_threads()
    other = 2 if threads == 1 else 1
    blas.controller.set_num_threads(other)
    try:
        with blas:
            assert blas.controller.get_num_threads() == threads
        assert blas.controller.get_num_threads() == other
    finally:
        blas.controller.set_num_threads(before)


def test_supports_follows_the_cpu_rule_and_the_policy(monkeypatch) -> None:
    monkeypatch.setenv("SB3_PPO_EXT_NUMPY_HEAD", "1")
    _, backend = _backend("Pendulum-v1")
    assert NumpyHead.supports(backend.kernel)
    _, state_dependent = _backend("Pendulum-v1", numpy_head=False, policy_kwargs=dict(state_dependent_std=True))
    assert not NumpyHead.supports(state_dependent.kernel)
    _, widths = _backend("CartPole-v1", numpy_head=False, policy_kwargs=dict(net_arch=dict(pi=[64], vf=[32])))
    assert not NumpyHead.supports(widths.kernel)  # dL/dh of both networks is one [2, B, hidden] array
    double, backend = _backend("CartPole-v1")
    double.policy.to(th.float64)
    assert not NumpyHead.supports(backend.kernel)
    monkeypatch.setenv("SB3_PPO_EXT_NUMPY_HEAD", "0")
    _, backend = _backend("CartPole-v1")
    assert not NumpyHead.supports(backend.kernel)
    assert ClosedFormBackend(backend.kernel.policy).kernel.numpy_head is None


def test_the_loss_gradients_take_numpy_arrays_and_answer_as_torch_does() -> None:
    generator = np.random.default_rng(0)
    n = 64

    def pair() -> tuple[np.ndarray, th.Tensor]:
        array = generator.normal(size=n).astype(np.float32)
        return array, th.from_numpy(array.copy())

    (log_prob, log_prob_t), (old, old_t), (adv, adv_t) = pair(), pair(), pair()
    (values, values_t), (old_values, old_values_t), (returns, returns_t) = pair(), pair(), pair()
    log_prob, log_prob_t = old + 0.3 * log_prob, old_t + 0.3 * log_prob_t  # ratios around 1, some clipped
    ratio, ratio_t = probability_ratio(log_prob, old), probability_ratio(log_prob_t, old_t)
    results = [
        (ratio, ratio_t),
        (clipped_surrogate_grad(ratio, adv, 0.2), clipped_surrogate_grad(ratio_t, adv_t, 0.2)),
        (clipped_surrogate_grad(ratio, adv, 0.2, 1.2), clipped_surrogate_grad(ratio_t, adv_t, 0.2, 1.2)),
        (entropy_loss_grad(values, 0.01), entropy_loss_grad(values_t, 0.01)),
        (reference_kl_loss_grad(values, 0.1), reference_kl_loss_grad(values_t, 0.1)),
    ]
    for clip in (None, 0.5):
        for mode in ("max", "sb3"):
            results.append(
                (
                    value_loss_grad(values, old_values, returns, clip, mode, 0.5),
                    value_loss_grad(values_t, old_values_t, returns_t, clip, mode, 0.5),
                )
            )
    for got, expected in results:
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-7)
    assert 0 < np.count_nonzero(results[1][0]) < n  # some samples clipped, some not


def test_deferred_statistics_take_numpy_evaluations() -> None:
    model, backend = _backend("CartPole-v1")
    batch = _batch(model)
    loss = PPOLoss(0.2, 0.2, "max", 0.01, 0.5)
    with th.no_grad():
        evaluation, _ = backend.kernel.evaluate(batch.observations, batch.actions)
    from_numpy = DeferredStatistics(loss).add(evaluation, batch.numpy_targets())
    tensors = type(evaluation)(*(None if a is None else th.from_numpy(a.copy()) for a in evaluation))
    from_tensors = DeferredStatistics(loss).add(tensors, batch)
    for name in ("loss", "policy_loss", "value_loss", "entropy_loss", "clip_fraction", "approx_kl"):
        assert th.equal(getattr(from_numpy, name), getattr(from_tensors, name)), name
