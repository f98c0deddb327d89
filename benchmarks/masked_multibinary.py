"""ClippedPPO's two MultiBinary parametrisations against MaskablePPO on sb3-contrib's masked MultiBinary env.

``InvalidActionEnvMultiBinary(dims=16, n_invalid_actions=10)``: 16 bits, 10 of the 32 bit values forced by
the masks each step, reward 1 when the action equals the state. Identical settings for all three (8 envs,
n_steps 128, batch 256, 10 epochs, 50k steps, SB3's other defaults); 10 deterministic evaluation episodes
with the masks on a separately seeded env. One line per run:

    python benchmarks/masked_multibinary.py --seeds 0 1 2 [--timesteps 50000]

Variants: ``bernoulli`` (ClippedPPO's default, one logit per bit as SB3's PPO), ``categorical``
(``policy_kwargs=dict(multibinary_head="categorical")``, two logits per bit) and ``maskable_ppo``.
"""

from __future__ import annotations

import argparse

import torch as th
from sb3_contrib import MaskablePPO
from sb3_contrib.common.envs import InvalidActionEnvMultiBinary
from sb3_contrib.common.maskable.evaluation import evaluate_policy
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO

ENV_KWARGS = dict(dims=16, n_invalid_actions=10)
VARIANTS = ("categorical", "bernoulli", "maskable_ppo")


def run(variant: str, seed: int, timesteps: int) -> float:
    """Train one variant and return its mean evaluation return."""
    th.set_num_threads(1)
    env = make_vec_env(InvalidActionEnvMultiBinary, n_envs=8, seed=seed, env_kwargs=ENV_KWARGS)
    kwargs = dict(n_steps=128, batch_size=256, n_epochs=10, seed=seed, device="cpu")
    if variant == "maskable_ppo":
        model = MaskablePPO("MlpPolicy", env, **kwargs)
    else:
        model = ClippedPPO("MlpPolicy", env, policy_kwargs=dict(multibinary_head=variant), **kwargs)
    model.learn(timesteps)
    eval_env = InvalidActionEnvMultiBinary(**ENV_KWARGS)
    eval_env.reset(seed=1000 + seed)
    mean, _ = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
    return float(mean)


def main() -> None:
    """Run every variant for every seed, printing one line per run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--timesteps", type=int, default=50_000)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()
    for seed in args.seeds:
        for variant in args.variants:
            print(f"{variant} seed {seed} steps {args.timesteps}: {run(variant, seed, args.timesteps):.1f}", flush=True)


if __name__ == "__main__":
    main()
