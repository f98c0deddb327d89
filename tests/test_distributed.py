"""Data-parallel ClippedPPO (sb3_ppo_ext.distributed): 2 gloo ranks on the CPU against one process.

How the comparisons are exact: both sides train on the same fixed data, written straight into the rollout
buffer, and minibatches are taken in order (``InOrderBuffer``: no shuffle). One process holds rows
``0..127`` with minibatches of 32; rank r holds, for each global minibatch j, rows ``32 j + 16 r .. +16``, so
its minibatch j is its half of the global minibatch j. The ranks start from rank 0's parameters (seed 0, the
single process's too), so averaging their gradients is the single process's gradient up to float rounding.

Ranks are spawned processes (``torch.multiprocessing``, spawn); each writes its results to a pickle that
the test reads. A ``torchrun`` smoke run of ``python -m sb3_ppo_ext train`` checks the launcher path.
"""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import gymnasium as gym
import numpy as np
import pytest
import torch as th
import torch.distributed as dist
import torch.multiprocessing as mp
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from sb3_ppo_ext import ClippedPPO, distributed, losses
from sb3_ppo_ext.backends import select_backend
from sb3_ppo_ext.buffers import GAERolloutBuffer
from sb3_ppo_ext.errors import ConfigurationError, DistributedError

ROWS, BATCH, WORLD = 128, 32, 2


