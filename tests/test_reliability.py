"""Bad data fails loudly, saves are atomic, bad files give clear errors, save/load is transparent (issue 6)."""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import stat
import subprocess
import sys
import textwrap
import zipfile
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import TINY, params_of, recording_logger
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.errors import ModelFileError, NonFiniteError, NotAModelFileError
from sb3_ppo_ext.reliability import checkpoints
from sb3_ppo_ext.reliability.checkpoints import AtomicCheckpointCallback, find_checkpoints, latest_checkpoint
from sb3_ppo_ext.schedules import linear

# -- NaN/inf from the environment ----------------------------------------------------------------------------


class BadDataEnv(gym.Env):
    """Box or Dict observations; returns ``bad`` in the observation or reward at step ``at`` (0: at reset)."""

    def __init__(self, where: str = "obs", at: int = 3, bad: float = np.nan, dict_obs: bool = False) -> None:
        box = spaces.Box(-10, 10, (3,), np.float32)
        self.observation_space = spaces.Dict(pos=box, vel=box) if dict_obs else box
        self.action_space = spaces.Discrete(2)
        self.where, self.at, self.bad, self.dict_obs = where, at, bad, dict_obs
        self.t = 0

    def _obs(self) -> Any:
        obs = np.zeros(3, np.float32)
        if self.where == "obs" and self.t == self.at:
            obs[1] = self.bad
        return {"pos": np.zeros(3, np.float32), "vel": obs} if self.dict_obs else obs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        self.t += 1
        reward = self.bad if self.where == "reward" and self.t == self.at else 1.0
        return self._obs(), float(reward), False, self.t >= 50, {}


def bad_env_model(n_envs: int = 3, bad_env: int = 1, check_finite: bool = True, **env_kwargs: Any) -> ClippedPPO:
    dict_obs = env_kwargs.get("dict_obs", False)
    fns = [
        (lambda i=i: BadDataEnv(**env_kwargs) if i == bad_env else BadDataEnv("none", dict_obs=dict_obs))
        for i in range(n_envs)
    ]
    policy = "MultiInputPolicy" if dict_obs else "MlpPolicy"
    return ClippedPPO(policy, DummyVecEnv(fns), check_finite=check_finite, **TINY)


@pytest.mark.parametrize(
    ("env_kwargs", "text"),
    [
        (dict(where="obs", at=3), r"Environment 1 returned a non-finite observation at rollout step 2 of 32"),
        (dict(where="obs", at=3, bad=np.inf), r"Environment 1 returned a non-finite observation at rollout step 2"),
        (dict(where="reward", at=5), r"Environment 1 returned a non-finite reward at rollout step 4 of 32"),
        (dict(where="obs", at=0), r"Environment 1 returned a non-finite observation from env.reset\(\)"),
        (dict(where="obs", at=2, dict_obs=True), r"non-finite observation\['vel'\] at rollout step 1"),
    ],
    ids=["nan-obs", "inf-obs", "nan-reward", "nan-reset-obs", "nan-dict-obs"],
)
def test_non_finite_env_data_names_env_index_and_step(env_kwargs, text) -> None:
    model = bad_env_model(**env_kwargs)
    with pytest.raises(NonFiniteError, match=text) as caught:
        model.learn(200)
    assert "check_finite=False" in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_check_finite_false_skips_the_env_check() -> None:
    model = bad_env_model(where="reward", at=5, check_finite=False)
    with pytest.raises(NonFiniteError) as caught:  # the NaN reward still poisons the loss, caught there
        model.learn(200)
    assert "returned a non-finite" not in str(caught.value)
    assert "in train()" in str(caught.value)


# -- NaN/inf in a loss or gradient -------------------------------------------------------------------------


def trained_model(fast_update: bool) -> ClippedPPO:
    model = ClippedPPO(
        "MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), seed=0, fast_update=fast_update, **TINY
    )
    model.learn(64)  # one rollout and update: Adam has state
    return model


