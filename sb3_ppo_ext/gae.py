"""Generalized Advantage Estimation (seed section 4) as one pure function, and the truncation bootstrap."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    episode_starts: np.ndarray,
    last_values: np.ndarray,
    last_dones: np.ndarray,
    gamma: float,
    gae_lambda: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Compute GAE(gamma, lambda) advantages and TD(lambda) returns over a ``[T, N]`` rollout.

    SB3's convention is used: ``episode_starts[t]`` says that ``obs_t`` is the first observation of an
    episode, so the step ``t -> t + 1`` crosses an episode end exactly when ``episode_starts[t + 1]`` is set
    (and, after the last step, when ``last_dones`` is set). Time-limit truncations are expected to be
    folded into ``rewards`` already (``r + gamma * V(terminal_obs)``), so every episode end here cuts
    the bootstrap.

    :param rewards: ``[T, N]`` rewards.
    :param values: ``[T, N]`` value estimates ``V(s_t)`` made during collection.
    :param episode_starts: ``[T, N]`` 1.0 where ``s_t`` starts an episode.
    :param last_values: ``[N]`` value of the observation that follows the last step.
    :param last_dones: ``[N]`` 1.0 where the last step ended an episode.
    :param gamma: discount factor.
    :param gae_lambda: bias/variance trade-off: 0 gives the one-step TD error, 1 the Monte Carlo advantage.
    :return: ``(advantages, returns)``, both ``[T, N]``, with ``returns = advantages + values``.
    """
    rewards = np.asarray(rewards, dtype=np.float32)
    values = np.asarray(values, dtype=np.float32)
    # V(s_{t+1}) and "no episode end between t and t+1", aligned with step t
    next_values = np.concatenate([values[1:], np.asarray(last_values, dtype=np.float32).reshape(1, -1)])
    next_non_terminal = 1.0 - np.concatenate(
        [np.asarray(episode_starts, dtype=np.float32)[1:], np.asarray(last_dones, dtype=np.float32).reshape(1, -1)]
    )
    # TD residuals: delta_t = r_t + gamma * V(s_{t+1}) - V(s_t), all at once
    deltas = rewards + gamma * next_values * next_non_terminal - values
    # A_t = delta_t + gamma * lambda * A_{t+1}: the only sequential part, vectorised over envs
    discounts = (gamma * gae_lambda) * next_non_terminal
    advantages = np.empty_like(deltas)
    last_gae = np.zeros(deltas.shape[1:], dtype=np.float32)
    for t in range(deltas.shape[0] - 1, -1, -1):
        last_gae = deltas[t] + discounts[t] * last_gae
        advantages[t] = last_gae
    return advantages, advantages + values


def bootstrap_truncations(
    rewards: np.ndarray,
    dones: np.ndarray,
    infos: list[dict[str, Any]],
    gamma: float,
    obs_to_tensor: Callable[[Any], tuple[Any, bool]],
    state_values: Callable[[Any, np.ndarray, np.ndarray], Any],
) -> None:
    """Add ``gamma * V(terminal_obs)`` to the reward of every time-limit truncation, in place, in one forward pass.

    A true termination is never bootstrapped: its future value is zero by definition. A truncated episode's
    return goes on past the time limit, and GAE would otherwise treat its end as a termination.

    :param rewards: ``[N]`` rewards of the current step, changed in place.
    :param dones: ``[N]`` the VecEnv's done flags of the current step.
    :param infos: the VecEnv's infos of the current step (``TimeLimit.truncated``, ``terminal_observation``).
    :param gamma: discount factor.
    :param obs_to_tensor: SB3's ``policy.obs_to_tensor``: a batch of observations -> ``(tensor, vectorized)``.
    :param state_values: ``(obs, episode_starts, rows) -> V [len(rows), 1]``, the critic after the current step.
    """
    if not dones.any():
        return
    truncated = [
        i
        for i in np.flatnonzero(dones)
        if infos[i].get("TimeLimit.truncated", False) and infos[i].get("terminal_observation") is not None
    ]
    if not truncated:
        return
    terminal = [infos[i]["terminal_observation"] for i in truncated]
    if isinstance(terminal[0], dict):
        batch: Any = {key: np.stack([obs[key] for obs in terminal]) for key in terminal[0]}
    else:
        batch = np.stack(terminal)
    obs_tensor, _ = obs_to_tensor(batch)
    values = state_values(obs_tensor, np.zeros(len(truncated), dtype=bool), np.asarray(truncated))
    rewards[truncated] += gamma * values.flatten().cpu().numpy()
