"""The project's error classes and the argument/space checks that raise them.

Every error we raise for bad input subclasses :class:`ClippedPPOError`, itself a ``ValueError``. Where
SB3's PPO raises ``AssertionError`` for the same input, we raise :class:`ConfigurationAssertionError`,
which is both, so ``except AssertionError`` written against SB3 keeps working.

The checks run in ``ClippedPPO.__init__`` before the environment is created or stepped. Each message
names the argument, the value given and what would be valid. Inputs SB3's PPO trains with stay
accepted, except for values that the project's reliability issue asks us to reject because they
have no meaning for PPO (SB3 trains on with them silently): ``gamma``/``gae_lambda``
outside [0, 1], negative ``ent_coef``/``vf_coef``, ``max_grad_norm <= 0``, ``target_kl <= 0`` and a
non-positive or non-finite ``clip_range``/``clip_range_vf``. Inputs that are only suspicious warn
with :class:`ConfigurationWarning`.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import NatureCNN

# -- error classes ---------------------------------------------------------------------------------


class ClippedPPOError(ValueError):
    """Base class of the errors raised by sb3_ppo_ext for bad input or bad data."""


class ConfigurationError(ClippedPPOError):
    """A constructor argument, schedule value, policy or space that cannot work."""


class ConfigurationAssertionError(ConfigurationError, AssertionError):
    """A configuration error that SB3's PPO reports with ``assert``: catchable as ``AssertionError`` too."""


class UnsupportedSpaceError(ConfigurationAssertionError, NotImplementedError):
    """An observation or action space ClippedPPO cannot handle.

    SB3 reports these with ``AssertionError`` (action spaces) or ``NotImplementedError`` (observation
    spaces); this class is both, and a ``ValueError``.
    """


class SpaceMismatchError(ConfigurationError):
    """An environment whose spaces differ from those of the model it is given to (SB3: ``ValueError``)."""


class ModelFileError(ClippedPPOError):
    """A file that cannot be loaded as a ClippedPPO model: truncated, corrupt, or another algorithm's."""


class NotAModelFileError(ModelFileError, AssertionError):
    """A readable zip archive without a model in it (SB3 reports this with ``assert``)."""


class NonFiniteError(ClippedPPOError, FloatingPointError):
    """NaN or inf in environment data, a loss term or a gradient."""


class EnvWorkerError(ClippedPPOError, EOFError):
    """A ``SubprocVecEnv`` worker process died (SB3 would raise ``EOFError``/``BrokenPipeError`` or hang)."""


class ConfigurationWarning(UserWarning):
    """A configuration that works but is probably not what was meant."""


# -- helpers ---------------------------------------------------------------------------------------

# Progress points at which schedules are checked at construction; 1 is the start of training, 0 the end.
SCHEDULE_CHECK_POINTS = (1.0, 0.9, 0.75, 0.5, 0.25, 0.1, 0.01, 0.0)

# NatureCNN's three convolutions (8/4, 4/2, 3/1) need at least 36 x 36 pixels.
NATURE_CNN_MIN_SIZE = 36


def _fail(
    name: str, value: Any, valid: str, hint: str = "", *, error: type[ConfigurationError] = ConfigurationError
) -> None:
    message = f"{name}={value!r} is invalid: {valid}."
    if hint:
        message += f" {hint}"
    raise error(message)


def _as_float(name: str, value: Any, valid: str) -> float:
    """``float(value)`` for numbers (Python, NumPy, 0-d tensors); a clear error for anything else."""
    if isinstance(value, (str, bytes)):
        _fail(name, value, valid, "Pass a number, not a string.")
    try:
        return float(value)
    except (TypeError, ValueError):
        _fail(name, value, valid)
    raise AssertionError("unreachable")  # pragma: no cover