def poison_and_train(model: ClippedPPO, field: str) -> tuple[NonFiniteError, list[dict[str, th.Tensor]]]:
    """Collect a rollout, put NaN in one sample of ``field``, train; return the error and the states after each step."""
    model.learn(64, reset_num_timesteps=False)  # a fresh rollout in the buffer (and a full update)
    getattr(model.rollout_buffer, field)[5, 1] = np.nan
    good_states = [params_of(model)]
    optimizer_step = model.policy.optimizer.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        result = optimizer_step(*args, **kwargs)
        good_states.append(params_of(model))
        return result

    model.policy.optimizer.step = recording_step  # type: ignore[method-assign]
    adam_steps = [s["step"].clone() for s in model.policy.optimizer.state.values()]
    with pytest.raises(NonFiniteError) as caught:
        model.train()
    model.policy.optimizer.step = optimizer_step  # type: ignore[method-assign]
    # the failing minibatch changed neither the parameters nor the optimizer state
    steps_taken = len(good_states) - 1
    for state, before in zip(model.policy.optimizer.state.values(), adam_steps, strict=True):
        assert state["step"].item() == before.item() + steps_taken
    return caught.value, good_states


@pytest.mark.parametrize("fast_update", [True, False], ids=["fast-update", "autograd"])
@pytest.mark.parametrize(("field", "term"), [("returns", "value_loss"), ("advantages", "policy_loss")])
def test_non_finite_loss_stops_before_the_step_and_keeps_the_last_good_parameters(fast_update, field, term) -> None:
    model = trained_model(fast_update)
    error, good_states = poison_and_train(model, field)
    message = str(error)
    assert f"Non-finite {term}" in message
    assert "Batch statistics: advantages:" in message and "rollout returns:" in message
    assert "1 of 64 non-finite" in message or "non-finite" in message
    current = params_of(model)
    assert all(th.equal(current[name], good_states[-1][name]) for name in current)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


def test_non_finite_gradient_with_finite_losses_is_named() -> None:
    model = trained_model(fast_update=False)
    model.learn(64, reset_num_timesteps=False)
    before = params_of(model)
    handle = model.policy.value_net.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteError, match=r"Non-finite gradient \(all loss terms are finite\)"):
        model.train()
    handle.remove()
    current = params_of(model)
    assert all(th.equal(current[name], before[name]) for name in current)


# -- atomic save -------------------------------------------------------------------------------------------


def small_model(**kwargs: Any) -> ClippedPPO:
    return ClippedPPO("MlpPolicy", "CartPole-v1", seed=0, **{**TINY, **kwargs})


@pytest.mark.filterwarnings("ignore:Path .* does not exist")
def test_save_writes_the_same_files_as_sb3(tmp_path: pathlib.Path) -> None:
    model = small_model()
    model.save(tmp_path / "a")
    model.save(str(tmp_path / "b.model"))
    model.save(tmp_path / "new" / "dir" / "c")  # SB3 creates missing folders (with a warning)
    buffer = io.BytesIO()
    model.save(buffer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "b.model", "new"]
    assert (tmp_path / "new" / "dir" / "c.zip").is_file()
    assert buffer.getvalue()[:2] == b"PK"
    for path in (tmp_path / "a.zip", tmp_path / "b.model", io.BytesIO(buffer.getvalue())):
        ClippedPPO.load(path)


def test_save_gives_the_file_the_usual_permissions(tmp_path: pathlib.Path) -> None:
    model = small_model()
    model.save(tmp_path / "model.zip")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "model.zip").stat().st_mode) == 0o666 & ~umask
    os.chmod(tmp_path / "model.zip", 0o640)
    model.save(tmp_path / "model.zip")
    assert stat.S_IMODE((tmp_path / "model.zip").stat().st_mode) == 0o640


