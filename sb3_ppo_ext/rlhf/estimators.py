"""The loss-mode KL where the action heads have no closed form (gSDE): an estimate from the sampled actions.

The minibatch's actions were sampled from ``pi_old`` (the policy that collected the rollout), and the loss needs
``KL(pi_theta || pi_ref)``, whose gradient moves ``pi_theta``. Schulman's "k3", ``exp(d) - d - 1`` with
``d = log pi_ref(a|s) - log pi_theta(a|s)`` (:func:`sb3_ppo_ext.losses.sampled_kl`), is unbiased for the value
where ``pi_theta = pi_old``, but its gradient there is

    E_old[(1 - pi_ref / pi_theta) grad log pi_theta] = -E_ref[grad log pi_theta] = grad KL(pi_ref || pi_theta),

the reverse direction. :func:`importance_weighted_kl` weighs k3 by the importance ratio
``rho = pi_theta / pi_old``: ``E_old[rho * k3] = E_theta[k3] = KL(pi_theta || pi_ref)`` for *every* theta, so its
value and its gradient are unbiased for ``KL(pi_theta || pi_ref)`` and its gradient, on every epoch (the policy
moves away from ``pi_old`` after the first minibatch step). Where ``pi_theta = pi_old`` (``rho = 1``) its value
equals k3's. It stays >= 0 per sample.
"""

from __future__ import annotations

import torch as th

__all__ = ["importance_weighted_kl"]


def importance_weighted_kl(log_prob: th.Tensor, old_log_prob: th.Tensor, ref_log_prob: th.Tensor) -> th.Tensor:
    """Per-sample ``rho * k3``: an unbiased estimate of ``KL(pi_theta || pi_ref)`` and of its gradient.

    ``rho = exp(log pi_theta - log pi_old)``, ``k3 = exp(d) - d - 1`` with ``d = log pi_ref - log pi_theta``, for
    actions sampled from ``pi_old``. Gradients flow through ``log_prob`` only.

    :param log_prob: ``[B]`` ``log pi_theta(a|s)`` (with its autograd graph).
    :param old_log_prob: ``[B]`` ``log pi_old(a|s)``, stored with the rollout.
    :param ref_log_prob: ``[B]`` ``log pi_ref(a|s)``.
    :return: ``[B]`` estimates, each >= 0.
    """
    difference = ref_log_prob - log_prob
    return th.exp(log_prob - old_log_prob) * (th.expm1(difference) - difference)
