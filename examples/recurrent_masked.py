"""Memory and invalid-action masks together: ClippedPPO with an LSTM policy on a masked task.

    python examples/recurrent_masked.py                    # 40k steps, about a minute (OMP_NUM_THREADS=1)
    python examples/recurrent_masked.py --timesteps 5000   # or EXAMPLE_TIMESTEPS=5000

The task (``sb3_ppo_ext.zoo.envs.MaskedMemoryEnv``, registered as ``MaskedMemory-v0``) shows a cue at the
first of 8 steps only, and pays +1 at the last step for naming it: that takes memory. On the steps in
between, 4 of 32 actions are valid, and which 4 depends on the hidden cue: the env says which through
``action_masks()``, and an invalid action ends the episode with -1. sb3-contrib has RecurrentPPO
(memory, no masks) and MaskablePPO (masks, no memory); ClippedPPO's "MlpLstmPolicy" has both.
"""

import argparse
import os

import numpy as np
from sb3_contrib.common.maskable.utils import get_action_masks
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.zoo.envs import MaskedMemoryEnv


def evaluate(model: ClippedPPO, n_episodes: int, seed: int) -> tuple[list[float], int]:
    """Play ``n_episodes`` with masks and LSTM states; return the episode returns and the invalid actions taken.

    sb3-contrib's predict loop for recurrent policies, plus ``action_masks``. (sb3-contrib 2.9's masked
    ``evaluate_policy`` loses the LSTM states between steps, so it would score an LSTM policy as memoryless.)
    """
    env = make_vec_env(MaskedMemoryEnv, n_envs=1, seed=seed)
    obs = env.reset()
    lstm_states = None
    episode_starts = np.ones((env.num_envs,), dtype=bool)  # an episode start resets the LSTM states
    returns, invalid, total = [], 0, 0.0
    while len(returns) < n_episodes:
        action, lstm_states = model.predict(
            obs,
            state=lstm_states,
            episode_start=episode_starts,
            deterministic=True,
            action_masks=get_action_masks(env),
        )
        obs, rewards, dones, infos = env.step(action)
        episode_starts = dones
        total += float(rewards[0])
        if dones[0]:
            invalid += int(infos[0].get("invalid", False))
            returns.append(total)
            total = 0.0
    return returns, invalid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=int(os.environ.get("EXAMPLE_TIMESTEPS", 40_000)))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    env = make_vec_env(MaskedMemoryEnv, n_envs=8, seed=args.seed)
    model = ClippedPPO(
        "MlpLstmPolicy",  # was: RecurrentPPO("MlpLstmPolicy", ...), which cannot take the masks
        env,
        n_steps=128,
        batch_size=256,
        learning_rate=1e-3,
        ent_coef=0.01,
        policy_kwargs=dict(lstm_hidden_size=64, net_arch=dict(pi=[64], vf=[64])),
        seed=args.seed,
    )
    model.learn(args.timesteps)  # reads the env's action_masks() at every step, keeps the LSTM states

    returns, invalid = evaluate(model, n_episodes=100, seed=args.seed + 1000)
    recalled = np.mean(np.asarray(returns) == 1.0)
    print(f"evaluation: mean return {np.mean(returns):.2f} over {len(returns)} episodes (optimal 1, memoryless 0.25)")
    print(f"cue recalled in {recalled:.0%} of the episodes; invalid actions taken: {invalid}")


if __name__ == "__main__":
    main()
