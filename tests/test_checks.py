"""sb3_ppo_ext.reliability.checks: bad configuration fails fast with a clear error; what SB3's PPO accepts works."""

from __future__ import annotations

import inspect
import math
import re
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import TINY
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.torch_layers import FlattenExtractor, NatureCNN
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from sb3_ppo_ext import ClippedPPO, policies, ppo
from sb3_ppo_ext.errors import (
    ClippedPPOError,
    ConfigurationAssertionError,
    ConfigurationError,
    ConfigurationWarning,
    SpaceMismatchError,
    UnsupportedSpaceError,
)
from sb3_ppo_ext.policies import ActorCriticCnnPolicy
from sb3_ppo_ext.reliability.checks import (
    SUPPORTED_ACTION_SPACE_NAMES,
    SUPPORTED_ACTION_SPACES,
    check_clip_range_vf,
    check_schedule_value,
    validate_hyperparameters,
    validate_image_observation,
)
from sb3_ppo_ext.schedules import linear

BOX3 = spaces.Box(-1, 1, (3,), np.float32)
FLOAT_IMAGES = spaces.Box(0, 1, (3, 36, 36), np.float32)
TWO_ACTIONS = spaces.Discrete(2)


class SpaceEnv(gym.Env):
    """An env with any spaces that counts its reset and step calls (to prove errors come before them)."""

    resets = 0
    steps = 0

    def __init__(self, observation_space: spaces.Space = BOX3, action_space: spaces.Space = TWO_ACTIONS):
        self.observation_space = observation_space
        self.action_space = action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        SpaceEnv.resets += 1
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        SpaceEnv.steps += 1
        return self.observation_space.sample(), 0.0, False, False, {}


# (id, constructor kwargs, expected error class, text the message must contain)
BAD_ARGUMENTS = [
    ("batch_size=0", dict(batch_size=0), ConfigurationAssertionError, "batch_size=0"),
    ("batch_size=-4", dict(batch_size=-4, normalize_advantage=False), ConfigurationAssertionError, "batch_size=-4"),
    ("batch_size=1+norm", dict(batch_size=1), ConfigurationAssertionError, "batch_size=1"),
    ("batch_size=float", dict(batch_size=8.0), ConfigurationAssertionError, "batch_size=8.0"),
    ("n_steps*n_envs=1+norm", dict(n_steps=1, batch_size=2), ConfigurationAssertionError, "n_steps * n_envs=1"),
    ("n_steps=0", dict(n_steps=0, normalize_advantage=False), ConfigurationAssertionError, "n_steps=0"),
    ("n_epochs=0", dict(n_epochs=0), ConfigurationError, "n_epochs=0"),
    ("clip_range=0", dict(clip_range=0.0), ConfigurationError, "clip_range=0.0"),
    ("clip_range=-0.2", dict(clip_range=-0.2), ConfigurationError, "clip_range=-0.2"),
    ("clip_range=inf", dict(clip_range=math.inf), ConfigurationError, "clip_range=inf"),
    ("clip_range=nan", dict(clip_range=math.nan), ConfigurationError, "clip_range=nan"),
    ("clip_range_vf=0", dict(clip_range_vf=0.0), ConfigurationAssertionError, "clip_range_vf=0.0"),
    ("clip_range_vf=-1", dict(clip_range_vf=-1), ConfigurationAssertionError, "clip_range_vf=-1"),
    ("clip_range_vf=nan", dict(clip_range_vf=math.nan), ConfigurationAssertionError, "clip_range_vf=nan"),
    ("clip_schedule<=0", dict(clip_range=lambda p: p - 0.5), ConfigurationError, "progress_remaining=0.5"),
    ("clip_schedule_raises", dict(clip_range=lambda p: 1 / 0), ConfigurationError, "ZeroDivisionError"),
    ("gamma=1.5", dict(gamma=1.5), ConfigurationError, "gamma=1.5"),
    ("gamma=-0.1", dict(gamma=-0.1), ConfigurationError, "gamma=-0.1"),
    ("gamma=nan", dict(gamma=math.nan), ConfigurationError, "gamma=nan"),
    ("gamma=str", dict(gamma="0.99"), ConfigurationError, "gamma='0.99'"),
    ("gae_lambda=1.01", dict(gae_lambda=1.01), ConfigurationError, "gae_lambda=1.01"),
    ("ent_coef<0", dict(ent_coef=-0.01), ConfigurationError, "ent_coef=-0.01"),
    ("vf_coef<0", dict(vf_coef=-0.5), ConfigurationError, "vf_coef=-0.5"),
    ("vf_coef=inf", dict(vf_coef=math.inf), ConfigurationError, "vf_coef=inf"),
    ("max_grad_norm=0", dict(max_grad_norm=0.0), ConfigurationError, "max_grad_norm=0.0"),
    ("max_grad_norm<0", dict(max_grad_norm=-1.0), ConfigurationError, "max_grad_norm=-1.0"),
    ("target_kl=0", dict(target_kl=0.0), ConfigurationError, "target_kl=0.0"),
    ("target_kl<0", dict(target_kl=-0.01), ConfigurationError, "target_kl=-0.01"),
    ("learning_rate<0", dict(learning_rate=-3e-4), ConfigurationError, "learning_rate=-0.0003"),
    ("learning_rate=nan", dict(learning_rate=math.nan), ConfigurationError, "learning_rate=nan"),
    ("lr_schedule=inf", dict(learning_rate=lambda p: math.inf), ConfigurationError, "returns inf"),
    ("stats_window_size<0", dict(stats_window_size=-1), ConfigurationError, "stats_window_size=-1"),
    ("normalize_advantage", dict(normalize_advantage="epoch"), ConfigurationError, "normalize_advantage='epoch'"),
    ("vf_clip_mode", dict(vf_clip_mode="min"), ConfigurationError, "vf_clip_mode='min'"),
    ("unknown policy", dict(policy="MLPPolicy"), ConfigurationError, "policy='MLPPolicy'"),
    ("policy instance", dict(policy=object()), ConfigurationError, "policy=<object"),
]


