"""sb3_ppo_ext.zoo.envs: rl_zoo3's Atari rule, env building, the NoVel tasks and MaskedMemory-v0."""

from __future__ import annotations

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from conftest import ImageEnv
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import (
    DummyVecEnv,
    VecFrameStack,
    VecNormalize,
    VecTransposeImage,
    sync_envs_normalization,
)

from sb3_ppo_ext.zoo.envs import (
    MASKED_MEMORY_ID,
    NO_VELOCITY_ENVS,
    MaskedMemoryEnv,
    is_atari,
    make_env,
    register_no_velocity_envs,
)
from sb3_ppo_ext.zoo.presets import parse_zoo_block

IMAGE_ID = "SB3PPOExtTestImage-v0"
FAKE_ATARI_ID = "SB3PPOExtFakeGame-v0"
if IMAGE_ID not in gym.registry:
    gym.register(IMAGE_ID, entry_point=ImageEnv)
if FAKE_ATARI_ID not in gym.registry:
    # registered, never made: is_atari reads the entry point only, as rl_zoo3 does
    gym.register(FAKE_ATARI_ID, entry_point="ale_py.env:AtariEnv")


# -- is_atari ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env_id", "expected"),
    [
        (FAKE_ATARI_ID, True),  # rl_zoo3's rule: the AtariEnv entry point, whatever the name
        ("ALE/Pong-v5", True),  # by name where ale_py is not installed, by entry point where it is
        ("PongNoFrameskip-v4", True),
        ("CartPole-v1", False),
        ("HalfCheetah-v5", False),
        ("NoSuchEnv-v0", False),
        ("no_such_module:Thing-v0", False),
    ],
)
def test_is_atari(env_id, expected):
    assert is_atari(env_id) is expected


# -- make_env ------------------------------------------------------------------------------------------


def test_plain_settings_give_monitored_envs_seeded_one_apart():
    settings = parse_zoo_block({"n_envs": 3, "env_kwargs": {"max_episode_steps": 7}})
    env = make_env("CartPole-v1", settings, seed=5)
    assert isinstance(env, DummyVecEnv) and env.num_envs == 3
    assert all(isinstance(e, Monitor) for e in env.envs)
    assert env.envs[0].spec.max_episode_steps == 7
    again = make_env("CartPole-v1", settings, n_envs=1, seed=6)
    np.testing.assert_array_equal(env.reset()[1], again.reset()[0])  # env i is seeded with seed + i


def test_env_kwargs_argument_goes_over_the_settings():
    settings = parse_zoo_block({"env_kwargs": {"max_episode_steps": 7}})
    env = make_env("CartPole-v1", settings, env_kwargs={"max_episode_steps": 9})
    assert env.envs[0].spec.max_episode_steps == 9


def test_normalize_is_inside_frame_stack_as_in_the_zoo():
    settings = parse_zoo_block({"n_envs": 2, "normalize": "dict(norm_reward=False)", "gamma": 0.9, "frame_stack": 3})
    env = make_env("Pendulum-v1", settings, seed=0)
    assert isinstance(env, VecFrameStack) and isinstance(env.venv, VecNormalize)
    assert env.venv.gamma == 0.9 and env.venv.training and not env.venv.norm_reward
    assert env.observation_space.shape == (9,)
    assert not isinstance(make_env("Pendulum-v1", settings, normalize=False), VecNormalize)


