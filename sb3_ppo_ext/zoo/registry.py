"""The Gymnasium ids this package registers on first use, and rl_zoo3's test of an Atari game.

ALE's games (when ``ale_py`` is installed), sb3-contrib's invalid-action test envs, the RL Zoo's velocity-free
("NoVel") classic-control tasks and ``MaskedMemory-v0``. Entry points name their classes by path, so nothing
here imports the envs themselves (:mod:`sb3_ppo_ext.zoo.envs`), and the settings (:mod:`sb3_ppo_ext.zoo.presets`)
can ask :func:`is_atari` without importing the env builder.
"""

from __future__ import annotations

import gymnasium as gym

__all__ = [
    "MASKED_MEMORY_ID",
    "MASKED_TEST_ENVS",
    "NO_VELOCITY_ENVS",
    "is_atari",
    "register_atari",
    "register_masked_memory_env",
    "register_masked_test_envs",
    "register_no_velocity_envs",
]


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


# The RL Zoo's velocity-free tasks (rl_zoo3.wrappers.MaskVelocityWrapper's table): the base id's
# observation entries that are velocities, zeroed so that only a policy with memory can infer them.
_VELOCITY_INDICES: dict[str, tuple[int, ...]] = {
    "CartPole-v1": (1, 3),
    "MountainCar-v0": (1,),
    "MountainCarContinuous-v0": (1,),
    "Pendulum-v1": (2,),
    "LunarLander-v3": (2, 3, 5),
    "LunarLanderContinuous-v3": (2, 3, 5),
}


def _no_velocity_id(env_id: str) -> str:
    # rl_zoo3's naming: CartPole-v1 -> CartPoleNoVel-v1
    name, version = env_id.split("-v")
    return f"{name}NoVel-v{version}"


#: ``"CartPoleNoVel-v1"`` and the like -> the Gymnasium id they hide the velocities of (the Zoo's ids).
NO_VELOCITY_ENVS: dict[str, str] = {_no_velocity_id(env_id): env_id for env_id in _VELOCITY_INDICES}


def register_no_velocity_envs() -> None:
    """Register :data:`NO_VELOCITY_ENVS` with Gymnasium, except ids already registered (e.g. by rl_zoo3).

    Importing ``rl_zoo3.import_envs`` later registers the same ids again with its own wrapper, which
    hides the same entries; Gymnasium then warns that it overrides them.
    """
    for env_id, base_id in NO_VELOCITY_ENVS.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point="sb3_ppo_ext.zoo.envs:make_no_velocity_env", kwargs={"env_id": base_id})


#: Gymnasium id of :class:`MaskedMemoryEnv` with its default settings.
MASKED_MEMORY_ID = "MaskedMemory-v0"


def register_masked_memory_env() -> None:
    """Register ``MaskedMemory-v0`` (:class:`~sb3_ppo_ext.zoo.envs.MaskedMemoryEnv`) unless it is registered."""
    if MASKED_MEMORY_ID not in gym.registry:
        gym.register(MASKED_MEMORY_ID, entry_point="sb3_ppo_ext.zoo.envs:MaskedMemoryEnv")


def _register(env_id: str) -> None:
    """Register the id's family when Gymnasium does not know it yet (ALE's games, the extra tasks above)."""
    if env_id in gym.registry:
        return
    if env_id in MASKED_TEST_ENVS:
        register_masked_test_envs()
    elif env_id in NO_VELOCITY_ENVS:
        register_no_velocity_envs()
    elif env_id == MASKED_MEMORY_ID:
        register_masked_memory_env()
    else:
        register_atari()  # importing ale_py costs memory: only for ids not registered otherwise


def is_atari(env_id: str) -> bool:
    """Whether ``env_id`` is an Atari game.

    rl_zoo3's rule: the id is registered with ALE's ``AtariEnv`` entry point (``ALE/Pong-v5``,
    ``PongNoFrameskip-v4``, ``Pong-v4``, ...). Ids that are not registered, because ``ale_py`` is not
    installed, are judged by name (``ALE/...`` or ``...NoFrameskip...``), so that the ``atari`` settings
    are still chosen and making the env fails with Gymnasium's message on the missing package.

    :param env_id: a Gymnasium id.
    :return: whether it is an Atari game.
    """
    _register(env_id)
    try:
        spec = gym.spec(env_id)
    except (gym.error.Error, ImportError):  # not registered, or "module:Id" with the module missing
        return env_id.startswith("ALE/") or "NoFrameskip" in env_id
    return "AtariEnv" in str(spec.entry_point)
