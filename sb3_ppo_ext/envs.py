"""Environments built the RL Baselines3 Zoo's way, for the command line, the benchmark and throughput runs.

:func:`make_env` follows rl_zoo3's ``ExperimentManager.create_envs``: ``make_vec_env`` (one ``Monitor``
per env) with the settings' ``env_wrapper`` and ``env_kwargs``, then ``VecNormalize`` (new, or loaded
from saved statistics), then ``VecFrameStack``, then ``VecTransposeImage`` for channel-last images.
:func:`is_atari` is rl_zoo3's test of an ALE game, which decides the ``atari`` hyperparameter block and
stochastic evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first
from stable_baselines3.common.vec_env import VecEnv, VecFrameStack, VecNormalize, VecTransposeImage

if TYPE_CHECKING:
    from sb3_ppo_ext.presets import Settings

__all__ = ["is_atari", "make_env", "register_atari"]


def register_atari() -> bool:
    """Register ALE's games with Gymnasium when ``ale_py`` is installed (as importing rl_zoo3 does).

    :return: whether ``ale_py`` is installed.
    """
    try:
        import ale_py
    except ImportError:
        return False
    gym.register_envs(ale_py)
    return True


# sb3-contrib's invalid-action test envs under Gymnasium ids, for the harness (ClippedPPO vs MaskablePPO)
MASKED_TEST_ENVS = {
    "InvalidActionEnvDiscrete-v0": "sb3_contrib.common.envs:InvalidActionEnvDiscrete",
    "InvalidActionEnvMultiDiscrete-v0": "sb3_contrib.common.envs:InvalidActionEnvMultiDiscrete",
    "InvalidActionEnvMultiBinary-v0": "sb3_contrib.common.envs:InvalidActionEnvMultiBinary",
}


def register_masked_test_envs() -> None:
    """Register :data:`MASKED_TEST_ENVS` with Gymnasium (entry points only: nothing is imported now)."""
    for env_id, entry_point in MASKED_TEST_ENVS.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=entry_point)


def _register(env_id: str) -> None:
    """Register the id's family when Gymnasium does not know it yet (ALE's games, the masked test envs)."""
    if env_id in gym.registry:
        return
    if env_id in MASKED_TEST_ENVS:
        register_masked_test_envs()
    else:
        register_atari()  # importing ale_py costs memory: only for ids not registered otherwise


def is_atari(env_id: str) -> bool:
    """Whether ``env_id`` is an Atari game.

    rl_zoo3's rule: the id is registered with ALE's ``AtariEnv`` entry point (``ALE/Pong-v5``,
    ``PongNoFrameskip-v4``, ``Pong-v4``, ...). Ids that are not registered, because ``ale_py`` is not
    installed, are judged by name (``ALE/...`` or ``...NoFrameskip...``), so that the ``atari`` settings
    are still chosen and making the env fails with Gymnasium's message on the missing package.
    """
    _register(env_id)
    try:
        spec = gym.spec(env_id)
    except (gym.error.Error, ImportError):  # not registered, or "module:Id" with the module missing
        return env_id.startswith("ALE/") or "NoFrameskip" in env_id
    return "AtariEnv" in str(spec.entry_point)


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
    :param settings: parsed Zoo settings (:func:`sb3_ppo_ext.presets.zoo_settings` or ``preset``).
    :param n_envs: parallel envs; default ``settings.n_envs``.
    :param seed: env ``i`` is seeded with ``seed + i``; ``None``: unseeded.
    :param normalize: ``True``: a new ``VecNormalize(**settings.normalize)`` when the settings normalize;
        ``False``: none; a path: ``VecNormalize`` statistics saved there (whatever the settings say).
    :param evaluation: an evaluation env: ``VecNormalize`` neither updates its statistics nor scales
        rewards (copy the training statistics in with ``sync_envs_normalization``).
    :param env_kwargs: ``gym.make`` keyword arguments over the settings' ``env_kwargs``.
    :param monitor_dir: folder for the ``Monitor`` CSV files; ``None``: none written.
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
        env = VecNormalize.load(str(normalize), env)
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
