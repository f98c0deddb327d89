"""Invalid-action masks, sb3-contrib's protocol: read from the env, checked, sized per action space.

An env (or a wrapper such as ``sb3_contrib.common.wrappers.ActionMasker``) that has an ``action_masks()``
method gives, per step, one boolean per outcome: ``n`` for ``Discrete(n)``, ``sum(nvec)`` for
``MultiDiscrete(nvec)`` (the components' masks concatenated) and ``2 n`` for ``MultiBinary(n)`` (``[0 valid,
1 valid]`` per bit). ``ClippedPPO`` reads them with sb3-contrib's ``get_action_masks`` before each action,
checks them here, keeps them in the rollout buffer, and its heads (:meth:`ActionHead.mask
<sb3_ppo_ext.distributions.ActionHead.mask>`) restrict sampling, log-probabilities and entropies to the
valid actions.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.vec_env import VecEnv

from sb3_ppo_ext.errors import ActionMaskError, ConfigurationError
from sb3_ppo_ext.extensions import Extension

__all__ = [
    "ActionMasks",
    "MaskedPredictMixin",
    "check_action_masks",
    "env_provides_masks",
    "mask_groups",
    "policy_applies_masks",
    "read_action_masks",
]


def mask_groups(action_space: spaces.Space) -> list[int] | None:
    """Sizes of the mask's sub-spaces, each of which needs a valid action.

    :param action_space: the model's action space.
    :return: one size per sub-space (``[n]`` for ``Discrete(n)``, ``nvec`` for ``MultiDiscrete``, ``2`` per bit for
        ``MultiBinary``), or None for a space without discrete outcomes to mask.
    """
    if isinstance(action_space, spaces.Discrete):
        return [int(action_space.n)]
    if isinstance(action_space, spaces.MultiDiscrete):
        return [int(n) for n in np.asarray(action_space.nvec).ravel()]
    if isinstance(action_space, spaces.MultiBinary):
        return [2] * int(np.prod(action_space.shape))
    return None


def env_provides_masks(env: Any) -> bool:
    """Whether the env has an ``action_masks()`` method.

    :param env: a VecEnv, a Gymnasium env, or None.
    :return: True when masks can be read from it (False for None).
    """
    return env is not None and is_masking_supported(env)


def policy_applies_masks(policy_class: Any) -> bool:
    """Whether ``policy_class.forward`` takes ``action_masks`` (ours and sb3-contrib's maskable policies do).

    :param policy_class: a policy class (or instance).
    :return: True when its ``forward`` has an ``action_masks`` parameter.
    """
    forward = getattr(policy_class, "forward", None)
    try:
        return forward is not None and "action_masks" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return False


def check_action_masks(masks: Any, action_space: spaces.Space, n_envs: int | None, *, step: int) -> np.ndarray:
    """Return the masks as a bool array ``[n_envs, mask_size]``, or raise :class:`ActionMaskError` naming the problem.

    :param masks: what the envs' ``action_masks()`` returned, stacked over envs, or ``predict``'s ``action_masks``.
    :param action_space: the model's action space.
    :param n_envs: number of envs, or of observations given to ``predict`` (None: as many as the masks hold).
    :param step: rollout step, for the message (``-1``: ``predict``, whose argument the message then names).
    :return: the masks, shape ``[n_envs, mask_size]``, dtype bool.
    :raises ActionMaskError: the masks have the wrong size, are not booleans, or leave a (sub-)space no valid action.
    """
    in_predict = step < 0
    where = "in predict()" if in_predict else f"at rollout step {step}"
    groups = mask_groups(action_space)
    if groups is None:
        if in_predict:
            raise ActionMaskError(
                f"action_masks were given to predict(), but the action space {action_space} has no discrete outcomes "
                "to mask (masks apply to Discrete, MultiDiscrete and MultiBinary). Pass action_masks=None."
            )
        raise ActionMaskError(
            f"The env provides action masks, but the action space {action_space} has no discrete outcomes to mask "
            "(masks apply to Discrete, MultiDiscrete and MultiBinary). Pass use_masking=False to learn()."
        )
    array = np.asarray(masks)
    size = sum(groups)
    if n_envs is None:
        n_envs = max(1, array.size // size)
    # in predict() a batch needs one mask row per observation: a single row is never broadcast to all of them
    rows_differ = in_predict and n_envs > 1 and array.ndim >= 2 and array.shape[0] != n_envs
    if array.dtype == object or array.size != n_envs * size or rows_differ:
        if in_predict:
            raise ActionMaskError(
                f"action_masks has shape {array.shape}, but predict() got {n_envs} observation(s) and the action "
                f"space {action_space} needs {size} booleans per observation: pass one mask row per observation, "
                f"shape ({n_envs}, {size}) (or ({size},) for a single observation)."
            )
        raise ActionMaskError(
            f"Action masks {where} have shape {array.shape}, but {n_envs} env(s) with action space {action_space} "
            f"need {size} booleans each ({n_envs} x {size}). Return one flat mask per env from action_masks()."
        )
    array = array.reshape(n_envs, size)
    row = "action_masks row {} is" if in_predict else "env {} returned"
    if array.dtype != np.bool_:
        binary_rows = np.isin(array, (0, 1)).all(axis=1) if array.dtype.kind in "biuf" else np.zeros(n_envs, bool)
        if not binary_rows.all():
            bad = int(np.flatnonzero(~binary_rows)[0])
            raise ActionMaskError(
                f"Action masks {where} must be booleans (or 0/1); {row.format(bad)} {array[bad].tolist()} "
                f"(dtype {array.dtype})."
            )
        array = array.astype(bool)
    _check_some_action_valid(array, groups, action_space, where, in_predict)
    return array


def _check_some_action_valid(
    array: np.ndarray, groups: list[int], action_space: spaces.Space, where: str, in_predict: bool
) -> None:
    start = 0
    for index, size in enumerate(groups):
        none_valid = ~array[:, start : start + size].any(axis=1)
        if none_valid.any():
            env = int(np.flatnonzero(none_valid)[0])
            part = "" if len(groups) == 1 else f" in sub-space {index} (mask entries {start}..{start + size - 1})"
            problem = (
                f"action_masks row {env} given to predict() has no valid action{part}"
                if in_predict
                else f"Env {env} returned an action mask {where} with no valid action{part}"
            )
            raise ActionMaskError(
                f"{problem} for {action_space}: {array[env].tolist()}. Every (sub-)space needs at least one valid "
                "action."
            )
        start += size


def read_action_masks(env: Any, action_space: spaces.Space, *, step: int) -> np.ndarray:
    """``get_action_masks(env)``, checked (:func:`check_action_masks`).

    :param env: the VecEnv whose ``action_masks()`` are read.
    :param action_space: the model's action space.
    :param step: the rollout step, for the error message.
    :return: the masks, shape ``[env.num_envs, mask_size]``, dtype bool.
    """
    return check_action_masks(get_action_masks(env), action_space, env.num_envs, step=step)


class ActionMasks(Extension):
    """The rollout layer of masking: each step's masks read from the env, given to the policy and stored.

    Active in a rollout when the env has ``action_masks()`` and ``learn(use_masking=True)`` (the default);
    otherwise the rollout is SB3's.
    """

    def __init__(self) -> None:
        self._env: VecEnv | None = None
        self._masks: np.ndarray | None = None

    def rollout_start(self, model: Any, env: VecEnv, rollout_buffer: RolloutBuffer) -> bool:
        """Decide whether this rollout applies the env's masks (sit it out when not): :meth:`Extension.rollout_start`.

        :raises ConfigurationError: the env has masks but the rollout buffer cannot store them.
        """
        self._env = env if model.use_masking and env_provides_masks(env) else None
        self._masks = None
        if self._env is not None and "action_masks" not in inspect.signature(rollout_buffer.add).parameters:
            raise ConfigurationError(
                f"rollout_buffer_class={type(rollout_buffer).__name__} cannot store the env's action masks (its add() "
                "has no action_masks argument). Use ClippedPPO's default buffer, or pass use_masking=False to learn()."
            )
        self._action_space = model.action_space
        self._device = model.device
        return self._env is not None

    def policy_inputs(self, step: int) -> dict[str, Any]:
        """``action_masks`` for this step, read from the env and checked: :meth:`Extension.policy_inputs`."""
        if self._env is None:
            return {}
        self._masks = read_action_masks(self._env, self._action_space, step=step)
        return {"action_masks": th.as_tensor(self._masks, device=self._device)}

    def buffer_fields(self) -> dict[str, Any]:
        """The step's masks, for the minibatches (the update evaluates the policy under them).

        Implements :meth:`Extension.buffer_fields`.
        """
        return {} if self._masks is None else {"action_masks": self._masks}


class MaskedPredictMixin:
    """``predict`` with sb3-contrib's ``action_masks``: only valid actions are returned (SB3's without masks)."""

    action_space: spaces.Space
    policy: Any

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
        action_masks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """SB3's ``predict``, plus sb3-contrib's ``action_masks``: only valid actions are returned.

        :param observation: one observation, or a batch of them.
        :param state: the LSTM states of a recurrent policy (None: the initial ones); ignored by a feed-forward one.
        :param episode_start: per observation, whether an episode starts there (resets a recurrent policy's states).
        :param deterministic: return the most likely valid action instead of sampling.
        :param action_masks: one mask row per observation (:func:`check_action_masks`); a single row is not applied
            to a batch of observations. None: SB3's ``predict``, no masks.
        :return: the actions and the next LSTM states (None for a feed-forward policy).
        """
        if action_masks is None:
            return super().predict(observation, state, episode_start, deterministic)  # type: ignore[misc]
        # the policy checks the masks against its batch of observations (once, for model and policy calls alike)
        return self.policy.predict(observation, state, episode_start, deterministic, action_masks=action_masks)
