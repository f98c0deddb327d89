"""Value-target normalisation: the critic learns returns scaled to zero mean and unit variance.

The running mean and variance of the rollouts' returns (SB3's ``RunningMeanStd``) scale the critic's
targets in ``train()``; its outputs are scaled back (``denormalize``) wherever a value enters GAE or a
bootstrap. With PopArt (van Hasselt et al. 2016) each statistics update also rescales the value head's
last layer so that its de-normalised outputs stay exactly what they were ("preserving outputs precisely").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.running_mean_std import RunningMeanStd
from torch import nn

from sb3_ppo_ext.extensions import Extension
from sb3_ppo_ext.losses import PPOBatch

__all__ = ["ValueNormalizer", "ValueTargetNormalization"]


class ValueNormalizer:
    """Running statistics of the value targets, and the PopArt correction of the value head.

    :param popart: rescale the value head at each update so that de-normalised outputs are preserved.
    :param epsilon: added to the variance before the square root.
    """

    def __init__(self, popart: bool = False, epsilon: float = 1e-8) -> None:
        self.popart = popart
        self.epsilon = epsilon
        self.statistics = RunningMeanStd(shape=())

    @property
    def mean(self) -> float:
        """The running mean of the targets."""
        return float(self.statistics.mean)

    @property
    def std(self) -> float:
        """The running standard deviation of the targets."""
        return float(np.sqrt(self.statistics.var + self.epsilon))

    def normalize(self, values: th.Tensor) -> th.Tensor:
        """``(x - mean) / std``: what the critic is trained to output.

        :param values: targets in reward units.
        :return: the normalised targets.
        """
        return (values - self.mean) / self.std

    def denormalize(self, values: th.Tensor) -> th.Tensor:
        """``x * std + mean``: the critic's output in reward units.

        :param values: the critic's (normalised) outputs.
        :return: the values in reward units.
        """
        return values * self.std + self.mean

    def update(self, returns: np.ndarray, value_head: nn.Linear | None = None) -> None:
        """Fold a rollout's returns into the statistics; with PopArt, keep ``value_head``'s outputs in reward units.

        PopArt: with old ``(mu, sigma)`` and new ``(mu', sigma')``, ``W' = W sigma / sigma'`` and
        ``b' = (sigma b + mu - mu') / sigma'``, so ``sigma' (W' h + b') + mu' = sigma (W h + b) + mu`` for every ``h``.

        :param returns: the rollout's returns (any shape).
        :param value_head: the critic's last layer, rescaled in place with PopArt; None: no rescaling.
        """
        old_mean, old_std = self.mean, self.std
        self.statistics.update(np.asarray(returns, dtype=np.float64).reshape(-1))
        if self.popart and value_head is not None:
            new_mean, new_std = self.mean, self.std
            with th.no_grad():
                value_head.weight.mul_(old_std / new_std)
                value_head.bias.mul_(old_std).add_(old_mean - new_mean).div_(new_std)


class ValueTargetNormalization(Extension):
    """The critic learns normalised targets; wherever its output enters GAE or a bootstrap it is de-normalised.

    :param normalizer: the statistics (saved with the model as ``model.value_normalizer``).
    """

    def __init__(self, normalizer: ValueNormalizer) -> None:
        self.normalizer = normalizer

    def update_start(self, model: Any) -> None:
        """Fold the rollout's returns (every rank's, so that all statistics and PopArt heads agree) in.

        :param model: the model.
        """
        head = model.policy.value_net if self.normalizer.popart else None
        self.normalizer.update(model.distributed.all_gather(np.asarray(model.rollout_buffer.returns)), head)

    def values_in_reward_units(self, values: th.Tensor) -> th.Tensor:
        """The critic's output de-normalised.

        :param values: the critic's outputs.
        :return: the values in reward units.
        """
        return self.normalizer.denormalize(values)

    def minibatch(self, batch: PPOBatch) -> PPOBatch:
        """The critic's targets, and its old outputs (for value clipping), in its normalised units.

        :param batch: the minibatch.
        :return: the minibatch the loss sees.
        """
        return batch._replace(
            old_values=self.normalizer.normalize(batch.old_values), returns=self.normalizer.normalize(batch.returns)
        )