def make(policy: Any = "MlpPolicy", env: Any = None, **kwargs: Any) -> ClippedPPO:
    kwargs = {**TINY, **kwargs}
    return ClippedPPO(policy, SpaceEnv() if env is None else env, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "text"), [case[1:] for case in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS]
)
def test_bad_argument_fails_before_any_env_call_with_a_clear_message(kwargs, error, text) -> None:
    SpaceEnv.resets = SpaceEnv.steps = 0
    with pytest.raises(error) as caught:
        make(**kwargs)
    assert isinstance(caught.value, (ClippedPPOError, ValueError))
    message = str(caught.value)
    assert text in message
    assert "invalid" in message  # and it says what would be valid
    assert SpaceEnv.resets == 0 and SpaceEnv.steps == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(batch_size=0),
        dict(batch_size=1),
        dict(n_steps=1, batch_size=2),
        dict(clip_range_vf=0.0),
        dict(clip_range_vf=-0.3),
        dict(env=SpaceEnv(action_space=spaces.Box(-np.inf, np.inf, (2,), np.float32))),
        dict(env=SpaceEnv(action_space=spaces.MultiBinary((2, 2)))),
        dict(env=SpaceEnv(action_space=spaces.Tuple((spaces.Discrete(2), spaces.Discrete(2))))),
        dict(policy="CnnPolicy"),
    ],
    ids=["batch0", "batch1", "rollout1", "vf0", "vf-neg", "inf-box", "multibinary-2d", "tuple-action", "cnn-vector"],
)
def test_where_sb3_asserts_we_raise_an_assertion_error_too(kwargs) -> None:
    sb3_kwargs = dict(kwargs)
    policy = sb3_kwargs.pop("policy", "MlpPolicy")
    env = sb3_kwargs.pop("env", None) or SpaceEnv()
    with pytest.raises(AssertionError):
        PPO(policy, env, **{**TINY, **sb3_kwargs})
    with pytest.raises(AssertionError) as caught:
        make(**kwargs)
    assert isinstance(caught.value, ConfigurationError)


