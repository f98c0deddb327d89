"""Invalid-action masking: ClippedPPO where you would use sb3-contrib's MaskablePPO.

    python examples/action_masking.py                    # 20k steps, well under a minute on one core
    python examples/action_masking.py --timesteps 5000   # or EXAMPLE_TIMESTEPS=5000

The env (sb3-contrib's InvalidActionEnvDiscrete: name the current state, 12 actions of which 8 are
invalid at every step) has an ``action_masks()`` method; ClippedPPO reads it at every step, samples only
valid actions and trains on the masked distribution. The switch from MaskablePPO is the import line.
"""

import argparse
import os

from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from sb3_contrib.common.maskable.evaluation import evaluate_policy
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO as MaskablePPO  # was: from sb3_contrib import MaskablePPO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=int(os.environ.get("EXAMPLE_TIMESTEPS", 20_000)))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    env_kwargs = dict(dim=12, n_invalid_actions=8)
    env = make_vec_env(InvalidActionEnvDiscrete, n_envs=4, seed=args.seed, env_kwargs=env_kwargs)
    model = MaskablePPO("MlpPolicy", env, n_steps=128, batch_size=64, learning_rate=3e-3, seed=args.seed)
    model.learn(args.timesteps)  # use_masking=True (the default) applies the env's masks

    eval_env = InvalidActionEnvDiscrete(**env_kwargs)
    mean, std = evaluate_policy(model, eval_env, n_eval_episodes=5, deterministic=True, warn=False)
    print(f"evaluation: mean return {mean:.1f} +/- {std:.1f} (an episode is 100 steps, 1 per correct action)")

    obs, _ = eval_env.reset(seed=args.seed)
    action, _ = model.predict(obs, action_masks=eval_env.action_masks(), deterministic=True)
    print(f"valid actions now: {[i for i, ok in enumerate(eval_env.action_masks()) if ok]}, chosen: {int(action)}")


if __name__ == "__main__":
    main()