def _check_int(name: str, value: Any, minimum: int, valid: str, *, assertion: bool = False) -> None:
    error = ConfigurationAssertionError if assertion else ConfigurationError
    if not isinstance(value, numbers.Integral):
        _fail(name, value, valid, f"Got a {type(value).__name__}; pass an int.", error=error)
    if value < minimum:
        _fail(name, value, valid, error=error)


def _check_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    valid: str,
    hint: str = "",
    *,
    low_open: bool = False,
    allow_inf: bool = False,
) -> None:
    number = _as_float(name, value, valid)
    too_low = number <= low if low_open else number < low
    if math.isnan(number) or too_low or number > high or (math.isinf(number) and not allow_inf):
        _fail(name, value, valid, hint)


def _schedule_values(name: str, schedule: Any, points: tuple[float, ...]) -> list[tuple[float, float]]:
    """``[(progress_remaining, value), ...]`` of a float or a schedule; a clear error if calling it fails."""
    if not callable(schedule):
        return [(1.0, _as_float(name, schedule, "it must be a number or a schedule (callable of progress)"))]
    values = []
    for progress in points:
        try:
            value = schedule(progress)
        except Exception as error:
            raise ConfigurationError(
                f"{name}={schedule!r} is invalid: calling it with progress_remaining={progress} raised "
                f"{type(error).__name__}: {error}. A schedule maps progress_remaining (1 at the start, 0 at the "
                "end) to a number."
            ) from error
        values.append((progress, _as_float(f"{name}({progress})", value, "a schedule must return numbers")))
    return values


def check_schedule_value(name: str, value: float, progress_remaining: float) -> float:
    """Check one clip-range value (a float or a schedule's output) and return it.

    While training runs (``progress_remaining > 0``) the value must be positive and finite. At the
    end (``progress_remaining <= 0``, reached by the last rollout, which usually overshoots
    ``total_timesteps``) an annealed schedule may reach 0 or slightly below, as RL Zoo's linear
    schedules do; SB3 trains through that and so do we.

    :param name: ``"clip_range"`` or ``"clip_range_vf"``.
    :param value: the value to check.
    :param progress_remaining: SB3's progress, 1 at the start of training and 0 at the end.
    """
    value = float(value)
    if not math.isfinite(value) or (value <= 0 and progress_remaining > 0):
        hint = " Pass clip_range_vf=None to turn value clipping off." if name == "clip_range_vf" else ""
        raise ConfigurationError(
            f"{name} is invalid: it is {value} at progress_remaining={progress_remaining:.4g}, but {name} must be "
            f"a positive finite number while training runs (progress_remaining > 0); an annealed schedule may only "
            f"reach 0 at the end (progress_remaining <= 0).{hint}"
        )
    return value


def _check_clip_schedule(name: str, schedule: Any, *, sb3_asserts: bool) -> None:
    if not callable(schedule):
        number = _as_float(name, schedule, "it must be a positive finite number or a schedule")
        if not math.isfinite(number) or number <= 0:
            hint = "Pass None to turn value clipping off." if name == "clip_range_vf" else "0.1 to 0.3 is typical."
            error = ConfigurationAssertionError if sb3_asserts else ConfigurationError
            valid = "it must be a positive finite number (the epsilon of the clipping)"
            _fail(name, schedule, valid, hint, error=error)
        return
    for progress, value in _schedule_values(name, schedule, SCHEDULE_CHECK_POINTS):
        check_schedule_value(name, value, progress)


def _check_learning_rate(learning_rate: Any) -> None:
    valid = "it must be a finite number >= 0, or a schedule returning one"
    for progress, value in _schedule_values("learning_rate", learning_rate, SCHEDULE_CHECK_POINTS):
        # torch's optimizers reject a negative initial learning rate; non-finite ones turn the weights into NaN
        if not math.isfinite(value) or (progress == 1.0 and value < 0):
            if callable(learning_rate):
                valid = f"it returns {value} at progress_remaining={progress}; {valid}"
            _fail("learning_rate", learning_rate, valid)


# -- constructor arguments -------------------------------------------------------------------------


