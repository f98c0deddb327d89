"""Throughput benchmark: ClippedPPO vs SB3's PPO at identical hyperparameters, in one run.

Workloads with a ``counterpart`` compare against sb3-contrib instead: ``masked`` against MaskablePPO,
``recurrent`` (LSTM policies) against RecurrentPPO; ``reference_reward`` and ``reference_loss`` (the KL
penalty to a reference policy, in the reward or in the loss) against plain ClippedPPO. ``distributed``,
``distributed_halfcheetah`` and ``distributed_pong`` compare ClippedPPO on 1 process against 2 processes
launched by ``torchrun`` (data-parallel, 1 thread each, the same per-rank settings and the same total env
steps): weak scaling, global env-steps/s.

Each (workload, algorithm, seed) trains in a fresh subprocess so that peak RSS is measured per run;
runs alternate A B B A (seed by seed) to cancel slow machine drift. Results go to ``benchmarks/results/throughput.md``
and ``throughput.json``.

    python benchmarks/throughput.py                      # every workload, default budgets
    python benchmarks/throughput.py --workloads cartpole --seeds 0 1 2 --timesteps 50000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# RL Zoo hyperparameters (the shipped mirror of the Zoo's ppo.yml; Pong gets its "atari" block),
# identical for both algorithms; "counterpart" is the library a user would otherwise pick (default SB3's PPO)
WORKLOADS: dict[str, dict[str, Any]] = {
    "cartpole": dict(env_id="CartPole-v1", timesteps=100_000, eval_episodes=10),
    "halfcheetah": dict(env_id="HalfCheetah-v5", timesteps=20_480, eval_episodes=3),
    "pong": dict(env_id="ALE/Pong-v5", timesteps=16_384, eval_episodes=1),
    # SB3's constructor defaults (PPO("MlpPolicy", env): 1 env, n_steps 2048, batch 64, 10 epochs, lr 3e-4)
    "cartpole_defaults": dict(env_id="CartPole-v1", timesteps=50_000, eval_episodes=10, block=dict(n_envs=1)),
    "halfcheetah_defaults": dict(env_id="HalfCheetah-v5", timesteps=20_480, eval_episodes=3, block=dict(n_envs=1)),
    # invalid-action masking against sb3-contrib's MaskablePPO: 64 actions, 48 of them invalid at each step
    "masked": dict(
        env_id="InvalidActionEnvDiscrete-v0",
        timesteps=50_000,
        eval_episodes=5,
        counterpart="maskable_ppo",
        block=dict(policy="MlpPolicy", n_envs=8, n_steps=128, batch_size=256, n_epochs=10, learning_rate=3e-4),
    ),
    # LSTM policies against sb3-contrib's RecurrentPPO, both with the Zoo's ppo_lstm.yml CartPoleNoVel settings
    # (MlpLstmPolicy, 64 LSTM units, critic LSTM, 8 envs, n_steps 32, batch 256, 20 epochs, VecNormalize)
    "recurrent": dict(
        env_id="CartPoleNoVel-v1",
        timesteps=100_000,
        eval_episodes=10,
        counterpart="recurrent_ppo",
        settings="clipped_ppo_lstm",
    ),
    # the KL penalty to a reference policy (issue 13) against plain ClippedPPO, both at the Zoo's CartPole settings;
    # the reference is the model's own initial policy (fine-tuning starts from it), beta = 0.1
    **{
        f"reference_{mode}": dict(
            env_id="CartPole-v1",
            timesteps=100_000,
            eval_episodes=10,
            counterpart="clipped_ppo",
            candidate=f"clipped_ppo_ref_{mode}",
        )
        for mode in ("reward", "loss")
    },
    # data-parallel ClippedPPO: 1 process against 2 ranks under torchrun, the Zoo's settings per rank
    "distributed": dict(
        env_id="CartPole-v1",
        timesteps=100_000,
        eval_episodes=10,
        counterpart="clipped_ppo",
        candidate="clipped_ppo_2ranks",
    ),
    "distributed_halfcheetah": dict(
        env_id="HalfCheetah-v5",
        timesteps=40_960,
        eval_episodes=3,
        counterpart="clipped_ppo",
        candidate="clipped_ppo_2ranks",
    ),
    # NatureCNN, the Zoo's Atari settings per rank (8 envs, n_steps 128, batch 256, 4 epochs): 32 updates of one
    # rank against 16 of two
    "distributed_pong": dict(
        env_id="ALE/Pong-v5",
        timesteps=32_768,
        eval_episodes=1,
        counterpart="clipped_ppo",
        candidate="clipped_ppo_2ranks",
    ),
}
COUNTERPARTS = ("ppo", "maskable_ppo", "recurrent_ppo")
# ClippedPPO fine-tuned against a reference: algorithm name -> ref_kl_mode
REFERENCE_MODES = {"clipped_ppo_ref_reward": "reward", "clipped_ppo_ref_loss": "loss"}
# algorithm name -> number of torchrun ranks (the others run as one plain process)
RANKS = {"clipped_ppo_2ranks": 2}


def _register_masked_env() -> None:
    import gymnasium as gym

    if "InvalidActionEnvDiscrete-v0" not in gym.registry:
        gym.register(
            "InvalidActionEnvDiscrete-v0",
            entry_point="sb3_contrib.common.envs:InvalidActionEnvDiscrete",
            kwargs=dict(dim=64, n_invalid_actions=48),
        )


def _settings(workload: str) -> Any:
    from sb3_ppo_ext.zoo.presets import parse_zoo_block, zoo_settings

    spec = WORKLOADS[workload]
    if "block" in spec:
        _register_masked_env()
        return parse_zoo_block(spec["block"])
    return zoo_settings(spec.get("settings", "clipped_ppo"), spec["env_id"])


def _pair(workload: str) -> tuple[str, str]:
    """The baseline and the algorithm compared with it in ``workload``."""
    spec = WORKLOADS[workload]
    return spec.get("counterpart", "ppo"), spec.get("candidate", "clipped_ppo")


def _make_env(workload: str, seed: int, n_envs: int | None = None, evaluation: bool = False) -> Any:
    from sb3_ppo_ext.zoo.envs import make_env

    return make_env(WORKLOADS[workload]["env_id"], _settings(workload), n_envs, seed, evaluation=evaluation)


def _model(workload: str, env: Any, seed: int) -> Any:
    """ClippedPPO with the workload's Zoo settings (for the floors)."""
    from sb3_ppo_ext import ClippedPPO

    settings = _settings(workload)
    return ClippedPPO(settings.policy, env, seed=seed, device="cpu", **settings.model_kwargs)