# -- spaces ------------------------------------------------------------------------------------------------

UNSUPPORTED_SPACES = [
    ("obs Text", dict(observation_space=spaces.Text(5)), "observation_space=Text"),
    ("obs Graph", dict(observation_space=spaces.Graph(BOX3, None)), "observation_space=Graph"),
    ("obs Sequence", dict(observation_space=spaces.Sequence(BOX3)), "observation_space=Sequence"),
    ("obs Tuple", dict(observation_space=spaces.Tuple((BOX3, BOX3))), "FlattenObservation"),
    ("obs OneOf", dict(observation_space=spaces.OneOf((BOX3, spaces.Discrete(2)))), "observation_space=OneOf"),
    ("action Text", dict(action_space=spaces.Text(5)), "action_space=Text"),
    ("action Dict", dict(action_space=spaces.Dict(a=spaces.Discrete(2))), "action_space=Dict"),
    ("action inf Box", dict(action_space=spaces.Box(-np.inf, np.inf, (2,), np.float32)), "finite low and high"),
    (
        "action half-inf Box",
        dict(action_space=spaces.Box(np.array([-1, -np.inf], np.float32), np.array([1, 1], np.float32))),
        "finite low and high",
    ),
    ("action MultiBinary 2d", dict(action_space=spaces.MultiBinary((2, 2))), "one-dimensional MultiBinary"),
    ("action MultiDiscrete 2d", dict(action_space=spaces.MultiDiscrete([[2, 3], [2, 2]])), "one-dimensional"),
]


@pytest.mark.parametrize(
    ("spaces_kwargs", "text"), [c[1:] for c in UNSUPPORTED_SPACES], ids=[c[0] for c in UNSUPPORTED_SPACES]
)
def test_unsupported_spaces_are_named_and_catchable_as_sb3_errors(spaces_kwargs, text) -> None:
    SpaceEnv.resets = SpaceEnv.steps = 0
    with pytest.raises(UnsupportedSpaceError, match=re.escape(text)) as caught:
        make(env=SpaceEnv(**spaces_kwargs))
    # SB3 raises AssertionError (actions) or NotImplementedError (observations) for these
    assert isinstance(caught.value, (AssertionError, NotImplementedError, ValueError))
    assert "is invalid" in str(caught.value)
    assert SpaceEnv.resets == 0 and SpaceEnv.steps == 0


def test_nested_dict_observations_are_rejected() -> None:
    env = SpaceEnv(observation_space=spaces.Dict(a=spaces.Dict(b=BOX3)))
    with pytest.raises(UnsupportedSpaceError, match=r"observation_space\['a'\]=Dict"):
        make("MultiInputPolicy", env=env)


@pytest.mark.parametrize(
    ("policy", "observation_space", "error", "text"),
    [
        ("CnnPolicy", BOX3, ConfigurationAssertionError, "NatureCNN needs images"),
        ("CnnPolicy", spaces.Box(0, 1, (36, 36, 3), np.float32), ConfigurationAssertionError, "uint8"),
        ("CnnPolicy", spaces.Box(0, 255, (8, 8, 3), np.uint8), ConfigurationError, "at least 36x36"),
        ("MultiInputPolicy", BOX3, ConfigurationError, "needs a Dict observation space"),
        ("MlpPolicy", spaces.Dict(a=BOX3), ConfigurationError, "MultiInputPolicy"),
    ],
    ids=["cnn-vector", "cnn-float-image", "cnn-small-image", "multiinput-box", "mlp-dict"],
)
def test_policy_that_cannot_read_the_observations(policy, observation_space, error, text) -> None:
    with pytest.raises(error, match=re.escape(text)) as caught:
        make(policy, env=SpaceEnv(observation_space=observation_space))
    assert f"policy={policy!r}" in str(caught.value)


