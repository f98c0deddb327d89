"""Processes killed with SIGKILL: during a save, during training; a SubprocVecEnv worker that dies (issue 6)."""

from __future__ import annotations

import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch as th

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.reliability.checkpoints import find_checkpoints, latest_checkpoint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and fork are POSIX")

PREAMBLE = """
import os, sys, time
import torch as th
th.set_num_threads(1)
"""


def python(script: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PREAMBLE + textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


# -- killed during save ------------------------------------------------------------------------------------

SAVE_LOOP = """
from sb3_ppo_ext import ClippedPPO
model = ClippedPPO("MlpPolicy", "CartPole-v1", policy_kwargs=dict(net_arch=[512, 512]), n_steps=32, batch_size=16)
version = 0
while True:
    version += 1
    model.num_timesteps = version
    with th.no_grad():
        model.policy.value_net.bias.fill_(float(version))  # the parameters say which save they belong to
    model.save(sys.argv[1])
    print(version, flush=True)
"""


def test_sigkill_during_save_leaves_the_previous_file_intact_and_loadable(tmp_path: pathlib.Path) -> None:
    rng = random.Random(0)
    path = tmp_path / "model.zip"
    interrupted_saves = 0
    for _trial in range(5):
        process = python(SAVE_LOOP, str(path))
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "1", process.stderr.read()  # type: ignore[union-attr]
        time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL
        leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        interrupted_saves += bool(leftovers)
        for leftover in leftovers:
            leftover.unlink()
        # the file is a complete save: loadable, and its parameters match its counter
        model = ClippedPPO.load(path)
        assert model.num_timesteps >= 1
        assert th.all(model.policy.value_net.bias == float(model.num_timesteps))
    print(f"{interrupted_saves} of 5 kills landed during a save")


# -- killed during training, resumed from the last checkpoint ---------------------------------------------

TRAIN_OR_RESUME = """
from stable_baselines3.common.env_util import make_vec_env
from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.reliability.checkpoints import AtomicCheckpointCallback, latest_checkpoint
from sb3_ppo_ext.schedules import linear
folder, total = sys.argv[1], int(sys.argv[2])
env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
checkpoint = latest_checkpoint(folder)
if checkpoint is None:
    model = ClippedPPO("MlpPolicy", env, learning_rate=linear(1e-3), n_steps=32, batch_size=32, n_epochs=2, seed=0)
else:
    model = ClippedPPO.load(checkpoint.path, env=env)
print("start", model.num_timesteps, flush=True)
callback = AtomicCheckpointCallback(32, folder)  # every rollout of 32 steps x 2 envs
model.learn(total - model.num_timesteps, callback=callback, reset_num_timesteps=False)
print("done", model.num_timesteps, model._total_timesteps, flush=True)
"""


@pytest.mark.parametrize("trial", [0, 1])
def test_sigkill_during_training_resumes_from_the_last_checkpoint_and_completes(
    trial: int, tmp_path: pathlib.Path
) -> None:
    total = 3200
    process = python(TRAIN_OR_RESUME, str(tmp_path), str(total))
    deadline = time.monotonic() + 60
    while len(find_checkpoints(tmp_path)) < 2 + trial and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(trial).uniform(0.0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read()  # type: ignore[union-attr]
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and 0 < checkpoint.num_timesteps < total
    resume = python(TRAIN_OR_RESUME, str(tmp_path), str(total))
    out, err = resume.communicate(timeout=120)
    assert resume.returncode == 0, err
    assert out.splitlines() == [f"start {checkpoint.num_timesteps}", f"done {total} {total}"]
    final = ClippedPPO.load(latest_checkpoint(tmp_path).path)  # type: ignore[union-attr]
    assert final.num_timesteps == total


# -- a SubprocVecEnv worker dies ---------------------------------------------------------------------------

DYING_WORKER = """
import signal
import gymnasium as gym
from stable_baselines3.common.vec_env import SubprocVecEnv
from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.errors import EnvWorkerError

start_method, dying_env, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Dying(gym.Wrapper):
    def __init__(self, env, dies):
        super().__init__(env)
        self.dies, self.t = dies, 0
    def step(self, action):
        self.t += 1
        if self.dies and self.t == 5:
            if how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        return self.env.step(action)

if __name__ == "__main__":
    fns = [lambda i=i: Dying(gym.make("CartPole-v1"), i == dying_env) for i in range(3)]
    env = SubprocVecEnv(fns, start_method=start_method)
    model = ClippedPPO("MlpPolicy", env, n_steps=16, batch_size=16)
    try:
        model.learn(96)
    except EnvWorkerError as error:
        print("EnvWorkerError:", error, flush=True)
    env.close()  # must neither hang nor raise after a worker died
    print("closed", flush=True)
"""


@pytest.mark.parametrize(
    ("start_method", "dying_env", "how", "exit_text"),
    [
        ("fork", 2, "exit", "exited with code 3"),  # SB3 alone hangs here: other workers hold the dead pipe
        ("forkserver", 0, "kill", "was killed by signal SIGKILL"),  # SB3 alone raises a bare EOFError
    ],
)
def test_dead_subprocess_worker_gives_a_clear_error_instead_of_a_hang(start_method, dying_env, how, exit_text) -> None:
    process = python(DYING_WORKER, start_method, str(dying_env), how)
    try:
        out, err = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("training hung after a SubprocVecEnv worker died")
    assert process.returncode == 0, err
    lines = out.splitlines()
    assert lines[-1] == "closed"
    assert lines[0].startswith(f"EnvWorkerError: SubprocVecEnv worker for env {dying_env} (pid ")
    assert exit_text in lines[0] and "resume training from your last checkpoint" in lines[0]


def test_worker_guard_is_a_no_op_while_workers_live() -> None:
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv

    env = make_vec_env("CartPole-v1", n_envs=2, vec_env_cls=SubprocVecEnv, vec_env_kwargs=dict(start_method="fork"))
    try:
        model = ClippedPPO("MlpPolicy", env, n_steps=16, batch_size=16, n_epochs=1, seed=0)
        model.learn(64)
        assert model.num_timesteps == 64
        assert env.get_attr("spec")[0].id == "CartPole-v1"
    finally:
        env.close()
    assert all(not process.is_alive() for process in env.processes)
