"""Environments built the RL Baselines3 Zoo's way, for the command line, the benchmark and throughput runs.

:func:`make_env` follows rl_zoo3's ``ExperimentManager.create_envs``: ``make_vec_env`` (one ``Monitor``
per env) with the settings' ``env_wrapper`` and ``env_kwargs``, then ``VecNormalize`` (new, or loaded
from saved statistics), then ``VecFrameStack``, then ``VecTransposeImage`` for channel-last images.
:func:`is_atari` is rl_zoo3's test of an ALE game, which decides the ``atari`` hyperparameter block and
stochastic evaluation.

It also registers, on first use of their ids, the tasks the benchmark needs beyond Gymnasium's: ALE's
games, sb3-contrib's invalid-action test envs, the RL Zoo's velocity-free ("NoVel") classic-control
tasks (:data:`NO_VELOCITY_ENVS`) and :class:`MaskedMemoryEnv` (``MaskedMemory-v0``), a short task that
needs both memory and invalid-action masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first
from stable_baselines3.common.vec_env import VecEnv, VecFrameStack, VecNormalize, VecTransposeImage

from sb3_ppo_ext.zoo.registry import (
    _VELOCITY_INDICES,
    MASKED_MEMORY_ID,
    NO_VELOCITY_ENVS,
    _register,
    is_atari,
    register_atari,
    register_masked_memory_env,
    register_masked_test_envs,
    register_no_velocity_envs,
)

if TYPE_CHECKING:
    from sb3_ppo_ext.zoo.presets import Settings

__all__ = [
    "MASKED_MEMORY_ID",
    "MaskVelocity",
    "MaskedMemoryEnv",
    "NO_VELOCITY_ENVS",
    "is_atari",
    "make_env",
    "make_no_velocity_env",
    "register_atari",
    "register_masked_memory_env",
    "register_masked_test_envs",
    "register_no_velocity_envs",
]


class MaskVelocity(gym.ObservationWrapper):
    """Zero the velocity entries of a classic-control observation (as rl_zoo3's ``MaskVelocityWrapper``).

    The observation space is unchanged, so the task becomes partially observable without a new shape.

    :param env: a Gymnasium env whose observation is a flat ``Box``.
    :param indices: the entries to zero; default: rl_zoo3's table for the env's id.
    """

    def __init__(self, env: gym.Env, indices: tuple[int, ...] | None = None) -> None:
        super().__init__(env)
        if indices is None:
            spec_id = env.unwrapped.spec.id if env.unwrapped.spec is not None else None
            if spec_id not in _VELOCITY_INDICES:
                raise NotImplementedError(f"velocity masking is not defined for {spec_id!r}; pass indices")
            indices = _VELOCITY_INDICES[spec_id]
        self.indices = np.asarray(indices, dtype=np.intp)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        """The observation with the velocity entries set to zero (a copy: the env's array is left alone).

        :param observation: the wrapped env's observation.
        :return: a copy with the velocity entries zeroed.
        """
        observation = np.array(observation, copy=True)
        observation[self.indices] = 0
        return observation


def make_no_velocity_env(env_id: str, **kwargs: Any) -> gym.Env:
    """``gym.make(env_id, **kwargs)`` with its velocities hidden: the entry point of the ``NoVel`` ids.

    A module-level function (unlike rl_zoo3's closure), so the ids also work in ``SubprocVecEnv`` workers
    started with ``spawn``.

    :param env_id: the id of the env with velocities (``"CartPole-v1"``), a key of rl_zoo3's table.
    :param kwargs: ``gym.make`` keyword arguments.
    :return: the env, wrapped in :class:`MaskVelocity`.
    """
    return MaskVelocity(gym.make(env_id, **kwargs), _VELOCITY_INDICES[env_id])


class MaskedMemoryEnv(gym.Env):
    """A short partially observable task that needs memory *and* invalid-action masks.

    Each episode has ``episode_length`` steps. The first observation shows a cue ``c`` (one of
    ``n_cues``); later observations show only the step number. At every step but the last ("walk"
    steps) just ``n_valid`` of the ``n_actions`` actions are valid: a fixed random table, drawn from
    ``layout_seed``, gives the valid set for each (cue, step), so the valid actions change every step and
    depend on the hidden cue. A valid walk action gives 0; at the last step the first ``n_cues`` actions
    are valid and action ``c`` gives +1, the others 0. Any invalid action ends the episode with
    ``-invalid_penalty``.

    * Optimal return: 1 (masks keep the walk valid, memory recalls the cue).
    * Without memory, the last observation is the same whatever the cue: a policy reading the
      observation alone (and the masks) answers right with probability ``1 / n_cues`` (0.25 by default).
    * Without masks, a policy must learn the ``n_cues x (episode_length - 1)`` valid sets from the
      penalty alone; acting at random it survives a walk step with probability ``n_valid / n_actions``.

    ``action_masks()`` follows sb3-contrib's protocol (``MaskablePPO``, ``ClippedPPO``). The final
    ``info`` has ``is_success`` (the cue was recalled), as ``EvalCallback`` reads it.

    :param n_cues: how many cues there are to remember (and answers at the last step).
    :param n_actions: the size of the Discrete action space.
    :param n_valid: valid actions at each walk step.
    :param episode_length: steps per episode, the cue's and the answer's included.
    :param invalid_penalty: the (negated) reward of an invalid action, which ends the episode.
    :param layout_seed: seed of the table of valid sets (fixed for the env's lifetime).
    :param render_mode: ``"rgb_array"`` or None.
    :raises ValueError: for sizes that leave no task (fewer than 2 cues, more cues than actions, ...).
    """

    # rgb_array because SB3's make_vec_env asks every env for it
    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        n_cues: int = 4,
        n_actions: int = 32,
        n_valid: int = 4,
        episode_length: int = 8,
        invalid_penalty: float = 1.0,
        layout_seed: int = 0,
        render_mode: str | None = None,
    ) -> None:
        if not 2 <= n_cues <= n_actions:
            raise ValueError(f"need 2 <= n_cues <= n_actions, got n_cues={n_cues}, n_actions={n_actions}")
        if not 1 <= n_valid <= n_actions:
            raise ValueError(f"need 1 <= n_valid <= n_actions, got n_valid={n_valid}")
        if episode_length < 2:
            raise ValueError(f"need episode_length >= 2 (a cue step and an answer step), got {episode_length}")
        self.n_cues, self.n_actions, self.n_valid = n_cues, n_actions, n_valid
        self.episode_length = episode_length
        self.invalid_penalty = float(invalid_penalty)
        # the task's rules, not its randomness: the same table for every env instance and seed
        rng = np.random.default_rng(layout_seed)
        self.walk_masks = np.zeros((n_cues, episode_length - 1, n_actions), dtype=bool)
        for cue in range(n_cues):
            for step in range(episode_length - 1):
                self.walk_masks[cue, step, rng.choice(n_actions, n_valid, replace=False)] = True
        self.answer_mask = np.arange(n_actions) < n_cues
        self.observation_space = spaces.Box(0.0, 1.0, (n_cues + episode_length,), dtype=np.float32)
        self.action_space = spaces.Discrete(n_actions)
        self.render_mode = render_mode
        self.cue = 0
        self.t = 0

    def render(self) -> np.ndarray:
        """An RGB picture of the state, 8 pixels per cell: the cue, the step, the valid actions (rows).

        :return: the picture, ``uint8`` of shape ``[24, 8 * max(n_actions, episode_length), 3]``.
        """
        rows = np.zeros((3, max(self.n_actions, self.episode_length)), dtype=bool)
        rows[0, self.cue] = rows[1, self.t] = True
        rows[2, : self.n_actions] = self.action_masks()
        image = np.repeat(np.repeat(rows, 8, axis=0), 8, axis=1)
        return np.repeat(image[:, :, None] * np.uint8(255), 3, axis=2)

    def _observation(self) -> np.ndarray:
        obs = np.zeros(self.observation_space.shape, dtype=np.float32)
        if self.t == 0:
            obs[self.cue] = 1.0
        obs[self.n_cues + self.t] = 1.0
        return obs

    def action_masks(self) -> np.ndarray:
        """The valid actions of the current step.

        :return: one bool per action.
        """
        if self.t < self.episode_length - 1:
            return self.walk_masks[self.cue, self.t].copy()
        return self.answer_mask.copy()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Start an episode with a new random cue.

        :param seed: seeds the env's generator (the cues), as Gymnasium's ``reset``.
        :param options: unused.
        :return: the first observation (it shows the cue) and an empty info.
        """
        super().reset(seed=seed)
        self.cue = int(self.np_random.integers(self.n_cues))
        self.t = 0
        return self._observation(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply one action: an invalid one ends the episode with the penalty, the last step scores the recall.

        :param action: an action index.
        :return: Gymnasium's ``(observation, reward, terminated, truncated, info)``.
        """
        action = int(action)
        if not self.action_masks()[action]:
            return self._observation(), -self.invalid_penalty, True, False, {"is_success": False, "invalid": True}
        if self.t == self.episode_length - 1:
            recalled = action == self.cue
            return self._observation(), float(recalled), True, False, {"is_success": recalled}
        self.t += 1
        return self._observation(), 0.0, False, False, {}


def _needs_transpose(space: spaces.Space) -> bool:
    # rl_zoo3's test: an image (or a Dict holding one) whose channels come last
    if isinstance(space, spaces.Dict):
        return any(_needs_transpose(subspace) for subspace in space.spaces.values())
    return is_image_space(space) and not is_image_space_channels_first(space)  # type: ignore[arg-type]


def make_env(
    env_id: str,
    settings: Settings,
    n_envs: int | None = None,
    seed: int | None = None,
    *,
    normalize: bool | str | Path = True,
    evaluation: bool = False,
    env_kwargs: Mapping[str, Any] | None = None,
    monitor_dir: str | None = None,
) -> VecEnv:
    """A VecEnv for ``env_id`` with the wrappers, normalization and frame stacking of ``settings``.

    :param env_id: Gymnasium id (ALE's games are registered first when ``ale_py`` is installed).
    :param settings: parsed Zoo settings (:func:`sb3_ppo_ext.zoo.presets.zoo_settings` or ``preset``).
    :param n_envs: parallel envs; default ``settings.n_envs``.
    :param seed: env ``i`` is seeded with ``seed + i``; ``None``: unseeded.
    :param normalize: ``True``: a new ``VecNormalize(**settings.normalize)`` when the settings normalize;
        ``False``: none; a path: ``VecNormalize`` statistics saved there (whatever the settings say).
    :param evaluation: an evaluation env: ``VecNormalize`` neither updates its statistics nor scales
        rewards (copy the training statistics in with ``sync_envs_normalization``).
    :param env_kwargs: ``gym.make`` keyword arguments over the settings' ``env_kwargs``.
    :param monitor_dir: folder for the ``Monitor`` CSV files; ``None``: none written.
    :return: the wrapped VecEnv.
    :raises ValueError: saved statistics (``normalize`` a path) of another observation space than the env's.
    """
    _register(env_id)  # ALE's ids exist only once ale_py has registered them
    env = make_vec_env(
        env_id,
        n_envs=settings.n_envs if n_envs is None else n_envs,
        seed=seed,
        env_kwargs={**settings.env_kwargs, **(env_kwargs or {})},
        wrapper_class=settings.wrapper_class(),
        monitor_dir=monitor_dir,
    )
    if isinstance(normalize, (str, Path)):
        try:
            env = VecNormalize.load(str(normalize), env)
        except AssertionError as error:  # VecNormalize's own check of the observation spaces
            raise ValueError(
                f"the VecNormalize statistics in {normalize} do not fit {env_id} as built from these settings "
                f"({error}): build the env with the settings (env_kwargs, wrappers, frame stacking) they were "
                "saved with"
            ) from error
        if evaluation:
            env.training = False
            env.norm_reward = False
    elif normalize and settings.normalize is not None:
        kwargs = dict(settings.normalize)
        if evaluation:
            kwargs.update(training=False, norm_reward=False)
        env = VecNormalize(env, **kwargs)
    if settings.frame_stack:
        env = VecFrameStack(env, int(settings.frame_stack))
    if _needs_transpose(env.observation_space):
        # SB3 would add it when the model is built; adding it here keeps the training and evaluation
        # envs' wrapper stacks alike, which sync_envs_normalization walks in step
        env = VecTransposeImage(env)
    return env