def test_a_failing_save_leaves_the_previous_file_and_no_temporary(tmp_path: pathlib.Path, monkeypatch) -> None:
    model = small_model()
    model.save(tmp_path / "model.zip")
    before = (tmp_path / "model.zip").read_bytes()
    model.num_timesteps = 12345

    def failing_save(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        file.write(b"partial data")
        raise OSError("disk full")

    monkeypatch.setattr(th, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path / "model.zip")
    monkeypatch.undo()
    assert (tmp_path / "model.zip").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.zip"]
    assert ClippedPPO.load(tmp_path / "model.zip").num_timesteps == 0


def test_save_through_a_symlink_replaces_its_target(tmp_path: pathlib.Path) -> None:
    model = small_model()
    (tmp_path / "runs").mkdir()
    model.save(tmp_path / "runs" / "model.zip")
    (tmp_path / "latest.zip").symlink_to(tmp_path / "runs" / "model.zip")
    model.num_timesteps = 7
    model.save(tmp_path / "latest.zip")
    assert (tmp_path / "latest.zip").is_symlink()
    assert ClippedPPO.load(tmp_path / "runs" / "model.zip").num_timesteps == 7


# -- loading bad files -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("model") / "model.zip"
    small_model().save(path)
    return path


def test_truncated_file_is_reported_as_truncated(saved_model: pathlib.Path, tmp_path: pathlib.Path) -> None:
    content = saved_model.read_bytes()
    for cut in (len(content) // 3, len(content) - 30):
        (tmp_path / "cut.zip").write_bytes(content[:cut])
        with pytest.raises(ModelFileError, match="truncated or damaged zip archive") as caught:
            ClippedPPO.load(tmp_path / "cut.zip")
        assert isinstance(caught.value, ValueError)  # SB3 raises ValueError for a bad zip


def test_empty_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "empty.zip").write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"is empty \(0 bytes\)"):
        ClippedPPO.load(tmp_path / "empty.zip")


def test_corrupt_entry_fails_its_crc_check(saved_model: pathlib.Path, tmp_path: pathlib.Path) -> None:
    content = bytearray(saved_model.read_bytes())
    with zipfile.ZipFile(saved_model) as archive:
        info = archive.getinfo("policy.pth")
    data_start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    content[data_start + info.compress_size // 2] ^= 0xFF
    (tmp_path / "corrupt.zip").write_bytes(bytes(content))
    with pytest.raises(ModelFileError, match="corrupt"):
        ClippedPPO.load(tmp_path / "corrupt.zip")


def test_file_that_is_not_a_model(tmp_path: pathlib.Path) -> None:
    (tmp_path / "notes.zip").write_text("hello, not a model")
    with pytest.raises(ModelFileError, match="is not a zip archive"):
        ClippedPPO.load(tmp_path / "notes.zip")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "a zip, but not a model")
    with pytest.raises(NotAModelFileError, match="lacks the 'data' and 'policy.pth' entries") as caught:
        ClippedPPO.load(tmp_path / "other.zip")
    assert isinstance(caught.value, AssertionError)  # SB3 asserts "No data found in the saved file"
    with zipfile.ZipFile(tmp_path / "garbled.zip", "w") as archive:
        archive.writestr("data", "{not json")
        archive.writestr("policy.pth", b"")
    with pytest.raises(ModelFileError, match="'data' entry is not valid JSON"):
        ClippedPPO.load(tmp_path / "garbled.zip")
    with pytest.raises(FileNotFoundError, match="No model file"):
        ClippedPPO.load(tmp_path / "missing")


@pytest.mark.parametrize(
    ("algorithm", "env_id", "name"),
    [(A2C, "CartPole-v1", "A2C"), (DQN, "CartPole-v1", "DQN"), (MaskablePPO, "CartPole-v1", "MaskablePPO")],
)
def test_model_of_another_algorithm_is_named(algorithm, env_id, name, tmp_path: pathlib.Path) -> None:
    kwargs = dict(n_steps=16, batch_size=16) if algorithm is MaskablePPO else {}
    algorithm("MlpPolicy", env_id, **kwargs).save(tmp_path / "other")
    with pytest.raises(ModelFileError, match=rf"holds a model of another algorithm \({name}"):
        ClippedPPO.load(tmp_path / "other")


