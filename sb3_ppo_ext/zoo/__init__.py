"""The RL Baselines3 Zoo side: its settings, its env builder, and ClippedPPO as an rl_zoo3 algorithm.

``presets`` (Zoo-format settings from ``hyperparams/*.yml`` and the seed's Atari/MuJoCo table), ``registry``
(the Gymnasium ids this package registers, ``is_atari``), ``envs`` (the one env builder), ``plugin`` (the
rl_zoo3 registration and its start-up hook; its public names are re-exported here, where they always were).
"""

from sb3_ppo_ext.zoo.plugin import (
    ALGO_NAME,
    HYPERPARAMS_PATH,
    PTH_NAME,
    hook_line,
    install_hook,
    main,
    patch_module,
    register,
    run_script,
    uninstall_hook,
)

__all__ = [
    "ALGO_NAME",
    "HYPERPARAMS_PATH",
    "PTH_NAME",
    "hook_line",
    "install_hook",
    "main",
    "patch_module",
    "register",
    "run_script",
    "uninstall_hook",
]
