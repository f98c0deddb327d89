"""The implementation choices of sb3_ppo_ext.details, each against an independent computation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.details.recompute_advantages import RecomputeAdvantages
from sb3_ppo_ext.details.reward_scaling import RewardScaler, RewardScaling
from sb3_ppo_ext.errors import ConfigurationError
from sb3_ppo_ext.extensions import Extension

SETTINGS = dict(n_steps=32, batch_size=32, n_epochs=3, seed=0)


def _pendulum(n_envs: int = 2) -> Any:
    return make_vec_env("Pendulum-v1", n_envs=n_envs, seed=0)


def _brute_force_gae(rewards, values, episode_starts, last_values, last_dones, gamma, lam):
    """GAE by its definition: A_t = sum_k (gamma lambda)^k delta_{t+k}, cut at episode ends, one env at a time."""
    n_steps, n_envs = rewards.shape
    advantages = np.zeros_like(rewards, dtype=np.float64)
    for env in range(n_envs):
        for t in range(n_steps):
            total, discount = 0.0, 1.0
            for k in range(t, n_steps):
                done_next = last_dones[env] if k == n_steps - 1 else episode_starts[k + 1, env]
                next_value = last_values[env] if k == n_steps - 1 else values[k + 1, env]
                delta = rewards[k, env] + gamma * next_value * (1.0 - done_next) - values[k, env]
                total += discount * delta
                if done_next:
                    break
                discount *= gamma * lam
            advantages[t, env] = total
    return advantages, advantages + values


class _Snapshot(Extension):
    """Before each epoch (after any recomputation), what the buffer holds and what the critic says."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, np.ndarray]] = []

    def epoch_start(self, model: Any, epoch: int) -> None:
        buffer = model.rollout_buffer
        n_steps, n_envs = buffer.values.shape
        obs = th.as_tensor(buffer.observations.reshape(n_steps * n_envs, -1))
        with th.no_grad():
            critic = model.policy.predict_values(obs).numpy().reshape(n_steps, n_envs)
            last = model.policy.predict_values(th.as_tensor(model._last_obs)).numpy().reshape(n_envs)
        self.epochs.append(
            dict(
                values=buffer.values.copy(),
                advantages=buffer.advantages.copy(),
                returns=buffer.returns.copy(),
                rewards=buffer.rewards.copy(),
                episode_starts=buffer.episode_starts.copy(),
                critic=critic,
                last=last,
                last_dones=np.asarray(model._last_episode_starts, dtype=np.float32).copy(),
            )
        )