def test_sb3_ppo_model_loads_and_trains_as_a_drop_in(tmp_path: pathlib.Path) -> None:
    PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, seed=0).save(tmp_path / "sb3_ppo")
    model = ClippedPPO.load(tmp_path / "sb3_ppo", env=make_vec_env("CartPole-v1", n_envs=1))
    model.learn(32)
    assert model.num_timesteps == 32


# -- checkpoints and resuming ------------------------------------------------------------------------------


def test_atomic_checkpoint_callback_writes_sb3_names_with_vecnormalize(tmp_path: pathlib.Path) -> None:
    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=0))
    model = ClippedPPO("MlpPolicy", env, seed=0, **TINY)
    callback = AtomicCheckpointCallback(16, tmp_path, name_prefix="ppo", save_vecnormalize=True)
    model.learn(128, callback=callback)
    found = find_checkpoints(tmp_path, "ppo")
    assert [c.num_timesteps for c in found] == [32, 64, 96, 128]
    assert all(c.vecnormalize_path is not None for c in found)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with open(found[-1].vecnormalize_path, "rb") as file:  # type: ignore[arg-type]
        stats = pickle.load(file)
    np.testing.assert_array_equal(stats.obs_rms.mean, env.obs_rms.mean)


def test_latest_checkpoint_skips_unloadable_files(tmp_path: pathlib.Path) -> None:
    model = small_model()
    for steps in (100, 200):
        model.num_timesteps = steps
        model.save(tmp_path / f"rl_model_{steps}_steps.zip")
    (tmp_path / "rl_model_300_steps.zip").write_bytes(b"PK\x03\x04 interrupted")
    assert latest_checkpoint(tmp_path / "nothing") is None
    with pytest.warns(UserWarning, match="Skipping checkpoint"):
        checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.num_timesteps == 200
    assert ClippedPPO.load(checkpoint.path).num_timesteps == 200


def run_and_record(model: ClippedPPO, steps: int, reset: bool) -> list[dict[str, Any]]:
    logger, writer = recording_logger()
    model.set_logger(logger)
    model.learn(steps, reset_num_timesteps=reset)
    keys = ("time/total_timesteps", "train/learning_rate", "train/clip_range", "train/n_updates", "train/loss")
    return [{key: dump.get(key) for key in keys} for dump in writer.dumps]


def test_save_load_between_learn_calls_is_transparent(tmp_path: pathlib.Path) -> None:
    """learn(N); save; load; learn(N, reset_num_timesteps=False) == the same two calls without save/load.

    Same process, same env object, ``force_reset=False`` and the torch RNG state carried over: then the
    parameters are bit-identical, so parameters, optimizer state, schedules, counters, last observation
    and episode starts all survive the round trip. The logged trajectories (learning rate and clip
    range by progress, num_timesteps, n_updates) continue without a jump.
    """
    kwargs = dict(learning_rate=linear(1e-3), clip_range=linear(0.3, 0.1), seed=0, **TINY)
    runs = {}
    for interrupted in (False, True):
        env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
        model = ClippedPPO("MlpPolicy", env, **kwargs)
        first = run_and_record(model, 192, reset=True)
        if interrupted:
            model.save(tmp_path / "model")
            rng = th.get_rng_state()
            optimizer_state = model.policy.optimizer.state_dict()
            model = ClippedPPO.load(tmp_path / "model", env=env, force_reset=False)
            th.set_rng_state(rng)
            loaded = model.policy.optimizer.state_dict()
            for key, state in optimizer_state["state"].items():
                for name, value in state.items():
                    assert th.equal(loaded["state"][key][name], value), (key, name)
        second = run_and_record(model, 192, reset=False)
        runs[interrupted] = (first + second, params_of(model), model.num_timesteps, model._n_updates)
    (logs_a, params_a, steps_a, updates_a), (logs_b, params_b, steps_b, updates_b) = runs[False], runs[True]
    assert steps_a == steps_b == 384 and updates_a == updates_b
    assert logs_a == logs_b
    assert [d["time/total_timesteps"] for d in logs_b] == list(range(64, 385, 64))
    for name in params_a:
        assert th.equal(params_a[name], params_b[name]), name