def test_use_sde_with_discrete_actions_names_the_argument() -> None:
    with pytest.raises(ConfigurationError, match=r"use_sde=True is invalid: .*gSDE needs a Box action space"):
        make(use_sde=True)


def test_env_with_other_spaces_than_a_loaded_model(tmp_path) -> None:
    make().save(tmp_path / "model")
    other = SpaceEnv(observation_space=spaces.Box(-1, 1, (5,), np.float32))
    with pytest.raises(SpaceMismatchError, match=r"observation space is Box\(-1.0, 1.0, \(5,\), float32\)") as caught:
        ClippedPPO.load(tmp_path / "model", env=other)
    assert isinstance(caught.value, ValueError)  # what SB3 raises
    assert "trained with Box(-1.0, 1.0, (3,), float32)" in str(caught.value)
    with pytest.raises(SpaceMismatchError, match="action space is Discrete\\(3\\)"):
        ClippedPPO.load(tmp_path / "model", env=SpaceEnv(action_space=spaces.Discrete(3)))
    loaded = ClippedPPO.load(tmp_path / "model")
    with pytest.raises(SpaceMismatchError, match="this model"):
        loaded.set_env(DummyVecEnv([lambda: other]))


def test_load_accepts_rl_zoo_custom_objects_for_inference(tmp_path) -> None:
    """RL Zoo's enjoy.py loads with clip_range and learning rate replaced by zero schedules, as SB3 allows."""
    make(clip_range=linear(0.2)).save(tmp_path / "model")
    custom_objects = {"learning_rate": 0.0, "lr_schedule": lambda _: 0.0, "clip_range": lambda _: 0.0}
    model = ClippedPPO.load(tmp_path / "model", custom_objects=custom_objects)
    assert model.predict(np.zeros(3, np.float32))[0] in (0, 1)


# -- what SB3 accepts keeps working ------------------------------------------------------------------------

