"""RPO (Rahman and Xue 2022): the update sees the Gaussian mean shifted by uniform noise, keeping exploration."""

from __future__ import annotations

from typing import Any

import torch as th

from sb3_ppo_ext.distributions import ActionHead, DiagGaussianHead
from sb3_ppo_ext.extensions import Extension

__all__ = ["RPONoise", "RobustPolicyOptimization"]


class RPONoise:
    """``mean + U(-alpha, alpha)`` on a diagonal Gaussian head's parameters; other heads are left alone.

    Installed as the policy's ``training_params_transform``: applied while the policy evaluates stored actions in
    training mode (the update), never while it acts.

    :param alpha: the noise's half-width, in action units.
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = float(alpha)

    def __call__(self, head: ActionHead, params: tuple[th.Tensor, ...]) -> tuple[th.Tensor, ...]:
        """The perturbed parameters.

        :param head: the policy's action head.
        :param params: the head's parameters (for a Gaussian: mean and log std).
        :return: the mean shifted by ``U(-alpha, alpha)``; the parameters of other heads unchanged.
        """
        if not isinstance(head, DiagGaussianHead):
            return params
        mean, log_std = params
        return (mean + th.empty_like(mean).uniform_(-self.alpha, self.alpha), log_std)


class RobustPolicyOptimization(Extension):
    """Installs :class:`RPONoise` on the policy (the closed-form kernel then refuses it: autograd runs the update).

    :param alpha: the noise's half-width (CleanRL's RPO uses 0.5).
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def setup(self, model: Any) -> None:
        """Install the noise on the (new or loaded) policy.

        :param model: the model.
        """
        model.policy.training_params_transform = RPONoise(self.alpha)
