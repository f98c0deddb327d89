"""The KL-adaptive learning rate (rsl_rl, SBX): the rule, and the extension that applies it to the update."""

from __future__ import annotations

from typing import Any

import torch as th

from sb3_ppo_ext.extensions import Extension
from sb3_ppo_ext.losses import LossTerms, mean_of

__all__ = ["AdaptiveLearningRate", "KLAdaptiveLearningRate"]


class KLAdaptiveLearningRate:
    """The KL-adaptive learning rate of rsl_rl and SBX: keep each update's KL near a target.

    After each epoch (or minibatch): divide the rate by ``factor`` when the approximate KL exceeds
    ``2 * target``, multiply it by ``factor`` when it is below ``target / 2``, and clamp to ``bounds``.

    :param initial: the starting learning rate.
    :param target: the KL per update to aim at.
    :param bounds: ``(min, max)`` learning rate.
    :param factor: the multiplicative step (1.5 in rsl_rl).
    """

    def __init__(self, initial: float, target: float, bounds: tuple[float, float], factor: float = 1.5) -> None:
        self.target = float(target)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.factor = float(factor)
        self.value = min(max(float(initial), self.bounds[0]), self.bounds[1])

    def update(self, kl: float) -> float:
        """Move the rate for a measured KL.

        :param kl: the approximate KL of the last epoch (or minibatch).
        :return: the new rate.
        """
        if kl > 2.0 * self.target:
            self.value = max(self.value / self.factor, self.bounds[0])
        elif kl < 0.5 * self.target:
            self.value = min(self.value * self.factor, self.bounds[1])
        return self.value

    def apply(self, optimizer: th.optim.Optimizer) -> None:
        """Set every parameter group's rate to the current value.

        :param optimizer: the policy's optimizer.
        """
        for group in optimizer.param_groups:
            group["lr"] = self.value


class AdaptiveLearningRate(Extension):
    """Replaces the ``learning_rate`` schedule by :class:`KLAdaptiveLearningRate`, moved after each epoch or minibatch.

    :param rule: the rule and its current rate (saved with the model as ``model._adaptive_lr``).
    :param every: ``"epoch"`` (the approximate KL averaged over the epoch's minibatches) or ``"minibatch"``.
    """

    def __init__(self, rule: KLAdaptiveLearningRate, every: str) -> None:
        self.rule = rule
        self.every = every

    def update_start(self, model: Any) -> None:
        """The adaptive rate, instead of the schedule's.

        :param model: the model.
        """
        self.rule.apply(model.policy.optimizer)

    def minibatch_done(self, model: Any, terms: LossTerms) -> None:
        """``every="minibatch"``: move the rate for this minibatch's KL.

        :param model: the model.
        :param terms: the minibatch's loss terms.
        """
        if self.every == "minibatch":
            self.rule.update(terms.approx_kl.item())
            self.rule.apply(model.policy.optimizer)

    def epoch_done(self, model: Any, terms: list[LossTerms]) -> None:
        """``every="epoch"``: move the rate for the epoch's mean KL.

        :param model: the model.
        :param terms: the epoch's minibatches' loss terms.
        """
        if self.every == "epoch":
            self.rule.update(mean_of(terms, "approx_kl"))
            self.rule.apply(model.policy.optimizer)

    def update_end(self, model: Any, history: list[list[LossTerms]]) -> None:
        """Log the rate the update ended with.

        :param model: the model.
        :param history: each epoch's loss terms.
        """
        model.logger.record("train/learning_rate", self.rule.value)