def validate_policy(policy: Any, policy_aliases: Mapping[str, type[BasePolicy]]) -> None:
    """Check that ``policy`` is a known alias or a policy class.

    :param policy: the ``policy`` argument: ``"MlpPolicy"``-style name or a ``BasePolicy`` subclass.
    :param policy_aliases: the algorithm's ``policy_aliases``.
    """
    if isinstance(policy, str):
        if policy not in policy_aliases:
            _fail("policy", policy, f"use one of {sorted(policy_aliases)} or a policy class")
    elif not (isinstance(policy, type) and issubclass(policy, BasePolicy)):
        _fail(
            "policy",
            policy,
            f"use one of {sorted(policy_aliases)} or a subclass of stable_baselines3's BasePolicy (a class, not an "
            "instance)",
        )


#: values of ClippedPPO's ``normalize_advantage``: True/"minibatch" per minibatch, "batch" per rollout, False off
ADVANTAGE_NORMALIZATION_MODES = (True, False, "minibatch", "batch")


def validate_hyperparameters(
    *,
    learning_rate: Any = 3e-4,
    n_steps: Any = 2048,
    batch_size: Any = 64,
    n_epochs: Any = 10,
    gamma: Any = 0.99,
    gae_lambda: Any = 0.95,
    clip_range: Any = 0.2,
    clip_range_vf: Any = None,
    normalize_advantage: Any = True,
    ent_coef: Any = 0.0,
    vf_coef: Any = 0.5,
    max_grad_norm: Any = 0.5,
    target_kl: Any = None,
    stats_window_size: Any = 100,
    vf_clip_mode: Any = "max",
    valid_vf_clip_modes: tuple[str, ...] = ("max", "sb3"),
) -> None:
    """Check ClippedPPO's scalar arguments one by one; raise :class:`ConfigurationError` on the first bad one.

    The arguments mean what they mean in ``ClippedPPO.__init__``. Nothing here depends on the env;
    see :func:`validate_rollout_size` for the checks that need ``n_envs``.
    """
    _check_learning_rate(learning_rate)
    # SB3 asserts n_steps * n_envs > 1 (with advantage normalization); n_steps < 1 never collects anything
    _check_int("n_steps", n_steps, 1, "it must be an int >= 1 (steps per env per rollout)", assertion=True)
    _check_int(
        "batch_size",
        batch_size,
        1,
        "it must be an int >= 1 (and > 1 with normalize_advantage on)",
        assertion=True,
    )
    try:
        known_mode = normalize_advantage in ADVANTAGE_NORMALIZATION_MODES
    except (TypeError, ValueError):  # e.g. an array, whose truth value is ambiguous
        known_mode = False
    if not known_mode:
        _fail(
            "normalize_advantage",
            normalize_advantage,
            "use True or 'minibatch' (per minibatch), 'batch' (once per rollout) or False",
        )
    if normalize_advantage and batch_size == 1:
        _fail(
            "batch_size",
            batch_size,
            "it must be > 1 when normalize_advantage is on (a minibatch of one has no standard deviation)",
            "Raise batch_size or pass normalize_advantage=False.",
            error=ConfigurationAssertionError,
        )
    _check_int("n_epochs", n_epochs, 1, "it must be an int >= 1 (passes over each rollout)")
    _check_range("gamma", gamma, 0.0, 1.0, "the discount factor must be in [0, 1]", "0.99 is typical.")
    _check_range("gae_lambda", gae_lambda, 0.0, 1.0, "GAE's lambda must be in [0, 1]", "0.95 is typical.")
    _check_clip_schedule("clip_range", clip_range, sb3_asserts=False)
    if clip_range_vf is not None:
        _check_clip_schedule("clip_range_vf", clip_range_vf, sb3_asserts=True)
    _check_range("ent_coef", ent_coef, 0.0, math.inf, "the entropy coefficient must be a finite number >= 0")
    _check_range("vf_coef", vf_coef, 0.0, math.inf, "the value-loss coefficient must be a finite number >= 0")
    if max_grad_norm is not None:
        _check_range(
            "max_grad_norm",
            max_grad_norm,
            0.0,
            math.inf,
            "it must be > 0 (inf or None: no gradient clipping)",
            low_open=True,
            allow_inf=True,
        )
    if target_kl is not None:
        _check_range(
            "target_kl",
            target_kl,
            0.0,
            math.inf,
            "it must be > 0, or None for no early stopping",
            low_open=True,
            allow_inf=True,
        )
    _check_int("stats_window_size", stats_window_size, 0, "it must be an int >= 0 (episodes averaged in the logs)")
    if vf_clip_mode not in valid_vf_clip_modes:
        _fail("vf_clip_mode", vf_clip_mode, f"use one of {valid_vf_clip_modes}")


