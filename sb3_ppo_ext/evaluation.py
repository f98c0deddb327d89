"""``evaluate_policy`` for every ClippedPPO policy: invalid-action masks and LSTM states at the same time."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor, is_vecenv_wrapped

__all__ = ["evaluate_policy", "predict_takes_masks"]


def predict_takes_masks(model: Any) -> bool:
    """Whether ``model.predict`` takes ``action_masks`` (ClippedPPO, MaskablePPO; not SB3's PPO or RecurrentPPO).

    :param model: an SB3 algorithm (anything with ``predict``).
    :return: whether ``predict`` has an ``action_masks`` parameter.
    """
    return "action_masks" in inspect.signature(model.predict).parameters


def evaluate_policy(
    model: Any,
    env: gym.Env | VecEnv,
    n_eval_episodes: int = 10,
    deterministic: bool = True,
    render: bool = False,
    callback: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    reward_threshold: float | None = None,
    return_episode_rewards: bool = False,
    warn: bool = True,
    use_masking: bool = True,
) -> tuple[float, float] | tuple[list[float], list[int]]:
    """SB3's ``evaluate_policy`` (same arguments, episode accounting and return values), plus masks and LSTM states.

    The env's invalid-action masks are applied when it has ``action_masks()``, ``use_masking`` is on and the
    model's ``predict`` takes ``action_masks`` (otherwise the env is evaluated as by SB3's function), and a
    recurrent policy's states returned by ``predict`` are passed back at the next step, reset where an episode
    starts. sb3-contrib 2.9's masked ``evaluate_policy``
    passes ``None`` back as the state at every step (an LSTM policy restarts from zeros each step), and SB3's
    applies no masks: for a ClippedPPO LSTM policy with masks, use this one.

    :param model: the model to evaluate (anything with SB3's ``predict``).
    :param env: the env, or a VecEnv (a plain env is wrapped in a ``DummyVecEnv``).
    :param n_eval_episodes: episodes to run, spread over the VecEnv's envs as SB3 does.
    :param deterministic: deterministic actions (the mode of the distribution).
    :param render: render the env at every step.
    :param callback: called after every step with ``locals()`` and ``globals()``, as in SB3.
    :param reward_threshold: raise an ``AssertionError`` when the mean return is below it.
    :param return_episode_rewards: return the per-episode returns and lengths instead of their mean and std.
    :param warn: warn when the env has no ``Monitor``.
    :param use_masking: apply the env's ``action_masks()`` when it has them.
    :return: mean and standard deviation of the episode returns, or with ``return_episode_rewards`` the lists of
        episode returns and lengths. With a ``Monitor`` (or ``VecMonitor``) on the env, its episode ends and
        statistics count (e.g. an Atari game, not a life); without one, the ``done`` signals do.
    """
    if not isinstance(env, VecEnv):
        env = DummyVecEnv([lambda: env])  # type: ignore[list-item, return-value]
    monitored = is_vecenv_wrapped(env, VecMonitor) or env.env_is_wrapped(Monitor)[0]
    if not monitored and warn:
        warnings.warn(
            "The evaluation env is not wrapped with a Monitor: episode returns and lengths are those seen after "
            "every other wrapper, which may change them. Wrap the env with stable_baselines3.common.monitor.Monitor.",
            UserWarning,
            stacklevel=2,
        )
    apply_masks = use_masking and is_masking_supported(env) and predict_takes_masks(model)
    n_envs = env.num_envs
    # episodes spread over the envs as evenly as possible, as SB3 does
    targets = np.array([(n_eval_episodes + i) // n_envs for i in range(n_envs)], dtype=int)
    counts = np.zeros(n_envs, dtype=int)
    current_rewards, current_lengths = np.zeros(n_envs), np.zeros(n_envs, dtype=int)
    episode_rewards: list[float] = []
    episode_lengths: list[int] = []
    observations = env.reset()
    states = None
    episode_starts = np.ones(n_envs, dtype=bool)
    while (counts < targets).any():
        masks = {"action_masks": get_action_masks(env)} if apply_masks else {}
        actions, states = model.predict(
            observations, state=states, episode_start=episode_starts, deterministic=deterministic, **masks
        )
        observations, rewards, dones, infos = env.step(actions)
        current_rewards += rewards
        current_lengths += 1
        for i in range(n_envs):
            if counts[i] >= targets[i]:
                continue
            reward, done, info = rewards[i], dones[i], infos[i]  # noqa: F841 - for the callback's locals()
            episode_starts[i] = done
            if callback is not None:
                callback(locals(), globals())
            if not done:
                continue
            if not monitored:
                episode_rewards.append(float(current_rewards[i]))
                episode_lengths.append(int(current_lengths[i]))
                counts[i] += 1
            elif "episode" in info:  # a Monitor's real episode end (not, e.g., an Atari life lost)
                episode_rewards.append(float(info["episode"]["r"]))
                episode_lengths.append(int(info["episode"]["l"]))
                counts[i] += 1
            current_rewards[i], current_lengths[i] = 0, 0
        if render:
            env.render()
    mean_reward, std_reward = float(np.mean(episode_rewards)), float(np.std(episode_rewards))
    if reward_threshold is not None and mean_reward <= reward_threshold:
        raise AssertionError(f"Mean reward below threshold: {mean_reward:.2f} < {reward_threshold:.2f}")
    if return_episode_rewards:
        return episode_rewards, episode_lengths
    return mean_reward, std_reward
