"""Save/load round trips, continued training, ``env=``, ``custom_objects`` and parameter get/set/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch as th
from conftest import TINY, DictObsEnv, params_changed, params_of
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.policies import ActorCriticPolicy
from sb3_ppo_ext.schedules import linear


def cartpole(n_envs: int = 2, seed: int = 0):
    return make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed)


def pendulum(n_envs: int = 2, seed: int = 0):
    return make_vec_env("Pendulum-v1", n_envs=n_envs, seed=seed)


def obs_batch(model: ClippedPPO, n: int = 16, seed: int = 0) -> np.ndarray | dict:
    model.observation_space.seed(seed)
    samples = [model.observation_space.sample() for _ in range(n)]
    if isinstance(samples[0], dict):
        return {key: np.stack([s[key] for s in samples]) for key in samples[0]}
    return np.stack(samples)


def assert_same_model(a: ClippedPPO, b: ClippedPPO) -> None:
    state_a, state_b = a.policy.state_dict(), b.policy.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert th.equal(state_a[key], state_b[key]), key
    obs = obs_batch(a)
    np.testing.assert_array_equal(a.predict(obs, deterministic=True)[0], b.predict(obs, deterministic=True)[0])
    tensor_a, _ = a.policy.obs_to_tensor(obs)
    tensor_b, _ = b.policy.obs_to_tensor(obs)
    with th.no_grad():
        th.testing.assert_close(a.policy.predict_values(tensor_a), b.policy.predict_values(tensor_b), rtol=0, atol=0)


CASES = {
    "discrete": (cartpole, "MlpPolicy", {}),
    "box": (pendulum, "MlpPolicy", dict(policy_kwargs=dict(log_std_init=-0.5))),
    "gsde": (pendulum, "MlpPolicy", dict(use_sde=True, sde_sample_freq=4)),
    "state-dependent-std": (pendulum, "MlpPolicy", dict(policy_kwargs=dict(state_dependent_std=True))),
    "dict": (lambda: make_vec_env(DictObsEnv, n_envs=2, seed=0), "MultiInputPolicy", {}),
}


@pytest.mark.parametrize("case", CASES, ids=CASES.keys())
def test_round_trip_identical_parameters_and_predictions(case: str, tmp_path: Path) -> None:
    make_env, policy, kwargs = CASES[case]
    model = ClippedPPO(policy, make_env(), seed=0, **TINY, **kwargs)
    model.learn(128)
    model.save(tmp_path / "model.zip")
    loaded = ClippedPPO.load(tmp_path / "model.zip")
    assert type(loaded.policy) is type(model.policy)
    assert loaded.num_timesteps == 128
    assert_same_model(model, loaded)
    # the optimizer state (Adam moments, step count) survives too
    saved_opt, loaded_opt = model.policy.optimizer.state_dict(), loaded.policy.optimizer.state_dict()
    assert saved_opt["param_groups"][0]["eps"] == loaded_opt["param_groups"][0]["eps"] == 1e-5
    for key, state in saved_opt["state"].items():
        assert th.equal(state["exp_avg"], loaded_opt["state"][key]["exp_avg"])


def test_hyperparameters_and_extensions_survive_save_load(tmp_path: Path) -> None:
    model = ClippedPPO(
        "MlpPolicy",
        cartpole(),
        learning_rate=linear(1e-3),
        clip_range=linear(0.3, 0.1),
        clip_range_vf=0.5,
        normalize_advantage="batch",
        vf_clip_mode="sb3",
        target_kl=0.05,
        gae_lambda=0.9,
        gamma=0.97,
        ent_coef=0.01,
        max_grad_norm=None,
        policy_kwargs=dict(net_arch=[16], ortho_init=False),
        seed=0,
        **TINY,
    )
    model.learn(64)
    model.save(tmp_path / "m")
    loaded = ClippedPPO.load(tmp_path / "m")
    for attr in (
        "n_steps",
        "batch_size",
        "n_epochs",
        "gamma",
        "gae_lambda",
        "ent_coef",
        "target_kl",
        "normalize_advantage",
        "vf_clip_mode",
        "max_grad_norm",
    ):
        assert getattr(loaded, attr) == getattr(model, attr), attr
    for progress in (1.0, 0.5, 0.0):
        assert loaded.clip_range(progress) == pytest.approx(model.clip_range(progress))
        assert loaded.lr_schedule(progress) == pytest.approx(model.lr_schedule(progress))
        assert loaded.clip_range_vf(progress) == pytest.approx(0.5)
    assert loaded.clip_range(0.5) == pytest.approx(0.2)
    assert loaded.policy.net_arch == [16] and loaded.policy.ortho_init is False
    # and it trains again with those settings
    loaded.set_env(cartpole(seed=1))
    loaded.learn(64, reset_num_timesteps=False)
    assert loaded.num_timesteps == 128


def test_continue_training_after_load(tmp_path: Path) -> None:
    model = ClippedPPO("MlpPolicy", cartpole(), seed=0, **TINY)
    model.learn(128)
    model.save(tmp_path / "model")
    loaded = ClippedPPO.load(tmp_path / "model", env=cartpole(seed=1))
    before = params_of(loaded)
    updates = loaded._n_updates
    loaded.learn(128, reset_num_timesteps=False)
    assert loaded.num_timesteps == 256
    assert loaded._n_updates == updates + 2 * TINY["n_epochs"]
    assert params_changed(before, loaded)


def test_load_with_env_uses_it_and_checks_spaces(tmp_path: Path) -> None:
    model = ClippedPPO("MlpPolicy", cartpole(2), seed=0, **TINY)
    model.save(tmp_path / "model")
    loaded = ClippedPPO.load(tmp_path / "model", env=cartpole(4, seed=3))
    assert loaded.get_env() is not None and loaded.n_envs == 4
    loaded.learn(128)
    assert loaded.rollout_buffer.observations.shape[:2] == (TINY["n_steps"], 4)
    without = ClippedPPO.load(tmp_path / "model")
    assert without.get_env() is None
    with pytest.raises(ValueError):
        ClippedPPO.load(tmp_path / "model", env=pendulum())


def test_custom_objects_replace_saved_values(tmp_path: Path) -> None:
    model = ClippedPPO("MlpPolicy", cartpole(), seed=0, learning_rate=1e-3, clip_range=0.2, **TINY)
    model.save(tmp_path / "model")
    loaded = ClippedPPO.load(
        tmp_path / "model",
        env=cartpole(),
        custom_objects=dict(learning_rate=5e-4, clip_range=0.1, n_epochs=1, lr_schedule=lambda _: 5e-4),
    )
    assert loaded.n_epochs == 1
    assert loaded.clip_range(1.0) == pytest.approx(0.1)
    assert loaded.lr_schedule(1.0) == pytest.approx(5e-4)
    loaded.learn(64)
    assert loaded.policy.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert loaded._n_updates == 1


def test_get_and_set_parameters_transfer_the_policy() -> None:
    source = ClippedPPO("MlpPolicy", cartpole(), seed=0, **TINY)
    source.learn(64)
    params = source.get_parameters()
    assert set(params) == {"policy", "policy.optimizer"}
    target = ClippedPPO("MlpPolicy", cartpole(), seed=1, **TINY)
    assert not all(th.equal(v, target.policy.state_dict()[k]) for k, v in params["policy"].items())
    target.set_parameters(params)
    assert_same_model(source, target)
    # exact=False accepts a partial dict; exact=True refuses it
    partial = {"policy": {"value_net.bias": th.tensor([3.0])}}
    target.set_parameters(partial, exact_match=False)
    assert target.policy.value_net.bias.item() == 3.0
    with pytest.raises((RuntimeError, ValueError)):  # torch's strict load_state_dict, as with SB3's PPO
        target.set_parameters(partial, exact_match=True)


def test_load_parameters_from_saved_file(tmp_path: Path) -> None:
    source = ClippedPPO("MlpPolicy", cartpole(), seed=0, **TINY)
    source.learn(64)
    source.save(tmp_path / "model.zip")
    target = ClippedPPO("MlpPolicy", cartpole(), seed=7, **TINY)
    target.set_parameters(str(tmp_path / "model.zip"))
    assert_same_model(source, target)


def test_sb3_ppo_parameters_load_into_clipped_ppo(tmp_path: Path) -> None:
    """SB3 PPO's saved weights drive our policy to the same decisions (same names, shapes, semantics)."""
    sb3 = PPO("MlpPolicy", cartpole(), seed=0, **TINY)
    sb3.learn(64)
    sb3.save(tmp_path / "sb3.zip")
    ours = ClippedPPO("MlpPolicy", cartpole(), seed=0, **TINY)
    ours.set_parameters(str(tmp_path / "sb3.zip"))
    obs = obs_batch(ours, n=64)
    np.testing.assert_array_equal(sb3.predict(obs, deterministic=True)[0], ours.predict(obs, deterministic=True)[0])
    with th.no_grad():
        th.testing.assert_close(
            sb3.policy.predict_values(th.as_tensor(obs)), ours.policy.predict_values(th.as_tensor(obs))
        )


def test_policy_save_and_load(tmp_path: Path) -> None:
    model = ClippedPPO("MlpPolicy", pendulum(), seed=0, policy_kwargs=dict(net_arch=dict(pi=[8], vf=[16])), **TINY)
    model.policy.save(tmp_path / "policy.pth")
    policy = ActorCriticPolicy.load(tmp_path / "policy.pth")
    assert policy.net_arch == dict(pi=[8], vf=[16])
    obs = obs_batch(model)
    np.testing.assert_array_equal(policy.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


def test_saved_model_excludes_environment_and_buffer(tmp_path: Path) -> None:
    import zipfile

    model = ClippedPPO("MlpPolicy", cartpole(), seed=0, **TINY)
    model.learn(64)
    model.save(tmp_path / "model.zip")
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        names = set(archive.namelist())
        data = archive.read("data").decode()
    assert {"data", "policy.pth", "policy.optimizer.pth"} <= names
    assert '"rollout_buffer"' not in data and '"env"' not in data
    assert '"vf_clip_mode"' in data