def validate_rollout_size(n_steps: int, n_envs: int, batch_size: int, normalize_advantage: Any) -> None:
    """Check the rollout size ``n_steps * n_envs`` against ``batch_size``: SB3's assertion, then clear warnings.

    :param n_steps: steps per env per rollout.
    :param n_envs: number of environments of the VecEnv.
    :param batch_size: minibatch size.
    :param normalize_advantage: the ``normalize_advantage`` argument.
    """
    buffer_size = n_steps * n_envs
    if normalize_advantage and buffer_size <= 1:
        raise ConfigurationAssertionError(
            f"n_steps * n_envs={buffer_size} is invalid (n_steps={n_steps}, n_envs={n_envs}): the rollout must hold "
            "more than 1 sample when normalize_advantage is on (one sample has no standard deviation). Raise n_steps "
            "or pass normalize_advantage=False."
        )
    if batch_size > buffer_size:
        warnings.warn(
            f"batch_size={batch_size} is larger than the rollout n_steps * n_envs = {buffer_size} (n_steps={n_steps}, "
            f"n_envs={n_envs}): every epoch will be a single minibatch of {buffer_size} samples. Lower batch_size or "
            "raise n_steps if that is not what you meant.",
            ConfigurationWarning,
            stacklevel=3,
        )
    elif buffer_size % batch_size > 0:
        warnings.warn(
            f"batch_size={batch_size} does not divide the rollout size n_steps * n_envs = {buffer_size} "
            f"(n_steps={n_steps}, n_envs={n_envs}): every epoch ends with a truncated minibatch of "
            f"{buffer_size % batch_size} samples. Prefer a batch_size that divides it.",
            ConfigurationWarning,
            stacklevel=3,
        )


# -- spaces ----------------------------------------------------------------------------------------

SUPPORTED_OBSERVATION_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)
SUPPORTED_ACTION_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)
_SPACE_NAMES = "Box, Discrete, MultiDiscrete, MultiBinary"


def _policy_name(policy: Any) -> str:
    return policy if isinstance(policy, str) else getattr(policy, "__name__", repr(policy))


def _check_observation_space(observation_space: spaces.Space, policy: Any) -> None:
    valid = f"ClippedPPO supports {_SPACE_NAMES} observations and a Dict of them (with MultiInputPolicy)"
    if isinstance(observation_space, spaces.Dict):
        for key, subspace in observation_space.spaces.items():
            if not isinstance(subspace, SUPPORTED_OBSERVATION_SPACES):
                _fail(
                    f"observation_space[{key!r}]",
                    subspace,
                    valid + " (no nesting)",
                    "Flatten it with gymnasium.wrappers.FlattenObservation or an observation wrapper of your own.",
                    error=UnsupportedSpaceError,
                )
        if isinstance(policy, str) and policy != "MultiInputPolicy":
            _fail("policy", policy, "Dict observations need policy='MultiInputPolicy'", error=ConfigurationError)
        return
    if not isinstance(observation_space, SUPPORTED_OBSERVATION_SPACES):
        hint = (
            "Flatten it with gymnasium.wrappers.FlattenObservation."
            if isinstance(observation_space, spaces.Tuple)
            else "Encode it into a Box (e.g. token ids or a fixed-size array) with an observation wrapper."
        )
        _fail("observation_space", observation_space, valid, hint, error=UnsupportedSpaceError)
    if policy == "MultiInputPolicy":
        _fail(
            "policy",
            policy,
            f"MultiInputPolicy needs a Dict observation space, got {observation_space}",
            "Use 'MlpPolicy' (or 'CnnPolicy' for images).",
        )


