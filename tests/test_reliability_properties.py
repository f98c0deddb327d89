"""Property: any hyperparameter combination either fails at construction with our clear error, or trains (issue 6).

An independent oracle says which arguments of a drawn combination are invalid; ClippedPPO must raise a
``ConfigurationError`` naming one of them exactly when there is one, and otherwise train one iteration
with finite losses and parameters.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.errors import ConfigurationError
from sb3_ppo_ext.schedules import linear


def annealed_below_zero(progress: float) -> float:
    return progress - 0.5  # non-positive for half of training


VALID: dict[str, list[Any]] = dict(
    n_steps=[8, 3, 2, 1],  # typical values first: hypothesis starts from the first entries
    batch_size=[8, 64, 3, 2, 1],
    n_epochs=[1, 2],
    clip_range=[0.2, 0.05, 1.0, linear(0.2)],
    clip_range_vf=[None, 0.2, linear(1.0)],
    normalize_advantage=[True, False, "batch", "minibatch"],
    ent_coef=[0.0, 0.01],
    vf_coef=[0.5, 0.0, 1.0],
    max_grad_norm=[0.5, None, math.inf],
    target_kl=[None, 0.01, 1e3],
    learning_rate=[3e-4, 0.0, linear(1e-3)],
    use_sde=[False, False, True],
)
INVALID: dict[str, list[Any]] = dict(
    n_steps=[0, -1, 2.0],
    batch_size=[0, -1, 8.0],
    n_epochs=[0, -1],
    gamma=[-0.1, 1.5, math.nan, math.inf],
    gae_lambda=[-0.1, 1.01, math.nan],
    clip_range=[0.0, -0.2, math.inf, math.nan, annealed_below_zero],
    clip_range_vf=[0.0, -1.0, math.nan],
    normalize_advantage=["bogus"],
    ent_coef=[-0.01, math.nan],
    vf_coef=[-0.5, math.inf],
    max_grad_norm=[0.0, -1.0, math.nan],
    target_kl=[0.0, -0.01],
    learning_rate=[-1e-3, math.nan, math.inf],
)


@st.composite
def configurations(draw: st.DrawFn) -> dict[str, Any]:
    config = {name: draw(st.sampled_from(values)) for name, values in VALID.items()}
    config["gamma"] = draw(st.floats(0.0, 1.0))
    config["gae_lambda"] = draw(st.floats(0.0, 1.0))
    broken = draw(st.sampled_from([None] * len(INVALID) + sorted(INVALID)))  # half of them valid by design
    if broken is not None:
        config[broken] = draw(st.sampled_from(INVALID[broken]))
    config["env_id"] = draw(st.sampled_from(["CartPole-v1", "Pendulum-v1"]))
    config["n_envs"] = draw(st.sampled_from([1, 2]))
    return config


def is_int(value: Any) -> bool:
    return isinstance(value, int)


def positive_finite(value: Any) -> bool:
    if callable(value):
        return all(value(p) > 0 for p in (1.0, 0.5, 0.01))
    return math.isfinite(value) and value > 0


def invalid_arguments(config: dict[str, Any]) -> set[str]:
    """The oracle: names of the arguments that make ``config`` invalid (written apart from sb3_ppo_ext.errors)."""
    bad = set()
    normalize = config["normalize_advantage"]
    if not is_int(config["n_steps"]) or config["n_steps"] < 1:
        bad.add("n_steps")
    if not is_int(config["batch_size"]) or config["batch_size"] < 1 or (normalize and config["batch_size"] == 1):
        bad.add("batch_size")
    if normalize and is_int(config["n_steps"]) and 0 < config["n_steps"] * config["n_envs"] <= 1:
        bad.add("n_steps * n_envs")
    if config["n_epochs"] < 1:
        bad.add("n_epochs")
    for name in ("gamma", "gae_lambda"):
        if not 0 <= config[name] <= 1:  # False for NaN too
            bad.add(name)
    if not positive_finite(config["clip_range"]):
        bad.add("clip_range")
    if config["clip_range_vf"] is not None and not positive_finite(config["clip_range_vf"]):
        bad.add("clip_range_vf")
    if normalize not in (True, False, "batch", "minibatch"):
        bad.add("normalize_advantage")
    for name in ("ent_coef", "vf_coef"):
        if not (math.isfinite(config[name]) and config[name] >= 0):
            bad.add(name)
    if config["max_grad_norm"] is not None and not config["max_grad_norm"] > 0:
        bad.add("max_grad_norm")
    if config["target_kl"] is not None and not config["target_kl"] > 0:
        bad.add("target_kl")
    learning_rate = config["learning_rate"]
    if not callable(learning_rate) and not (math.isfinite(learning_rate) and learning_rate >= 0):
        bad.add("learning_rate")
    if config["use_sde"] and config["env_id"] == "CartPole-v1":
        bad.add("use_sde")
    return bad


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(configurations())
def test_every_configuration_fails_clearly_at_construction_or_trains_with_finite_losses(config) -> None:
    config = dict(config)
    env_id, n_envs = config.pop("env_id"), config.pop("n_envs")
    bad = invalid_arguments({**config, "env_id": env_id, "n_envs": n_envs})
    env = make_vec_env(env_id, n_envs=n_envs, seed=0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # batch sizes that do not fit the rollout
            model = ClippedPPO("MlpPolicy", env, seed=0, **config)
    except ConfigurationError as error:
        message = str(error)
        assert bad, f"valid configuration rejected: {message}"
        assert "invalid" in message
        assert any(message.startswith(name) for name in bad), (bad, message)
        return
    assert not bad, f"invalid {bad} accepted"
    model.learn(config["n_steps"] * n_envs)  # one iteration
    losses = {key: value for key, value in model.logger.name_to_value.items() if key.startswith("train/")}
    for key in ("train/loss", "train/value_loss", "train/policy_gradient_loss", "train/entropy_loss"):
        assert np.isfinite(losses[key]), (key, losses)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


def test_the_oracle_accepts_the_defaults() -> None:
    defaults = dict(
        n_steps=2048,
        batch_size=64,
        n_epochs=10,
        gamma=0.99,
        gae_lambda=0.95,
        clip_range=0.2,
        clip_range_vf=None,
        normalize_advantage=True,
        ent_coef=0.0,
        vf_coef=0.5,
        max_grad_norm=0.5,
        target_kl=None,
        learning_rate=3e-4,
        use_sde=False,
        env_id="CartPole-v1",
        n_envs=1,
    )
    assert invalid_arguments(defaults) == set()
    assert isinstance(gym.make("CartPole-v1").action_space, gym.spaces.Discrete)