def test_evaluation_envs_freeze_statistics_and_take_the_training_ones(tmp_path):
    settings = parse_zoo_block({"normalize": True, "gamma": 0.95})
    train_env = make_env("Pendulum-v1", settings, seed=0)
    train_env.reset()
    for _ in range(20):
        train_env.step(np.zeros((1, 1), dtype=np.float32))
    eval_env = make_env("Pendulum-v1", settings, 1, 1, evaluation=True)
    assert not eval_env.training and not eval_env.norm_reward
    sync_envs_normalization(train_env, eval_env)
    np.testing.assert_allclose(eval_env.obs_rms.mean, train_env.obs_rms.mean)

    path = tmp_path / "stats.pkl"
    train_env.save(str(path))
    loaded = make_env("Pendulum-v1", parse_zoo_block({}), 1, 2, normalize=path, evaluation=True)
    assert isinstance(loaded, VecNormalize) and not loaded.training and not loaded.norm_reward
    np.testing.assert_allclose(loaded.obs_rms.mean, train_env.obs_rms.mean)

    # Pendulum's statistics (3 observation dims) loaded for an env of 2: an error that says what to do
    with pytest.raises(ValueError, match=r"do not fit MountainCarContinuous-v0 .*\(3,\) != \(2,\).*settings"):
        make_env("MountainCarContinuous-v0", parse_zoo_block({}), 1, 2, normalize=path, evaluation=True)


@pytest.mark.filterwarnings("ignore:.*render_mode")  # make_vec_env asks every env for rgb_array
def test_channel_last_images_are_transposed_after_frame_stacking():
    settings = parse_zoo_block({"n_envs": 2, "frame_stack": 2, "policy": "CnnPolicy"})
    env = make_env(IMAGE_ID, settings, seed=0)
    assert isinstance(env, VecTransposeImage) and isinstance(env.venv, VecFrameStack)
    assert env.observation_space.shape == (6, 36, 36)
    assert env.reset().shape == (2, 6, 36, 36)


def test_env_wrappers_of_the_settings_are_applied():
    settings = parse_zoo_block({"env_wrapper": [{"gymnasium.wrappers.TimeLimit": {"max_episode_steps": 4}}]})
    env = make_env("CartPole-v1", settings, seed=0)
    env.reset()
    for _ in range(3):
        _, _, dones, _ = env.step(np.zeros(1, dtype=np.int64))
        assert not dones[0]
    _, _, dones, infos = env.step(np.zeros(1, dtype=np.int64))
    assert dones[0] and infos[0]["TimeLimit.truncated"]  # the wrapper (outside Monitor) cut the episode


# -- the Zoo's velocity-free tasks ----------------------------------------------------------------------

NO_VELOCITY_CASES = [
    ("CartPoleNoVel-v1", "CartPole-v1", [1, 3]),
    ("PendulumNoVel-v1", "Pendulum-v1", [2]),
    ("MountainCarNoVel-v0", "MountainCar-v0", [1]),
    ("MountainCarContinuousNoVel-v0", "MountainCarContinuous-v0", [1]),
    ("LunarLanderNoVel-v3", "LunarLander-v3", [2, 3, 5]),
    ("LunarLanderContinuousNoVel-v3", "LunarLanderContinuous-v3", [2, 3, 5]),
]


def _rollout(env: gym.Env, seed: int, steps: int) -> list[np.ndarray]:
    env.action_space.seed(seed)
    observations = [env.reset(seed=seed)[0]]
    for _ in range(steps):
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        observations.append(obs)
        if terminated or truncated:
            break
    return observations


@pytest.mark.parametrize(("env_id", "base_id", "hidden"), NO_VELOCITY_CASES)
def test_no_velocity_envs_hide_the_zoo_entries_and_nothing_else(env_id, base_id, hidden):
    assert NO_VELOCITY_ENVS[env_id] == base_id
    try:
        venv = make_env(env_id, parse_zoo_block({"n_envs": 2}), seed=0)  # registers the id on first use
        base = gym.make(base_id)
    except gym.error.DependencyNotInstalled as exc:  # LunarLander needs box2d
        pytest.skip(str(exc))
    assert venv.observation_space == base.observation_space  # the shape stays: only the values are hidden
    assert venv.action_space == base.action_space
    ours, plain = _rollout(gym.make(env_id), 3, 20), _rollout(base, 3, 20)
    shown = np.setdiff1d(np.arange(plain[0].shape[0]), hidden)
    assert len(ours) == len(plain)
    for masked, full in zip(ours, plain, strict=True):
        np.testing.assert_array_equal(masked[hidden], 0.0)
        np.testing.assert_array_equal(masked[shown], full[shown])
    assert any(np.any(full[hidden] != 0) for full in plain)  # the base env does move


