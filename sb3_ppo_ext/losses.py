"""PPO's loss terms as pure functions: tensors in, tensors out (seed sections 3 and 6).

The total loss minimised by :class:`~sb3_ppo_ext.ClippedPPO` is the seed's objective with its sign flipped,

    L = -L_CLIP + c1 * L_VF - c2 * H(pi)

written as ``policy_loss + vf_coef * value_loss + ent_coef * entropy_loss`` with
``entropy_loss = -mean(H)``.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch as th

ValueClipMode = Literal["max", "sb3"]
VALUE_CLIP_MODES: tuple[str, ...] = ("max", "sb3")


class PPOBatch(NamedTuple):
    """One minibatch as the loss sees it: advantages already normalised, Discrete actions as indices."""

    observations: Any
    actions: th.Tensor
    old_log_prob: th.Tensor
    old_values: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor


class LossTerms(NamedTuple):
    """Loss terms and diagnostics of one minibatch; only ``loss`` may carry an autograd graph."""

    loss: th.Tensor
    policy_loss: th.Tensor
    value_loss: th.Tensor
    entropy_loss: th.Tensor
    clip_fraction: th.Tensor
    approx_kl: th.Tensor


def normalize_advantages(advantages: th.Tensor, eps: float = 1e-8) -> th.Tensor:
    """Return ``(A - mean(A)) / (std(A) + eps)``; a batch of one is returned unchanged (its std is undefined)."""
    if advantages.numel() <= 1:
        return advantages
    return (advantages - advantages.mean()) / (advantages.std() + eps)


def probability_ratio(log_prob: th.Tensor, old_log_prob: th.Tensor) -> th.Tensor:
    """Return ``r(theta) = pi_theta(a|s) / pi_theta_old(a|s)``, computed from log-probabilities."""
    return th.exp(log_prob - old_log_prob)


def clipped_surrogate_loss(
    log_prob: th.Tensor, old_log_prob: th.Tensor, advantages: th.Tensor, clip_range: float
) -> tuple[th.Tensor, th.Tensor]:
    """PPO-Clip policy loss: ``-E[min(r * A, clip(r, 1 - eps, 1 + eps) * A)]`` (seed section 3).

    The ``min`` keeps the more pessimistic term, so the gradient vanishes once the ratio has moved past
    ``1 + eps`` for a positive advantage or below ``1 - eps`` for a negative one.

    :return: ``(policy_loss, clip_fraction)`` where ``clip_fraction`` is the share of samples whose ratio
        lies outside ``[1 - eps, 1 + eps]`` (a diagnostic, detached).
    """
    ratio = probability_ratio(log_prob, old_log_prob)
    surrogate = ratio * advantages
    clipped_surrogate = th.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    policy_loss = -th.min(surrogate, clipped_surrogate).mean()
    clip_fraction = ((ratio.detach() - 1.0).abs() > clip_range).float().mean()
    return policy_loss, clip_fraction


def value_loss(
    values: th.Tensor,
    old_values: th.Tensor,
    returns: th.Tensor,
    clip_range_vf: float | None = None,
    mode: ValueClipMode = "max",
) -> th.Tensor:
    """Critic loss against the TD(lambda) returns, optionally clipped around the old values.

    * ``clip_range_vf=None``: plain ``mean((V - R)^2)``.
    * ``mode="max"`` (the seed's and the PPO paper's form):
      ``mean(max((V - R)^2, (V_clip - R)^2))`` with ``V_clip = V_old + clip(V - V_old, -eps_vf, eps_vf)``;
      the pessimistic max keeps a gradient whenever the unclipped error is the larger one.
    * ``mode="sb3"`` (Stable-Baselines3's form): ``mean((V_clip - R)^2)``; the gradient is zero for every
      sample whose value moved further than ``eps_vf``, even when that move reduced the error.
    """
    if clip_range_vf is None:
        return ((values - returns) ** 2).mean()
    values_clipped = old_values + th.clamp(values - old_values, -clip_range_vf, clip_range_vf)
    clipped_error = (values_clipped - returns) ** 2
    if mode == "sb3":
        return clipped_error.mean()
    if mode == "max":
        return th.max((values - returns) ** 2, clipped_error).mean()
    raise ValueError(f"Unknown value clipping mode {mode!r}; use one of {VALUE_CLIP_MODES}.")


def entropy_loss(entropy: th.Tensor | None, log_prob: th.Tensor) -> th.Tensor:
    """Return ``-mean(H(pi))``; minimising it is the seed's entropy bonus ``+ c2 * H``.

    Where the distribution has no closed-form entropy (e.g. squashed gSDE), ``-log pi(a|s)`` of the
    sampled actions is its Monte Carlo estimate.
    """
    if entropy is None:
        return log_prob.mean()
    return -entropy.mean()


def approx_kl(log_prob: th.Tensor, old_log_prob: th.Tensor) -> th.Tensor:
    """Low-variance estimator of ``KL(pi_old || pi)``: ``mean((r - 1) - log r)`` (always >= 0), no gradient."""
    with th.no_grad():
        log_ratio = log_prob - old_log_prob
        return (th.exp(log_ratio) - 1.0 - log_ratio).mean()