ACCEPTED = [
    ("batch_size=1 without normalization", dict(batch_size=1, normalize_advantage=False)),
    ("n_steps=1 without normalization", dict(n_steps=1, batch_size=1, normalize_advantage=False)),
    ("numpy ints", dict(n_steps=np.int64(8), batch_size=np.int32(4), n_epochs=np.int16(1))),
    ("numpy floats", dict(gamma=np.float32(0.9), clip_range=np.float64(0.1), learning_rate=np.float64(1e-3))),
    ("normalize_advantage=1", dict(normalize_advantage=1)),
    ("normalize_advantage=np.True_", dict(normalize_advantage=np.True_)),
    ("gamma and lambda at the bounds", dict(gamma=1.0, gae_lambda=0.0)),
    ("gamma=0, lambda=1", dict(gamma=0.0, gae_lambda=1.0)),
    ("learning_rate=0", dict(learning_rate=0.0)),
    ("max_grad_norm=None", dict(max_grad_norm=None)),
    ("max_grad_norm=inf", dict(max_grad_norm=math.inf)),
    ("target_kl large", dict(target_kl=1e9)),
    ("stats_window_size=0", dict(stats_window_size=0)),
    ("ent_coef and vf_coef zero", dict(ent_coef=0.0, vf_coef=0.0)),
    ("huge clip_range", dict(clip_range=1e6, clip_range_vf=1e6)),
    ("clip schedules annealed to 0", dict(clip_range=linear(0.2), clip_range_vf=linear(1.0))),
    ("RL Zoo linear schedule overshooting below 0", dict(clip_range=lambda p: 0.2 * p)),
    ("Discrete(start=1) actions", dict(env=SpaceEnv(action_space=spaces.Discrete(3, start=1)))),
    ("int Box actions", dict(env=SpaceEnv(action_space=spaces.Box(-3, 3, (2,), np.int64)))),
    ("infinite observation bounds", dict(env=SpaceEnv(observation_space=spaces.Box(-np.inf, np.inf, (3,))))),
    ("2-d Box actions", dict(env=SpaceEnv(action_space=spaces.Box(-1, 1, (2, 2), np.float32)))),
    (
        "float images, normalize_images=False",
        dict(
            policy="CnnPolicy",
            env=SpaceEnv(observation_space=spaces.Box(0, 1, (3, 36, 36), np.float32)),
            policy_kwargs=dict(normalize_images=False),
        ),
    ),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_inputs_sb3_trains_with_are_accepted_and_train(kwargs) -> None:
    kwargs = {"n_steps": 8, "batch_size": 4, "n_epochs": 1, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = make(**kwargs)
        model.learn(20)  # three rollouts: the last one overshoots total_timesteps (progress < 0)
    assert model.num_timesteps >= 20
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


# -- suspicious but valid: warnings ------------------------------------------------------------------------


def test_batch_size_larger_than_the_rollout_warns_clearly() -> None:
    with pytest.warns(ConfigurationWarning, match=r"batch_size=64 is larger than the rollout n_steps \* n_envs = 16"):
        make(n_steps=16, batch_size=64)


def test_batch_size_not_dividing_the_rollout_warns() -> None:
    with pytest.warns(ConfigurationWarning, match="there will be a truncated mini-batch of size 2"):
        make(n_steps=10, batch_size=4)


def test_batch_size_not_dividing_rollout_warns() -> None:
    with pytest.warns(UserWarning, match="batch_size"):
        ClippedPPO("MlpPolicy", cartpole(), n_steps=10, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClippedPPO("MlpPolicy", cartpole(), n_steps=16, batch_size=8)


def test_a_consistent_configuration_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(n_steps=16, batch_size=8)


# -- schedule values while training ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, -0.1, math.nan, math.inf])
def test_clip_value_during_training_must_be_positive_and_finite(value) -> None:
    with pytest.raises(ConfigurationError, match=r"clip_range is invalid: it is .* at progress_remaining=0.3"):
        check_schedule_value("clip_range", value, 0.3)


@pytest.mark.parametrize("value", [0.0, -0.002])
def test_annealed_clip_value_may_reach_zero_at_the_end(value) -> None:
    assert check_schedule_value("clip_range", value, -0.01) == value


def test_schedule_going_bad_during_training_raises_at_that_update() -> None:
    state = {"broken": False}

    def flaky(progress: float) -> float:
        return math.nan if state["broken"] else 0.2

    model = make(clip_range=flaky)  # fine when checked at construction, NaN later
    state["broken"] = True
    with pytest.raises(ConfigurationError, match="clip_range is invalid: it is nan"):
        model.learn(64)


def test_load_with_env_does_not_recheck_images_against_default_policy_kwargs(tmp_path) -> None:
    env = SpaceEnv(observation_space=spaces.Box(0, 1, (3, 36, 36), np.float32))
    model = make("CnnPolicy", env=env, policy_kwargs=dict(normalize_images=False))
    model.save(tmp_path / "cnn")
    loaded = ClippedPPO.load(tmp_path / "cnn", env=env)
    loaded.learn(TINY["n_steps"])


# -- normalize_advantage and value clipping (with a real env) ----------------------------------------------


def cartpole(n_envs: int = 2, seed: int = 0) -> VecEnv:
    return make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed)


@pytest.mark.parametrize("mode", ["epoch", "none", None, 0.5])
def test_invalid_normalization_mode_is_rejected(mode) -> None:
    with pytest.raises(ConfigurationError, match="normalize_advantage"):
        ClippedPPO("MlpPolicy", cartpole(), normalize_advantage=mode, **TINY)


def test_invalid_value_clipping_settings_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="vf_clip_mode"):
        ClippedPPO("MlpPolicy", cartpole(), vf_clip_mode="min", **TINY)
    with pytest.raises(AssertionError, match="clip_range_vf"):
        ClippedPPO("MlpPolicy", cartpole(), clip_range_vf=0.0, **TINY)


def test_n_steps_below_one_with_normalization_is_sb3s_rollout_assertion() -> None:
    """n_envs is only known once the env is wrapped: the error names it, as SB3's does."""
    with pytest.raises(ConfigurationAssertionError, match=r"n_steps \* n_envs=0 is invalid: .* n_steps=0 and n_envs=2"):
        ClippedPPO("MlpPolicy", cartpole(), n_steps=0, batch_size=2)


# -- the module's own contracts -----------------------------------------------------------------------------


def test_one_table_of_supported_spaces() -> None:
    assert policies.SUPPORTED_ACTION_SPACES is SUPPORTED_ACTION_SPACES
    assert ppo.SUPPORTED_ACTION_SPACES is SUPPORTED_ACTION_SPACES
    assert SUPPORTED_ACTION_SPACE_NAMES == ", ".join(space.__name__ for space in SUPPORTED_ACTION_SPACES)
    with pytest.raises(UnsupportedSpaceError, match=SUPPORTED_ACTION_SPACE_NAMES):
        make(env=SpaceEnv(action_space=spaces.Text(3)))


def test_validate_hyperparameters_has_no_defaults_of_its_own() -> None:
    """ClippedPPO's signature is the only place its defaults are written."""
    parameters = inspect.signature(validate_hyperparameters).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty for p in parameters)
    defaults = {
        name: p.default
        for name, p in inspect.signature(ClippedPPO.__init__).parameters.items()
        if name in {p.name for p in parameters}
    }
    assert defaults.keys() == {p.name for p in parameters}
    validate_hyperparameters(**defaults)
    with pytest.raises(TypeError):
        validate_hyperparameters(gamma=0.99)  # type: ignore[call-arg]


