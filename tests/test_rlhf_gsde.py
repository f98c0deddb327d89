"""Loss mode under gSDE: the KL term's gradient is that of KL(pi || pi_ref); a gSDE reference loads from a path."""

from __future__ import annotations

import pytest
import torch as th
from torch.distributions import Normal, kl_divergence

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.backends import AutogradBackend
from sb3_ppo_ext.losses import PPOBatch, PPOLoss, importance_weighted_kl, sampled_kl
from sb3_ppo_ext.rlhf.penalty import LossKLPenalty

SMALL = dict(n_steps=64, batch_size=64, n_epochs=2, device="cpu")


def _gaussian_gradients(estimator: str, samples: int = 400_000) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """The estimator's gradient in (mean, log std) of pi_theta, and autograd's of both closed-form KLs.

    The actions come from pi_old, which differs from pi_theta (as after the first minibatch step of an update).
    """
    th.manual_seed(0)
    theta = th.tensor([0.3, -0.2], requires_grad=True)  # mean, log std of pi_theta
    old, ref = Normal(0.1, 0.9), Normal(-0.6, 0.7)  # a narrower reference: bounded ratios
    actions = old.sample((samples,))
    pi = Normal(theta[0], theta[1].exp())
    log_prob, ref_log_prob = pi.log_prob(actions), ref.log_prob(actions)
    if estimator == "importance_weighted":
        estimate = importance_weighted_kl(log_prob, old.log_prob(actions), ref_log_prob)
    else:
        estimate = sampled_kl(log_prob, ref_log_prob)
    (grad,) = th.autograd.grad(estimate.mean(), theta)
    forward = th.autograd.grad(kl_divergence(Normal(theta[0], theta[1].exp()), ref), theta)[0]
    reverse = th.autograd.grad(kl_divergence(ref, Normal(theta[0], theta[1].exp())), theta)[0]
    return grad, forward, reverse


def test_the_importance_weighted_estimator_has_the_gradient_of_kl_pi_to_ref() -> None:
    grad, forward, reverse = _gaussian_gradients("importance_weighted")
    assert (forward - reverse).abs().min() > 0.3  # the two directions differ clearly here
    th.testing.assert_close(grad, forward, atol=0.03, rtol=0.03)


def test_k3_alone_has_the_gradient_of_the_reverse_kl_where_pi_is_pi_old() -> None:
    """Why the estimator changed: at pi_theta = pi_old, k3's gradient is that of KL(pi_ref || pi_theta)."""
    th.manual_seed(0)
    theta = th.tensor([0.3, -0.2], requires_grad=True)
    ref = Normal(-0.6, 0.7)
    actions = Normal(0.3, th.tensor(-0.2).exp()).sample((400_000,))
    pi = Normal(theta[0], theta[1].exp())
    (grad,) = th.autograd.grad(sampled_kl(pi.log_prob(actions), ref.log_prob(actions)).mean(), theta)
    reverse = th.autograd.grad(kl_divergence(ref, Normal(theta[0], theta[1].exp())), theta)[0]
    forward = th.autograd.grad(kl_divergence(Normal(theta[0], theta[1].exp()), ref), theta)[0]
    th.testing.assert_close(grad, reverse, atol=0.03, rtol=0.03)
    assert (grad - forward).abs().max() > 0.3


def test_the_estimate_is_nonnegative_and_unbiased_for_the_value() -> None:
    th.manual_seed(1)
    old, pi, ref = Normal(0.1, 0.9), Normal(0.3, 0.8), Normal(-0.6, 0.7)
    actions = old.sample((400_000,))
    estimate = importance_weighted_kl(pi.log_prob(actions), old.log_prob(actions), ref.log_prob(actions))
    assert (estimate >= 0).all()
    assert estimate.mean().item() == pytest.approx(kl_divergence(pi, ref).item(), rel=0.02)


def _gsde_models(tmp_path=None) -> tuple[ClippedPPO, ClippedPPO]:
    reference = ClippedPPO("MlpPolicy", "Pendulum-v1", use_sde=True, seed=1, **SMALL)
    with th.no_grad():  # a reference clearly apart from the trained policy, and narrower (bounded ratios)
        reference.policy.log_std.sub_(0.7)
        reference.policy.action_net.bias.add_(1.5)
    source = reference
    if tmp_path is not None:
        reference.save(tmp_path / "sde_reference")
        source = str(tmp_path / "sde_reference.zip")
    model = ClippedPPO("MlpPolicy", "Pendulum-v1", use_sde=True, seed=0, ref_policy=source, ref_kl_mode="loss", **SMALL)
    return model, reference


def test_loss_mode_under_gsde_follows_the_closed_form_gradient_of_kl_pi_to_ref() -> None:
    """The whole path (our policy, the reference's targets, the backend): d/dtheta of the KL term, one state."""
    model, reference = _gsde_models()
    policy = model.policy
    th.manual_seed(0)
    obs = th.tensor([[0.6, -0.8, 1.5]]).repeat(200_000, 1)
    with th.no_grad():
        old = policy.get_distribution(obs[:1]).distribution  # pi_old = pi_theta at the update's first step
        actions = old.sample((200_000,)).reshape(200_000, 1)
        old_log_prob = old.log_prob(actions).sum(-1)
    zeros = th.zeros(200_000)
    batch = PPOBatch(obs, actions, old_log_prob, zeros, zeros, zeros)  # advantages 0: no surrogate gradient
    extension = model.extension(LossKLPenalty)
    extension.update_start(model)
    batch = extension.minibatch(batch)
    AutogradBackend(policy).loss_and_grad(PPOLoss(0.2, vf_coef=0.0, ref_kl_coef=1.0), batch)
    parameters = [policy.action_net.weight, policy.action_net.bias, policy.log_std]
    estimated = [p.grad.clone() for p in parameters]

    def closed_form(forward: bool) -> list[th.Tensor]:
        pi = policy.get_distribution(obs[:1]).distribution
        with th.no_grad():
            ref = reference.policy.get_distribution(obs[:1]).distribution
        kl = kl_divergence(pi, ref) if forward else kl_divergence(ref, pi)
        return list(th.autograd.grad(kl.sum(), parameters))

    forward, reverse = closed_form(True), closed_form(False)
    assert any((f - r).abs().max() > 0.1 for f, r in zip(forward, reverse, strict=True))
    for got, expected in zip(estimated, forward, strict=True):
        th.testing.assert_close(got, expected, atol=0.02, rtol=0.05)


def test_a_gsde_reference_loads_from_a_path(tmp_path) -> None:
    model, reference = _gsde_models(tmp_path)
    assert model.ref_policy.use_sde and model.ref_policy.log_std.shape == reference.policy.log_std.shape
    for a, b in zip(model.ref_policy.parameters(), reference.policy.parameters(), strict=True):
        assert th.equal(a, b)
    obs = th.randn(16, 3)
    with th.no_grad():
        actions = reference.policy.get_distribution(obs).distribution.sample()
        expected = reference.policy.get_distribution(obs).log_prob(actions)
    th.testing.assert_close(model._reference.log_prob(obs, actions), expected)
    model.learn(128)
    assert model.logger.name_to_value["rlhf/kl_exact_per_step"] > 0
