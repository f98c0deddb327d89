"""The tuned MuJoCo preset from Python: ClippedPPO on a MuJoCo v5 env with the settings that pass the published 1M.

    python examples/mujoco_tuned_preset.py                          # Hopper-v5, 1M steps, about 20 min on a core
    python examples/mujoco_tuned_preset.py --env Ant-v5              # HalfCheetah-, Hopper-, Walker2d- or Ant-v5
    python examples/mujoco_tuned_preset.py --timesteps 20000         # or EXAMPLE_TIMESTEPS=20000

The preset (``--preset mujoco-tuned`` on the command line; ``sb3_ppo_ext/zoo/hyperparams/
clipped_ppo_mujoco_tuned.yml``) turns on the two implementation choices SB3's PPO lacks, advantages recomputed with
the current critic before every epoch (``recompute_advantages``) and rewards scaled by a running std of the
discounted return (``scale_rewards``), with observation normalisation, no advantage normalisation and a decaying
learning rate. On Ant-v5 it also leaves the contact forces out of the observation (``env_kwargs``). At 1M steps,
5 seeds, it reaches IQM 3412 on Hopper, 4549 on Walker2d, 6086 on HalfCheetah and 3796 on Ant (docs/benchmark.md).
The model is saved with its ``VecNormalize`` statistics, which it needs to be loaded and run again.
"""

import argparse
import os

from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import sync_envs_normalization

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.zoo.envs import make_env
from sb3_ppo_ext.zoo.presets import preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Hopper-v5", help="HalfCheetah-v5, Hopper-v5, Walker2d-v5 or Ant-v5")
    parser.add_argument("--timesteps", type=int, default=int(os.environ.get("EXAMPLE_TIMESTEPS", 1_000_000)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--save-path", default=None, help="default: clipped_ppo_tuned_<env>")
    args = parser.parse_args()
    save_path = args.save_path or f"clipped_ppo_tuned_{args.env}"

    settings = preset("mujoco-tuned", args.env)  # the env's block of the shipped YAML, parsed
    env = make_env(args.env, settings, seed=args.seed)  # 8 envs, the block's env_kwargs, VecNormalize
    model = ClippedPPO(settings.policy, env, seed=args.seed, **settings.model_kwargs)
    switches = {key: settings.model_kwargs[key] for key in ("recompute_advantages", "scale_rewards")}
    print(f"{args.env}: {env.num_envs} envs, observation {env.observation_space.shape}, {switches}")
    model.learn(args.timesteps)
    model.save(save_path)
    env.save(f"{save_path}_vecnormalize.pkl")

    # a separate env with the training statistics frozen and the env's own rewards: the harness's evaluation
    eval_env = make_env(args.env, settings, n_envs=1, seed=args.seed + 1000, evaluation=True)
    sync_envs_normalization(env, eval_env)
    mean, std = evaluate_policy(model, eval_env, n_eval_episodes=args.eval_episodes, deterministic=True)
    episodes = args.eval_episodes
    print(f"evaluation: mean return {mean:.1f} +/- {std:.1f} over {episodes} episodes after {args.timesteps} steps")
    print(f"saved {save_path}.zip and {save_path}_vecnormalize.pkl")


if __name__ == "__main__":
    main()
