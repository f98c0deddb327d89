"""Hyperparameter presets: the seed's Atari/MuJoCo table and RL Zoo per-env settings.

Both kinds are written in the RL Baselines3 Zoo's YAML vocabulary (``n_envs``, ``n_timesteps``,
``policy``, ``normalize``, ``lin_3e-4`` schedule strings, ``policy_kwargs`` as a Python string) and
parsed by the same function, :func:`parse_zoo_block`, into a :class:`Settings`::

    from stable_baselines3.common.env_util import make_vec_env
    from sb3_ppo_ext import ClippedPPO
    from sb3_ppo_ext.zoo.presets import preset, zoo_settings

    s = zoo_settings("clipped_ppo", "CartPole-v1")      # the Zoo's tuned CartPole settings
    model = ClippedPPO(s.policy, make_vec_env("CartPole-v1", n_envs=s.n_envs), **s.model_kwargs)
    model.learn(s.n_timesteps)

    s = preset("mujoco")                                 # the seed's MuJoCo column
    model = ClippedPPO(s.policy, make_vec_env("Hopper-v5", n_envs=s.n_envs), **s.model_kwargs)
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from sb3_ppo_ext.schedules import parse_schedule
from sb3_ppo_ext.zoo.registry import is_atari

#: Folder of the shipped per-algorithm YAML files (``clipped_ppo.yml``, ``clipped_ppo_lstm.yml``, ``a2c.yml``,
#: ``trpo.yml``).
HYPERPARAMS_DIR = Path(__file__).parent / "hyperparams"

#: Which shipped file holds each algorithm's settings. SB3's PPO reads the same file as ClippedPPO:
#: ``clipped_ppo.yml`` mirrors the Zoo's ``ppo.yml``, so both PPOs are compared at identical settings;
#: ``clipped_ppo_lstm.yml`` mirrors ``ppo_lstm.yml`` for ClippedPPO's LSTM policies and ``RecurrentPPO``.
HYPERPARAMS_FILES: dict[str, str] = {
    "clipped_ppo": "clipped_ppo.yml",
    "ppo": "clipped_ppo.yml",
    "a2c": "a2c.yml",
    "trpo": "trpo.yml",
    "maskable_ppo": "clipped_ppo.yml",
    # LSTM policies: ClippedPPO's and sb3-contrib's RecurrentPPO read the mirror of the Zoo's ppo_lstm.yml
    "clipped_ppo_lstm": "clipped_ppo_lstm.yml",
    "recurrent_ppo": "clipped_ppo_lstm.yml",
    # ClippedPPO's own tuned MuJoCo preset (not a Zoo mirror): its rows carry "tuned" in the benchmark's tables
    "clipped_ppo_tuned": "clipped_ppo_mujoco_tuned.yml",
}

#: Presets shipped as Zoo-format files with per-env blocks, by ``--preset`` name.
PRESET_FILES: dict[str, str] = {"mujoco-tuned": "clipped_ppo_mujoco_tuned.yml"}

# Keys of a Zoo block that describe the environment or the run, not the model constructor.
_NON_MODEL_KEYS = {
    "n_envs",
    "n_timesteps",
    "policy",
    "normalize",
    "env_wrapper",
    "frame_stack",
    "env_kwargs",
}
# Keys the Zoo turns from ``lin_<x>`` strings into linear schedules (rl_zoo3's _preprocess_schedules).
_SCHEDULE_KEYS = ("learning_rate", "clip_range", "clip_range_vf")
# The names a Zoo ``policy_kwargs`` / ``normalize`` string may use; evaluated with no builtins.
_EVAL_NAMESPACE: dict[str, Any] = {"dict": dict, "nn": nn}

# The seed's hyperparameter table (section 6), one column each, in the Zoo's vocabulary. The seed
# anneals the learning rate linearly to 0 ("Learning Rate Annealing"); the clip range stays fixed.
_SEED_TABLE: dict[str, dict[str, Any]] = {
    "atari": {
        "policy": "CnnPolicy",
        "env_wrapper": ["stable_baselines3.common.atari_wrappers.AtariWrapper"],
        "frame_stack": 4,
        "n_envs": 8,
        "n_steps": 128,
        "batch_size": 256,
        "n_epochs": 4,
        "clip_range": 0.1,
        "learning_rate": "lin_2.5e-4",
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "ent_coef": 0.01,
    },
    "mujoco": {
        "policy": "MlpPolicy",
        # The seed allows 1-64 environments; 1 is the PPO paper's MuJoCo setting. Observation and
        # reward normalization are not in the seed's table but standard for MuJoCo (baselines, Zoo).
        "normalize": True,
        "n_envs": 1,
        "n_steps": 2048,
        "batch_size": 64,
        "n_epochs": 10,
        "clip_range": 0.2,
        "learning_rate": "lin_3e-4",
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "ent_coef": 0.0,
    },
}


@dataclass(frozen=True)
class Settings:
    """Everything needed to build the environment and the model for one algorithm on one task.

    :param policy: policy alias or dotted class path, e.g. ``"MlpPolicy"``.
    :param n_envs: number of parallel training environments.
    :param model_kwargs: keyword arguments for the algorithm's constructor (schedules and
        ``policy_kwargs`` already turned into Python objects).
    :param n_timesteps: the training budget the source recommends, or ``None``.
    :param normalize: ``VecNormalize`` keyword arguments, or ``None`` for no normalization.
    :param env_wrapper: dotted paths of ``gym.Wrapper`` classes (or ``{path: kwargs}`` dicts).
    :param frame_stack: number of frames for ``VecFrameStack``, or ``None``.
    :param env_kwargs: keyword arguments for ``gym.make``.
    :param raw: the block as written in YAML (strings not yet parsed), for the record.
    """

    policy: str
    n_envs: int
    model_kwargs: dict[str, Any]
    n_timesteps: int | None = None
    normalize: dict[str, Any] | None = None
    env_wrapper: tuple[Any, ...] = ()
    frame_stack: int | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def wrapper_class(self) -> Callable[[Any], Any] | None:
        """The ``wrapper_class`` for ``make_vec_env``.

        :return: a function that applies the env wrappers in order, or None when there are none.
        """
        if not self.env_wrapper:
            return None
        wrappers = [_wrapper_factory(spec) for spec in self.env_wrapper]

        def wrap(env: Any) -> Any:
            for wrapper in wrappers:
                env = wrapper(env)
            return env

        return wrap


def _eval_python_string(text: str, what: str) -> Any:
    # The Zoo stores policy_kwargs as Python source, e.g. "dict(net_arch=[64], activation_fn=nn.ReLU)";
    # evaluate it without builtins so only dict/nn/constants are reachable.
    try:
        return eval(text, {"__builtins__": {}}, dict(_EVAL_NAMESPACE))  # noqa: S307
    except Exception as exc:
        raise ValueError(f"cannot parse {what} {text!r}: {exc}") from exc


def _normalize_kwargs(value: Any, gamma: float | None) -> dict[str, Any] | None:
    if value is None or value is False:
        return None
    if value is True:
        kwargs: dict[str, Any] = {}
    elif isinstance(value, str):
        kwargs = dict(_eval_python_string(value, "normalize"))
    elif isinstance(value, Mapping):
        kwargs = dict(value)
    else:
        raise ValueError(f"normalize must be a bool, a dict or a dict string, got {value!r}")
    if gamma is not None:
        # the Zoo discounts VecNormalize's return estimate with the algorithm's gamma
        kwargs.setdefault("gamma", gamma)
    return kwargs


def parse_zoo_block(block: Mapping[str, Any]) -> Settings:
    """Parse one per-env block of a Zoo hyperparameter file into :class:`Settings`.

    Follows rl_zoo3's ``ExperimentManager`` preprocessing: ``lin_`` strings become linear schedules,
    ``policy_kwargs``/``normalize`` strings are evaluated, env-level keys are split off.

    :param block: the block, as read from YAML.
    :return: the parsed settings (the block itself kept as ``raw``).
    :raises ValueError: ``normalize`` is not a bool, a dict or a dict string.
    """
    raw = copy.deepcopy(dict(block))
    model_kwargs = {key: value for key, value in raw.items() if key not in _NON_MODEL_KEYS}
    for key in _SCHEDULE_KEYS:
        if key in model_kwargs:
            model_kwargs[key] = parse_schedule(model_kwargs[key])
    if isinstance(model_kwargs.get("policy_kwargs"), str):
        model_kwargs["policy_kwargs"] = _eval_python_string(model_kwargs["policy_kwargs"], "policy_kwargs")
    wrappers = raw.get("env_wrapper") or []
    n_timesteps = raw.get("n_timesteps")
    return Settings(
        policy=raw.get("policy", "MlpPolicy"),
        n_envs=int(raw.get("n_envs", 1)),
        model_kwargs=model_kwargs,
        n_timesteps=None if n_timesteps is None else int(float(n_timesteps)),
        normalize=_normalize_kwargs(raw.get("normalize"), raw.get("gamma")),
        env_wrapper=tuple(wrappers if isinstance(wrappers, list) else [wrappers]),
        frame_stack=raw.get("frame_stack"),
        env_kwargs=dict(raw.get("env_kwargs") or {}),
        raw=raw,
    )


def load_zoo_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a Zoo hyperparameter YAML file.

    :param path: the file.
    :return: ``{env_id | "default" | "atari": block}``, the blocks unparsed.
    :raises ValueError: the file does not hold a mapping.
    """
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of env ids to hyperparameter blocks")
    return data


