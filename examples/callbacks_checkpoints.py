"""Callbacks with ClippedPPO: periodic evaluation, checkpoints, and stopping once the task is solved.

    python examples/callbacks_checkpoints.py                    # up to 100k steps, stops at return 475
    python examples/callbacks_checkpoints.py --timesteps 2048   # or EXAMPLE_TIMESTEPS=2048

* ``EvalCallback`` evaluates on a separate env every ``--eval-every`` steps, keeps the best model in
  ``<log-dir>/best_model.zip`` and the history in ``<log-dir>/evaluations.npz``;
* ``StopTrainingOnRewardThreshold`` (as the EvalCallback's ``callback_on_new_best``) ends training once a
  new best mean return reaches ``--threshold``;
* ``CheckpointCallback`` saves ``<log-dir>/checkpoints/clipped_ppo_<steps>_steps.zip`` every
  ``--checkpoint-every`` steps;
* a custom ``BaseCallback`` counts rollouts, to show the hooks ClippedPPO calls.
"""

import argparse
import os
from pathlib import Path

from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EvalCallback,
    StopTrainingOnRewardThreshold,
)
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.schedules import linear


class RolloutCounter(BaseCallback):
    """Counts ``on_rollout_end`` calls (one per collected rollout)."""

    def __init__(self) -> None:
        super().__init__()
        self.rollouts = 0

    def _on_rollout_end(self) -> None:
        self.rollouts += 1

    def _on_step(self) -> bool:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=int(os.environ.get("EXAMPLE_TIMESTEPS", 100_000)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="logs/callbacks_example")
    parser.add_argument("--threshold", type=float, default=475.0, help="stop at this mean evaluation return")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: 1/20)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (1/5)")
    args = parser.parse_args()
    log_dir = Path(args.log_dir)
    n_envs = 8
    eval_every = args.eval_every or max(args.timesteps // 20, 1)
    checkpoint_every = args.checkpoint_every or max(args.timesteps // 5, 1)

    env = make_vec_env("CartPole-v1", n_envs=n_envs, seed=args.seed)
    eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=args.seed + 1000)
    # callback frequencies count VecEnv steps, each of which is n_envs env steps
    stop = StopTrainingOnRewardThreshold(reward_threshold=args.threshold, verbose=1)
    evaluation = EvalCallback(
        eval_env,
        callback_on_new_best=stop,
        n_eval_episodes=5,
        eval_freq=max(eval_every // n_envs, 1),
        best_model_save_path=str(log_dir),
        log_path=str(log_dir),
        deterministic=True,
        verbose=1,
    )
    checkpoints = CheckpointCallback(
        save_freq=max(checkpoint_every // n_envs, 1), save_path=str(log_dir / "checkpoints"), name_prefix="clipped_ppo"
    )
    counter = RolloutCounter()

    model = ClippedPPO(
        "MlpPolicy",
        env,
        n_steps=32,
        batch_size=256,
        n_epochs=20,
        gamma=0.98,
        gae_lambda=0.8,
        learning_rate=linear(1e-3),
        clip_range=linear(0.2),
        seed=args.seed,
        device="cpu",
    )
    model.learn(total_timesteps=args.timesteps, callback=CallbackList([evaluation, checkpoints, counter]))

    stopped_early = model.num_timesteps < args.timesteps
    print(
        f"trained {model.num_timesteps} steps in {counter.rollouts} rollouts"
        f"{' (stopped early: threshold reached)' if stopped_early else ''}; "
        f"best mean evaluation return {evaluation.best_mean_reward:.1f}"
    )
    saved = sorted(p.name for p in (log_dir / "checkpoints").glob("*.zip"))
    print(f"checkpoints: {', '.join(saved) or 'none'}")
    best = log_dir / "best_model.zip"
    if best.exists():
        best_model = ClippedPPO.load(best, device="cpu")
        print(f"loaded {best} ({best_model.num_timesteps} steps)")


if __name__ == "__main__":
    main()
