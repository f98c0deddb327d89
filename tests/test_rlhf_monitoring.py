"""The rlhf/ logger keys, each against a computation from the rollout buffer and the reference itself."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch as th
from conftest import RolloutRecorder
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import KVWriter, Logger

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.extensions import Extension


class _Capture(KVWriter):
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        self.rows.append(dict(key_values))


def test_reward_mode_keys_equal_sums_over_the_episodes_of_the_rollout() -> None:
    reference = ClippedPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=5), seed=5)
    keep = RolloutRecorder()
    beta = 0.3
    model = ClippedPPO(
        "MlpPolicy",
        make_vec_env("CartPole-v1", n_envs=2, seed=0),
        n_steps=128,
        batch_size=64,
        n_epochs=1,
        seed=0,
        ref_policy=reference,
        ref_kl_coef=beta,
        extensions=[keep],
    )
    capture = _Capture()
    model.set_logger(Logger(folder=None, output_formats=[capture]))
    model.learn(512)  # rollouts of 128 steps x 2 envs (CartPole episodes of ~10-40 steps end inside them); SB3
    # writes an update's keys with the next iteration's: the second rollout gets the first update logged
    row = next(r for r in capture.rows if "rlhf/score" in r)
    data = keep.rollouts[0]
    obs = th.as_tensor(data["observations"].reshape(-1, 4))
    actions = th.as_tensor(data["actions"].reshape(-1)).long()
    with th.no_grad():
        ref_log_prob = reference.policy.get_distribution(obs).log_prob(actions).numpy().reshape(128, 2)
    kl = data["log_probs"] - ref_log_prob
    # the buffer holds r - beta * kl (CartPole pays 1 per step; no truncation within 128 steps)
    np.testing.assert_allclose(data["rewards"], 1.0 - beta * kl, rtol=1e-4, atol=1e-5)
    episodes = {"kl": [], "score": [], "penalty": []}
    running = np.zeros((3, 2))
    for t in range(128):
        running += np.stack([kl[t], np.ones(2), -beta * kl[t]])
        for env in np.flatnonzero(data["dones"][t]):
            for i, key in enumerate(episodes):
                episodes[key].append(running[i, env])
            running[:, env] = 0.0
    assert len(episodes["score"]) >= 4
    assert row["rlhf/kl_sampled_per_step"] == pytest.approx(kl.mean(), rel=1e-4)
    assert row["rlhf/kl_sampled_per_episode"] == pytest.approx(np.mean(episodes["kl"]), rel=1e-4, abs=1e-6)
    assert row["rlhf/score"] == pytest.approx(np.mean(episodes["score"]))
    assert row["rlhf/non_score_reward"] == pytest.approx(np.mean(episodes["penalty"]), rel=1e-4, abs=1e-6)
    assert row["rlhf/beta"] == beta and row["rlhf/entropy"] == pytest.approx(-row["train/entropy_loss"])


def test_loss_mode_logs_the_exact_kl_of_the_update() -> None:
    reference = ClippedPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=5), seed=5)
    model = ClippedPPO(
        "MlpPolicy",
        make_vec_env("CartPole-v1", n_envs=2, seed=0),
        n_steps=32,
        batch_size=64,
        n_epochs=2,
        seed=0,
        ref_policy=reference,
        ref_kl_mode="loss",
    )
    capture = _Capture()
    model.set_logger(Logger(folder=None, output_formats=[capture]))
    model.learn(128)
    row = next(r for r in capture.rows if "rlhf/beta" in r)
    assert row["rlhf/kl_exact_per_step"] == pytest.approx(row["train/ref_kl"]) and row["rlhf/kl_exact_per_step"] > 0
    assert "rlhf/kl_sampled_per_step" not in row


class _RecordVecNormalize(Extension):
    """After the penalty: the rewards it returned, the env's raw rewards and VecNormalize's scale; the raw obs."""

    def __init__(self) -> None:
        self.steps: list[dict[str, np.ndarray]] = []
        self._obs: Any = None

    def rollout_start(self, model: Any, env: Any, rollout_buffer: Any) -> None:
        self._venv = model.get_vec_normalize_env()

    def acted(self, step: Any) -> None:
        self._obs = self._venv.get_original_obs()

    def shape_rewards(self, rewards: np.ndarray, step: Any) -> np.ndarray:
        venv = self._venv
        self.steps.append(
            dict(
                penalized=rewards.copy(),
                raw=venv.get_original_reward(),
                scale=np.sqrt(venv.ret_rms.var + venv.epsilon),
                raw_obs=self._obs,
                actions=step.actions.numpy().copy(),
                log_probs=step.log_probs.numpy().copy(),
            )
        )
        return rewards


def test_under_vecnormalize_the_penalty_is_in_raw_units_and_the_reference_reads_frozen_statistics() -> None:
    from stable_baselines3.common.vec_env import VecNormalize

    reference = ClippedPPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=5), seed=5)
    record = _RecordVecNormalize()
    beta = 0.5
    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=0))
    model = ClippedPPO(
        "MlpPolicy",
        env,
        n_steps=64,
        batch_size=64,
        n_epochs=1,
        seed=0,
        ref_policy=reference,
        ref_kl_coef=beta,
        extensions=[record],
    )
    model.learn(256)  # two rollouts: the live statistics move on after the reference's were frozen
    frozen_rms, eps, clip = model._ref_obs_rms
    assert not np.allclose(frozen_rms.mean, env.obs_rms.mean)  # frozen at the first rollout, the live ones moved
    for step in record.steps[-8:]:
        obs = np.clip((step["raw_obs"] - frozen_rms.mean) / np.sqrt(frozen_rms.var + eps), -clip, clip)
        with th.no_grad():
            ref_log_prob = reference.policy.get_distribution(th.as_tensor(obs, dtype=th.float32)).log_prob(
                th.as_tensor(step["actions"])
            )
        kl = step["log_probs"] - ref_log_prob.numpy()
        env_reward = np.clip(step["raw"] / step["scale"], -env.clip_reward, env.clip_reward)
        np.testing.assert_allclose(step["penalized"], env_reward - beta * kl / step["scale"], rtol=1e-4, atol=1e-5)
