"""Continuous control with VecNormalize: ClippedPPO on Pendulum-v1, normalization statistics saved with the model.

    python examples/continuous_vecnormalize.py                    # 100k steps, about 30 s on one CPU core
    python examples/continuous_vecnormalize.py --timesteps 4096   # or EXAMPLE_TIMESTEPS=4096

``VecNormalize`` keeps running means of observations and returns. They are part of the agent: an
agent loaded without them sees differently scaled observations. So the script saves them next to the
model and loads both for evaluation, with the statistics frozen and rewards left unnormalized so the
returns are the env's own (a random policy scores about -1200, a good one about -200; seed 0 reaches about -170).
"""

import argparse
import os

from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecNormalize

from sb3_ppo_ext import ClippedPPO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=int(os.environ.get("EXAMPLE_TIMESTEPS", 100_000)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-path", default="clipped_ppo_pendulum")
    args = parser.parse_args()
    stats_path = f"{args.save_path}_vecnormalize.pkl"

    gamma = 0.9
    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=4, seed=args.seed), gamma=gamma)
    # the RL Zoo's tuned Pendulum-v1 settings (gSDE exploration, resampled every 4 steps)
    model = ClippedPPO(
        "MlpPolicy",
        env,
        n_steps=1024,
        gamma=gamma,
        gae_lambda=0.95,
        n_epochs=10,
        learning_rate=1e-3,
        clip_range=0.2,
        use_sde=True,
        sde_sample_freq=4,
        seed=args.seed,
        device="cpu",
        verbose=1,
    )
    model.learn(total_timesteps=args.timesteps)
    model.save(args.save_path)
    env.save(stats_path)
    env.close()
    del model, env

    # evaluation: same statistics, frozen (training=False), and raw rewards (norm_reward=False)
    eval_env = VecNormalize.load(stats_path, make_vec_env("Pendulum-v1", n_envs=1, seed=args.seed + 1000))
    eval_env.training = False
    eval_env.norm_reward = False
    model = ClippedPPO.load(args.save_path, env=eval_env, device="cpu")
    mean_return, std_return = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
    print(f"evaluation: mean return {mean_return:.1f} +/- {std_return:.1f} over 10 episodes")
    print(f"saved {args.save_path}.zip and {stats_path}")


if __name__ == "__main__":
    main()
