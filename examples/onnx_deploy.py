"""Train, export to ONNX, deploy with onnxruntime and numpy only: ClippedPPO on Pendulum-v1 with VecNormalize.

    python examples/onnx_deploy.py                          # train 100k steps, export, deploy
    python examples/onnx_deploy.py --timesteps 4096         # or EXAMPLE_TIMESTEPS=4096
    python examples/onnx_deploy.py --load agent.zip --vecnormalize agent_vecnormalize.pkl   # skip training
    python examples/onnx_deploy.py --deploy pendulum_policy.onnx                           # deployment only

The exported graph computes what ``model.predict(obs, deterministic=True)`` does, VecNormalize's
observation statistics and the clipping to the action bounds included, so the deployment side feeds raw
observations and gets env-ready actions. That side, :func:`deploy`, imports onnxruntime and numpy only
(and gymnasium for the env it drives: on a robot, that would be the robot); the script runs it in a fresh
process, which checks at the end that neither torch nor Stable-Baselines3 was loaded.
"""

import argparse
import os
import subprocess
import sys

ENV_ID = "Pendulum-v1"


def deploy(onnx_path: str, env_id: str = ENV_ID, episodes: int = 3, seed: int = 1000) -> list[float]:
    """Drive ``env_id`` for a few episodes with the exported policy; return the episode returns."""
    import gymnasium as gym
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one observation per step: threads only add overhead
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    print(f"loaded {onnx_path}: {metadata['observation_space']} -> {metadata['action_space']}")
    env = gym.make(env_id)
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            # a batch of one raw observation in, a batch of one action out (already within the bounds)
            (action,) = session.run(["action"], {"obs": obs[None].astype(np.float32)})
            obs, reward, terminated, truncated, _ = env.step(action[0])
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
        print(f"deployed episode {episode + 1}: return {total:.1f}")
    env.close()
    loaded = sorted(name for name in ("torch", "stable_baselines3", "sb3_ppo_ext") if name in sys.modules)
    print(f"deployment: mean return {np.mean(returns):.1f} over {episodes} episodes; loaded {loaded or 'no torch/SB3'}")
    return returns


def train_and_export(args: argparse.Namespace) -> str:
    """Train (or load) the agent, export it with its VecNormalize statistics, check it against predict."""
    import numpy as np
    import onnxruntime as ort
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_ppo_ext import ClippedPPO

    if args.load:
        model = ClippedPPO.load(args.load, device="cpu")
        stats = VecNormalize.load(args.vecnormalize, make_vec_env(ENV_ID)) if args.vecnormalize else None
    else:
        stats = VecNormalize(make_vec_env(ENV_ID, n_envs=4, seed=args.seed), gamma=0.9)
        # the RL Zoo's tuned Pendulum-v1 settings, as in examples/continuous_vecnormalize.py
        model = ClippedPPO(
            "MlpPolicy",
            stats,
            n_steps=1024,
            gamma=0.9,
            gae_lambda=0.95,
            n_epochs=10,
            learning_rate=1e-3,
            use_sde=True,
            sde_sample_freq=4,
            seed=args.seed,
            device="cpu",
        )
        model.learn(total_timesteps=args.timesteps)
    path = str(model.export(args.out, vecnormalize=stats))
    print(f"exported {path} (VecNormalize statistics {'baked in' if stats is not None else 'none'})")

    # the same raw observations through predict (normalised by VecNormalize first) and through onnxruntime
    raw = np.random.default_rng(0).uniform(-8.0, 8.0, size=(1000, 3)).astype(np.float32)
    raw[:, :2] = np.clip(raw[:, :2], -1.0, 1.0)
    expected, _ = model.predict(stats.normalize_obs(raw) if stats is not None else raw, deterministic=True)
    (actions,) = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["action"], {"obs": raw})
    print(f"onnxruntime vs model.predict on 1000 observations: max |difference| {np.abs(actions - expected).max():.1e}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=int(os.environ.get("EXAMPLE_TIMESTEPS", 100_000)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load", default=None, help="a saved ClippedPPO model instead of training one")
    parser.add_argument("--vecnormalize", default=None, help="its saved VecNormalize statistics")
    parser.add_argument("--out", default="pendulum_policy.onnx", help="the ONNX file to write")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--deploy", default=None, metavar="ONNX", help="only run this exported policy")
    args = parser.parse_args()
    if args.deploy:
        deploy(args.deploy, episodes=args.episodes)
        return
    path = train_and_export(args)
    # a fresh process: what runs there is all a deployment needs
    command = [sys.executable, os.path.abspath(__file__), "--deploy", path, "--episodes", str(args.episodes)]
    sys.stdout.flush()  # keep this process's lines before the deployment's
    subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
