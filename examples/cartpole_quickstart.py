"""Quickstart: train ClippedPPO on CartPole-v1, evaluate it, save it, load it back and play one episode.

    python examples/cartpole_quickstart.py                    # 100k steps, 15-20 s on one CPU core
    python examples/cartpole_quickstart.py --timesteps 5000   # or EXAMPLE_TIMESTEPS=5000

The hyperparameters are the RL Baselines3 Zoo's tuned CartPole-v1 settings; with them the agent
usually reaches the maximum return of 500 within 100k steps.
"""

import argparse
import os

import gymnasium as gym
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.schedules import linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=int(os.environ.get("EXAMPLE_TIMESTEPS", 100_000)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-path", default="clipped_ppo_cartpole")
    args = parser.parse_args()

    # 8 envs x 32 steps = 256 samples per rollout, one minibatch of 256, 20 epochs (RL Zoo's settings)
    env = make_vec_env("CartPole-v1", n_envs=8, seed=args.seed)
    model = ClippedPPO(
        "MlpPolicy",
        env,
        n_steps=32,
        batch_size=256,
        n_epochs=20,
        gamma=0.98,
        gae_lambda=0.8,
        ent_coef=0.0,
        learning_rate=linear(1e-3),  # 1e-3 -> 0 over training
        clip_range=linear(0.2),  # 0.2 -> 0 over training
        seed=args.seed,
        device="cpu",
        verbose=1,
    )
    model.learn(total_timesteps=args.timesteps)
    model.save(args.save_path)
    del model

    # a loaded model needs no env to act; evaluate_policy wraps a plain env in a VecEnv itself
    model = ClippedPPO.load(args.save_path, device="cpu")
    eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=args.seed + 1000)
    mean_return, std_return = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
    print(f"evaluation: mean return {mean_return:.1f} +/- {std_return:.1f} over 10 episodes")

    # predict() also takes a single, unbatched observation from a plain Gymnasium env
    play_env = gym.make("CartPole-v1")
    obs, _ = play_env.reset(seed=args.seed)
    episode_return, done = 0.0, False
    while not done:
        action, _ = model.predict(obs, deterministic=True)
        obs, reward, terminated, truncated, _ = play_env.step(action)
        episode_return += float(reward)
        done = terminated or truncated
    print(f"one episode with the loaded model: return {episode_return:.0f}; saved to {args.save_path}.zip")


if __name__ == "__main__":
    main()
