"""sb3_ppo_ext.rlhf.preferences: the Bradley-Terry loss, reward recovery, the reward wrapper and periodic refits."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import recording_logger
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.rlhf.preferences import (
    LearnedRewardWrapper,
    PreferenceDataset,
    RewardModel,
    RewardModelRefitCallback,
    Segment,
    SyntheticPreferenceCollector,
    Trajectories,
    bradley_terry_loss,
    evaluate,
    fit,
    preference_probability,
    record_rollout,
)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation (no ties in continuous data): Pearson's r of the ranks."""
    rank_x, rank_y = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rank_x, rank_y)[0, 1])


class CounterEnv(gym.Env):
    """obs = [step in episode], Discrete(3) actions, env reward = 100 * action, episodes of 3 steps."""

    def __init__(self) -> None:
        self.observation_space = spaces.Box(0, 10, shape=(1,), dtype=np.float32)
        self.action_space = spaces.Discrete(3)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        return np.array([0.0], dtype=np.float32), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        self._t += 1
        return np.array([self._t], dtype=np.float32), 100.0 * int(action), False, self._t == 3, {}


def linear_model(env: gym.Env) -> RewardModel:
    """r(s, a) = 2 s + 10 [a = 1] + 20 [a = 2] + 0.5: one linear layer with hand-set weights."""
    model = RewardModel(env.observation_space, env.action_space, net_arch=())
    with th.no_grad():
        model.net[0].weight.copy_(th.tensor([[2.0, 0.0, 10.0, 20.0]]))
        model.net[0].bias.fill_(0.5)
    return model


