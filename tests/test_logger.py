"""Logged keys equal SB3 PPO's in the same configuration; logged values mean the same thing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch as th
from conftest import DictObsEnv, collect_rollout, recording_logger
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.schedules import linear

SB3_TRAIN_KEYS = {
    "train/approx_kl",
    "train/clip_fraction",
    "train/entropy_loss",
    "train/policy_gradient_loss",
    "train/value_loss",
    "train/loss",
    "train/explained_variance",
    "train/n_updates",
    "train/clip_range",
    "train/learning_rate",
}

CONFIGS = {
    "discrete": ("CartPole-v1", "MlpPolicy", {}),
    "box-std": ("Pendulum-v1", "MlpPolicy", {}),
    "clip-range-vf": ("CartPole-v1", "MlpPolicy", dict(clip_range_vf=0.2)),
    "box-clip-range-vf-schedules": (
        "Pendulum-v1",
        "MlpPolicy",
        dict(clip_range_vf=linear(0.5), clip_range=linear(0.2), learning_rate=linear(1e-3)),
    ),
    "gsde": ("Pendulum-v1", "MlpPolicy", dict(use_sde=True, sde_sample_freq=4)),
    "target-kl": ("CartPole-v1", "MlpPolicy", dict(target_kl=1e-4)),
    "dict": (DictObsEnv, "MultiInputPolicy", {}),
}


def logged_keys(algo: type, env_id, policy: str, kwargs: dict) -> set[str]:
    env = make_vec_env(env_id, n_envs=2, seed=0)
    model = algo(policy, env, n_steps=32, batch_size=16, n_epochs=2, seed=0, **kwargs)
    logger, writer = recording_logger()
    model.set_logger(logger)
    model.learn(192)  # three rollouts: the train/ records of the first two are dumped
    return writer.keys


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIGS.keys())
def test_logged_keys_equal_sb3_ppo(config: str) -> None:
    env_id, policy, kwargs = CONFIGS[config]
    ours = logged_keys(ClippedPPO, env_id, policy, kwargs)
    sb3 = logged_keys(PPO, env_id, policy, kwargs)
    assert ours == sb3
    train = {key for key in ours if key.startswith("train/")}
    expected = set(SB3_TRAIN_KEYS)
    if "clip_range_vf" in kwargs:
        expected.add("train/clip_range_vf")
    if env_id == "Pendulum-v1":
        expected.add("train/std")
    assert train == expected


def test_no_std_key_with_state_dependent_std() -> None:
    """The per-state std has no single value to log (SB3 logs std only when the policy has ``log_std``)."""
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    model = ClippedPPO(
        "MlpPolicy", env, n_steps=32, batch_size=16, n_epochs=1, seed=0, policy_kwargs=dict(state_dependent_std=True)
    )
    logger, writer = recording_logger()
    model.set_logger(logger)
    model.learn(192)
    assert "train/std" not in writer.keys and "train/loss" in writer.keys


def test_logged_values_follow_schedules_and_state() -> None:
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    model = ClippedPPO(
        "MlpPolicy",
        env,
        n_steps=32,
        batch_size=16,
        n_epochs=3,
        seed=0,
        learning_rate=linear(1e-3),
        clip_range=linear(0.2),
        clip_range_vf=linear(0.4),
        policy_kwargs=dict(log_std_init=-0.7),
    )
    logger, writer = recording_logger()
    model.set_logger(logger)
    model.learn(256)  # 4 rollouts; train() runs at progress 0.75, 0.5, 0.25, 0
    logger.dump()  # flush the records of the last train()
    progress = [0.75, 0.5, 0.25, 0.0]
    clip_ranges = [d["train/clip_range"] for d in writer.dumps if "train/clip_range" in d]
    np.testing.assert_allclose(clip_ranges, [0.2 * p for p in progress], atol=1e-12)
    vf_ranges = [d["train/clip_range_vf"] for d in writer.dumps if "train/clip_range_vf" in d]
    np.testing.assert_allclose(vf_ranges, [0.4 * p for p in progress], atol=1e-12)
    lrs = [d["train/learning_rate"] for d in writer.dumps if "train/learning_rate" in d]
    np.testing.assert_allclose(lrs, [1e-3 * p for p in progress], atol=1e-12)
    assert [d["train/n_updates"] for d in writer.dumps if "train/n_updates" in d] == [3, 6, 9, 12]
    assert writer.last("train/std") == pytest.approx(th.exp(model.policy.log_std).mean().item())
    for dump in writer.dumps:
        if "train/approx_kl" in dump:
            assert dump["train/approx_kl"] > -1e-6 and 0 <= dump["train/clip_fraction"] <= 1


@pytest.mark.parametrize("fast_update", [True, False], ids=["fast-update", "autograd"])
@pytest.mark.parametrize(
    ("env_id", "kwargs"),
    [
        ("CartPole-v1", {}),
        ("Pendulum-v1", dict(clip_range_vf=0.05, policy_kwargs=dict(log_std_init=-0.5))),
        ("Pendulum-v1", dict(use_sde=True, policy_kwargs=dict(log_std_init=-1.0))),
        ("CartPole-v1", dict(policy_kwargs=dict(net_arch=[16], activation_fn=th.nn.ReLU), max_grad_norm=0.05)),
    ],
    ids=["discrete", "box-clip-range-vf", "gsde", "relu-grad-clip"],
)
def test_train_on_the_same_rollout_matches_sb3_ppo(env_id: str, kwargs: dict, fast_update: bool) -> None:
    """Same weights, same rollout, one full-batch minibatch per epoch: same logged numbers and same update.

    With a single minibatch per epoch the shuffling order cannot matter, so ClippedPPO's ``train()`` (with
    SB3's value clipping form) must reproduce SB3 PPO's losses and parameters up to float rounding.
    """
    common = dict(n_steps=32, batch_size=64, n_epochs=4, seed=0, learning_rate=1e-2, ent_coef=0.01, **kwargs)
    sb3 = PPO("MlpPolicy", make_vec_env(env_id, n_envs=2, seed=0), **common)
    ours = ClippedPPO(
        "MlpPolicy",
        make_vec_env(env_id, n_envs=2, seed=0),
        rollout_buffer_class=RolloutBuffer,
        vf_clip_mode="sb3",
        fast_update=fast_update,
        **common,
    )
    ours.policy.load_state_dict(sb3.policy.state_dict())
    initial = {k: v.clone() for k, v in sb3.policy.state_dict().items()}
    collect_rollout(sb3, 64)
    ours.rollout_buffer = copy.deepcopy(sb3.rollout_buffer)

    values = {}
    for name, model in (("sb3", sb3), ("ours", ours)):
        logger, writer = recording_logger()
        model.set_logger(logger)
        model.train()
        logger.dump()
        values[name] = writer.dumps[-1]
    assert values["ours"].keys() == values["sb3"].keys()
    for key, expected in values["sb3"].items():
        assert values["ours"][key] == pytest.approx(expected, rel=1e-4, abs=1e-6), key
    # the update is large enough for the comparison to mean something
    assert max((sb3.policy.state_dict()[k] - v).abs().max().item() for k, v in initial.items()) > 1e-2
    for name, param in sb3.policy.state_dict().items():
        th.testing.assert_close(ours.policy.state_dict()[name], param, rtol=1e-4, atol=1e-6)
