"""Advantages (and returns) recomputed with the current critic before every epoch after the first.

The rollout's GAE uses the values the critic predicted while acting. After an epoch of updates the critic
has moved; Andrychowicz et al. (2021, "What Matters in On-Policy RL", the "recompute advantages" choice) found
that recomputing them at the start of each pass helps, and Tianshou's PPO does it by default
(``recompute_adv``). The stored rewards (with their truncation bootstraps), episode starts and the last
observation stay; ``values``, ``advantages`` and ``returns`` of the buffer are replaced, so value clipping
clips around the recomputed values, as Tianshou's does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.utils import obs_as_tensor

from sb3_ppo_ext.extensions import Extension

__all__ = ["RecomputeAdvantages", "recompute_gae"]


def _flat_observations(observations: Any, n_samples: int) -> Any:
    if isinstance(observations, dict):
        return {key: value.reshape(n_samples, *value.shape[2:]) for key, value in observations.items()}
    return observations.reshape(n_samples, *observations.shape[2:])


def recompute_gae(model: Any) -> None:
    """Replace the rollout buffer's values, advantages and returns by those of the current critic.

    :param model: a ``ClippedPPO`` whose buffer holds a complete rollout and whose ``_last_obs`` and
        ``_last_episode_starts`` are the observation and done flags that followed it.
    """
    buffer = model.rollout_buffer
    n_steps, n_envs = buffer.values.shape
    observations = obs_as_tensor(_flat_observations(buffer.observations, n_steps * n_envs), model.device)
    values = model._state_values(observations, np.zeros(n_steps * n_envs, dtype=bool))
    buffer.values[...] = values.cpu().numpy().reshape(n_steps, n_envs)
    dones = np.asarray(model._last_episode_starts)
    last_values = model._state_values(obs_as_tensor(model._last_obs, model.device), dones)
    buffer.compute_returns_and_advantage(last_values=last_values, dones=dones)


class RecomputeAdvantages(Extension):
    """Runs :func:`recompute_gae` before epochs 2..K of every update (the first epoch's GAE is current)."""

    def epoch_start(self, model: Any, epoch: int) -> None:
        """GAE again, from the second epoch on: :meth:`Extension.epoch_start`."""
        if epoch > 0:
            with th.inference_mode():
                recompute_gae(model)
