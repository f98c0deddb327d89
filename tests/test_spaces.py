"""Every supported action space and Dict / image observations train for a few iterations."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from conftest import TINY, DictObsEnv, ImageEnv, params_changed, params_of, recording_logger
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import IdentityEnv, IdentityEnvBox, IdentityEnvMultiBinary, IdentityEnvMultiDiscrete
from stable_baselines3.common.torch_layers import CombinedExtractor, NatureCNN
from stable_baselines3.common.vec_env import VecTransposeImage

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.buffers import DictGAERolloutBuffer
from sb3_ppo_ext.reliability.checks import SUPPORTED_ACTION_SPACES

ENVS = {
    "discrete": lambda: IdentityEnv(dim=3, ep_length=10),
    "box": lambda: IdentityEnvBox(eps=0.5, ep_length=10),
    "multidiscrete": lambda: IdentityEnvMultiDiscrete(dim=3, ep_length=10),
    "multibinary": lambda: IdentityEnvMultiBinary(dim=3, ep_length=10),
}


def train_and_check(model: ClippedPPO, iterations: int = 2) -> None:
    """Train a few rollouts; the parameters must move and the train/ logs must be finite."""
    total = iterations * model.n_steps * model.n_envs
    logger, writer = recording_logger()
    model.set_logger(logger)
    before = params_of(model)
    model.learn(total)
    assert model.num_timesteps >= total
    assert params_changed(before, model)
    for key in ("train/loss", "train/value_loss", "train/policy_gradient_loss", "train/entropy_loss"):
        assert np.isfinite(writer.last(key)), key
    assert model._n_updates == model.n_epochs * iterations


def check_predict(model: ClippedPPO, env) -> None:
    obs = env.reset()
    actions, _ = model.predict(obs, deterministic=True)
    assert actions.shape == (env.num_envs, *model.action_space.shape)
    for action in actions:
        assert model.action_space.contains(np.asarray(action, dtype=model.action_space.dtype))


def test_envs_cover_every_supported_action_space() -> None:
    """What sb3_ppo_ext.reliability.checks accepts is what is trained below, no more, no less."""
    assert {type(make().action_space) for make in ENVS.values()} == set(SUPPORTED_ACTION_SPACES)


@pytest.mark.parametrize("name", ENVS, ids=ENVS.keys())
def test_action_space_trains(name: str) -> None:
    env = make_vec_env(ENVS[name], n_envs=2, seed=0)
    model = ClippedPPO("MlpPolicy", env, seed=0, **TINY)
    train_and_check(model)
    check_predict(model, env)


@pytest.mark.parametrize(
    "policy_kwargs",
    [dict(state_dependent_std=True), dict(log_std_init=-1.0, net_arch=[16])],
    ids=["state-dependent-std", "small-net"],
)
def test_box_variants_train(policy_kwargs: dict) -> None:
    env = make_vec_env(ENVS["box"], n_envs=2, seed=0)
    model = ClippedPPO("MlpPolicy", env, seed=0, policy_kwargs=policy_kwargs, **TINY)
    train_and_check(model)
    check_predict(model, env)


@pytest.mark.parametrize("squash", [False, True])
def test_gsde_trains_and_resamples_noise(squash: bool) -> None:
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    model = ClippedPPO(
        "MlpPolicy", env, use_sde=True, sde_sample_freq=4, seed=0, policy_kwargs=dict(squash_output=squash), **TINY
    )
    calls = []
    original = model.policy.reset_noise
    model.policy.reset_noise = lambda n_envs=1: (calls.append(n_envs), original(n_envs))  # type: ignore[method-assign]
    train_and_check(model)
    # once at the start of each rollout plus every 4 steps: 2 rollouts x (1 + 32 / 4)
    assert calls == [2] * 18
    check_predict(model, env)


def test_box_action_with_matrix_shape_trains() -> None:
    from stable_baselines3.common.envs.identity_env import IdentityEnv as Identity

    space = spaces.Box(-1.0, 1.0, shape=(2, 2), dtype=np.float32)
    env = make_vec_env(lambda: Identity(space=space, ep_length=10), n_envs=2, seed=0)
    model = ClippedPPO("MlpPolicy", env, seed=0, **TINY)
    train_and_check(model)
    check_predict(model, env)


@pytest.mark.parametrize("discrete", [True, False])
def test_dict_observations_train(discrete: bool) -> None:
    env = make_vec_env(lambda: DictObsEnv(discrete=discrete), n_envs=2, seed=0)
    model = ClippedPPO("MultiInputPolicy", env, seed=0, **TINY)
    assert isinstance(model.rollout_buffer, DictGAERolloutBuffer)
    assert isinstance(model.policy.features_extractor, CombinedExtractor)
    train_and_check(model)
    check_predict(model, env)


@pytest.mark.parametrize("discrete", [True, False])
def test_cnn_policy_trains_on_small_image_env(discrete: bool) -> None:
    env = make_vec_env(lambda: ImageEnv(discrete=discrete), n_envs=2, seed=0)
    model = ClippedPPO("CnnPolicy", env, seed=0, n_steps=16, batch_size=16, n_epochs=2)
    # channel-last images are transposed for PyTorch, as in SB3
    assert isinstance(model.get_env(), VecTransposeImage)
    assert isinstance(model.policy.features_extractor, NatureCNN)
    assert model.rollout_buffer.observations.dtype == np.uint8
    train_and_check(model)
    check_predict(model, model.get_env())


def test_cnn_policy_learns_a_colour_from_pixels() -> None:
    """Not only runs: a few hundred steps of the image task beat a random policy's 50%."""
    th.manual_seed(0)
    env = make_vec_env(lambda: ImageEnv(discrete=True), n_envs=4, seed=1)
    model = ClippedPPO("CnnPolicy", env, seed=1, n_steps=32, batch_size=64, n_epochs=4, learning_rate=1e-3)
    model.learn(768)
    obs = model.get_env().reset()
    hits = 0
    for _ in range(25):
        actions, _ = model.predict(obs, deterministic=True)
        colours = obs[:, :, 0, 0].argmax(axis=1)  # channel-first after VecTransposeImage
        hits += int((actions == colours).sum())
        obs, _, _, _ = model.get_env().step(actions)
    assert hits / 100 > 0.8