def test_recomputed_advantages_equal_a_fresh_gae_pass_with_the_current_critic() -> None:
    snapshot = _Snapshot()
    model = ClippedPPO("MlpPolicy", _pendulum(), recompute_advantages=True, extensions=[snapshot], **SETTINGS)
    model.learn(64)  # one update of 3 epochs
    assert model.extension(RecomputeAdvantages) is not None
    first, *later = snapshot.epochs
    for epoch in later:
        # the buffer's values are the critic's current outputs, and GAE is recomputed from them
        np.testing.assert_allclose(epoch["values"], epoch["critic"], rtol=1e-5, atol=1e-6)
        expected_adv, expected_ret = _brute_force_gae(
            epoch["rewards"], epoch["critic"], epoch["episode_starts"], epoch["last"], epoch["last_dones"], 0.99, 0.95
        )
        np.testing.assert_allclose(epoch["advantages"], expected_adv, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(epoch["returns"], expected_ret, rtol=1e-4, atol=1e-4)
        assert not np.allclose(epoch["advantages"], first["advantages"])  # the critic moved, so did GAE


def test_without_the_switch_advantages_stay_those_of_the_rollout() -> None:
    snapshot = _Snapshot()
    model = ClippedPPO("MlpPolicy", _pendulum(), extensions=[snapshot], **SETTINGS)
    model.learn(64)
    assert model.extension(RecomputeAdvantages) is None
    for epoch in snapshot.epochs[1:]:
        np.testing.assert_array_equal(epoch["advantages"], snapshot.epochs[0]["advantages"])


def test_reward_scaler_equals_a_hand_computed_running_std_of_the_discounted_return() -> None:
    rng = np.random.default_rng(0)
    gamma, eps = 0.9, 1e-8
    scaler = RewardScaler(gamma, epsilon=eps)
    running, seen = np.zeros(3), []
    for _ in range(40):
        rewards = rng.normal(1.0, 2.0, size=3).astype(np.float32)
        dones = rng.random(3) < 0.1
        scaled = scaler(rewards)
        running = running * gamma + rewards.astype(np.float64)
        seen.extend(running)
        # SB3's RunningMeanStd starts from var 1 with a tiny count: its variance after n values is
        # (1 * 1e-4 + n * var_n + corrections) / (1e-4 + n); for n >= 3 it equals the sample variance to 1e-4
        expected_var = (
            1e-4 * 1.0 + np.var(seen) * len(seen) + 1e-4 * len(seen) / (1e-4 + len(seen)) * np.mean(seen) ** 2
        ) / (1e-4 + len(seen))
        np.testing.assert_allclose(scaled, rewards / np.sqrt(expected_var + eps), rtol=1e-5)
        scaler.end_episodes(dones)
        running[dones] = 0.0


def test_reward_scaling_reaches_the_buffer_and_leaves_the_episode_statistics_raw() -> None:
    models = []
    for scale_rewards in (False, True):  # one after the other: each rollout starts from its model's seed
        model = ClippedPPO("MlpPolicy", _pendulum(), scale_rewards=scale_rewards, **SETTINGS)
        _, callback = model._setup_learn(64)
        assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
        models.append(model)
    plain, scaled = models
    assert scaled.extension(RewardScaling) is not None and plain.extension(RewardScaling) is None
    np.testing.assert_array_equal(plain.rollout_buffer.actions, scaled.rollout_buffer.actions)
    ratio = scaled.rollout_buffer.rewards / plain.rollout_buffer.rewards
    assert (ratio > 0).all() and not np.allclose(ratio, 1.0)  # signs kept, magnitudes scaled
    # Pendulum's 200-step episodes do not end within 32 steps: the last step's divisor is the scaler's
    np.testing.assert_allclose(ratio[-1], 1.0 / scaled.reward_scaler.scale, rtol=1e-5)


def test_reward_scaler_statistics_are_saved_with_the_model(tmp_path) -> None:
    model = ClippedPPO("MlpPolicy", _pendulum(), scale_rewards=True, **SETTINGS).learn(64)
    model.save(tmp_path / "m")
    loaded = ClippedPPO.load(tmp_path / "m", env=_pendulum())
    assert loaded.reward_scaler.statistics.count == model.reward_scaler.statistics.count
    assert loaded.reward_scaler.scale == pytest.approx(model.reward_scaler.scale)
    assert loaded.extension(RewardScaling).scaler is loaded.reward_scaler


def test_recompute_advantages_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ConfigurationError, match="recompute_advantages"):
        ClippedPPO("MlpLstmPolicy", _pendulum(), recompute_advantages=True, **SETTINGS)
    with pytest.raises(ConfigurationError, match="recompute_advantages"):
        ClippedPPO("MlpPolicy", _pendulum(), recompute_advantages=True, normalize_advantage="batch", **SETTINGS)
    with pytest.raises(ConfigurationError, match="scale_rewards"):
        ClippedPPO("MlpPolicy", _pendulum(), scale_rewards="yes", **SETTINGS)


def test_both_switches_with_vecnormalize_observations_train_to_finite_parameters() -> None:
    env = VecNormalize(_pendulum(), norm_reward=False)
    model = ClippedPPO("MlpPolicy", env, recompute_advantages=True, scale_rewards=True, **SETTINGS).learn(128)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


def test_the_tuned_mujoco_preset_turns_both_switches_on_for_the_four_envs() -> None:
    import inspect

    from sb3_ppo_ext.zoo import presets

    names = set(inspect.signature(ClippedPPO.__init__).parameters)
    for env_id in ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5"):
        settings = presets.preset("mujoco-tuned", env_id)
        assert settings.model_kwargs["recompute_advantages"] is True and settings.model_kwargs["scale_rewards"] is True
        assert set(settings.model_kwargs) <= names  # rl_zoo3 hands every model key to the constructor
        assert settings.normalize == {"norm_obs": True, "norm_reward": False, "gamma": 0.99}
        assert settings == presets.zoo_settings("clipped_ppo_tuned", env_id)  # the harness reads the same file
    with pytest.raises(ValueError, match="no block for 'Pendulum-v1'"):
        presets.preset("mujoco-tuned", "Pendulum-v1")


def test_the_tuned_preset_leaves_ants_contact_forces_out_of_the_observation() -> None:
    from sb3_ppo_ext.zoo import presets
    from sb3_ppo_ext.zoo.envs import make_env

    ant = presets.preset("mujoco-tuned", "Ant-v5")
    assert ant.env_kwargs == {"include_cfrc_ext_in_observation": False}
    # the same algorithm settings as the other envs: only the env differs
    assert ant.model_kwargs == presets.preset("mujoco-tuned", "Hopper-v5").model_kwargs
    assert all(not presets.preset("mujoco-tuned", e).env_kwargs for e in ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5"))
    for evaluation in (False, True):  # training and evaluation envs alike: 27 dims instead of Ant-v5's 105
        env = make_env("Ant-v5", ant, 1, 0, evaluation=evaluation)
        assert env.observation_space.shape == (27,)
        env.close()
