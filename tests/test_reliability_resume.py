"""Resume equals uninterrupted (issue 28, SB3 issue #1526): a run resumed from a resumable checkpoint ends with the
parameters of the run that was never interrupted, bit for bit.

Each test trains once with ``AtomicCheckpointCallback(..., exact_resume=True)``, then resumes from several of its
checkpoints as a new process would: the global RNGs scrambled, envs built anew with another seed, ``load`` +
``learn(TOTAL - num_timesteps, reset_num_timesteps=False)``. The negative controls resume the same checkpoints
without their state, and must end elsewhere: the comparisons can fail.
"""

from __future__ import annotations

import hashlib
import pathlib
import random
import warnings
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv, VecEnv, VecNormalize

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.errors import ResumeWarning
from sb3_ppo_ext.reliability.checkpoints import (
    RESUME_ATTRIBUTE,
    AtomicCheckpointCallback,
    Checkpoint,
    find_checkpoints,
    latest_checkpoint,
    save_resumable,
)
from sb3_ppo_ext.schedules import linear

MakeEnv = Callable[[int], VecEnv]


def digest(model: ClippedPPO) -> str:
    """SHA-256 of every parameter and buffer of the policy, and of Adam's moments."""
    sha = hashlib.sha256()
    for name, tensor in sorted(model.policy.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().numpy().tobytes())
    for key, state in sorted(model.policy.optimizer.state_dict()["state"].items()):
        for name, value in sorted(state.items()):
            sha.update(f"{key}.{name}".encode())
            sha.update(th.as_tensor(value).detach().cpu().numpy().tobytes())
    return sha.hexdigest()


def cartpole(seed: int) -> VecEnv:
    return make_vec_env("CartPole-v1", n_envs=2, seed=seed)


def pendulum_vecnormalize(seed: int) -> VecEnv:
    return VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=seed), gamma=0.9)


CARTPOLE = dict(n_steps=32, batch_size=16, n_epochs=2, learning_rate=linear(1e-3), seed=0)
PENDULUM = dict(n_steps=32, batch_size=32, n_epochs=2, gamma=0.9, learning_rate=linear(1e-3), seed=0)
LSTM = dict(
    n_steps=32,
    batch_size=32,
    n_epochs=2,
    seed=0,
    policy_kwargs=dict(lstm_hidden_size=8, net_arch=[16]),
)


def scramble_global_rngs() -> None:
    """What a new process (or anything run since the checkpoint) would have: other RNG states."""
    th.manual_seed(12345)
    np.random.seed(54321)
    random.seed(999)


def train(
    policy: str, make_env: MakeEnv, kwargs: dict[str, Any], total: int, folder: pathlib.Path | None, save_freq: int
) -> tuple[str, list[Checkpoint]]:
    """The uninterrupted run (with resumable checkpoints when ``folder`` is given): its digest and checkpoints."""
    model = ClippedPPO(policy, make_env(0), **kwargs)
    callback = None if folder is None else AtomicCheckpointCallback(save_freq, str(folder), exact_resume=True)
    model.learn(total, callback=callback)
    assert model.num_timesteps == total
    return digest(model), [] if folder is None else find_checkpoints(folder)


def resume(
    checkpoint: Checkpoint, make_env: MakeEnv, total: int, keep_state: bool = True, callback: Any = None
) -> ClippedPPO:
    scramble_global_rngs()
    model = ClippedPPO.load(checkpoint.path, env=make_env(99))
    assert model.num_timesteps == checkpoint.num_timesteps
    if not keep_state:
        delattr(model, RESUME_ATTRIBUTE)  # what resuming from a plain checkpoint does
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)  # everything restored: no warning
        model.learn(total - model.num_timesteps, callback=callback, reset_num_timesteps=False)
    assert model.num_timesteps == total
    return model


@pytest.mark.parametrize(
    ("save_freq", "expected_steps"),
    [
        # save points mid-rollout (every 20 calls of 2 envs): written at the next rollout start, the last one after
        # the last update
        (20, [64, 128, 192, 256]),
        # save points on a rollout's last step: written right after the update, under SB3's own names
        (32, [64, 128, 192, 256]),
    ],
    ids=["mid-rollout", "rollout-boundary"],
)
def test_cartpole_resumed_from_every_checkpoint_equals_the_uninterrupted_run(
    tmp_path: pathlib.Path, save_freq: int, expected_steps: list[int]
) -> None:
    total = 256
    uninterrupted, _ = train("MlpPolicy", cartpole, CARTPOLE, total, None, save_freq)
    with_checkpoints, checkpoints = train("MlpPolicy", cartpole, CARTPOLE, total, tmp_path, save_freq)
    assert with_checkpoints == uninterrupted  # writing checkpoints changes nothing
    assert [c.num_timesteps for c in checkpoints] == expected_steps
    for checkpoint in checkpoints[:-1]:
        assert digest(resume(checkpoint, cartpole, total)) == uninterrupted, checkpoint.path.name
    # the control: the same checkpoint without its state (SB3's resume) ends elsewhere
    assert digest(resume(checkpoints[0], cartpole, total, keep_state=False)) != uninterrupted