def run_single(workload: str, algo: str, seed: int, timesteps: int, threads: int) -> dict[str, Any]:
    """Train one model in this process and return its measurements."""
    import numpy as np
    import torch as th
    from sb3_contrib import MaskablePPO, RecurrentPPO
    from sb3_contrib.common.maskable.evaluation import evaluate_policy as evaluate_masked
    from stable_baselines3 import PPO
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import sync_envs_normalization

    from sb3_ppo_ext import ClippedPPO

    th.set_num_threads(threads)
    spec, settings = WORKLOADS[workload], _settings(workload)
    classes = {"clipped_ppo": ClippedPPO, "ppo": PPO, "maskable_ppo": MaskablePPO, "recurrent_ppo": RecurrentPPO}
    # under torchrun ClippedPPO finds its ranks by itself
    cls = ClippedPPO if algo in RANKS or algo in REFERENCE_MODES else classes[algo]
    if spec.get("counterpart") == "maskable_ppo":
        evaluate_policy = evaluate_masked  # noqa: N806 - both apply the env's masks when it has them
    env = _make_env(workload, seed)
    reference_kwargs: dict[str, Any] = {}
    if algo in REFERENCE_MODES:
        reference = ClippedPPO(settings.policy, env, seed=seed, device="cpu", **settings.model_kwargs)
        reference_kwargs = dict(ref_policy=reference, ref_kl_coef=0.1, ref_kl_mode=REFERENCE_MODES[algo])
    model = cls(settings.policy, env, seed=seed, device="cpu", **reference_kwargs, **settings.model_kwargs)
    if reference_kwargs:  # fine-tuning starts from the reference
        model.policy.load_state_dict(reference_kwargs["ref_policy"].policy.state_dict())

    timers = {"rollout": 0.0, "train": 0.0}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[name] += time.perf_counter() - start

        return wrapper

    model.collect_rollouts = timed("rollout", model.collect_rollouts)  # type: ignore[method-assign]
    model.train = timed("train", model.train)  # type: ignore[method-assign]
    start, cpu_start = time.perf_counter(), time.process_time()
    model.learn(timesteps)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    ranks = getattr(model, "distributed", None)
    if ranks is not None and ranks.enabled:  # torchrun: the CPU time of every rank; rank 0 evaluates and reports
        import torch.distributed as dist

        total = th.tensor([cpu], dtype=th.float64)
        dist.all_reduce(total)
        cpu = float(total)
        if not ranks.is_main_process:
            return {}

    eval_env = _make_env(workload, seed + 1000, n_envs=1, evaluation=True)
    sync_envs_normalization(model.get_env(), eval_env)  # the training statistics, frozen
    returns, _ = evaluate_policy(model, eval_env, n_eval_episodes=spec["eval_episodes"], return_episode_rewards=True)
    return dict(
        workload=workload,
        algo=algo,
        seed=seed,
        timesteps=model.num_timesteps,
        wall_s=wall,
        cpu_s=cpu,
        ranks=1 if ranks is None else ranks.world_size,
        fps=model.num_timesteps / wall,
        cpu_fps=model.num_timesteps / cpu,
        rollout_s=timers["rollout"],
        train_s=timers["train"],
        eval_return=float(np.mean(returns)),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def floors(workload: str, seed: int, threads: int, steps: int = 4096) -> dict[str, float]:
    """Env-only steps/s (random actions) and env + ClippedPPO policy forward steps/s."""
    import numpy as np
    import torch as th
    from gymnasium import spaces
    from stable_baselines3.common.utils import obs_as_tensor

    th.set_num_threads(threads)
    env = _make_env(workload, seed)
    n = env.num_envs
    iterations = max(1, steps // n)
    env.reset()
    actions = np.stack([env.action_space.sample() for _ in range(n)])
    start = time.perf_counter()
    for _ in range(iterations):
        env.step(actions)
    env_only = iterations * n / (time.perf_counter() - start)

    model = _model(workload, env, seed)
    env = model.get_env()  # with the image-transposing wrapper SB3 adds for CNN policies
    obs = env.reset()
    # an LSTM policy also takes and returns its states, reset where an episode starts
    recurrent = hasattr(model.policy, "initial_state")
    states = model.policy.initial_state(n) if recurrent else None
    starts = th.ones(n)
    start = time.perf_counter()
    for _ in range(iterations):
        with th.no_grad():
            if recurrent:
                act, _, _, states = model.policy(obs_as_tensor(obs, model.device), states, starts)
            else:
                act, _, _ = model.policy(obs_as_tensor(obs, model.device))
        act = act.numpy()
        if isinstance(env.action_space, spaces.Box):
            act = np.clip(act, env.action_space.low, env.action_space.high)
        obs, _, dones, _ = env.step(act)
        starts = th.as_tensor(dones, dtype=th.float32)
    with_policy = iterations * n / (time.perf_counter() - start)
    return {"env_only_fps": env_only, "env_policy_fps": with_policy}


def _child(args: list[str]) -> dict[str, Any]:
    launcher = [sys.executable]
    if args[1] in RANKS:  # data-parallel: the same child on RANKS[algo] processes
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS[args[1]]}"]
    out = subprocess.run(
        [*launcher, __file__, "--child", *args], check=True, capture_output=True, text=True, env=os.environ
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _cpu_model() -> str:
    """The CPU's model name and torch's vector capability (kernels, and so speed and rounding, depend on both)."""
    import torch as th

    from sb3_ppo_ext.fast.cpu import cpu_model

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, cwd=RESULTS.parent
    )
    return f"{cpu_model()} ({th.backends.cpu.get_cpu_capability()}), code {commit.stdout.strip() or 'unknown'}"


def summarize(runs: list[dict[str, Any]], floor: dict[str, dict[str, float]], threads: int) -> str:
    """The markdown table of the results."""
    lines = [
        f"Machine: {_cpu_model()}, {os.cpu_count()} cores, "
        f"torch threads = {threads}, Python {platform.python_version()}.",
        "",
        "| workload | algo | env-steps/s (median, wall) | per CPU-second | rollout s | train s | peak RSS MB "
        "| eval return per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for workload in dict.fromkeys(r["workload"] for r in runs):
        fps, cpu_fps = {}, {}
        baseline, candidate = _pair(workload)
        for algo in (baseline, candidate):
            rs = [r for r in runs if r["workload"] == workload and r["algo"] == algo]
            if not rs:
                continue
            fps[algo] = _median([r["fps"] for r in rs])
            cpu_fps[algo] = _median([r["cpu_fps"] for r in rs])
            lines.append(
                f"| {workload} | {algo} | {fps[algo]:.0f} | {cpu_fps[algo]:.0f} | "
                f"{_median([r['rollout_s'] for r in rs]):.1f} | "
                f"{_median([r['train_s'] for r in rs]):.1f} | {max(r['peak_rss_mb'] for r in rs):.0f} | "
                + ", ".join(f"{r['eval_return']:.1f}" for r in sorted(rs, key=lambda r: r["seed"]))
                + " |"
            )
        if baseline in fps and candidate in fps:
            ratios.append((workload, fps[candidate] / fps[baseline], cpu_fps[candidate] / cpu_fps[baseline]))
    lines += [
        "",
        "| workload | ClippedPPO / counterpart (distributed: 2 ranks / 1; reference: with / without) env-steps/s "
        "(wall) | same, per CPU-second "
        "| env-only steps/s "
        "| env + policy forward steps/s |",
        "|---|---|---|---|---|",
    ]
    for workload, ratio, cpu_ratio in ratios:
        f = floor.get(workload, {})
        lines.append(
            f"| {workload} | **{ratio:.2f}x** | {cpu_ratio:.2f}x | {f.get('env_only_fps', float('nan')):.0f} | "
            f"{f.get('env_policy_fps', float('nan')):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse arguments and run the benchmark (or one child run)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--timesteps", type=int, default=None, help="override every workload's budget")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=5, metavar=("WORKLOAD", "ALGO", "SEED", "TIMESTEPS", "THREADS"))
    args = parser.parse_args()
    if args.child:
        workload, algo, seed, timesteps, threads = args.child
        if algo == "floors":
            print(json.dumps(floors(workload, int(seed), int(threads))))
        else:
            result = run_single(workload, algo, int(seed), int(timesteps), int(threads))
            if result:  # empty on the ranks other than 0 of a torchrun launch
                print(json.dumps(result))
        return

    runs: list[dict[str, Any]] = []
    floor: dict[str, dict[str, float]] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    for workload in args.workloads:
        timesteps = args.timesteps or WORKLOADS[workload]["timesteps"]
        floor[workload] = _child([workload, "floors", "0", "0", str(args.threads)])
        for index, seed in enumerate(args.seeds):
            # A B B A ...: which library runs first alternates, so a drift within a pair cancels over two seeds
            pair = _pair(workload)
            for algo in pair if index % 2 == 0 else pair[::-1]:
                run = _child([workload, algo, str(seed), str(timesteps), str(args.threads)])
                runs.append(run)
                print(
                    f"{workload:12s} {algo:12s} seed {seed}: {run['fps']:7.0f} steps/s "
                    f"(rollout {run['rollout_s']:.1f}s, train {run['train_s']:.1f}s), "
                    f"RSS {run['peak_rss_mb']:.0f} MB, eval {run['eval_return']:.1f}",
                    flush=True,
                )
                _write(args.out, runs, floor, args.threads)
    print(_write(args.out, runs, floor, args.threads))


def _write(out: Path, runs: list[dict[str, Any]], floor: dict[str, dict[str, float]], threads: int) -> str:
    """Write (or rewrite, after every run) the markdown table and the JSON file; return the table."""
    table = summarize(runs, floor, threads)
    (out / "throughput.md").write_text("# Throughput: ClippedPPO vs SB3 PPO\n\n" + table)
    (out / "throughput.json").write_text(
        json.dumps({"threads": threads, "runs": runs, "floors": floor}, indent=2) + "\n"
    )
    return table


if __name__ == "__main__":
    main()
