"""Checks of ClippedPPO's arguments and spaces, run before the environment is stepped.

Each message names the argument, the value given and what would be valid. Inputs SB3's PPO trains
with stay accepted, except values that have no meaning for PPO and that SB3 trains on silently:
``gamma``/``gae_lambda`` outside [0, 1], negative ``ent_coef``/``vf_coef``, ``max_grad_norm <= 0``,
``target_kl <= 0`` and a non-positive or non-finite ``clip_range``/``clip_range_vf``. Inputs that are
only suspicious warn with :class:`~sb3_ppo_ext.errors.ConfigurationWarning`.

Where SB3 would raise or warn for the same input, our message contains SB3's text verbatim (a warning
starts with it, since ``warnings.filterwarnings`` matches the start) and the exception has SB3's type
too, so code and warning filters written against SB3 keep working. ``tests/test_sb3_messages.py``
checks those texts against SB3's source.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.save_util import recursive_getattr
from stable_baselines3.common.torch_layers import NatureCNN

from sb3_ppo_ext.distributions import SUPPORTED_ACTION_SPACES
from sb3_ppo_ext.errors import (
    ConfigurationAssertionError,
    ConfigurationError,
    ConfigurationWarning,
    ParameterMismatchError,
    SpaceMismatchError,
    UnsupportedSpaceError,
)
from sb3_ppo_ext.losses import VALUE_CLIP_MODES
from sb3_ppo_ext.masking import env_provides_masks, policy_applies_masks
from sb3_ppo_ext.rlhf.reference import DEFAULT_REF_KL_HORIZON

# -- what ClippedPPO supports ----------------------------------------------------------------------

#: observation spaces SB3's preprocessing reads; a Dict of them needs ``MultiInputPolicy``
SUPPORTED_OBSERVATION_SPACES: tuple[type[spaces.Space[Any]], ...] = (
    spaces.Box,
    spaces.Discrete,
    spaces.MultiDiscrete,
    spaces.MultiBinary,
)
SUPPORTED_ACTION_SPACE_NAMES = ", ".join(space.__name__ for space in SUPPORTED_ACTION_SPACES)
SUPPORTED_OBSERVATION_SPACE_NAMES = ", ".join(space.__name__ for space in SUPPORTED_OBSERVATION_SPACES)

#: values of ClippedPPO's ``normalize_advantage``: True/"minibatch" per minibatch, "batch" per rollout, False off
ADVANTAGE_NORMALIZATION_MODES = (True, False, "minibatch", "batch")

#: progress points at which schedules are checked at construction; 1 is the start of training, 0 the end
SCHEDULE_CHECK_POINTS = (1.0, 0.9, 0.75, 0.5, 0.25, 0.1, 0.01, 0.0)

#: NatureCNN's three convolutions (8/4, 4/2, 3/1) need at least 36 x 36 pixels
NATURE_CNN_MIN_SIZE = 36

# SB3 2.9's texts for inputs that we check before SB3 does, verbatim (placeholders filled as SB3's f-strings do)
_SB3_BATCH_SIZE = "`batch_size` must be greater than 1. See https://github.com/DLR-RM/stable-baselines3/issues/440"
_SB3_ROLLOUT_SIZE = "`n_steps * n_envs` must be greater than 1. Currently n_steps={n_steps} and n_envs={n_envs}"
_SB3_TRUNCATED_MINIBATCH = (
    "You have specified a mini-batch size of {batch_size}, but because the `RolloutBuffer` is of size "
    "`n_steps * n_envs = {buffer_size}`, after every {untruncated} untruncated mini-batches, there will be a "
    "truncated mini-batch of size {remainder}\nWe recommend using a `batch_size` that is a factor of "
    "`n_steps * n_envs`.\nInfo: (n_steps={n_steps} and n_envs={n_envs})"
)
_SB3_CLIP_RANGE_VF = "`clip_range_vf` must be positive, pass `None` to deactivate vf clipping"
_SB3_UNKNOWN_POLICY = "Policy {policy} unknown"
#: the policy names that read Dict observations
_MULTI_INPUT_POLICIES = ("MultiInputPolicy", "MultiInputLstmPolicy", "MultiInputGruPolicy")
_SB3_DICT_NEEDS_MULTI_INPUT = "You must use `MultiInputPolicy` when working with dict observation space, not {policy}"
_SB3_OBSERVATION_SPACE = "{space} observation space is not supported"
_SB3_NESTED_SPACE = "Nested observation spaces are not supported (Tuple/Dict space inside Tuple/Dict space)."
_SB3_ACTION_SPACE = "The algorithm only supports {supported} as action spaces but {space} was provided"
_SB3_UNBOUNDED_BOX = "Continuous action space must have a finite lower and upper bound"
_SB3_GSDE = "generalized State-Dependent Exploration (gSDE) can only be used with continuous actions."
_SB3_MULTIBINARY = "Multi-dimensional MultiBinary({n}) action space is not supported. You can flatten it instead."
_SB3_NATURE_CNN = "You should use NatureCNN only with images not with {space}"

# -- helpers ---------------------------------------------------------------------------------------


def _fail(
    name: str, value: Any, valid: str, hint: str = "", *, error: type[ConfigurationError] = ConfigurationError
) -> NoReturn:
    message = f"{name}={value!r} is invalid: {valid}"
    if not message.endswith("."):
        message += "."
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


# -- clip ranges and learning rate -----------------------------------------------------------------


def check_schedule_value(name: str, value: float, progress_remaining: float) -> float:
    """Check one clip-range value (a float or a schedule's output) and return it.

    While training runs (``progress_remaining > 0``) the value must be positive and finite. At the
    end (``progress_remaining <= 0``, reached by the last rollout, which usually overshoots
    ``total_timesteps``) an annealed schedule may reach 0 or slightly below, as RL Zoo's linear
    schedules do; SB3 trains through that and so do we.

    :param name: ``"clip_range"`` or ``"clip_range_vf"``.
    :param value: the value to check.
    :param progress_remaining: SB3's progress, 1 at the start of training and 0 at the end.
    :return: the value, as a float.
    :raises ConfigurationError: the value is not finite, or not positive while training runs.
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


def check_clip_range_vf(clip_range_vf: Any) -> None:
    """SB3's own check of ``clip_range_vf`` in ``PPO._setup_model``, with SB3's message and exception type.

    For values that reach ``_setup_model`` without :func:`validate_hyperparameters` (``load`` with saved
    values or ``custom_objects``): exactly as lenient as SB3, so whatever SB3 loads still loads.

    :param clip_range_vf: a number, a schedule or None; only a number that is not > 0 fails.
    :raises ConfigurationAssertionError: for a number that is not positive (NaN included).
    """
    if isinstance(clip_range_vf, (float, int)) and not clip_range_vf > 0:
        raise ConfigurationAssertionError(f"clip_range_vf={clip_range_vf!r} is invalid: {_SB3_CLIP_RANGE_VF}.")


def _check_clip_schedule(name: str, schedule: Any) -> None:
    if callable(schedule):
        for progress, value in _schedule_values(name, schedule, SCHEDULE_CHECK_POINTS):
            check_schedule_value(name, value, progress)
        return
    number = _as_float(name, schedule, "it must be a positive finite number or a schedule")
    if math.isfinite(number) and number > 0:
        return
    valid = "it must be a positive finite number (the epsilon of the clipping)"
    if name == "clip_range":  # SB3 does not check clip_range at all
        _fail(name, schedule, valid, "0.1 to 0.3 is typical.")
    if not number > 0:  # what SB3 asserts (NaN included)
        _fail(name, schedule, f"{_SB3_CLIP_RANGE_VF} ({valid})", error=ConfigurationAssertionError)
    # inf passes SB3 but clips nothing
    _fail(name, schedule, valid, "Pass None to turn value clipping off.", error=ConfigurationAssertionError)


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
            sb3 = _SB3_UNKNOWN_POLICY.format(policy=policy)
            _fail("policy", policy, f"{sb3}; use one of {sorted(policy_aliases)} or a policy class")
    elif not (isinstance(policy, type) and issubclass(policy, BasePolicy)):
        _fail(
            "policy",
            policy,
            f"use one of {sorted(policy_aliases)} or a subclass of stable_baselines3's BasePolicy (a class, not an "
            "instance)",
        )


def _check_normalize_advantage(normalize_advantage: Any) -> None:
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


def _check_batch_size(batch_size: Any, normalize_advantage: Any) -> None:
    if normalize_advantage and isinstance(batch_size, numbers.Real) and not batch_size > 1:
        _fail(
            "batch_size",
            batch_size,
            f"{_SB3_BATCH_SIZE} (with normalize_advantage on: a minibatch of one sample has no standard deviation)",
            "Raise batch_size or pass normalize_advantage=False.",
            error=ConfigurationAssertionError,
        )
    # SB3 only asserts the above; 0 or a float fails later inside its training loop
    _check_int("batch_size", batch_size, 1, "it must be an int >= 1", assertion=True)


def validate_hyperparameters(
    *,
    learning_rate: Any,
    n_steps: Any,
    batch_size: Any,
    n_epochs: Any,
    gamma: Any,
    gae_lambda: Any,
    clip_range: Any,
    clip_range_vf: Any,
    normalize_advantage: Any,
    ent_coef: Any,
    vf_coef: Any,
    max_grad_norm: Any,
    target_kl: Any,
    stats_window_size: Any,
    vf_clip_mode: Any,
) -> None:
    """Check ClippedPPO's scalar arguments one by one; raise :class:`ConfigurationError` on the first bad one.

    The arguments mean what they mean in ``ClippedPPO.__init__`` and have no defaults here, so that
    the defaults live in one place. Nothing here depends on the env; :func:`validate_rollout_size`
    runs the checks that need ``n_envs``.

    :param learning_rate: a finite number >= 0, or a schedule returning finite numbers.
    :param n_steps: an int >= 1.
    :param batch_size: an int >= 1 (> 1 with advantage normalisation on).
    :param n_epochs: an int >= 1.
    :param gamma: in [0, 1].
    :param gae_lambda: in [0, 1].
    :param clip_range: a positive finite number, or a schedule (:func:`check_schedule_value`).
    :param clip_range_vf: None, or as ``clip_range``.
    :param normalize_advantage: one of :data:`ADVANTAGE_NORMALIZATION_MODES`.
    :param ent_coef: a finite number >= 0.
    :param vf_coef: a finite number >= 0.
    :param max_grad_norm: None or a number > 0 (inf allowed).
    :param target_kl: None or a number > 0 (inf allowed).
    :param stats_window_size: an int >= 0.
    :param vf_clip_mode: ``"max"`` or ``"sb3"``.
    :raises ConfigurationError: the first argument that is invalid (SB3's assertions stay ``AssertionError`` too).
    """
    _check_learning_rate(learning_rate)
    _check_normalize_advantage(normalize_advantage)  # first: the checks below use its truth value
    # With normalization on, SB3 asserts n_steps * n_envs > 1 and names n_envs in its message, which is not
    # known yet: validate_rollout_size reports int n_steps < 1 then
    if not (normalize_advantage and isinstance(n_steps, numbers.Integral)):
        _check_int("n_steps", n_steps, 1, "it must be an int >= 1 (steps per env per rollout)", assertion=True)
    _check_batch_size(batch_size, normalize_advantage)
    _check_int("n_epochs", n_epochs, 1, "it must be an int >= 1 (passes over each rollout)")
    _check_range("gamma", gamma, 0.0, 1.0, "the discount factor must be in [0, 1]", "0.99 is typical.")
    _check_range("gae_lambda", gae_lambda, 0.0, 1.0, "GAE's lambda must be in [0, 1]", "0.95 is typical.")
    _check_clip_schedule("clip_range", clip_range)
    if clip_range_vf is not None:
        _check_clip_schedule("clip_range_vf", clip_range_vf)
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
    if vf_clip_mode not in VALUE_CLIP_MODES:
        _fail("vf_clip_mode", vf_clip_mode, f"use one of {VALUE_CLIP_MODES}")


def validate_rollout_size(n_steps: int, n_envs: int, batch_size: int, normalize_advantage: Any) -> None:
    """Check the rollout size ``n_steps * n_envs`` against ``batch_size``, as SB3's PPO does, in SB3's words.

    Raises SB3's assertion for a rollout of at most one sample with advantage normalization; warns
    (:class:`ConfigurationWarning`, starting with SB3's warning text) when ``batch_size`` does not
    divide the rollout.

    :param n_steps: steps per env per rollout.
    :param n_envs: number of environments of the VecEnv.
    :param batch_size: minibatch size, already checked by :func:`validate_hyperparameters`.
    :param normalize_advantage: the ``normalize_advantage`` argument.
    """
    buffer_size = n_steps * n_envs
    if normalize_advantage and buffer_size <= 1:
        raise ConfigurationAssertionError(
            f"n_steps * n_envs={buffer_size} is invalid: {_SB3_ROLLOUT_SIZE.format(n_steps=n_steps, n_envs=n_envs)} "
            "(with normalize_advantage on: one sample has no standard deviation). Raise n_steps or pass "
            "normalize_advantage=False."
        )
    remainder = buffer_size % batch_size
    if remainder == 0:
        return
    message = _SB3_TRUNCATED_MINIBATCH.format(
        batch_size=batch_size,
        buffer_size=buffer_size,
        untruncated=buffer_size // batch_size,
        remainder=remainder,
        n_steps=n_steps,
        n_envs=n_envs,
    )
    if batch_size > buffer_size:
        message += (
            f"\nbatch_size={batch_size} is larger than the rollout n_steps * n_envs = {buffer_size}: every epoch is "
            f"a single minibatch of {buffer_size} samples. Lower batch_size or raise n_steps if that is not what "
            "you meant."
        )
    # stacklevel 3: the user's ClippedPPO(...) call
    warnings.warn(message, ConfigurationWarning, stacklevel=3)


# -- spaces ----------------------------------------------------------------------------------------


def _check_observation_space(observation_space: spaces.Space[Any], policy: Any) -> None:
    valid = f"ClippedPPO supports {SUPPORTED_OBSERVATION_SPACE_NAMES} observations and a Dict of them"
    if isinstance(observation_space, spaces.Dict):
        for key, subspace in observation_space.spaces.items():
            if not isinstance(subspace, SUPPORTED_OBSERVATION_SPACES):
                reason = f"{valid} (no nesting)"
                if isinstance(subspace, (spaces.Dict, spaces.Tuple)):
                    reason = f"{_SB3_NESTED_SPACE} {reason}"
                _fail(
                    f"observation_space[{key!r}]",
                    subspace,
                    reason,
                    "Flatten it with gymnasium.wrappers.FlattenObservation or an observation wrapper of your own.",
                    error=UnsupportedSpaceError,
                )
        if isinstance(policy, str) and policy not in _MULTI_INPUT_POLICIES:
            sb3 = _SB3_DICT_NEEDS_MULTI_INPUT.format(policy=policy)
            _fail(
                "policy",
                policy,
                f"{sb3}: Dict observations need policy='MultiInputPolicy' (or 'MultiInputLstmPolicy' / "
                "'MultiInputGruPolicy')",
            )
        return
    if not isinstance(observation_space, SUPPORTED_OBSERVATION_SPACES):
        hint = (
            "Flatten it with gymnasium.wrappers.FlattenObservation."
            if isinstance(observation_space, spaces.Tuple)
            else "Encode it into a Box (e.g. token ids or a fixed-size array) with an observation wrapper."
        )
        sb3 = _SB3_OBSERVATION_SPACE.format(space=observation_space)
        _fail("observation_space", observation_space, f"{sb3}; {valid}", hint, error=UnsupportedSpaceError)
    if policy in _MULTI_INPUT_POLICIES:
        _fail(
            "policy",
            policy,
            f"{policy} needs a Dict observation space, got {observation_space}",
            "Use 'MlpPolicy' (or 'CnnPolicy' for images; 'MlpLstmPolicy' / 'CnnLstmPolicy' or 'MlpGruPolicy' / "
            "'CnnGruPolicy' with memory).",
        )


def _check_action_space(action_space: spaces.Space[Any], use_sde: bool) -> None:
    if not isinstance(action_space, SUPPORTED_ACTION_SPACES):
        sb3 = _SB3_ACTION_SPACE.format(supported=SUPPORTED_ACTION_SPACES, space=action_space)
        _fail(
            "action_space",
            action_space,
            f"{sb3}; ClippedPPO supports {SUPPORTED_ACTION_SPACE_NAMES} actions",
            "Wrap the env so that it takes one of these (e.g. flatten a Dict/Tuple of actions into a MultiDiscrete).",
            error=UnsupportedSpaceError,
        )
    if isinstance(action_space, spaces.Box):
        if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
            _fail(
                "action_space",
                action_space,
                f"{_SB3_UNBOUNDED_BOX}: a Box action space needs finite low and high bounds (the Gaussian "
                "policy's actions are clipped to them)",
                "Declare finite bounds in the env, or wrap it in a gymnasium.ActionWrapper whose action_space is a "
                "bounded Box (e.g. Box(-1, 1)) and that scales actions to the env's range.",
                error=UnsupportedSpaceError,
            )
    elif use_sde:
        _fail("use_sde", use_sde, f"{_SB3_GSDE} gSDE needs a Box action space, got {action_space}")
    if isinstance(action_space, spaces.MultiBinary) and len(action_space.shape) > 1:
        _fail(
            "action_space",
            action_space,
            f"{_SB3_MULTIBINARY.format(n=action_space.n)} Only one-dimensional MultiBinary action spaces are supported",
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
    observation_space: spaces.Space[Any],
    action_space: spaces.Space[Any],
    *,
    policy: Any = "MlpPolicy",
    use_sde: bool = False,
) -> None:
    """Check the env's spaces against what ClippedPPO and the chosen policy support.

    :param observation_space: the env's observation space.
    :param action_space: the env's action space.
    :param policy: the ``policy`` argument (alias or class).
    :param use_sde: the ``use_sde`` argument.
    """
    _check_observation_space(observation_space, policy)
    _check_action_space(action_space, use_sde)


def _init_default(cls: Any, name: str) -> Any:
    """The default of argument ``name`` of ``cls(...)``, or None if none is declared.

    Walks the MRO so that a subclass whose ``__init__`` forwards ``*args, **kwargs`` still shows its
    parent's default.
    """
    for klass in getattr(cls, "__mro__", ()):
        init = vars(klass).get("__init__")
        if init is None:
            continue
        try:
            parameter = inspect.signature(init).parameters.get(name)
        except (TypeError, ValueError):  # C-implemented __init__ without a signature
            continue
        if parameter is not None:
            return None if parameter.default is inspect.Parameter.empty else parameter.default
    return None


def _uses_nature_cnn(policy: Any, policy_aliases: Mapping[str, type], policy_kwargs: Mapping[str, Any]) -> bool:
    """Whether the policy will build a NatureCNN (or a subclass of it) as its features extractor."""
    if "features_extractor_class" in policy_kwargs:
        extractor = policy_kwargs["features_extractor_class"]
    else:
        policy_class = policy_aliases.get(policy) if isinstance(policy, str) else policy
        extractor = _init_default(policy_class, "features_extractor_class")
    return isinstance(extractor, type) and issubclass(extractor, NatureCNN)


def validate_image_observation(
    observation_space: spaces.Space[Any],
    *,
    policy: Any,
    policy_aliases: Mapping[str, type],
    policy_kwargs: Mapping[str, Any] | None,
) -> None:
    """Check that a policy using NatureCNN (``CnnPolicy``) gets images NatureCNN can read.

    Call it with the observation space after SB3 wrapped the env (``VecTransposeImage`` makes uint8
    images channel-first). Runs NatureCNN's own test (``is_image_space``), which SB3 asserts, and a
    size check for images too small for its convolutions.

    :param observation_space: the algorithm's observation space.
    :param policy: the ``policy`` argument.
    :param policy_aliases: the algorithm's ``policy_aliases``.
    :param policy_kwargs: the ``policy_kwargs`` argument.
    """
    policy_kwargs = policy_kwargs or {}
    if isinstance(observation_space, spaces.Dict) or not _uses_nature_cnn(policy, policy_aliases, policy_kwargs):
        return
    extractor_kwargs = policy_kwargs.get("features_extractor_kwargs") or {}
    # SB3's BaseModel passes normalized_image=True to NatureCNN when normalize_images is off
    normalized = not policy_kwargs.get("normalize_images", True) or bool(extractor_kwargs.get("normalized_image"))
    name = policy if isinstance(policy, str) else getattr(policy, "__name__", repr(policy))
    if not is_image_space(observation_space, check_channels=False, normalized_image=normalized):
        raise ConfigurationAssertionError(
            f"policy={name!r} is invalid for observation_space={observation_space}: "
            f"{_SB3_NATURE_CNN.format(space=observation_space)}. Its NatureCNN needs images, i.e. a 3-dimensional "
            "Box of dtype uint8 with bounds [0, 255] (or any 3-dimensional Box with "
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

    The message keeps SB3's text and adds which space is the env's and what to do.

    :param error: the ``ValueError`` raised by SB3's ``load``/``set_env``.
    :param path: the model file (or a description of the model) for the message.
    :return: the clearer error, or None when ``error`` is not a space mismatch.
    """
    text = str(error)
    for kind in ("Observation", "Action"):
        prefix = f"{kind} spaces do not match: "
        if text.startswith(prefix):
            model_space, _, env_space = text[len(prefix) :].partition(" != ")
            return SpaceMismatchError(
                f"env is invalid for {path}: {text}. Its {kind.lower()} space is {env_space}, but the model was "
                f"trained with {model_space}. Give the model an env built exactly like its training env (same env "
                "id, wrappers such as VecFrameStack/VecTransposeImage/FlattenObservation and their settings), or "
                "load it without env for predict() only."
            )
    return None


__all__ = [
    "ADVANTAGE_NORMALIZATION_MODES",
    "NATURE_CNN_MIN_SIZE",
    "SCHEDULE_CHECK_POINTS",
    "SUPPORTED_ACTION_SPACES",
    "SUPPORTED_ACTION_SPACE_NAMES",
    "SUPPORTED_OBSERVATION_SPACES",
    "SUPPORTED_OBSERVATION_SPACE_NAMES",
    "check_clip_range_vf",
    "check_parameters",
    "check_schedule_value",
    "space_mismatch_error",
    "validate_hyperparameters",
    "validate_image_observation",
    "validate_policy",
    "validate_policy_and_buffer",
    "validate_rollout_size",
    "validate_spaces",
    "validate_stabilizers",
    "warn_inactive_settings",
]


def validate_stabilizers(
    *,
    dual_clip: Any,
    rpo_alpha: Any,
    adaptive_lr_kl: Any,
    adaptive_lr_every: Any,
    adaptive_lr_bounds: Any,
    normalize_value_targets: Any,
    popart: Any,
    action_space: spaces.Space[Any] | None,
    use_sde: bool,
) -> None:
    """Check the stabiliser arguments (dual clip, RPO, KL-adaptive learning rate, value normalisation).

    The arguments are ``ClippedPPO``'s; each is checked only when its feature is on.

    :param dual_clip: None, or a finite float > 1.
    :param rpo_alpha: None, or in (0, 1], for Box actions without gSDE.
    :param adaptive_lr_kl: None, or a finite float > 0.
    :param adaptive_lr_every: ``"epoch"`` or ``"minibatch"``.
    :param adaptive_lr_bounds: ``(min_lr, max_lr)`` with ``0 < min_lr <= max_lr``, both finite.
    :param normalize_value_targets: not checked (read as a truth value).
    :param popart: not checked here: without ``normalize_value_targets`` it only warns
        (:func:`warn_inactive_settings`).
    :param action_space: the env's action space, or None when not known yet (RPO's check then waits).
    :param use_sde: whether the model uses gSDE.
    :raises ConfigurationError: the first invalid setting.
    """
    if dual_clip is not None:
        _check_range(
            "dual_clip", dual_clip, 1.0, math.inf, "c must be a finite float > 1 (Ye et al. use 3)", low_open=True
        )
    if rpo_alpha is not None:
        _check_range(
            "rpo_alpha", rpo_alpha, 0.0, 1.0, "alpha must be in (0, 1] (CleanRL's RPO uses 0.5)", low_open=True
        )
        if action_space is not None and (not isinstance(action_space, spaces.Box) or use_sde):
            _fail(
                "rpo_alpha",
                rpo_alpha,
                f"RPO perturbs the mean of Gaussian actions; this model has {action_space} actions"
                + (" with gSDE" if use_sde else ""),
                "Use it with Box actions and use_sde=False, or pass rpo_alpha=None.",
            )
    if adaptive_lr_kl is not None:
        _check_range(
            "adaptive_lr_kl", adaptive_lr_kl, 0.0, math.inf, "the target KL must be a finite float > 0", low_open=True
        )
        if adaptive_lr_every not in ("epoch", "minibatch"):
            _fail("adaptive_lr_every", adaptive_lr_every, "pass 'epoch' or 'minibatch'")
        bounds = tuple(adaptive_lr_bounds) if isinstance(adaptive_lr_bounds, (tuple, list)) else ()
        if (
            len(bounds) != 2
            or not all(isinstance(b, numbers.Real) and 0 < b < math.inf for b in bounds)
            or bounds[0] > bounds[1]
        ):
            _fail("adaptive_lr_bounds", adaptive_lr_bounds, "pass (min_lr, max_lr) with 0 < min_lr <= max_lr")
    # popart without normalize_value_targets does nothing: warn_inactive_settings says so


def validate_policy_and_buffer(policy_class: Any, buffer_class: Any, env: Any, *, recurrent: bool) -> None:
    """A recurrent policy needs a buffer that stores LSTM states; an env with masks needs a policy that applies them.

    :param policy_class: the model's policy class.
    :param buffer_class: the model's rollout buffer class.
    :param env: the model's env (None: no masks to check).
    :param recurrent: whether the policy is recurrent.
    :raises ConfigurationError: the buffer cannot store LSTM states, or the policy cannot apply the env's masks.
    """
    if recurrent and "lstm_states" not in inspect.signature(buffer_class.add).parameters:
        raise ConfigurationError(
            f"rollout_buffer_class={buffer_class.__name__} cannot store the LSTM states a recurrent policy needs (its "
            "add() has no lstm_states argument). Use ClippedPPO's default buffer "
            "(sb3_ppo_ext.recurrent.buffers.RecurrentGAERolloutBuffer)."
        )
    if env_provides_masks(env) and not policy_applies_masks(policy_class):
        # sampling without the masks would take invalid actions (sb3-contrib raises here too)
        raise ConfigurationError(
            f"policy={policy_class.__name__} cannot apply the invalid-action masks this env provides (its forward() "
            "has no action_masks argument). Use 'MlpPolicy'/'CnnPolicy'/'MultiInputPolicy' (or a subclass of "
            "sb3_ppo_ext.ActorCriticPolicy), or remove the env's action_masks() method."
        )


# -- settings whose feature is off -----------------------------------------------------------------

#: ClippedPPO's defaults of the settings that only matter when another switch turns their feature on
#: (``tests/test_reliability_inputs.py`` checks them against ``ClippedPPO.__init__``)
INACTIVE_SETTING_DEFAULTS: dict[str, Any] = {
    "ref_kl_coef": None,
    "ref_kl_mode": "reward",
    "ref_kl_target": None,
    "ref_kl_horizon": DEFAULT_REF_KL_HORIZON,
    "adaptive_lr_every": "epoch",
    "adaptive_lr_bounds": (1e-5, 1e-2),
    "popart": False,
}


def _differs(name: str, value: Any) -> bool:
    default = INACTIVE_SETTING_DEFAULTS[name]
    try:
        if isinstance(default, tuple) and isinstance(value, (tuple, list)):
            return tuple(value) != default
        return bool(value != default)
    except (TypeError, ValueError):  # e.g. an array, whose truth value is ambiguous
        return True


def inactive_settings(settings: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The settings given a non-default value that do nothing because their feature is off.

    :param settings: ClippedPPO's keyword arguments by name (missing ones count as their defaults).
    :return: ``(setting, what turns its feature on)`` pairs, in the order of ClippedPPO's arguments.
    """
    found = []
    reference = settings.get("ref_policy") is not None
    coef = settings.get("ref_kl_coef")
    adaptive_beta = isinstance(coef, str) and coef == "adaptive"
    for name in ("ref_kl_coef", "ref_kl_mode", "ref_kl_target", "ref_kl_horizon"):
        if name not in settings or not _differs(name, settings[name]):
            continue
        if not reference:
            found.append((name, "ref_policy=<a trained model, its policy or a saved model's path> (the reference KL)"))
        elif name in ("ref_kl_target", "ref_kl_horizon") and not adaptive_beta:
            found.append((name, "ref_kl_coef='adaptive' (the adaptive KL controller)"))
    if settings.get("adaptive_lr_kl") is None:
        for name in ("adaptive_lr_every", "adaptive_lr_bounds"):
            if name in settings and _differs(name, settings[name]):
                found.append((name, "adaptive_lr_kl=<a target KL, e.g. 0.01> (the KL-adaptive learning rate)"))
    if settings.get("popart") and not settings.get("normalize_value_targets"):
        found.append(("popart", "normalize_value_targets=True (value-target normalisation, which PopArt rescales)"))
    return found


def warn_inactive_settings(settings: Mapping[str, Any], *, stacklevel: int = 2) -> list[str]:
    """Warn (:class:`~sb3_ppo_ext.errors.ConfigurationWarning`) once per setting that does nothing: its feature is off.

    E.g. ``ref_kl_coef`` without ``ref_policy``, ``adaptive_lr_bounds`` without ``adaptive_lr_kl``, ``popart``
    without ``normalize_value_targets``. The message names the setting, its value and the switch that turns
    its feature on. ``configure_features`` calls it with ClippedPPO's arguments.

    :param settings: ClippedPPO's keyword arguments by name; other keys are ignored.
    :param stacklevel: passed to ``warnings.warn`` (the default points at the caller of this function).
    :return: the names of the settings warned about.
    """
    names = []
    for name, switch in inactive_settings(settings):
        warnings.warn(
            f"{name}={settings[name]!r} has no effect: its feature is off. Pass {switch} to turn it on, or leave "
            f"{name} at its default ({INACTIVE_SETTING_DEFAULTS[name]!r}).",
            ConfigurationWarning,
            stacklevel=stacklevel,
        )
        names.append(name)
    return names


# -- parameters given to set_parameters / load ------------------------------------------------------

#: entries listed per kind of problem before "and N more"
_LISTED_ENTRIES = 8


def _listed(entries: list[str]) -> str:
    shown = ", ".join(entries[:_LISTED_ENTRIES])
    return shown + (f" and {len(entries) - _LISTED_ENTRIES} more" if len(entries) > _LISTED_ENTRIES else "")


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, th.Tensor) else None