def _check_action_space(action_space: spaces.Space, use_sde: bool) -> None:
    if not isinstance(action_space, SUPPORTED_ACTION_SPACES):
        _fail(
            "action_space",
            action_space,
            f"ClippedPPO supports {_SPACE_NAMES} actions",
            "Wrap the env so that it takes one of these (e.g. flatten a Dict/Tuple of actions into a MultiDiscrete).",
            error=UnsupportedSpaceError,
        )
    if isinstance(action_space, spaces.Box):
        if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
            _fail(
                "action_space",
                action_space,
                "a Box action space needs finite low and high bounds (the Gaussian policy's actions are clipped to "
                "them)",
                "Declare finite bounds in the env, or wrap it in a gymnasium.ActionWrapper whose action_space is a "
                "bounded Box (e.g. Box(-1, 1)) and that scales actions to the env's range.",
                error=UnsupportedSpaceError,
            )
    elif use_sde:
        _fail("use_sde", use_sde, f"gSDE needs a Box action space, got {action_space}", error=ConfigurationError)
    if isinstance(action_space, spaces.MultiBinary) and len(action_space.shape) > 1:
        _fail(
            "action_space",
            action_space,
            "only one-dimensional MultiBinary action spaces are supported",
            "Flatten it to MultiBinary(n).",
            error=UnsupportedSpaceError,
        )
    if isinstance(action_space, spaces.MultiDiscrete) and action_space.nvec.ndim > 1:
        _fail(
            "action_space",
            action_space,
            "only one-dimensional MultiDiscrete action spaces are supported",
            "Flatten nvec to one dimension.",
            error=UnsupportedSpaceError,
        )


def validate_spaces(
    observation_space: spaces.Space, action_space: spaces.Space, *, policy: Any = "MlpPolicy", use_sde: bool = False
) -> None:
    """Check the env's spaces against what ClippedPPO and the chosen policy support.

    :param observation_space: the env's observation space.
    :param action_space: the env's action space.
    :param policy: the ``policy`` argument (alias or class).
    :param use_sde: the ``use_sde`` argument.
    """
    _check_observation_space(observation_space, policy)
    _check_action_space(action_space, use_sde)


def _uses_nature_cnn(policy: Any, policy_aliases: Mapping[str, type], policy_kwargs: Mapping[str, Any]) -> bool:
    policy_class = policy_aliases.get(policy) if isinstance(policy, str) else policy
    if "features_extractor_class" in policy_kwargs:
        return policy_kwargs["features_extractor_class"] is NatureCNN
    if not isinstance(policy_class, type):
        return False
    try:
        default = inspect.signature(policy_class.__init__).parameters.get("features_extractor_class")
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return False
    return default is not None and default.default is NatureCNN


