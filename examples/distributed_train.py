"""Data-parallel training: the same script on N processes, launched by torchrun; one process works too.

    torchrun --standalone --nproc_per_node=2 examples/distributed_train.py        # 2 ranks on this machine
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        examples/distributed_train.py                                            # 2 hosts x 4 ranks (GPUs)
    python examples/distributed_train.py --timesteps 4096                         # one process, as any script

Nothing in the script is specific to distribution but the rank-0 guards around what it writes and prints:
``ClippedPPO`` finds torchrun's environment (``WORLD_SIZE > 1``), joins the process group (gloo on CPU, nccl
on CUDA with one GPU per rank) and trains one model on every rank's data:

* ``n_envs``, ``n_steps`` and ``batch_size`` are per rank: with N ranks each update sees N times the data;
* ``total_timesteps`` counts the env steps of all ranks; schedules and callbacks see that global count;
* env i of rank r is seeded with ``seed + r * n_envs + i``;
* rank 0 alone logs, saves (``model.save`` does nothing on the others) and runs ``EvalCallback`` /
  ``CheckpointCallback``.

CartPole-v1 with the RL Zoo's settings (8 envs per rank, n_steps 32, batch 256); seed 0 reaches a mean
return of 500 in 100k env steps, on one process or two.
"""

import argparse
import os

from stable_baselines3.common.callbacks import CheckpointCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_ppo_ext import ClippedPPO, distributed
from sb3_ppo_ext.schedules import linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=int(os.environ.get("EXAMPLE_TIMESTEPS", 100_000)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="distributed_logs")
    args = parser.parse_args()

    env = make_vec_env("CartPole-v1", n_envs=8, seed=args.seed)  # this rank's envs (re-seeded per rank)
    model = ClippedPPO(
        "MlpPolicy",
        env,
        n_steps=32,
        batch_size=256,
        n_epochs=20,
        gae_lambda=0.8,
        gamma=0.98,
        ent_coef=0.0,
        learning_rate=linear(1e-3),
        clip_range=linear(0.2),
        seed=args.seed,
        device="cpu",
    )
    context = model.distributed
    print(f"rank {context.rank} of {context.world_size}: {env.num_envs} envs", flush=True)

    # built on every rank, run on rank 0 only: the other ranks skip them (and never wait on them)
    eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=args.seed + 10_000)
    callbacks = [
        EvalCallback(
            eval_env,
            eval_freq=max(1, args.timesteps // 5 // (8 * context.world_size)),
            n_eval_episodes=5,
            log_path=args.log_dir,
            best_model_save_path=args.log_dir,
        ),
        CheckpointCallback(
            save_freq=max(1, args.timesteps // 2 // (8 * context.world_size)),
            save_path=os.path.join(args.log_dir, "checkpoints"),
            name_prefix="clipped_ppo",
        ),
    ]
    model.learn(total_timesteps=args.timesteps, callback=callbacks)
    model.save(os.path.join(args.log_dir, "clipped_ppo_cartpole"))  # writes on rank 0 only

    if distributed.is_main_process():
        mean_return, std_return = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
        print(
            f"trained {model.num_timesteps} env steps on {context.world_size} process(es); "
            f"evaluation: mean return {mean_return:.1f} +/- {std_return:.1f} over 10 episodes",
            flush=True,
        )
    env.close()
    eval_env.close()


if __name__ == "__main__":
    main()