def _described(value: Any) -> str:
    """A given state-dict value for a message: its shape, or its type when it is no tensor."""
    shape = _shape(value)
    return type(value).__name__ if shape is None else str(shape)


def _module_problems(name: str, module: th.nn.Module, given: Mapping[str, Any], exact_match: bool) -> list[str]:
    """What keeps ``module.load_state_dict(given, strict=exact_match)`` from loading all of ``given``."""
    own = module.state_dict()
    problems = []
    if exact_match:
        missing = [key for key in own if key not in given]
        unexpected = [key for key in given if key not in own]
        if missing:  # torch's wording, which SB3's load() looks for to load models saved by SB3 < 1.7
            problems.append(f"Missing key(s) in state_dict of {name!r}: {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected key(s) in state_dict of {name!r}: {_listed(unexpected)}")
    mismatched = [
        f"{key} {_described(value)} (the model's {tuple(own[key].shape)})"
        for key, value in given.items()
        if isinstance(own.get(key), th.Tensor) and _shape(value) != tuple(own[key].shape)
    ]
    if mismatched:
        problems.append(f"shape mismatch in {name!r}: {_listed(mismatched)}")
    return problems


def _optimizer_problems(name: str, optimizer: th.optim.Optimizer, given: Mapping[str, Any]) -> list[str]:
    """What would make ``optimizer.load_state_dict(given)`` fail, or load moments of the wrong shapes."""
    groups, state = given.get("param_groups"), given.get("state")
    if not isinstance(groups, list) or not isinstance(state, Mapping):
        return [f"{name!r} is not an optimizer state_dict (it needs 'state' and 'param_groups')"]
    own_groups = optimizer.param_groups
    sizes, own_sizes = [len(group.get("params", ())) for group in groups], [len(g["params"]) for g in own_groups]
    if sizes != own_sizes:
        return [f"{name!r} holds parameter groups of sizes {sizes}, the model's optimizer {own_sizes}"]
    # torch pairs saved and current parameters by position; it checks no shape of the moments (Adam's exp_avg...)
    saved_ids = [index for group in groups for index in group["params"]]
    params = [param for group in own_groups for param in group["params"]]
    mismatched = []
    for position, (saved_id, param) in enumerate(zip(saved_ids, params, strict=True)):
        for key, value in (state.get(saved_id) or {}).items():
            if isinstance(value, th.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                mismatched.append(
                    f"{key} of parameter {position} {tuple(value.shape)} (the parameter's {tuple(param.shape)})"
                )
    return [f"shape mismatch in {name!r}: {_listed(mismatched)}"] if mismatched else []


def check_parameters(model: Any, params: Any, exact_match: bool = True, *, optional: Sequence[str] = ()) -> None:
    """Check that ``model.set_parameters(params, exact_match)`` can load every entry; nothing is changed here.

    Every problem is collected, then reported in one :class:`~sb3_ppo_ext.errors.ParameterMismatchError`:
    unknown object names, and with ``exact_match`` missing objects and missing or unexpected keys; shape
    mismatches of module tensors and optimizer moments in any case.

    :param model: an SB3 algorithm.
    :param params: ``{object name: state_dict}``, as ``get_parameters()`` returns and a model file holds.
    :param exact_match: SB3's meaning: every object and key of the model must be given, and nothing else.
    :param optional: objects that may be left out even with ``exact_match`` (a frozen reference policy).
    """
    if not isinstance(params, Mapping):
        raise ParameterMismatchError(
            f"set_parameters() needs a path or a dict {{object name: state_dict}} as get_parameters() returns; got "
            f"a {type(params).__name__}."
        )
    expected = list(model._get_torch_save_params()[0])
    problems = []
    for name, given in params.items():
        try:
            target = recursive_getattr(model, name)
        except Exception:  # SB3 catches anything here too: KeyError, AttributeError...
            target = None
        if exact_match and name not in expected or not isinstance(target, (th.nn.Module, th.optim.Optimizer)):
            hint = " (a frozen reference this model has none of: leave it out)" if name == "ref_policy" else ""
            problems.append(f"unexpected object {name!r}{hint} (the model's are {expected})")
        elif not isinstance(given, Mapping):
            problems.append(f"{name!r} is a {type(given).__name__}, not a state_dict")
        elif isinstance(target, th.optim.Optimizer):
            problems.extend(_optimizer_problems(name, target, given))
        else:
            problems.extend(_module_problems(name, target, given, exact_match))
    missing = [name for name in expected if name not in params and name not in optional]
    if exact_match and missing:
        problems.append(f"missing object(s) {missing}")
    if problems:
        raise ParameterMismatchError(
            "The parameters do not fit this model, so none were loaded (the model is unchanged): "
            + "; ".join(problems)
            + ". Load parameters saved from a model with the same policy class and policy_kwargs (net_arch, "
            "lstm_hidden_size...), or pass exact_match=False to load a subset of objects and keys."
        )
