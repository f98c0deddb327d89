"""The pure loss functions and their closed-form gradients against hand-derived numbers (seed sections 3 and 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch as th

from sb3_ppo_ext import losses

EPS = 0.2


def _log_probs(ratios: list[float]) -> tuple[th.Tensor, th.Tensor]:
    """``(log_prob, old_log_prob)`` with ``exp(log_prob - old_log_prob) == ratios``; log_prob requires grad."""
    old = th.tensor([-1.3, -0.2, -2.0, -0.7, -1.0, -0.4, -3.0, -0.9][: len(ratios)], dtype=th.float64)
    new = (old + th.log(th.tensor(ratios, dtype=th.float64))).detach().requires_grad_(True)
    return new, old


def _surrogate(ratios: list[float], advantages: list[float], clip_range: float = EPS) -> tuple[th.Tensor, ...]:
    """``(loss, d loss / d log_prob by autograd, the same by clipped_surrogate_grad, ratio)``."""
    log_prob, old_log_prob = _log_probs(ratios)
    ratio = losses.probability_ratio(log_prob, old_log_prob)
    adv = th.tensor(advantages, dtype=th.float64)
    loss = losses.clipped_surrogate_loss(ratio, adv, clip_range)
    loss.backward()
    closed_form = losses.clipped_surrogate_grad(ratio.detach(), adv, clip_range)
    return loss, log_prob.grad, closed_form, ratio


# -- clipped surrogate ---------------------------------------------------------------------------------------


def test_clipped_surrogate_value_gradient_and_clip_fraction_match_hand_derivation() -> None:
    # ratio, advantage, min(r A, clip(r) A), d/dlogpi of that term (r A when the unclipped term is active, else 0)
    cases = [
        (1.5, 2.0, 2.4, 0.0),  # A > 0, r > 1 + eps: flat at (1 + eps) A
        (0.5, 2.0, 1.0, 1.0),  # A > 0, r < 1 - eps: unclipped term is the smaller one, gradient r A
        (0.5, -1.0, -0.8, 0.0),  # A < 0, r < 1 - eps: flat at (1 - eps) A
        (1.5, -1.0, -1.5, -1.5),  # A < 0, r > 1 + eps: unclipped (pessimistic) term, gradient r A
        (1.0, 3.0, 3.0, 3.0),  # inside the trust region
        (1.1, -2.0, -2.2, -2.2),  # inside the trust region
    ]
    ratios, advantages, objectives, term_grads = (list(c) for c in zip(*cases, strict=True))
    loss, autograd, closed_form, ratio = _surrogate(ratios, advantages)
    # L = -(2.4 + 1.0 - 0.8 - 1.5 + 3.0 - 2.2) / 6 = -1.9 / 6
    assert loss.item() == pytest.approx(-1.9 / 6, abs=1e-12)
    assert loss.item() == pytest.approx(-np.mean(objectives), abs=1e-12)
    expected = -np.array(term_grads) / 6
    np.testing.assert_allclose(autograd.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(closed_form.numpy(), expected, atol=1e-12)
    clip_fraction = losses.clip_fraction(ratio, EPS)
    assert clip_fraction.item() == pytest.approx(4 / 6)
    assert not clip_fraction.requires_grad


@pytest.mark.parametrize(
    ("ratio", "advantage"),
    [(1.21, 1.0), (1.5, 0.3), (3.0, 10.0), (0.79, -1.0), (0.5, -0.3), (0.01, -10.0)],
)
def test_clipped_surrogate_gradient_is_exactly_zero_in_flat_regions(ratio: float, advantage: float) -> None:
    """A > 0 and r > 1 + eps, or A < 0 and r < 1 - eps: the min picks the constant clipped term."""
    loss, autograd, closed_form, _ = _surrogate([ratio], [advantage])
    assert autograd.item() == 0.0
    assert closed_form.item() == 0.0
    clipped_ratio = 1 + EPS if advantage > 0 else 1 - EPS
    assert loss.item() == pytest.approx(-clipped_ratio * advantage)


@pytest.mark.parametrize(
    ("ratio", "advantage"),
    [(0.5, 1.0), (0.79, 2.0), (1.21, -1.0), (2.0, -0.5), (1.0, 1.0), (0.9, -1.0), (1.1, 1.0)],
)
def test_clipped_surrogate_gradient_is_ratio_times_advantage_elsewhere(ratio: float, advantage: float) -> None:
    loss, autograd, closed_form, _ = _surrogate([ratio], [advantage])
    # d(-r A)/d log pi = -r A
    assert autograd.item() == pytest.approx(-ratio * advantage, rel=1e-9)
    assert closed_form.item() == pytest.approx(-ratio * advantage, rel=1e-9)
    assert loss.item() == pytest.approx(-ratio * advantage, rel=1e-9)


def test_clipped_surrogate_matches_piecewise_formula_on_random_batch() -> None:
    rng = np.random.default_rng(0)
    ratios = np.exp(rng.normal(scale=0.5, size=200))
    advantages = rng.normal(size=200)
    log_prob = th.tensor(np.log(ratios), requires_grad=True)
    old_log_prob = th.zeros(200, dtype=th.float64)
    ratio = losses.probability_ratio(log_prob, old_log_prob)
    loss = losses.clipped_surrogate_loss(ratio, th.tensor(advantages), 0.1)
    loss.backward()
    flat = ((advantages > 0) & (ratios > 1.1)) | ((advantages < 0) & (ratios < 0.9))
    objective = np.where(flat, np.clip(ratios, 0.9, 1.1) * advantages, ratios * advantages)
    assert loss.item() == pytest.approx(-objective.mean(), rel=1e-9)
    expected = np.where(flat, 0.0, -ratios * advantages / 200)
    np.testing.assert_allclose(log_prob.grad.numpy(), expected, atol=1e-12)
    closed_form = losses.clipped_surrogate_grad(ratio.detach(), th.tensor(advantages), 0.1)
    np.testing.assert_allclose(closed_form.numpy(), expected, atol=1e-12)
    assert losses.clip_fraction(ratio, 0.1).item() == pytest.approx(np.mean(np.abs(ratios - 1) > 0.1))
    assert 0 < flat.sum() < 200


def test_probability_ratio_is_exp_of_log_difference() -> None:
    r = losses.probability_ratio(th.tensor([math.log(0.3)]), th.tensor([math.log(0.6)]))
    assert r.item() == pytest.approx(0.5)


# -- value loss ----------------------------------------------------------------------------------------------


def _value_case(values: list[float], old: list[float], returns: list[float]) -> tuple[th.Tensor, ...]:
    v = th.tensor(values, dtype=th.float64, requires_grad=True)
    return v, th.tensor(old, dtype=th.float64), th.tensor(returns, dtype=th.float64)


def _check_value_grads(
    v: th.Tensor,
    old: th.Tensor,
    ret: th.Tensor,
    clip_range_vf: float | None,
    mode: str,
    expected: list[float],
) -> None:
    """Autograd of ``value_loss`` and the closed-form ``value_loss_grad`` both give ``expected``."""
    losses.value_loss(v, old, ret, clip_range_vf, mode).backward()  # type: ignore[arg-type]
    np.testing.assert_allclose(v.grad.numpy(), expected, atol=1e-12)
    closed_form = losses.value_loss_grad(v.detach(), old, ret, clip_range_vf, mode)  # type: ignore[arg-type]
    np.testing.assert_allclose(closed_form.numpy(), expected, atol=1e-12)


def test_value_loss_unclipped_is_mse() -> None:
    v, old, ret = _value_case([0.5, 2.0], [100.0, -100.0], [1.0, 0.0])
    loss = losses.value_loss(v, old, ret, None)
    assert loss.item() == pytest.approx((0.25 + 4.0) / 2)
    _check_value_grads(v, old, ret, None, "max", [2 * -0.5 / 2, 2 * 2.0 / 2])


@pytest.mark.parametrize("mode", ["max", "sb3"])
def test_value_loss_inside_clip_range_equals_mse(mode: str) -> None:
    v, old, ret = _value_case([0.1, -0.15], [0.0, 0.0], [1.0, 2.0])
    loss = losses.value_loss(v, old, ret, 0.2, mode)  # type: ignore[arg-type]
    assert loss.item() == pytest.approx((0.81 + 2.15**2) / 2)
    # inside the clip range both forms are the MSE: gradient 2 (V - R) / n
    _check_value_grads(v, old, ret, 0.2, mode, [2 * -0.9 / 2, 2 * -2.15 / 2])


def test_value_loss_max_form_hand_numbers() -> None:
    """``max((V - R)^2, (V_clip - R)^2)`` with ``V_clip = V_old + clip(V - V_old, -0.2, 0.2)``."""
    # sample 1: V moved from 0 towards R=1 past the clip: (0.5-1)^2 = 0.25 < (0.2-1)^2 = 0.64 -> 0.64, no gradient
    # sample 2: V overshot from 1.0 to 1.5 with R=1: (0.5)^2 = 0.25 > (1.2-1)^2 = 0.04 -> 0.25, gradient 2*0.5
    v, old, ret = _value_case([0.5, 1.5], [0.0, 1.0], [1.0, 1.0])
    loss = losses.value_loss(v, old, ret, 0.2, "max")
    assert loss.item() == pytest.approx((0.64 + 0.25) / 2)
    _check_value_grads(v, old, ret, 0.2, "max", [0.0, 2 * 0.5 / 2])


def test_value_loss_sb3_form_hand_numbers() -> None:
    """``(V_clip - R)^2``: no gradient for any sample whose value moved beyond the clip range."""
    v, old, ret = _value_case([0.5, 1.5], [0.0, 1.0], [1.0, 1.0])
    loss = losses.value_loss(v, old, ret, 0.2, "sb3")
    assert loss.item() == pytest.approx((0.64 + 0.04) / 2)
    _check_value_grads(v, old, ret, 0.2, "sb3", [0.0, 0.0])


def test_value_loss_sb3_form_matches_sb3_mse_of_clipped_prediction() -> None:
    rng = np.random.default_rng(1)
    v, old, ret = (th.tensor(rng.normal(size=64)) for _ in range(3))
    values_pred = old + th.clamp(v - old, -0.3, 0.3)  # SB3 PPO.train, clip_range_vf branch
    expected = th.nn.functional.mse_loss(ret, values_pred)
    assert losses.value_loss(v, old, ret, 0.3, "sb3").item() == pytest.approx(expected.item(), rel=1e-12)
    # the max form is never below either of its terms
    assert losses.value_loss(v, old, ret, 0.3, "max").item() >= expected.item()
    assert losses.value_loss(v, old, ret, 0.3, "max").item() >= losses.value_loss(v, old, ret, None).item()


def test_value_loss_rejects_unknown_mode() -> None:
    v, old, ret = _value_case([0.0], [0.0], [0.0])
    with pytest.raises(ValueError, match="clipping mode"):
        losses.value_loss(v, old, ret, 0.2, "min")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clipping mode"):
        losses.value_loss_grad(v.detach(), old, ret, 0.2, "min")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clipping mode"):
        losses.PPOLoss(0.2, 0.2, "min")  # type: ignore[arg-type]


# -- advantage normalization, entropy, KL --------------------------------------------------------------------


def test_normalize_advantages_hand_numbers() -> None:
    adv = th.tensor([1.0, 2.0, 3.0, 4.0], dtype=th.float64)
    std = math.sqrt(5 / 3)  # unbiased (n - 1) std, as SB3 uses
    expected = (np.array([1.0, 2.0, 3.0, 4.0]) - 2.5) / (std + 1e-8)
    np.testing.assert_allclose(losses.normalize_advantages(adv).numpy(), expected, rtol=1e-12)


def test_normalize_advantages_uses_1e_minus_8() -> None:
    d = 1e-8
    out = losses.normalize_advantages(th.tensor([0.0, d], dtype=th.float64))
    # (d / 2) / (d / sqrt(2) + 1e-8) = 0.5 / (1 / sqrt(2) + 1): the epsilon is visible at this scale
    assert out[1].item() == pytest.approx(0.5 / (1 / math.sqrt(2) + 1.0), rel=1e-9)
    constant = losses.normalize_advantages(th.tensor([3.0, 3.0, 3.0]))
    assert th.equal(constant, th.zeros(3))


def test_normalize_advantages_minibatch_of_one_unchanged() -> None:
    adv = th.tensor([2.5])
    out = losses.normalize_advantages(adv)
    assert th.equal(out, adv)
    assert th.equal(losses.normalize_advantages(th.tensor(2.5)), th.tensor(2.5))


def test_normalize_advantages_rows_each_on_their_own() -> None:
    rows = np.random.default_rng(3).normal(2.0, 3.0, size=(5, 16))
    out = losses.normalize_advantages(th.as_tensor(rows)).numpy()
    for row, normalized in zip(rows, out, strict=True):
        expected = (row - row.mean()) / (row.std(ddof=1) + 1e-8)
        np.testing.assert_allclose(normalized, expected, rtol=1e-12)


def test_entropy_loss_is_minus_mean_entropy_or_log_prob_estimate() -> None:
    assert losses.entropy_loss(th.tensor([1.0, 3.0]), th.tensor([-5.0, -5.0])).item() == pytest.approx(-2.0)
    # no closed form: -H estimated by mean(log pi)
    assert losses.entropy_loss(None, th.tensor([-1.0, -2.0])).item() == pytest.approx(-1.5)


def test_entropy_loss_gradient_is_minus_one_over_n() -> None:
    entropy = th.tensor([1.0, 3.0, 0.5, 2.0], dtype=th.float64, requires_grad=True)
    losses.entropy_loss(entropy, th.zeros(4, dtype=th.float64)).backward()
    # d(-mean H)/dH_i = -1/4
    np.testing.assert_allclose(entropy.grad.numpy(), [-0.25] * 4, atol=1e-15)
    np.testing.assert_allclose(losses.entropy_loss_grad(entropy.detach()).numpy(), [-0.25] * 4, atol=1e-15)
    # the log-prob estimate mean(log pi): d/dlog pi_i = +1/4
    log_prob = th.tensor([-1.0, -2.0, -0.5, -3.0], dtype=th.float64, requires_grad=True)
    losses.entropy_loss(None, log_prob).backward()
    np.testing.assert_allclose(log_prob.grad.numpy(), [0.25] * 4, atol=1e-15)


def test_approx_kl_hand_numbers_and_no_gradient() -> None:
    log_ratio = th.tensor([math.log(2.0), 0.0], requires_grad=True)
    kl = losses.approx_kl(th.exp(log_ratio), log_ratio)
    # (r - 1) - log r: (1 - log 2) and 0
    assert kl.item() == pytest.approx((1 - math.log(2.0)) / 2)
    assert not kl.requires_grad
