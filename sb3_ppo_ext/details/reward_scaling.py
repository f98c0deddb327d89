"""Reward scaling (Engstrom et al. 2020): each reward divided by a running std of the discounted return.

Per env, the discounted return ``R_t = gamma R_{t-1} + r_t`` (reset at episode ends) feeds a running variance
(SB3's ``RunningMeanStd``, over all envs and steps so far), and the reward GAE sees is ``r_t / sqrt(var(R) +
eps)``. No mean is subtracted and nothing is clipped, so the sign of every reward and the optimal policy are
kept. This is the arithmetic of ``VecNormalize(norm_reward=True)``, done inside the algorithm instead of in an
env wrapper: episode statistics, callbacks, evaluation envs and saved VecNormalize files keep the env's raw
rewards, the statistics are saved with the model (``model.reward_scaler``), and no reward is clipped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3.common.running_mean_std import RunningMeanStd

from sb3_ppo_ext.extensions import Extension, RolloutStep

__all__ = ["RewardScaler", "RewardScaling"]


class RewardScaler:
    """The running statistics of the discounted return, and the per-env returns in flight.

    :param gamma: the discount of the return whose standard deviation scales the rewards (the model's gamma).
    :param epsilon: added to the variance before the square root.
    """

    def __init__(self, gamma: float, epsilon: float = 1e-8) -> None:
        self.gamma = float(gamma)
        self.epsilon = float(epsilon)
        self.statistics = RunningMeanStd(shape=())
        self.returns: np.ndarray | None = None

    @property
    def scale(self) -> float:
        """The current divisor, ``sqrt(var(R) + eps)``."""
        return float(np.sqrt(self.statistics.var + self.epsilon))

    def __call__(self, rewards: np.ndarray) -> np.ndarray:
        """Fold the step's rewards into the returns and their statistics; return the scaled rewards."""
        if self.returns is None or self.returns.shape != np.shape(rewards):
            self.returns = np.zeros(np.shape(rewards), dtype=np.float64)
        self.returns = self.returns * self.gamma + rewards
        self.statistics.update(self.returns)
        return (rewards / self.scale).astype(np.asarray(rewards).dtype, copy=False)

    def end_episodes(self, dones: np.ndarray) -> None:
        """The returns of the envs whose episode just ended start again from zero.

        :param dones: per env, whether its episode ended at this step.
        """
        if self.returns is not None:
            self.returns[np.asarray(dones, dtype=bool)] = 0.0


class RewardScaling(Extension):
    """Applies :class:`RewardScaler` to every rollout step's rewards (after any other shaping, e.g. a KL penalty).

    :param scaler: the statistics (saved with the model as ``model.reward_scaler``).
    """

    def __init__(self, scaler: RewardScaler) -> None:
        self.scaler = scaler

    def shape_rewards(self, rewards: np.ndarray, step: RolloutStep) -> np.ndarray:
        """``r_t / sqrt(var(R) + eps)``: :meth:`Extension.shape_rewards`."""
        return self.scaler(rewards)

    def step_end(self, model: Any) -> None:
        """Reset the returns of the episodes that ended at this step: :meth:`Extension.step_end`."""
        self.scaler.end_episodes(model._last_episode_starts)