def test_resuming_towards_a_total_continues_the_schedules_of_an_uninterrupted_run(tmp_path: pathlib.Path) -> None:
    """Checkpoint mid-run, load, learn(TOTAL - num_timesteps, reset_num_timesteps=False): same progress."""
    total = 320
    kwargs = dict(learning_rate=linear(1e-3), clip_range=linear(0.3, 0.1), seed=0, **TINY)
    full = ClippedPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), **kwargs)
    full_log = run_and_record(full, total, reset=True)
    part = ClippedPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), **kwargs)
    part.learn(total, callback=AtomicCheckpointCallback(32, tmp_path))  # every 32 calls = 64 steps
    checkpoint = find_checkpoints(tmp_path)[1]  # as if killed after the second checkpoint
    resumed = ClippedPPO.load(checkpoint.path, env=make_vec_env("CartPole-v1", n_envs=2, seed=1))
    assert resumed.num_timesteps == checkpoint.num_timesteps == 128
    resumed_log = run_and_record(resumed, total - resumed.num_timesteps, reset=False)
    assert resumed.num_timesteps == total
    by_step = {d["time/total_timesteps"]: d for d in full_log}
    # SB3 dumps before train(): a dump holds the train/ values of the previous iteration
    compared = [d for d in resumed_log if d["train/learning_rate"] is not None]
    assert len(compared) == 2
    for dump in compared:
        expected = by_step[dump["time/total_timesteps"]]
        assert dump["train/learning_rate"] == pytest.approx(expected["train/learning_rate"], rel=1e-12)
        assert dump["train/clip_range"] == pytest.approx(expected["train/clip_range"], rel=1e-12)
    assert [d["time/total_timesteps"] for d in resumed_log] == [192, 256, 320]


# -- reproducibility across processes ----------------------------------------------------------------------

REPRODUCE = textwrap.dedent(
    """
    import hashlib, json, sys
    import torch as th
    th.set_num_threads(1)
    from stable_baselines3.common.env_util import make_vec_env
    from sb3_ppo_ext import ClippedPPO
    for env_id in ("CartPole-v1", "Pendulum-v1"):
        model = ClippedPPO("MlpPolicy", make_vec_env(env_id, n_envs=2, seed=7), seed=7,
                           n_steps=64, batch_size=32, n_epochs=3)
        model.learn(512)
        digest = hashlib.sha256()
        for name, tensor in sorted(model.policy.state_dict().items()):
            digest.update(name.encode()); digest.update(tensor.detach().cpu().numpy().tobytes())
        print(json.dumps({"env": env_id, "sha256": digest.hexdigest(), "steps": model.num_timesteps}))
    """
)


def test_same_seed_gives_bit_identical_parameters_in_fresh_processes() -> None:
    outputs = [
        subprocess.run([sys.executable, "-c", REPRODUCE], capture_output=True, text=True, timeout=120, check=True)
        for _ in range(2)
    ]
    first, second = ([json.loads(line) for line in out.stdout.splitlines()] for out in outputs)
    assert len(first) == 2 and first == second
    assert all(result["steps"] == 512 for result in first)


def test_checkpoint_module_exports() -> None:
    assert set(checkpoints.__all__) >= {"atomic_write", "AtomicCheckpointCallback", "latest_checkpoint"}