def expected_learned(obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
    return 2 * obs[:, 0] + 10 * (actions == 1) + 20 * (actions == 2) + 0.5


# ── loss ───────────────────────────────────────────────────────────────────────────────────────────────


def test_bradley_terry_loss_and_gradient_match_a_hand_computation() -> None:
    returns1 = th.tensor([1.0, -0.5, 2.0, 3.0], dtype=th.float64, requires_grad=True)
    returns2 = th.tensor([0.0, 0.5, 2.0, 1.0], dtype=th.float64, requires_grad=True)
    labels = th.tensor([1.0, 0.0, 0.5, 0.0], dtype=th.float64)
    loss = bradley_terry_loss(returns1, returns2, labels)
    loss.backward()

    def sigmoid(d: float) -> float:
        return 1 / (1 + math.exp(-d))

    gaps = [1.0, -1.0, 0.0, 2.0]
    ys = [1.0, 0.0, 0.5, 0.0]
    by_hand = [-(y * math.log(sigmoid(d)) + (1 - y) * math.log(1 - sigmoid(d))) for d, y in zip(gaps, ys, strict=True)]
    assert loss.item() == pytest.approx(sum(by_hand) / 4, rel=1e-12)
    assert by_hand[0] == pytest.approx(0.313261687518, rel=1e-9)  # log(1 + e^-1)
    grad = [(sigmoid(d) - y) / 4 for d, y in zip(gaps, ys, strict=True)]
    assert returns1.grad.tolist() == pytest.approx(grad, rel=1e-12)
    assert returns2.grad.tolist() == pytest.approx([-g for g in grad], rel=1e-12)
    probability = preference_probability(returns1, returns2)
    assert probability.tolist() == pytest.approx([sigmoid(d) for d in gaps], rel=1e-12)


def test_loss_is_finite_for_huge_return_gaps() -> None:
    loss = bradley_terry_loss(th.tensor([1e4]), th.tensor([-1e4]), th.tensor([0.0]))
    assert loss.item() == pytest.approx(2e4)


def test_segment_return_sums_per_step_rewards_over_any_batch_shape() -> None:
    model = RewardModel(spaces.Box(-1, 1, (3,)), spaces.MultiDiscrete([2, 3]))
    obs = th.randn(5, 7, 3)
    actions = th.randint(0, 2, (5, 7, 2))
    per_step = model(obs, actions)
    assert per_step.shape == (5, 7)
    th.testing.assert_close(model.segment_return(obs, actions), per_step.sum(dim=1))
    assert model.segment_return(obs[0], actions[0]).shape == ()
    th.testing.assert_close(model(obs[2, 4], actions[2, 4]), per_step[2, 4])


# ── recovering a known reward ──────────────────────────────────────────────────────────────────────────


def test_reward_model_recovers_a_linear_reward_from_synthetic_preferences() -> None:
    rng = np.random.default_rng(0)
    obs_space, act_space = spaces.Box(-np.inf, np.inf, (4,)), spaces.Box(-1, 1, (2,))
    w_obs, w_act = np.array([1.0, -2.0, 0.5, 0.0]), np.array([1.5, -1.0])

    def steps(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        obs = rng.normal(size=(n, 1, 4)).astype(np.float32)
        actions = rng.uniform(-1, 1, size=(n, 1, 2)).astype(np.float32)
        return obs, actions, obs @ w_obs + actions @ w_act

    obs, actions, rewards = steps(4000)
    dones = np.zeros((4000, 1), dtype=bool)
    dones[49::50] = True
    collector = SyntheticPreferenceCollector(segment_length=10, seed=0)
    collector.add_steps(obs, actions, rewards, dones)
    dataset = collector.collect(1000)
    model = RewardModel(obs_space, act_space, net_arch=(32, 32))
    history = fit(model, dataset, epochs=30, batch_size=64, lr=3e-3, seed=0)
    assert history[-1] < 0.5 * history[0]

    test_obs, test_actions, test_rewards = steps(2000)
    predicted = model.predict_reward(test_obs[:, 0], test_actions[:, 0])
    assert spearman(predicted, test_rewards[:, 0]) > 0.9

    held_out = SyntheticPreferenceCollector(segment_length=10, seed=1)
    held_out.add_steps(test_obs, test_actions, test_rewards, np.zeros((2000, 1), dtype=bool))
    assert evaluate(model, held_out.collect(300))["accuracy"] > 0.9


def test_collector_segments_stay_inside_one_episode_and_labels_follow_the_score() -> None:
    n_steps, n_envs = 40, 3
    obs = np.arange(n_steps * n_envs, dtype=np.float32).reshape(n_steps, n_envs, 1)
    dones = np.zeros((n_steps, n_envs), dtype=bool)
    dones[[6, 19, 33], 0] = True
    dones[[9], 1] = True
    rewards = obs[..., 0] % 7
    collector = SyntheticPreferenceCollector(segment_length=5, seed=0)
    collector.add_steps(obs, np.zeros((n_steps, n_envs)), rewards, dones)
    for _ in range(200):
        segment = collector.sample_segment()
        t, n = np.argwhere(obs[..., 0] == segment.obs[0, 0])[0]
        assert np.array_equal(segment.obs[:, 0], obs[t : t + 5, n, 0])
        assert not dones[t : t + 4, n].any()  # only the last step may end the episode
    for _ in range(20):
        seg_a, seg_b = collector.sample_segment(), collector.sample_segment()
        score_a, score_b = seg_a.env_rewards.sum(), seg_b.env_rewards.sum()
        assert collector.label(seg_a, seg_b) == (0.5 if score_a == score_b else float(score_a > score_b))


def test_boltzmann_labeller_is_noisy_near_ties_and_tie_margin_gives_half() -> None:
    def make(score: float) -> Segment:
        return Segment(np.zeros((2, 1)), np.zeros((2, 1)), np.array([score, 0.0]))

    noisy = SyntheticPreferenceCollector(segment_length=2, temperature=1.0, seed=0)
    labels = [noisy.label(make(1.0), make(0.0)) for _ in range(4000)]
    assert np.mean(labels) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.03)
    exact = SyntheticPreferenceCollector(segment_length=2, tie_margin=0.1)
    assert exact.label(make(1.0), make(0.0)) == 1.0
    assert exact.label(make(0.0), make(1.0)) == 0.0
    assert exact.label(make(1.05), make(1.0)) == 0.5


# ── the wrapper ────────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("mode", "weight"), [("replace", 1.0), ("replace", 0.5), ("add", 0.25)])
def test_wrapper_rewards_are_the_models_for_the_state_the_action_was_taken_in(mode: str, weight: float) -> None:
    venv = DummyVecEnv([CounterEnv, CounterEnv])
    wrapped = LearnedRewardWrapper(venv, linear_model(CounterEnv()), mode=mode, weight=weight)
    obs = wrapped.reset()
    rng = np.random.default_rng(0)
    for _ in range(7):  # crosses two episode ends: the state after a reset is the next step's s
        actions = rng.integers(0, 3, size=2)
        new_obs, rewards, _, infos = wrapped.step(actions)
        env_rewards = 100.0 * actions
        learned = expected_learned(obs, actions)
        assert [info["env_reward"] for info in infos] == pytest.approx(env_rewards)
        assert [info["learned_reward"] for info in infos] == pytest.approx(learned)
        expected = weight * learned + (env_rewards if mode == "add" else 0.0)
        assert rewards == pytest.approx(expected)
        assert rewards.dtype == np.float32
        obs = new_obs


def test_wrapper_inside_vecnormalize_normalises_the_learned_reward_and_keeps_the_env_reward() -> None:
    wrapped = LearnedRewardWrapper(DummyVecEnv([CounterEnv]), linear_model(CounterEnv()), record=True)
    venv = VecNormalize(wrapped, norm_obs=True, norm_reward=True, clip_reward=1e6)
    venv.reset()
    raw_obs = wrapped._last_obs.copy()
    for action in [2, 0, 1, 1]:
        _, rewards, _, infos = venv.step(np.array([action]))
        learned = expected_learned(raw_obs, np.array([action]))
        assert venv.get_original_reward() == pytest.approx(learned)  # what VecNormalize normalised
        assert infos[0]["env_reward"] == 100.0 * action
        raw_obs = wrapped._last_obs.copy()
    recording = wrapped.pop_recording()
    assert recording.obs.shape == (4, 1, 1) and recording.actions[:, 0].tolist() == [2, 0, 1, 1]
    assert recording.obs[:, 0, 0].tolist() == [0.0, 1.0, 2.0, 0.0]  # raw, not normalised; reset after 3 steps
    assert recording.env_rewards[:, 0].tolist() == [200.0, 0.0, 100.0, 100.0]
    assert recording.dones[:, 0].tolist() == [False, False, True, False]
    assert wrapped.pop_recording() is None


# ── refits during training ─────────────────────────────────────────────────────────────────────────────


def test_refit_callback_inside_clipped_ppo_learn_improves_accuracy() -> None:
    env_id = "Pendulum-v1"
    reward_model = RewardModel(*_spaces(env_id), net_arch=(64, 64))
    train_env = VecNormalize(LearnedRewardWrapper(make_vec_env(env_id, n_envs=2, seed=0), reward_model))
    collector = SyntheticPreferenceCollector(segment_length=25, seed=0)
    callback = RewardModelRefitCallback(reward_model, collector, pairs_per_refit=100, epochs=10, lr=3e-3)
    model = ClippedPPO("MlpPolicy", train_env, n_steps=256, batch_size=128, n_epochs=2, seed=0)
    logger, writer = recording_logger()
    model.set_logger(logger)
    model.learn(6 * 512, callback=callback)

    assert len(callback.history) == 6 and len(callback.dataset) == 600
    logged = [dump["reward_model/accuracy"] for dump in writer.dumps]
    assert logged == [refit["accuracy"] for refit in callback.history]
    assert writer.last("reward_model/loss") == callback.history[-1]["loss"]
    first = callback.history[0]["accuracy"]

    held_out = SyntheticPreferenceCollector(segment_length=25, seed=1)
    held_out.add(record_rollout(make_vec_env(env_id, n_envs=2, seed=1), 600))
    final = evaluate(reward_model, held_out.collect(400))["accuracy"]
    assert final > 0.85
    assert final > first + 0.1


def _spaces(env_id: str) -> tuple[spaces.Space, spaces.Space]:
    env = gym.make(env_id)
    return env.observation_space, env.action_space


# ── bad input ──────────────────────────────────────────────────────────────────────────────────────────


def test_pairs_with_mismatched_segments_are_refused() -> None:
    dataset = PreferenceDataset()
    with pytest.raises(ValueError, match="same length and shapes"):
        dataset.add(np.zeros((5, 3)), np.zeros((5, 1)), np.zeros((4, 3)), np.zeros((4, 1)), 1.0)
    with pytest.raises(ValueError, match="same length and shapes"):
        dataset.add(np.zeros((5, 3)), np.zeros((5, 1)), np.zeros((5, 2)), np.zeros((5, 1)), 1.0)
    with pytest.raises(ValueError, match="same number of steps"):
        dataset.add(np.zeros((5, 3)), np.zeros((4, 1)), np.zeros((5, 3)), np.zeros((4, 1)), 1.0)
    for label in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="in \\[0, 1\\]"):
            dataset.add(np.zeros((5, 3)), np.zeros((5, 1)), np.zeros((5, 3)), np.zeros((5, 1)), label)
    dataset.add(np.zeros((5, 3)), np.zeros((5, 1)), np.ones((5, 3)), np.zeros((5, 1)), 0.5)
    with pytest.raises(ValueError, match="L = 5"):
        dataset.add(np.zeros((6, 3)), np.zeros((6, 1)), np.zeros((6, 3)), np.zeros((6, 1)), 1.0)
    assert len(dataset) == 1
    with pytest.raises(ValueError, match="empty"):
        PreferenceDataset().arrays()