def validate_image_observation(
    observation_space: spaces.Space,
    *,
    policy: Any,
    policy_aliases: Mapping[str, type],
    policy_kwargs: Mapping[str, Any] | None,
) -> None:
    """Check that a policy using NatureCNN (``CnnPolicy``) gets images NatureCNN can read.

    Call it with the observation space after SB3 wrapped the env (``VecTransposeImage`` makes uint8
    images channel-first). Mirrors SB3's own test in ``NatureCNN`` (``is_image_space``), which SB3
    reports with ``AssertionError``, and adds a size check for images too small for its convolutions.

    :param observation_space: the algorithm's observation space.
    :param policy: the ``policy`` argument.
    :param policy_aliases: the algorithm's ``policy_aliases``.
    :param policy_kwargs: the ``policy_kwargs`` argument.
    """
    policy_kwargs = policy_kwargs or {}
    if isinstance(observation_space, spaces.Dict) or not _uses_nature_cnn(policy, policy_aliases, policy_kwargs):
        return
    extractor_kwargs = policy_kwargs.get("features_extractor_kwargs") or {}
    # SB3's BaseModel: normalize_images=False tells NatureCNN that the images are already normalized
    normalized = policy_kwargs.get("normalize_images", True) is False or extractor_kwargs.get("normalized_image", False)
    name = _policy_name(policy)
    if not is_image_space(observation_space, check_channels=False, normalized_image=normalized):
        raise ConfigurationAssertionError(
            f"policy={name!r} is invalid for observation_space={observation_space}: its NatureCNN needs images, i.e. "
            "a 3-dimensional Box of dtype uint8 with bounds [0, 255] (or any 3-dimensional Box with "
            "policy_kwargs=dict(normalize_images=False) for images already scaled to [0, 1]). Use 'MlpPolicy' for "
            "vector observations."
        )
    height, width = observation_space.shape[1:]
    if min(height, width) < NATURE_CNN_MIN_SIZE:
        raise ConfigurationError(
            f"policy={name!r} is invalid for observation_space={observation_space}: NatureCNN reads channel-first "
            f"images (C, H, W) of at least {NATURE_CNN_MIN_SIZE}x{NATURE_CNN_MIN_SIZE} pixels, and this space gives "
            f"H={height}, W={width}. SB3 transposes channel-last uint8 images itself; transpose other images "
            "(VecTransposeImage), resize them, or pass your own features_extractor_class."
        )


# -- loaded models ---------------------------------------------------------------------------------


def space_mismatch_error(error: ValueError, path: Any) -> SpaceMismatchError | None:
    """Turn SB3's ``check_for_correct_spaces`` error into a :class:`SpaceMismatchError`, or return None.

    :param error: the ``ValueError`` raised by SB3's ``load``/``set_env``.
    :param path: the model file (or a description of the model) for the message.
    """
    text = str(error)
    for kind in ("Observation", "Action"):
        prefix = f"{kind} spaces do not match: "
        if text.startswith(prefix):
            model_space, _, env_space = text[len(prefix) :].partition(" != ")
            return SpaceMismatchError(
                f"env is invalid for {path}: its {kind.lower()} space is {env_space}, but the model was trained "
                f"with {model_space}. Give the model an env built exactly like its training env (same env id, "
                "wrappers such as VecFrameStack/VecTransposeImage/FlattenObservation and their settings), or load "
                "it without env for predict() only."
            )
    return None


def non_finite_summary(name: str, values: Any) -> str:
    """``"name: mean=.., std=.., min=.., max=.. (k of n non-finite)"`` for a tensor or array, ignoring NaN/inf."""
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64).ravel()
    finite = array[np.isfinite(array)]
    bad = array.size - finite.size
    if finite.size == 0:
        return f"{name}: all {array.size} non-finite"
    stats = f"{name}: mean={finite.mean():.4g}, std={finite.std():.4g}, min={finite.min():.4g}, max={finite.max():.4g}"
    return stats + (f" ({bad} of {array.size} non-finite)" if bad else f" (n={array.size})")


__all__ = [
    "ClippedPPOError",
    "ConfigurationAssertionError",
    "ConfigurationError",
    "ConfigurationWarning",
    "EnvWorkerError",
    "ModelFileError",
    "NonFiniteError",
    "NotAModelFileError",
    "SpaceMismatchError",
    "UnsupportedSpaceError",
    "check_schedule_value",
    "non_finite_summary",
    "space_mismatch_error",
    "validate_hyperparameters",
    "validate_image_observation",
    "validate_policy",
    "validate_rollout_size",
    "validate_spaces",
]