def zoo_block(algo: str, env_id: str, path: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """The raw Zoo block for ``algo`` on ``env_id`` and the key it is filed under.

    rl_zoo3's rule: the env's own block, else the ``atari`` block for Atari games
    (:func:`sb3_ppo_ext.zoo.envs.is_atari`), else the ``default`` block.

    :param algo: a key of :data:`HYPERPARAMS_FILES` (``"clipped_ppo"``, ``"clipped_ppo_lstm"``, ...), or any
        name when ``path`` is given.
    :param env_id: a Gymnasium id.
    :param path: a Zoo-format YAML file to read instead of the shipped one.
    :return: ``(key, block)``: ``key`` is ``env_id``, ``"atari"`` or ``"default"``.
    """
    if path is None:
        if algo not in HYPERPARAMS_FILES:
            raise ValueError(f"no shipped hyperparameters for {algo!r}; known: {sorted(HYPERPARAMS_FILES)}")
        path = HYPERPARAMS_DIR / HYPERPARAMS_FILES[algo]
    blocks = load_zoo_file(path)
    for key in (env_id, "atari" if is_atari(env_id) else None, "default"):
        if key is not None and key in blocks:
            return key, blocks[key]
    raise ValueError(f"{path}: no hyperparameters for {env_id!r} and no 'default' block")


def zoo_settings(algo: str, env_id: str, path: str | Path | None = None) -> Settings:
    """The RL Zoo settings of ``algo`` on ``env_id``, chosen as rl_zoo3 does (see :func:`zoo_block`).

    :param algo: a key of :data:`HYPERPARAMS_FILES` (``"clipped_ppo"``, ``"clipped_ppo_lstm"``, ...), or any
        name when ``path`` is given.
    :param env_id: a Gymnasium id.
    :param path: a Zoo-format YAML file to read instead of the shipped one.
    :return: the parsed settings.
    """
    return parse_zoo_block(zoo_block(algo, env_id, path)[1])


def preset(name: str, env_id: str | None = None) -> Settings:
    """A column of the seed's hyperparameter table (``"atari"``, ``"mujoco"``) or a shipped preset file's block.

    :param name: a name of :func:`preset_names`.
    :param env_id: for a preset file (``"mujoco-tuned"``), the env whose block to read; None: its first block.
    :return: the parsed settings.
    :raises ValueError: an unknown preset, or a preset file without a block for ``env_id``.
    """
    if name in PRESET_FILES:
        path = HYPERPARAMS_DIR / PRESET_FILES[name]
        blocks = load_zoo_file(path)
        if env_id is not None and env_id not in blocks:
            raise ValueError(f"preset {name!r} has no block for {env_id!r}; it has {sorted(blocks)} ({path})")
        return parse_zoo_block(blocks[env_id if env_id is not None else next(iter(blocks))])
    if name not in _SEED_TABLE:
        raise ValueError(f"unknown preset {name!r}; known: {preset_names()}")
    return parse_zoo_block(_SEED_TABLE[name])


def preset_names() -> list[str]:
    """Names accepted by :func:`preset`.

    :return: the seed table's columns and the preset files' names, sorted.
    """
    return sorted([*_SEED_TABLE, *PRESET_FILES])


def import_object(dotted: str) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``.

    :param dotted: the object's module path and name, joined by dots.
    :return: the object.
    :raises ValueError: ``dotted`` has no module part.
    """
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"expected a dotted path 'module.Name', got {dotted!r}")
    return getattr(importlib.import_module(module_name), attr)


def _wrapper_factory(spec: Any) -> Callable[[Any], Any]:
    # A Zoo wrapper entry is "module.Class" or {"module.Class": {kwarg: value}}.
    if isinstance(spec, str):
        return import_object(spec)
    if isinstance(spec, Mapping) and len(spec) == 1:
        ((name, kwargs),) = spec.items()
        cls = import_object(name)
        return lambda env: cls(env, **(kwargs or {}))
    raise ValueError(f"cannot read env_wrapper entry {spec!r}")
