"""A typical Stable-Baselines3 script with one line changed: the import of PPO.

The original line was ``from stable_baselines3 import PPO``; everything else is plain SB3 code, and
tests/test_examples.py runs this file both ways. Budget: EXAMPLE_TIMESTEPS (default 25000).
"""

import os

import gymnasium as gym
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_ppo_ext import ClippedPPO as PPO

TOTAL_TIMESTEPS = int(os.environ.get("EXAMPLE_TIMESTEPS", 25_000))

# Parallel environments
vec_env = make_vec_env("CartPole-v1", n_envs=4, seed=0)

model = PPO("MlpPolicy", vec_env, n_steps=256, batch_size=64, ent_coef=0.0, verbose=1, seed=0, device="cpu")
model.learn(total_timesteps=TOTAL_TIMESTEPS)
model.save("ppo_cartpole")

del model  # remove to demonstrate saving and loading

model = PPO.load("ppo_cartpole", env=vec_env, device="cpu")

# Evaluate the agent on a separate environment
eval_env = gym.make("CartPole-v1")
mean_reward, std_reward = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
print(f"mean_reward={mean_reward:.2f} +/- {std_reward:.2f}")

# Enjoy the trained agent
obs = vec_env.reset()
total_reward = 0.0
for _ in range(500):
    action, _states = model.predict(obs, deterministic=True)
    obs, rewards, dones, info = vec_env.step(action)
    total_reward += float(rewards.sum())
print(f"reward collected over 500 steps of {vec_env.num_envs} envs: {total_reward:.0f}")

# Keep training the loaded model
model.learn(total_timesteps=TOTAL_TIMESTEPS // 5, reset_num_timesteps=False)
print(f"num_timesteps={model.num_timesteps}")