def test_a_run_killed_mid_rollout_resumes_from_its_latest_checkpoint_and_again_from_the_resumed_runs(
    tmp_path: pathlib.Path,
) -> None:
    total = 320
    uninterrupted, _ = train("MlpPolicy", cartpole, CARTPOLE, total, None, 1)

    class Crash(BaseCallback):
        def _on_step(self) -> bool:
            return self.num_timesteps < 150  # stops inside the rollout of steps 129-192

    model = ClippedPPO("MlpPolicy", cartpole(0), **CARTPOLE)
    model.learn(total, callback=[AtomicCheckpointCallback(25, str(tmp_path / "first"), exact_resume=True), Crash()])
    first = latest_checkpoint(tmp_path / "first")
    assert first is not None and first.num_timesteps == 128  # the save point at 100 steps, written at 128
    # the resumed run writes resumable checkpoints of its own; a second crash resumes from one of them
    second_folder = tmp_path / "second"
    checkpoints = AtomicCheckpointCallback(40, str(second_folder), exact_resume=True)
    resumed = resume(first, cartpole, total, callback=checkpoints)
    assert digest(resumed) == uninterrupted
    second = find_checkpoints(second_folder)[0]
    assert second.num_timesteps == 256  # 128 + 80 steps is a save point, written at 256
    assert digest(resume(second, cartpole, total)) == uninterrupted


def test_pendulum_with_vecnormalize_resumes_exactly(tmp_path: pathlib.Path) -> None:
    """A Box task; the VecNormalize statistics and its running returns come back from the checkpoint.

    The resumed run wraps fresh envs in a fresh ``VecNormalize`` (no statistics loaded): the checkpoint holds them.
    """
    total = 256
    uninterrupted, _ = train("MlpPolicy", pendulum_vecnormalize, PENDULUM, total, None, 1)
    with_checkpoints, checkpoints = train("MlpPolicy", pendulum_vecnormalize, PENDULUM, total, tmp_path, 48)
    assert with_checkpoints == uninterrupted
    assert [c.num_timesteps for c in checkpoints] == [128, 192]  # save points at 96 and 192 steps
    for checkpoint in checkpoints:
        assert digest(resume(checkpoint, pendulum_vecnormalize, total)) == uninterrupted, checkpoint.path.name
    assert digest(resume(checkpoints[0], pendulum_vecnormalize, total, keep_state=False)) != uninterrupted


def test_mujoco_env_state_resumes_exactly(tmp_path: pathlib.Path) -> None:
    """MuJoCo envs pickle their constructor's arguments (gymnasium's EzPickle); their physics state is copied anyway."""
    pytest.importorskip("mujoco")

    def hopper(seed: int) -> VecEnv:
        return VecNormalize(make_vec_env("Hopper-v5", n_envs=2, seed=seed))

    total = 192
    kwargs = dict(n_steps=32, batch_size=32, n_epochs=2, seed=0)
    uninterrupted, _ = train("MlpPolicy", hopper, kwargs, total, None, 1)
    _, checkpoints = train("MlpPolicy", hopper, kwargs, total, tmp_path, 40)
    assert [c.num_timesteps for c in checkpoints] == [128, 192]
    assert digest(resume(checkpoints[0], hopper, total)) == uninterrupted
    assert digest(resume(checkpoints[0], hopper, total, keep_state=False)) != uninterrupted


@pytest.mark.parametrize("sde_sample_freq", [-1, 4])
def test_gsde_noise_resumes_exactly(tmp_path: pathlib.Path, sde_sample_freq: int) -> None:
    """gSDE samples its exploration matrix at every rollout start (and every 4 steps): the checkpoint holds it."""
    total = 192
    kwargs = dict(PENDULUM, use_sde=True, sde_sample_freq=sde_sample_freq)
    uninterrupted, _ = train("MlpPolicy", pendulum_vecnormalize, kwargs, total, None, 1)
    _, checkpoints = train("MlpPolicy", pendulum_vecnormalize, kwargs, total, tmp_path, 40)
    assert [c.num_timesteps for c in checkpoints] == [128, 192]
    assert digest(resume(checkpoints[0], pendulum_vecnormalize, total)) == uninterrupted