# -- launching ranks ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bootstrap(target: Callable[..., Any], rank: int, port: int, out: str, args: tuple) -> None:
    """A rank: torchrun's environment variables, then ``target``; its result (or error) pickled."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    th.set_num_threads(1)
    try:
        assert distributed.__file__.startswith(os.environ.get("SB3_PPO_EXT_EXPECTED_ROOT", "")), distributed.__file__
        result: Any = {"ok": target(rank, Path(out), *args)}
    except BaseException:
        result = {"error": traceback.format_exc()}
    with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(target: Callable[..., Any], out: Path, *args: Any, timeout: float = 150) -> list[Any]:
    """Run ``target(rank, out, *args)`` on 2 spawned ranks; return each rank's result (or raise its error)."""
    context = mp.get_context("spawn")
    port = _free_port()
    processes = [context.Process(target=_bootstrap, args=(target, rank, port, str(out), args)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
    assert not hung, f"ranks {hung} still running after {timeout} s"
    results = []
    for rank in range(WORLD):
        path = out / f"rank{rank}.pkl"
        results.append(pickle.loads(path.read_bytes()) if path.exists() else {"exit": processes[rank].exitcode})
    return results


def ok(results: list[Any]) -> list[Any]:
    for rank, result in enumerate(results):
        assert "ok" in result, f"rank {rank}: {result.get('error', result)}"
    return [result["ok"] for result in results]


@pytest.fixture(autouse=True)
def _children_import_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(Path(distributed.__file__).resolve().parent)
    monkeypatch.setenv("SB3_PPO_EXT_EXPECTED_ROOT", root)


# -- fixed data, in-order minibatches ---------------------------------------------------------------


class InOrderBuffer(GAERolloutBuffer):
    """Minibatches in row order (no shuffle), so that one process and two ranks see the same rows."""

    def get(self, batch_size: int | None = None) -> Any:
        with mock.patch.object(th, "randperm", lambda n, device=None: th.arange(n, device=device)):
            yield from super().get(batch_size)


def fixed_data(iteration: int) -> dict[str, np.ndarray]:
    """``ROWS`` rows of CartPole-shaped data (the same on every rank)."""
    g = np.random.default_rng(100 + iteration)
    advantages = g.normal(0.3, 2.0, ROWS)
    values = g.normal(0.0, 1.0, ROWS)
    return {
        "observations": g.normal(size=(ROWS, 4)),
        "actions": g.integers(0, 2, ROWS).astype(np.float64),
        "values": values,
        "log_probs": np.log(0.5) + 0.05 * g.normal(size=ROWS),
        "advantages": advantages,
        "returns": values + advantages,
    }


def rank_rows(rank: int | None) -> np.ndarray:
    """The global rows a rank holds, in its order (None: one process, every row)."""
    if rank is None:
        return np.arange(ROWS)
    half = BATCH // WORLD
    return np.concatenate(
        [np.arange(j * BATCH + rank * half, j * BATCH + (rank + 1) * half) for j in range(ROWS // BATCH)]
    )


def fill(model: ClippedPPO, data: dict[str, np.ndarray], rank: int | None) -> None:
    """Write ``data``'s rows of ``rank`` into the model's buffer, as a finished rollout."""
    buffer, rows = model.rollout_buffer, rank_rows(rank)
    buffer.reset()
    for name, values in data.items():
        target = getattr(buffer, name)
        target[...] = values[rows].reshape(target.shape)
    buffer.pos, buffer.full = buffer.buffer_size, True


def small_model(rank: int | None, **kwargs: Any) -> ClippedPPO:
    n_rows = ROWS if rank is None else ROWS // WORLD
    batch = BATCH if rank is None else BATCH // WORLD
    model = ClippedPPO(
        "MlpPolicy",
        DummyVecEnv([lambda: gym.make("CartPole-v1")]),
        n_steps=n_rows,
        batch_size=batch,
        n_epochs=2,
        learning_rate=1e-3,
        seed=0,
        rollout_buffer_class=InOrderBuffer,
        **kwargs,
    )
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def parameters(model: ClippedPPO) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy().copy() for name, t in model.policy.state_dict().items()}


# value targets normalised over the returns of every rank (PopArt rescales the value head with those statistics)
POPART = {"normalize_value_targets": True, "popart": True}
LOGGED = ("train/approx_kl", "train/loss", "train/value_loss", "train/policy_gradient_loss", "train/clip_fraction")


def train_fixed(rank: int | None, fast_update: bool, iterations: int = 3, **kwargs: Any) -> dict[str, Any]:
    """``iterations`` updates on the fixed data; parameters, logged statistics and update count."""
    model = small_model(rank, fast_update=fast_update, **kwargs)
    for iteration in range(iterations):
        fill(model, fixed_data(iteration), rank)
        model.train()
    logged = {key: model.logger.name_to_value[key] for key in LOGGED}
    return {"parameters": parameters(model), "logged": logged, "n_updates": model._n_updates}


def kl_breach_data() -> dict[str, np.ndarray]:
    """Data whose third global minibatch has a large KL, on rank 1's rows only (rank 0's stays small)."""
    data = fixed_data(0)
    rows = np.arange(2 * BATCH + BATCH // 2, 3 * BATCH)  # rank 1's half of global minibatch 2
    data["log_probs"][rows] += 0.5
    return data


def train_until_kl_stop(rank: int | None) -> dict[str, Any]:
    model = small_model(rank, target_kl=0.01)
    with th.no_grad():
        data = kl_breach_data()
        obs = th.as_tensor(data["observations"], dtype=th.float32)
        _, log_prob, _ = model.policy.evaluate_actions(obs, th.as_tensor(data["actions"]))
        data["log_probs"] = log_prob.numpy() + (data["log_probs"] - fixed_data(0)["log_probs"])
    fill(model, data, rank)
    backend, loss = select_backend(model.policy, model.fast_update), losses.PPOLoss(0.2)
    history = model._train_epochs(backend, loss)
    return {
        "parameters": parameters(model),
        "minibatches": [len(epoch) for epoch in history],
        "approx_kl": [float(t.approx_kl) for t in history[-1]],
        "n_updates": model._n_updates,
    }


# -- rank workers -------------------------------------------------------------------------------------


def _two_ranks_worker(rank: int, out: Path) -> dict[str, Any]:
    """Every check of the two-rank run, in one launch (spawning ranks costs seconds on a busy machine).

    The first ClippedPPO finds torchrun's environment (``WORLD_SIZE=2``...) and creates the process group from
    ``env://``, as under ``torchrun``.
    """
    result: dict[str, Any] = {}
    for fast_update in (True, False):
        result[f"train_{fast_update}"] = train_fixed(rank, fast_update)
    result["train_popart"] = train_fixed(rank, False, **POPART)
    result["kl_stop"] = train_until_kl_stop(rank)
    result["all_reduces"] = _count_all_reduces(rank)

    g = np.random.default_rng(7)
    everything = th.as_tensor(g.normal(1.0, 3.0, 64), dtype=th.float32)
    mine = everything[rank * 32 : (rank + 1) * 32]
    context = distributed.DataParallel(distributed.DistributedConfig())
    local = distributed.DataParallel(distributed.DistributedConfig(advantage_normalization="local"))
    result["advantages"] = {
        "global": context.normalize_advantages(mine).numpy(),
        "local": local.normalize_advantages(mine).numpy(),
        "expected_global": losses.normalize_advantages(everything)[rank * 32 : (rank + 1) * 32].numpy(),
        "expected_local": losses.normalize_advantages(mine).numpy(),
    }
    result["vecnormalize"] = _vecnormalize_merge(rank, context)
    result["learn"] = _learn(rank, out)
    result["timeout"] = _stuck_rank(rank)
    return result


def _count_all_reduces(rank: int) -> list[int]:
    """The sizes of the all-reduces of an update whose one minibatch per epoch is the whole rollout."""
    model = small_model(rank)
    model.batch_size = ROWS // WORLD
    fill(model, fixed_data(0), rank)
    sizes: list[int] = []
    original = dist.all_reduce

    def counting(tensor: th.Tensor, *args: Any, **kwargs: Any) -> Any:
        sizes.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    with mock.patch.object(dist, "all_reduce", counting):
        model.train()
    return sizes


def _stuck_rank(rank: int) -> dict[str, Any]:
    """Rank 1 does not answer for longer than the timeout of a process group: rank 0 gets DistributedError."""
    group = dist.new_group(timeout=datetime.timedelta(seconds=2))
    context = distributed.DataParallel(distributed.DistributedConfig(), timeout="2 s", group=group)
    if rank == 1:
        time.sleep(4)
    began = time.monotonic()
    try:
        context.normalize_advantages(th.ones(4))
    except DistributedError as error:
        return {"error": str(error), "seconds": time.monotonic() - began}
    return {"error": None}


class _Spy:
    """Records every batch a RunningMeanStd is updated with."""

    def __init__(self, rms: RunningMeanStd) -> None:
        self.batches: list[np.ndarray] = []
        update = rms.update

        def recording_update(batch: np.ndarray) -> None:
            self.batches.append(np.array(batch))  # as given: SB3 takes float32 batches' moments in float32
            update(batch)

        rms.update = recording_update  # type: ignore[method-assign]


def _vecnormalize_merge(rank: int, context: distributed.DataParallel) -> dict[str, Any]:
    venv = VecNormalize(make_vec_env("CartPole-v1", n_envs=2 + rank, seed=10 * rank))
    owner = type("Model", (), {"get_vec_normalize_env": lambda self: venv})()
    spies = [_Spy(venv.obs_rms), _Spy(venv.ret_rms)]
    context._align_stats(owner)
    venv.reset()
    snapshots, boundaries = [], []
    for steps in (20 + 7 * rank, 13):  # two merges, different amounts of data on each rank
        for _ in range(steps):
            venv.step(np.array([venv.action_space.sample() for _ in range(venv.num_envs)]))
        assert context.end_rollout(owner, True, {}, ())[0]
        snapshots.append([(rms.mean.copy(), rms.var.copy(), rms.count) for rms in (venv.obs_rms, venv.ret_rms)])
        boundaries.append([len(spy.batches) for spy in spies])
    return {"snapshots": snapshots, "boundaries": boundaries, "data": [spy.batches for spy in spies]}


class _CountEpisodes(BaseCallback):
    """Runs on every rank: counts steps and finished episodes; stops on rank ``stop_rank`` after ``stop_at`` steps."""

    def __init__(self, stop_rank: int = -1, stop_at: int = 0) -> None:
        super().__init__()
        self.calls, self.episodes, self.stop_rank, self.stop_at = 0, 0, stop_rank, stop_at

    def _on_step(self) -> bool:
        self.calls += 1
        self.episodes += sum("episode" in info for info in self.locals["infos"])
        return not (self.model.distributed.rank == self.stop_rank and self.calls >= self.stop_at)


def _learn(rank: int, out: Path) -> dict[str, Any]:
    """learn() with callbacks that write files (rank 0 only), VecNormalize, a stop on rank 0, save and load."""
    env = VecNormalize(make_vec_env("CartPole-v1", n_envs=2, seed=0))
    model = ClippedPPO("MlpPolicy", env, n_steps=32, batch_size=32, n_epochs=2, seed=0)
    eval_env = VecNormalize(make_vec_env("CartPole-v1", n_envs=1, seed=99), training=False, norm_reward=False)
    counter = _CountEpisodes()
    callbacks = [
        EvalCallback(eval_env, eval_freq=64, n_eval_episodes=1, log_path=str(out / f"eval{rank}"), verbose=0),
        CheckpointCallback(save_freq=128, save_path=str(out / f"checkpoints{rank}")),
        counter,
    ]
    model.learn(1024, callback=callbacks)
    result: dict[str, Any] = {
        "context": (model.distributed.rank, model.distributed.world_size, model.distributed.enabled),
        "num_timesteps": model.num_timesteps,
        "parameters": parameters(model),
        "obs_rms": (env.obs_rms.mean.copy(), env.obs_rms.var.copy(), env.obs_rms.count),
        "ret_rms": (env.ret_rms.mean.copy(), env.ret_rms.var.copy(), env.ret_rms.count),
        "episodes_seen": counter.episodes,
        "episodes_logged": len(model.ep_info_buffer),
        "calls": counter.calls,
    }
    model.save(out / f"model{rank}")

    # a callback stopping rank 0 alone, mid-rollout, stops both ranks (and they agree on num_timesteps)
    stopper = _CountEpisodes(stop_rank=0, stop_at=40)
    model.learn(4096, callback=stopper, reset_num_timesteps=False)
    result["after_stop"] = (model.num_timesteps, stopper.calls)

    distributed.barrier()  # rank 0's file is written
    loaded = ClippedPPO.load(out / "model0.zip", env=env)  # every rank: rank 0's parameters, broadcast
    result["loaded_parameters"] = parameters(loaded)
    if rank == 0:  # a single-process load in rank-0-only code does not wait for the others
        alone = ClippedPPO.load(out / "model0.zip", distributed=False)
        result["alone"] = (alone.distributed.enabled, alone.distributed.world_size)
    return result


def _killed_rank_worker(rank: int, out: Path) -> dict[str, Any]:
    """Rank 1 is killed (SIGKILL) mid-training; rank 0 must raise DistributedError, not wait for ever."""
    model = ClippedPPO(
        "MlpPolicy",
        make_vec_env("CartPole-v1", n_envs=1, seed=rank),
        n_steps=16,
        batch_size=16,
        n_epochs=1,
        distributed={"timeout_s": 30},
    )

    class Kill(BaseCallback):
        def _on_step(self) -> bool:
            if rank == 1 and self.n_calls == 40:
                os.kill(os.getpid(), signal.SIGKILL)
            return True

    began = time.monotonic()
    try:
        model.learn(100_000, callback=Kill())
    except DistributedError as error:
        return {"error": str(error), "seconds": time.monotonic() - began}
    return {"error": None}


# -- tests --------------------------------------------------------------------------------------------


def test_two_ranks_train_as_one_process_with_the_global_batch(tmp_path: Path) -> None:
    ranks = ok(launch(_two_ranks_worker, tmp_path))
    initial = parameters(small_model(None))
    for variant in (True, False, "popart"):
        single = train_fixed(None, False, **POPART) if variant == "popart" else train_fixed(None, variant)
        assert any(not np.array_equal(initial[name], value) for name, value in single["parameters"].items())
        results = [r[f"train_{variant}"] for r in ranks]
        for name, value in single["parameters"].items():
            # every rank holds exactly the same parameters, those of one process up to float rounding
            np.testing.assert_array_equal(results[0]["parameters"][name], results[1]["parameters"][name])
            np.testing.assert_allclose(results[0]["parameters"][name], value, rtol=0, atol=2e-6, err_msg=name)
        for key, value in single["logged"].items():
            assert results[0]["logged"][key] == results[1]["logged"][key], key
            assert results[0]["logged"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        assert results[0]["n_updates"] == results[1]["n_updates"] == single["n_updates"]

    # one all-reduce per minibatch (gradients + statistics); the advantage statistics of the one minibatch of
    # every epoch (the whole rollout) all-reduced once, not once per epoch
    n_parameters = sum(v.size for v in initial.values())
    assert ranks[0]["all_reduces"] == ranks[1]["all_reduces"] == [3, n_parameters + 6, n_parameters + 6]

    # global advantage normalisation = one process's over the whole minibatch; "local" = each rank's own
    for result in ranks:
        advantages = result["advantages"]
        np.testing.assert_allclose(advantages["global"], advantages["expected_global"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(advantages["local"], advantages["expected_local"])

    # target_kl: the KL of the third minibatch is large on rank 1 only; both ranks stop there, as one process
    single = train_until_kl_stop(None)
    stops = [r["kl_stop"] for r in ranks]
    assert stops[0]["minibatches"] == stops[1]["minibatches"] == single["minibatches"] == [3]
    assert stops[0]["n_updates"] == stops[1]["n_updates"] == single["n_updates"] == 1
    assert stops[0]["approx_kl"] == stops[1]["approx_kl"]
    # a KL of ~4e-5 from parameters equal to ~1e-7 carries float32 rounding of ~1e-9: absolute tolerance 1e-8
    assert stops[0]["approx_kl"] == pytest.approx(single["approx_kl"], rel=1e-5, abs=1e-8)
    assert stops[0]["approx_kl"][-1] > 1.5 * 0.01
    for name, value in single["parameters"].items():
        np.testing.assert_array_equal(stops[0]["parameters"][name], stops[1]["parameters"][name])
        np.testing.assert_allclose(stops[0]["parameters"][name], value, rtol=0, atol=2e-6)

    # VecNormalize: after each merge, every rank holds the statistics of the union of all ranks' data
    for merge in range(2):
        for index in range(2):  # obs_rms, ret_rms
            union = RunningMeanStd(shape=ranks[0]["vecnormalize"]["snapshots"][0][index][0].shape)
            for result in ranks:
                recorded = result["vecnormalize"]
                for batch in recorded["data"][index][: recorded["boundaries"][merge][index]]:
                    union.update(batch)
            mean, var, count = ranks[0]["vecnormalize"]["snapshots"][merge][index]
            other = ranks[1]["vecnormalize"]["snapshots"][merge][index]
            np.testing.assert_array_equal(mean, other[0])
            np.testing.assert_array_equal(var, other[1])
            assert count == other[2] == pytest.approx(union.count, abs=1e-9)  # no count inflation
            np.testing.assert_allclose(mean, union.mean, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(var, union.var, rtol=1e-9, atol=1e-12)

    _check_learn([r["learn"] for r in ranks], tmp_path)

    # a rank that stops answering: the other raises DistributedError after the group's timeout
    stuck = ranks[0]["timeout"]
    assert "rank 0 of 2: the advantage statistics all-reduce failed" in stuck["error"]
    assert "did not answer within 2 s" in stuck["error"] and 1.5 < stuck["seconds"] < 20


def _check_learn(ranks: list[dict[str, Any]], tmp_path: Path) -> None:
    assert [r["context"] for r in ranks] == [(0, 2, True), (1, 2, True)]
    assert ranks[0]["num_timesteps"] == ranks[1]["num_timesteps"] == 1024  # global: 2 ranks x 2 envs x 256 steps
    assert ranks[0]["calls"] == ranks[1]["calls"] == 256  # callbacks without I/O ran on both ranks
    for name, value in ranks[0]["parameters"].items():
        np.testing.assert_array_equal(value, ranks[1]["parameters"][name])
        np.testing.assert_array_equal(value, ranks[0]["loaded_parameters"][name])
        np.testing.assert_array_equal(value, ranks[1]["loaded_parameters"][name])
    for key in ("obs_rms", "ret_rms"):
        for a, b in zip(ranks[0][key], ranks[1][key], strict=True):
            np.testing.assert_array_equal(a, b)
    # every observation of both ranks counted once: 2 envs x (1 reset + 256 steps) per rank
    assert ranks[0]["obs_rms"][2] == pytest.approx(1e-4 + 2 * 2 * 257, abs=1e-9)
    # rank 0 logs the episodes of both ranks; rank 1 keeps its own
    assert ranks[0]["episodes_logged"] == min(100, ranks[0]["episodes_seen"] + ranks[1]["episodes_seen"])
    assert ranks[1]["episodes_logged"] == min(100, ranks[1]["episodes_seen"])
    # rank 0 alone evaluated and saved
    assert (tmp_path / "eval0" / "evaluations.npz").exists() and not (tmp_path / "eval1").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints0").iterdir()) == [
        "rl_model_1024_steps.zip",
        "rl_model_512_steps.zip",
    ]
    assert not (tmp_path / "checkpoints1").exists()
    assert (tmp_path / "model0.zip").exists() and not (tmp_path / "model1.zip").exists()
    # rank 0 stopped after 40 steps of its rollout: both ranks ended the rollout and agree on the count
    assert ranks[0]["after_stop"] == (1024 + 64 * 4, 40)  # rank 1's count: the rollout it finished
    assert ranks[1]["after_stop"] == (1024 + 64 * 4, 64)
    assert ranks[0]["alone"] == (False, 1)


def test_a_killed_rank_gives_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    results = launch(_killed_rank_worker, tmp_path, timeout=90)
    assert results[1] == {"exit": -signal.SIGKILL}
    outcome = results[0]["ok"]
    assert outcome["error"] is not None, "rank 0 trained on without rank 1"
    assert "rank 0 of 2" in outcome["error"] and "another rank died or did not answer within 30 s" in outcome["error"]
    assert outcome["seconds"] < 25  # the closed connection is noticed at once, well before the timeout


def test_torchrun_train_cli_runs_and_rank_zero_saves_once(tmp_path: Path) -> None:
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        *("-m", "sb3_ppo_ext", "train", "--env", "CartPole-v1", "--timesteps", "512", "--seed", "0"),
        *("--n-envs", "2", "--hyperparams", "n_steps=32", "batch_size=32", "n_epochs=1", "normalize=True"),
        *("--eval-episodes", "1", "--save-path", "model"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ClippedPPO CartPole-v1")]
    assert len(lines) == 1, proc.stdout
    assert "| 512 steps, seed 0 | saved model.zip (+ model_vecnormalize.pkl)" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip", "model_vecnormalize.pkl"]


# -- one process ----------------------------------------------------------------------------------------


def _learned(**kwargs: Any) -> dict[str, np.ndarray]:
    model = ClippedPPO(
        "MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), n_steps=32, batch_size=16, seed=0, **kwargs
    )
    model.learn(128)
    return parameters(model)


def _assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_one_process_is_bit_identical_to_no_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _learned(distributed=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _assert_identical(_learned(), reference)  # auto: no torchrun, one process
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1
    _assert_identical(_learned(distributed=True), reference)
    # an initialised process group of one rank: no collective either
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = ClippedPPO("MlpPolicy", "CartPole-v1", distributed=True)
        assert model.distributed is distributed.SINGLE_PROCESS
        _assert_identical(_learned(), reference)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("batch_size", [64, 50, 7])
def test_single_process_normalizes_an_epochs_minibatches_at_once_bitwise(batch_size: int) -> None:
    from gymnasium import spaces

    from sb3_ppo_ext.buffers import GAERolloutBuffer

    observation_space = spaces.Box(-1, 1, (2,), np.float32)
    buffer = GAERolloutBuffer(40, observation_space, spaces.Discrete(3), "cpu", n_envs=8)
    buffer.advantages[...] = np.random.default_rng(0).normal(3.0, 2.0, size=buffer.advantages.shape)
    buffer.full = True
    context = distributed.SingleProcess()
    for _epoch in range(2):
        for batch in list(buffer.get(batch_size)):
            alone = batch.advantages.clone()  # not a slice of the epoch: normalised on its own
            normalized = context.normalize_advantages(batch.advantages)
            assert th.equal(normalized, losses.normalize_advantages(alone))
            a = alone.numpy().astype(np.float64)
            np.testing.assert_allclose(normalized.numpy(), (a - a.mean()) / (a.std(ddof=1) + 1e-8), atol=1e-5)
        # the whole rows of the epoch were normalised in one call
        assert context._epoch_normalized is not None
        assert context._epoch_normalized[2].shape == (320 // batch_size, batch_size)


def test_single_process_epoch_rows_fall_back_on_float64_and_follow_in_place_changes() -> None:
    context = distributed.SingleProcess()
    epoch = th.randn(128, dtype=th.float64)
    assert th.equal(context.normalize_advantages(epoch[:64]), losses.normalize_advantages(epoch[:64].clone()))
    assert context._epoch_normalized is None  # float64: a row's std is not bitwise the slice's
    epoch = th.randn(128)
    first = context.normalize_advantages(epoch[64:]).clone()
    assert th.equal(first, losses.normalize_advantages(epoch[64:].clone()))
    epoch.pow_(3)  # the rollout changed in place (recomputed advantages): not the cached rows
    again = context.normalize_advantages(epoch[64:])
    assert th.equal(again, losses.normalize_advantages(epoch[64:].clone()))
    assert not th.allclose(again, first)


def test_single_process_context_is_the_identity() -> None:
    context = distributed.SINGLE_PROCESS
    advantages = th.randn(32)
    assert th.equal(context.normalize_advantages(advantages), losses.normalize_advantages(advantages))
    terms = losses.LossTerms(*(th.tensor(float(i)) for i in range(6)))
    assert context.reduce_update([], terms) is terms
    assert (
        context.rank_seed(3, 8) == 3
        and context.global_steps(5) == 5
        and context.end_rollout(None, False, {"x": 1.0}, ("x",)) == (False, {"x": 1.0})
    )


def test_distributed_argument_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="advantage_normalization"):
        distributed.DistributedConfig(advantage_normalization="rank")
    with pytest.raises(ConfigurationError, match="timeout_s"):
        ClippedPPO("MlpPolicy", "CartPole-v1", distributed={"timeout_s": 0})
    with pytest.raises(ConfigurationError, match="distributed="):
        ClippedPPO("MlpPolicy", "CartPole-v1", distributed="yes")


def test_rank_zero_callbacks_are_dropped_on_other_ranks() -> None:
    env = make_vec_env("CartPole-v1", n_envs=1)
    evaluation, checkpoint, counter = EvalCallback(env), CheckpointCallback(10, "x"), _CountEpisodes()
    marked = _CountEpisodes()
    marked.rank_zero_only = True  # type: ignore[attr-defined]
    kept = distributed.without_rank_zero_callbacks([evaluation, [checkpoint, counter], marked])
    assert kept == [[counter]]
    assert distributed.without_rank_zero_callbacks(evaluation) is None


def test_the_exit_hook_destroys_the_group_then_lets_gloo_threads_finish() -> None:
    """A gloo worker frees its last tensors after the caller wakes; exiting at once aborted 6 runs in 78."""
    calls: list[tuple[str, float]] = []
    with (
        mock.patch.object(dist, "is_initialized", return_value=True),
        mock.patch.object(dist, "destroy_process_group", side_effect=lambda: calls.append(("destroy", 0.0))),
        mock.patch.object(distributed.time, "sleep", side_effect=lambda s: calls.append(("sleep", s))),
    ):
        distributed._destroy_process_group()
    assert calls == [("destroy", 0.0), ("sleep", distributed.EXIT_GRACE_S)] and distributed.EXIT_GRACE_S >= 0.1
