"""ClippedPPO learns: CartPole-v1 with RL Zoo's hyperparameters, and Pendulum-v1 (continuous, gSDE).

These are the slowest tests (tens of seconds each on one thread). They are marked ``slow`` for selection
(``-m "not slow"``) but run in the default test command. Seeds were checked offline for margin: CartPole
reaches 500 within 10k-30k steps on seeds 0-5; Pendulum goes from about -1000..-1300 to about -140..-200
after 32k steps on seeds 0-4.
"""

from __future__ import annotations

import pytest
from stable_baselines3.common.callbacks import EvalCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.schedules import linear

pytestmark = pytest.mark.slow


def test_cartpole_reaches_475_within_100k_steps() -> None:
    """RL Zoo's CartPole-v1 PPO settings; deterministic evaluation every 10k steps, stop at mean >= 475."""
    seed = 1
    env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    model = ClippedPPO(
        "MlpPolicy",
        env,
        n_steps=32,
        batch_size=256,
        gae_lambda=0.8,
        gamma=0.98,
        n_epochs=20,
        ent_coef=0.0,
        learning_rate=linear(1e-3),
        clip_range=linear(0.2),
        seed=seed,
    )
    eval_callback = EvalCallback(
        make_vec_env("CartPole-v1", n_envs=1, seed=seed + 1000),
        eval_freq=10_000 // 8,
        n_eval_episodes=10,
        deterministic=True,
        verbose=0,
        callback_on_new_best=StopTrainingOnRewardThreshold(reward_threshold=475, verbose=0),
    )
    model.learn(100_000, callback=eval_callback)
    print(f"CartPole-v1: best eval mean {eval_callback.best_mean_reward:.1f} at {model.num_timesteps} steps")
    assert eval_callback.best_mean_reward >= 475
    assert model.num_timesteps <= 100_000


def test_pendulum_clearly_improves() -> None:
    """RL Zoo's Pendulum-v1 PPO settings (gSDE), 32k steps instead of 100k: a large, clear improvement."""
    seed = 0
    env = make_vec_env("Pendulum-v1", n_envs=4, seed=seed)
    model = ClippedPPO(
        "MlpPolicy",
        env,
        n_steps=1024,
        gae_lambda=0.95,
        gamma=0.9,
        n_epochs=10,
        ent_coef=0.0,
        learning_rate=1e-3,
        clip_range=0.2,
        use_sde=True,
        sde_sample_freq=4,
        seed=seed,
    )
    eval_env = make_vec_env("Pendulum-v1", n_envs=1, seed=seed + 1000)
    before, _ = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
    model.learn(32_768)
    after, _ = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
    print(f"Pendulum-v1: eval mean {before:.0f} untrained -> {after:.0f} after {model.num_timesteps} steps")
    assert after > before + 400
    assert after > -600
