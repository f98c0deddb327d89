"""Inference latency of an exported policy: onnxruntime (and TorchScript) vs ``model.predict``, one thread each.

    python benchmarks/export_latency.py                 # CartPole MLP and a HalfCheetah-size 256x256 MLP
    python benchmarks/export_latency.py --repeats 15 --calls 2000

For each policy the script exports an untrained ClippedPPO model (latency does not depend on the weights)
and times ``model.predict(obs, deterministic=True)``, the onnxruntime session and the TorchScript module
on the same observations at batch 1 and 64. Each figure is the median over ``--repeats`` rounds of the
mean time of ``--calls`` calls, the three runtimes alternating round by round so that machine drift hits
them alike. torch runs with ``torch.set_num_threads(1)``, onnxruntime with one intra-op and one inter-op
thread. Prints a Markdown table (docs/export.md).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import onnxruntime as ort
import torch as th
from gymnasium import spaces

from sb3_ppo_ext import ClippedPPO


class SpacesEnv(gym.Env):
    """An env with the given spaces (HalfCheetah-v5's without needing MuJoCo): only its spaces matter here."""

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        super().__init__()
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return self.observation_space.sample(), 0.0, False, False, {}


def policies() -> dict[str, ClippedPPO]:
    """CartPole-v1 with the default 64x64 MLP; HalfCheetah's spaces (17 -> 6) with 256x256 (the MuJoCo preset)."""
    cheetah = SpacesEnv(spaces.Box(-np.inf, np.inf, (17,), np.float64), spaces.Box(-1.0, 1.0, (6,), np.float32))
    return {
        "CartPole MLP 64x64": ClippedPPO("MlpPolicy", "CartPole-v1", device="cpu", seed=0),
        "HalfCheetah MLP 256x256": ClippedPPO(
            "MlpPolicy", cheetah, device="cpu", seed=0, policy_kwargs=dict(net_arch=dict(pi=[256, 256], vf=[256, 256]))
        ),
    }


def time_call(fn: Callable[[], Any], calls: int) -> float:
    """Mean seconds per call over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(model: ClippedPPO, folder: Path, batch: int, repeats: int, calls: int) -> dict[str, float]:
    """Median microseconds per call of each runtime for one policy and batch size."""
    onnx_path = model.export(folder / "policy.onnx")
    torchscript = th.jit.load(str(model.export(folder / "policy.pt")))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    obs_space = model.observation_space
    obs_space.seed(0)
    obs = np.stack([obs_space.sample() for _ in range(batch)]).astype(np.float32)
    if not np.isfinite(obs).all():
        obs = np.random.default_rng(0).standard_normal(obs.shape).astype(np.float32)
    obs_tensor = th.as_tensor(obs)

    def run_torchscript() -> np.ndarray:
        with th.no_grad():
            return torchscript(obs_tensor).numpy()

    runtimes: dict[str, Callable[[], Any]] = {
        "model.predict": lambda: model.predict(obs, deterministic=True),
        "onnxruntime": lambda: session.run(None, {"obs": obs}),
        "TorchScript": run_torchscript,
    }
    want = model.predict(obs, deterministic=True)[0]
    # the runtimes timed compute the same actions
    assert np.allclose(session.run(None, {"obs": obs})[0], want, atol=1e-5)
    assert np.allclose(run_torchscript(), want, atol=1e-5)
    for fn in runtimes.values():  # warm-up: first-call allocations and lazy initialisation
        time_call(fn, max(calls // 10, 10))
    samples: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(repeats):
        for name, fn in runtimes.items():
            samples[name].append(time_call(fn, calls))
    return {name: 1e6 * statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9, help="rounds per runtime (the median is reported)")
    parser.add_argument("--calls", type=int, default=1000, help="calls per round")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    th.set_num_threads(1)
    print(
        f"torch {th.__version__}, onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, "
        f"1 thread each; median of {args.repeats} rounds of {args.calls} calls\n"
    )
    print("| policy | batch | model.predict (us) | onnxruntime (us) | TorchScript (us) | predict / onnxruntime |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as folder:
        for name, model in policies().items():
            for batch in args.batches:
                t = measure(model, Path(folder), batch, args.repeats, args.calls)
                print(
                    f"| {name} | {batch} | {t['model.predict']:.1f} | {t['onnxruntime']:.1f} | {t['TorchScript']:.1f} "
                    f"| {t['model.predict'] / t['onnxruntime']:.1f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