@pytest.mark.parametrize(("env_id", "base_id", "hidden"), NO_VELOCITY_CASES[:2])
def test_no_velocity_envs_match_rl_zoo3s_wrapper(env_id, base_id, hidden):
    wrappers = pytest.importorskip("rl_zoo3.wrappers")
    register_no_velocity_envs()
    zoo = wrappers.MaskVelocityWrapper(gym.make(base_id))
    for mine, theirs in zip(_rollout(gym.make(env_id), 7, 30), _rollout(zoo, 7, 30), strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_no_velocity_ids_registered_elsewhere_are_kept(monkeypatch):
    # e.g. by rl_zoo3.import_envs, which registers the same ids with its own wrapper
    theirs = gym.envs.registration.EnvSpec("CartPoleNoVel-v1", entry_point="somewhere:else")
    monkeypatch.setitem(gym.registry, "CartPoleNoVel-v1", theirs)
    register_no_velocity_envs()
    assert gym.registry["CartPoleNoVel-v1"] is theirs


def test_rl_zoo3_registers_its_no_velocity_envs_after_ours():
    pytest.importorskip("rl_zoo3")
    script = """
import warnings
import gymnasium as gym
from sb3_ppo_ext.zoo.envs import make_env, register_no_velocity_envs
from sb3_ppo_ext.zoo.presets import parse_zoo_block
register_no_velocity_envs()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Gymnasium's 'Overriding environment' notice
    import rl_zoo3.import_envs
assert "create_no_vel_env" in str(gym.spec("CartPoleNoVel-v1").entry_point)
obs = make_env("CartPoleNoVel-v1", parse_zoo_block({}), seed=0).reset()
assert obs.shape == (1, 4) and (obs[:, [1, 3]] == 0).all()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# -- MaskedMemory-v0: memory and masks -------------------------------------------------------------------


def _play(env: MaskedMemoryEnv, cue: int, answer: int | None = None) -> tuple[float, int]:
    """One episode whose cue is ``cue``: the first valid action at walk steps, then ``answer`` (default: the cue)."""
    env.reset(seed=0)
    env.cue = cue  # the episode's hidden state, set directly to cover every cue
    total, steps, done = 0.0, 0, False
    while not done:
        mask = env.action_masks()
        action = (cue if answer is None else answer) if env.t == env.episode_length - 1 else int(np.argmax(mask))
        _, reward, done, truncated, _ = env.step(action)
        assert not truncated
        total, steps = total + reward, steps + 1
    return total, steps


def test_masked_memory_is_a_valid_gymnasium_env_made_by_make_env():
    from stable_baselines3.common.env_checker import check_env

    check_env(MaskedMemoryEnv())
    settings = parse_zoo_block({"n_envs": 3})
    env = make_env(MASKED_MEMORY_ID, settings, seed=0)
    masks = np.stack(env.env_method("action_masks"))
    assert env.reset().shape == (3, 4 + 8) and masks.shape == (3, 32) and (masks.sum(axis=1) == 4).all()


def test_masked_memory_masks_follow_the_rules():
    env = MaskedMemoryEnv()
    assert env.walk_masks.shape == (4, 7, 32) and (env.walk_masks.sum(axis=2) == 4).all()
    # the valid set changes from step to step and depends on the hidden cue
    assert all(not np.array_equal(env.walk_masks[c, t], env.walk_masks[c, t + 1]) for c in range(4) for t in range(6))
    assert all(not np.array_equal(env.walk_masks[0, t], env.walk_masks[1, t]) for t in range(7))
    # the same rules in every instance (vectorised envs share them), others for another layout_seed
    np.testing.assert_array_equal(MaskedMemoryEnv().walk_masks, env.walk_masks)
    assert not np.array_equal(MaskedMemoryEnv(layout_seed=1).walk_masks, env.walk_masks)
    for cue in range(4):
        env.reset(seed=cue)
        env.cue = cue
        for t in range(7):
            np.testing.assert_array_equal(env.action_masks(), env.walk_masks[cue, t])
            env.step(int(np.argmax(env.action_masks())))
        np.testing.assert_array_equal(env.action_masks(), np.arange(32) < 4)  # the answers, whatever the cue


def test_masked_memory_shows_the_cue_at_the_first_step_only():
    env = MaskedMemoryEnv()
    seen = {}
    for cue in range(4):
        env.reset(seed=0)
        env.cue = cue
        observations = [env._observation()]
        for _ in range(7):
            observations.append(env.step(int(np.argmax(env.action_masks())))[0])
        seen[cue] = np.stack(observations)
        np.testing.assert_array_equal(seen[cue][0, :4], np.eye(4)[cue])
    for cue in range(1, 4):  # after the first step, nothing in the observation tells the cues apart
        np.testing.assert_array_equal(seen[cue][1:], seen[0][1:])


def test_masked_memory_invalid_action_ends_the_episode_with_the_penalty():
    env = MaskedMemoryEnv(invalid_penalty=2.0)
    env.reset(seed=1)
    invalid = int(np.argmin(env.action_masks()))
    _, reward, terminated, truncated, info = env.step(invalid)
    assert (reward, terminated, truncated, info["invalid"], info["is_success"]) == (-2.0, True, False, True, False)


def test_masked_memory_optimal_return_is_one():
    env = MaskedMemoryEnv()
    for cue in range(4):
        assert _play(env, cue) == (1.0, 8)
    env.reset(seed=0)
    env.cue = 2
    for _ in range(7):
        env.step(int(np.argmax(env.action_masks())))
    assert env.step(2)[4] == {"is_success": True}


def test_masked_memory_without_memory_is_chance():
    env = MaskedMemoryEnv()
    # the last observation is the same for every cue, so a memoryless policy gives one answer to all:
    # whichever it is, over the (uniform) cues it earns 1 / n_cues
    for answer in range(4):
        assert np.mean([_play(env, cue, answer)[0] for cue in range(4)]) == 0.25
    # and the cues are uniform: a masked random policy scores about 0.25
    env.reset(seed=0)
    rng, returns = np.random.default_rng(0), []
    for _ in range(2000):
        env.reset()
        done, total = False, 0.0
        while not done:
            _, reward, done, _, _ = env.step(rng.choice(np.flatnonzero(env.action_masks())))
            total += reward
        returns.append(total)
    assert abs(np.mean(returns) - 0.25) < 0.04


def test_masked_memory_without_masks_a_random_policy_is_penalised():
    env = MaskedMemoryEnv()
    env.reset(seed=0)
    rng, returns, lengths = np.random.default_rng(0), [], []
    for _ in range(2000):
        env.reset()
        done, total, steps = False, 0.0, 0
        while not done:
            _, reward, done, _, _ = env.step(int(rng.integers(32)))
            total, steps = total + reward, steps + 1
        returns.append(total)
        lengths.append(steps)
    # a walk step survives with probability 4 / 32: episodes end early, almost always with the penalty
    assert np.mean(returns) < -0.99 and abs(np.mean(lengths) - 32 / 28) < 0.1


def test_masked_memory_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="n_cues"):
        MaskedMemoryEnv(n_cues=8, n_actions=4)
    with pytest.raises(ValueError, match="n_valid"):
        MaskedMemoryEnv(n_valid=0)
    with pytest.raises(ValueError, match="episode_length"):
        MaskedMemoryEnv(episode_length=1)