def test_unsupported_spaces_and_bad_arguments_are_refused() -> None:
    box = spaces.Box(-1, 1, (2,))
    with pytest.raises(TypeError, match="observation space .*Dict"):
        RewardModel(spaces.Dict({"a": box}), spaces.Discrete(2))
    with pytest.raises(TypeError, match="action space .*Tuple"):
        RewardModel(box, spaces.Tuple((box, box)))
    model = RewardModel(box, spaces.Discrete(2))
    with pytest.raises(ValueError, match="observation space's shape"):
        model(th.zeros(4, 3), th.zeros(4))
    venv = DummyVecEnv([CounterEnv])
    with pytest.raises(ValueError, match="observation space"):
        LearnedRewardWrapper(venv, model)
    with pytest.raises(ValueError, match='"replace" or "add"'):
        LearnedRewardWrapper(venv, linear_model(CounterEnv()), mode="multiply")
    with pytest.raises(ValueError, match="segment_length"):
        SyntheticPreferenceCollector(segment_length=0)
    with pytest.raises(ValueError, match="temperature"):
        SyntheticPreferenceCollector(segment_length=3, temperature=-1.0)
    with pytest.raises(ValueError, match="no segment of 5 steps"):
        SyntheticPreferenceCollector(segment_length=5).sample_segment()
    with pytest.raises(ValueError, match="shape"):
        Trajectories(np.zeros((3, 2, 1)), np.zeros((3, 2)), np.zeros((3, 1)), np.zeros((3, 2)))


def test_refit_callback_without_a_reward_wrapper_fails_before_training() -> None:
    model = RewardModel(*_spaces("CartPole-v1"))
    callback = RewardModelRefitCallback(model, SyntheticPreferenceCollector(segment_length=5))
    agent = ClippedPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1), n_steps=32, batch_size=16)
    with pytest.raises(ValueError, match="LearnedRewardWrapper"):
        agent.learn(32, callback=callback)
    assert agent.num_timesteps == 0