@pytest.mark.parametrize(
    ("save_freq", "rnn_type"),
    [(20, "lstm"), (32, "lstm"), (20, "gru")],
    ids=["mid-rollout", "rollout-boundary", "gru-mid-rollout"],
)
def test_lstm_policy_resumes_exactly(tmp_path: pathlib.Path, save_freq: int, rnn_type: str) -> None:
    """The LSTM (GRU) states of the episodes in flight are in the checkpoint (SB3 excludes them from ``save``)."""
    total = 192
    kwargs = dict(LSTM, policy_kwargs=dict(LSTM["policy_kwargs"], rnn_type=rnn_type))
    uninterrupted, _ = train("MlpLstmPolicy", cartpole, kwargs, total, None, 1)
    with_checkpoints, checkpoints = train("MlpLstmPolicy", cartpole, kwargs, total, tmp_path, save_freq)
    assert with_checkpoints == uninterrupted
    assert [c.num_timesteps for c in checkpoints] == [64, 128, 192]
    for checkpoint in checkpoints[:2]:
        assert digest(resume(checkpoint, cartpole, total)) == uninterrupted, checkpoint.path.name
    assert digest(resume(checkpoints[1], cartpole, total, keep_state=False)) != uninterrupted


@pytest.mark.parametrize(
    ("policy", "make_env", "kwargs"),
    [("MlpLstmPolicy", cartpole, LSTM), ("MlpPolicy", pendulum_vecnormalize, dict(PENDULUM, use_sde=True))],
    ids=["lstm", "gsde-vecnormalize"],
)
def test_save_resumable_between_learn_calls_continues_in_another_env_object(
    tmp_path: pathlib.Path, policy: str, make_env: MakeEnv, kwargs: dict[str, Any]
) -> None:
    """``learn(N); save_resumable(...)``, later ``load`` + ``learn(N, reset_num_timesteps=False)`` elsewhere.

    Captured after the last update, before the next rollout samples gSDE's noise: resuming samples it again from the
    restored RNG, as the uninterrupted run does.
    """
    model = ClippedPPO(policy, make_env(0), **kwargs)
    model.learn(128)
    save_resumable(model, tmp_path / "model")
    model.learn(128, reset_num_timesteps=False)
    scramble_global_rngs()
    resumed = ClippedPPO.load(tmp_path / "model", env=make_env(7))
    resumed.learn(128, reset_num_timesteps=False)
    assert digest(resumed) == digest(model)


def test_a_plain_learn_on_a_loaded_resumable_checkpoint_starts_afresh_and_later_saves_carry_no_state(
    tmp_path: pathlib.Path,
) -> None:
    model = ClippedPPO("MlpPolicy", cartpole(0), **CARTPOLE)
    model.learn(64)
    save_resumable(model, tmp_path / "model")
    loaded = ClippedPPO.load(tmp_path / "model", env=cartpole(0))
    assert hasattr(loaded, RESUME_ATTRIBUTE)
    loaded.learn(64)  # reset_num_timesteps=True: a new run, nothing restored
    assert not hasattr(loaded, RESUME_ATTRIBUTE)
    loaded.save(tmp_path / "again")
    assert not hasattr(ClippedPPO.load(tmp_path / "again"), RESUME_ATTRIBUTE)


def test_another_env_layout_gets_a_warning_naming_what_was_not_restored(tmp_path: pathlib.Path) -> None:
    model = ClippedPPO("MlpPolicy", cartpole(0), **CARTPOLE)
    model.learn(64)
    save_resumable(model, tmp_path / "model")
    loaded = ClippedPPO.load(tmp_path / "model", env=make_vec_env("CartPole-v1", n_envs=4, seed=0))
    with pytest.warns(ResumeWarning, match=r"the envs' state: the checkpoint's VecEnv is .*2.*this one .*4"):
        loaded.learn(64, reset_num_timesteps=False)
    assert loaded.num_timesteps == 128 + 64  # the rollout of 4 envs overshoots; training goes on


class CountingEnv(gym.Env):
    """A deterministic env whose episodes end after 5 steps, picklable, to run in SubprocVecEnv workers."""

    observation_space = gym.spaces.Box(-10.0, 10.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.t += 1
        return np.full(1, self.t, np.float32), float(action), self.t >= 5, False, {}


def test_subproc_vec_env_state_is_not_restored_and_the_warning_says_so(tmp_path: pathlib.Path) -> None:
    env = VecNormalize(SubprocVecEnv([CountingEnv, CountingEnv], start_method="fork"))
    try:
        model = ClippedPPO("MlpPolicy", env, n_steps=8, batch_size=16, n_epochs=1, seed=0)
        model.learn(16)
        save_resumable(model, tmp_path / "model")
        statistics = env.obs_rms.mean.copy()
    finally:
        env.close()
    resumed_env = VecNormalize(SubprocVecEnv([CountingEnv, CountingEnv], start_method="fork"))
    try:
        loaded = ClippedPPO.load(tmp_path / "model", env=resumed_env)
        with pytest.warns(ResumeWarning, match="SubprocVecEnv.*VecNormalize statistics were restored"):
            loaded.learn(16, reset_num_timesteps=False)
        assert not np.array_equal(resumed_env.obs_rms.mean, statistics)  # restored, then updated by the rollout
        assert resumed_env.obs_rms.count > 16 * 2  # the checkpoint's counts plus the new rollout's
    finally:
        resumed_env.close()
