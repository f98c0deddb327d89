"""Shared fixtures and tiny environments for the test suite.

The machine running the suite has few cores shared by parallel workers, so torch is pinned to one thread
and every non-learning test trains for a few hundred steps at most.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger

from sb3_ppo_ext.extensions import Extension

th.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_global_rngs() -> None:
    """Every test starts from the same torch and NumPy random state, so a failure reproduces."""
    th.manual_seed(0)
    np.random.seed(0)


# small, fast settings for smoke training: 2 rollouts of 32 steps, 2 epochs of 2 minibatches
TINY = dict(n_steps=32, batch_size=16, n_epochs=2)


class ImageEnv(gym.Env):
    """36x36x3 uint8 images (the smallest NatureCNN accepts); reward 1 when the action matches the colour bit."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, discrete: bool = True, ep_length: int = 20) -> None:
        super().__init__()
        self.observation_space = spaces.Box(0, 255, shape=(36, 36, 3), dtype=np.uint8)
        self.action_space = spaces.Discrete(2) if discrete else spaces.Box(-1, 1, shape=(2,), dtype=np.float32)
        self.ep_length = ep_length
        self._t = 0
        self._bit = 0

    def _obs(self) -> np.ndarray:
        obs = np.zeros((36, 36, 3), dtype=np.uint8)
        obs[..., self._bit] = 255
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        self._bit = int(self.np_random.integers(2))
        return self._obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if isinstance(self.action_space, spaces.Discrete):
            reward = float(int(action) == self._bit)
        else:
            reward = float(-np.abs(np.asarray(action) - self._bit).sum())
        self._t += 1
        self._bit = int(self.np_random.integers(2))
        return self._obs(), reward, False, self._t >= self.ep_length, {}


class DictObsEnv(gym.Env):
    """Dict observations (a vector, a second vector and a Discrete index), Discrete or Box actions."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, discrete: bool = True, ep_length: int = 20) -> None:
        super().__init__()
        self.observation_space = spaces.Dict(
            {
                "vec": spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32),
                "other": spaces.Box(0.0, 1.0, shape=(2, 2), dtype=np.float32),
                "index": spaces.Discrete(4),
            }
        )
        self.action_space = spaces.Discrete(3) if discrete else spaces.Box(-1, 1, shape=(2,), dtype=np.float32)
        self.ep_length = ep_length
        self._t = 0

    def _obs(self) -> dict[str, Any]:
        return {
            "vec": self.np_random.uniform(-1, 1, size=3).astype(np.float32),
            "other": self.np_random.uniform(0, 1, size=(2, 2)).astype(np.float32),
            "index": int(self.np_random.integers(4)),
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self._t = 0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        self._t += 1
        reward = float(np.sum(action) == 1)
        return self._obs(), reward, False, self._t >= self.ep_length, {}


class CounterEnv(gym.Env):
    """Observation ``[t / 10]``; odd episodes terminate after 3 steps, even ones run until a TimeLimit cuts them.

    Reward is always 1, so the only non-unit rewards a rollout buffer can hold come from truncation bootstraps.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = spaces.Box(0.0, 100.0, shape=(1,), dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        self.episode = -1
        self._t = 0

    def _obs(self) -> np.ndarray:
        return np.array([self._t / 10.0], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.episode += 1
        self._t = 0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        self._t += 1
        terminated = self.episode % 2 == 1 and self._t >= 3
        return self._obs(), 1.0, terminated, False, {}


class RecordingWriter(KVWriter):
    """Logger output that keeps every dump in memory."""

    def __init__(self) -> None:
        self.dumps: list[dict[str, Any]] = []

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        self.dumps.append(dict(key_values))

    def close(self) -> None:
        pass

    @property
    def keys(self) -> set[str]:
        """Every key seen in any dump."""
        return set().union(*(d.keys() for d in self.dumps)) if self.dumps else set()

    def last(self, key: str) -> Any:
        """The last dumped value of ``key``."""
        return [d[key] for d in self.dumps if key in d][-1]


def recording_logger() -> tuple[Logger, RecordingWriter]:
    """A logger whose dumps can be inspected."""
    writer = RecordingWriter()
    return Logger(folder=None, output_formats=[writer]), writer


class _NoCallback(BaseCallback):
    def _on_step(self) -> bool:
        return True


def collect_rollout(model: Any, total_timesteps: int | None = None) -> None:
    """Fill ``model``'s rollout buffer once (``n_steps`` per env), without training.

    :param model: a ClippedPPO or SB3 on-policy model.
    :param total_timesteps: the ``learn`` budget the rollout is taken under (default: this one rollout).
    """
    model._setup_learn(total_timesteps or model.n_steps * model.n_envs, callback=None)
    callback = _NoCallback()
    callback.init_callback(model)
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)


def params_of(model: Any) -> dict[str, th.Tensor]:
    """Detached copies of a model's policy parameters."""
    return {name: p.detach().clone() for name, p in model.policy.state_dict().items()}


def params_changed(before: dict[str, th.Tensor], model: Any) -> bool:
    """True when any policy parameter differs from ``before``."""
    after = model.policy.state_dict()
    return any(not th.equal(before[name], after[name]) for name in before)


@pytest.fixture
def tiny() -> dict[str, int]:
    """Constructor arguments for fast smoke training."""
    return dict(TINY)


class RolloutRecorder(Extension):
    """An extension: per rollout, copies of the buffer's observations, actions, log-probabilities and rewards and
    every step's done flags; per update, ``ref_kl_coef`` after it and the logger's values (its hooks run after the
    package's own)."""

    def __init__(self) -> None:
        self.rollouts: list[dict[str, np.ndarray]] = []
        self.betas: list[float] = []
        self.logged: list[dict[str, float]] = []
        self._dones: list[np.ndarray] = []

    def rollout_start(self, model: Any, env: Any, rollout_buffer: Any) -> None:
        self._dones = []

    def step_end(self, model: Any) -> None:
        self._dones.append(np.asarray(model._last_episode_starts, dtype=bool).copy())

    def rollout_end(self, model: Any) -> dict[str, float]:
        buffer = model.rollout_buffer
        self.rollouts.append(
            dict(
                observations=buffer.observations.copy(),
                actions=buffer.actions.copy(),
                log_probs=buffer.log_probs.copy(),
                rewards=buffer.rewards.copy(),
                dones=np.stack(self._dones),
            )
        )
        return {}

    def update_end(self, model: Any, history: Any) -> None:
        self.betas.append(getattr(model, "ref_kl_coef", float("nan")))
        self.logged.append(dict(model.logger.name_to_value))