@pytest.mark.parametrize("value", [0.0, -1, math.nan])
def test_check_clip_range_vf_is_sb3s_setup_model_check(value) -> None:
    with pytest.raises(ConfigurationAssertionError, match="`clip_range_vf` must be positive"):
        check_clip_range_vf(value)


@pytest.mark.parametrize("value", [None, 0.1, math.inf, np.float32(0.0), linear(0.0)])
def test_check_clip_range_vf_is_as_lenient_as_sb3(value) -> None:
    check_clip_range_vf(value)


class ForwardingCnnPolicy(ActorCriticCnnPolicy):
    """A subclass whose ``__init__`` hides the NatureCNN default behind ``*args, **kwargs``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


class WiderNatureCNN(NatureCNN):
    """A NatureCNN subclass: asserts on non-images exactly as NatureCNN does."""


@pytest.mark.parametrize(
    ("policy", "policy_kwargs"),
    [
        ("CnnPolicy", None),
        (ActorCriticCnnPolicy, None),
        (ForwardingCnnPolicy, None),
        ("MlpPolicy", dict(features_extractor_class=NatureCNN)),
        ("CnnPolicy", dict(features_extractor_class=WiderNatureCNN)),
    ],
    ids=["alias", "class", "forwarding-subclass", "mlp-with-naturecnn", "naturecnn-subclass"],
)
def test_nature_cnn_probe_finds_every_way_to_get_a_nature_cnn(policy, policy_kwargs) -> None:
    with pytest.raises(ConfigurationAssertionError, match="NatureCNN needs images"):
        validate_image_observation(
            BOX3, policy=policy, policy_aliases=ClippedPPO.policy_aliases, policy_kwargs=policy_kwargs
        )


@pytest.mark.parametrize(
    ("policy", "policy_kwargs"),
    [
        ("MlpPolicy", None),
        ("CnnPolicy", dict(features_extractor_class=FlattenExtractor)),
        ("CnnPolicy", dict(normalize_images=False)),
    ],
    ids=["mlp", "cnn-with-flatten", "cnn-normalized-float-images"],
)
def test_nature_cnn_probe_passes_what_nature_cnn_accepts(policy, policy_kwargs) -> None:
    space = BOX3 if policy_kwargs is None or "features_extractor_class" in policy_kwargs else FLOAT_IMAGES
    validate_image_observation(
        space, policy=policy, policy_aliases=ClippedPPO.policy_aliases, policy_kwargs=policy_kwargs
    )
