"""The extension points: a feature written only against sb3_ppo_ext.extensions works without touching ppo.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.extensions import Extension, Extensions, RolloutStep
from sb3_ppo_ext.losses import LossTerms, PPOBatch
from sb3_ppo_ext.masking import ActionMasks
from sb3_ppo_ext.rlhf.penalty import LossKLPenalty, RewardKLPenalty
from sb3_ppo_ext.stabilizers.adaptive_lr import AdaptiveLearningRate
from sb3_ppo_ext.stabilizers.value_normalization import ValueTargetNormalization

SETTINGS = dict(n_steps=16, batch_size=32, n_epochs=2, seed=0)


def _env() -> Any:
    return make_vec_env("CartPole-v1", n_envs=2, seed=0)


class SurvivalBonus(Extension):
    """Reward shaping: a constant per step, recorded so that the test can check what GAE saw."""

    def __init__(self, bonus: float) -> None:
        self.bonus = bonus

    def shape_rewards(self, rewards: np.ndarray, step: RolloutStep) -> np.ndarray:
        return rewards + self.bonus


class Recorder(Extension):
    """Records the order of every hook call and what the hooks receive."""

    statistics = ("mean_log_prob",)

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.log_probs: list[th.Tensor] = []
        self.merged: list[dict[str, float]] = []
        self.minibatches = 0

    def setup(self, model: Any) -> None:
        self.calls.append("setup")

    def rollout_start(self, model: Any, env: Any, rollout_buffer: Any) -> None:
        self.calls.append("rollout_start")
        self.log_probs = []

    def acted(self, step: RolloutStep) -> None:
        self.calls.append("acted")
        self.log_probs.append(step.log_probs.clone())

    def step_end(self, model: Any) -> None:
        self.calls.append("step_end")

    def rollout_end(self, model: Any) -> dict[str, float]:
        self.calls.append("rollout_end")
        return {"mean_log_prob": th.cat(self.log_probs).mean().item()}

    def rollout_statistics(self, statistics: dict[str, float]) -> None:
        self.merged.append(statistics)

    def update_start(self, model: Any) -> None:
        self.calls.append("update_start")

    def minibatch(self, batch: PPOBatch) -> PPOBatch:
        self.minibatches += 1
        return batch

    def epoch_done(self, model: Any, terms: list[LossTerms]) -> None:
        self.calls.append("epoch_done")

    def update_end(self, model: Any, history: list[list[LossTerms]]) -> None:
        self.calls.append("update_end")
        model.logger.record("train/recorded_epochs", len(history))


def test_a_reward_shaping_extension_changes_exactly_the_rewards_gae_sees() -> None:
    buffers = []
    for extensions in ([], [SurvivalBonus(0.25)]):
        env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
        model = ClippedPPO("MlpPolicy", env, extensions=extensions, **SETTINGS)
        _, callback = model._setup_learn(32)
        assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
        buffers.append(model.rollout_buffer)
    plain, shaped = buffers
    # same seeds, same initial parameters: the same observations and actions
    np.testing.assert_array_equal(plain.actions, shaped.actions)
    # CartPole pays 1 per step and no time limit is reached in 16 steps: the shaped rollout stored 1 + 0.25
    np.testing.assert_allclose(shaped.rewards, plain.rewards + 0.25)
    # ... and GAE ran on the shaped rewards: with gamma = 0.99, lambda = 0.95 the returns differ accordingly
    assert (shaped.returns > plain.returns).all()


def test_hooks_run_in_the_documented_order_and_statistics_come_back() -> None:
    recorder = Recorder()
    model = ClippedPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), extensions=[recorder], **SETTINGS)
    model.learn(32)  # one rollout of 16 steps x 2 envs, one update of 2 epochs
    calls = recorder.calls
    assert calls[0] == "setup"
    first_rollout = calls[calls.index("rollout_start") : calls.index("rollout_end") + 1]
    assert first_rollout == ["rollout_start"] + ["acted", "step_end"] * 16 + ["rollout_end"]
    update = calls[calls.index("update_start") : calls.index("update_end") + 1]
    assert update == ["update_start", "epoch_done", "epoch_done", "update_end"]
    assert recorder.minibatches == 2  # 2 epochs x 1 minibatch of 32
    # the statistic is the mean log-probability of the rollout's actions, independently recomputed
    expected = float(np.mean(model.rollout_buffer.log_probs))
    assert recorder.merged[0]["mean_log_prob"] == pytest.approx(expected, rel=1e-6)
    assert model.logger.name_to_value.get("train/recorded_epochs", 2) == 2


def test_user_extensions_are_saved_and_come_back_after_load(tmp_path) -> None:
    model = ClippedPPO("MlpPolicy", _env(), extensions=[SurvivalBonus(0.5)], **SETTINGS)
    model.save(tmp_path / "m")
    loaded = ClippedPPO.load(tmp_path / "m", env=make_vec_env("CartPole-v1", n_envs=1, seed=0))
    bonus = loaded.extension(SurvivalBonus)
    assert bonus is not None and bonus.bonus == 0.5
    assert loaded.extension(ActionMasks) is not None  # the package's own are rebuilt


@pytest.mark.parametrize(
    ("kwargs", "present", "absent"),
    [
        ({}, [ActionMasks], [RewardKLPenalty, LossKLPenalty, ValueTargetNormalization, AdaptiveLearningRate]),
        (dict(normalize_value_targets=True, adaptive_lr_kl=0.01), [ValueTargetNormalization, AdaptiveLearningRate], []),
    ],
)
def test_features_are_extensions_only_when_turned_on(kwargs, present, absent) -> None:
    model = ClippedPPO("MlpPolicy", _env(), **SETTINGS, **kwargs)
    for kind in present:
        assert model.extension(kind) is not None
    for kind in absent:
        assert model.extension(kind) is None


def test_the_reference_kl_is_an_extension_of_its_mode() -> None:
    reference = ClippedPPO("MlpPolicy", _env(), seed=3)
    reward = ClippedPPO("MlpPolicy", _env(), ref_policy=reference, **SETTINGS)
    loss = ClippedPPO("MlpPolicy", _env(), ref_policy=reference, ref_kl_mode="loss", **SETTINGS)
    assert reward.extension(RewardKLPenalty) is not None and reward.extension(LossKLPenalty) is None
    assert loss.extension(LossKLPenalty) is not None and loss.extension(RewardKLPenalty) is None


def test_hooks_nobody_overrides_are_not_called() -> None:
    class OnlyRewards(Extension):
        def shape_rewards(self, rewards: np.ndarray, step: RolloutStep) -> np.ndarray:
            return rewards * 2

    extensions = Extensions([OnlyRewards(), Extension()])
    assert len(extensions._shape_rewards) == 1 and extensions._acted == [] and extensions._minibatch == []
    step = RolloutStep(0, None, th.zeros(1), th.zeros(1), {}, ())
    np.testing.assert_array_equal(extensions.shape_rewards(np.ones(3), step), np.full(3, 2.0))
