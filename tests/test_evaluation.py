"""sb3_ppo_ext.evaluation.evaluate_policy: SB3's results where SB3's applies, masks and LSTM states together."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from sb3_contrib.common.maskable.utils import get_action_masks
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy as sb3_evaluate_policy

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.evaluation import evaluate_policy

TINY = dict(n_steps=32, batch_size=16, n_epochs=2, device="cpu", seed=0)


def test_equals_sb3s_evaluate_policy_on_a_feed_forward_policy() -> None:
    model = ClippedPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), **TINY)
    model.learn(64)
    results = []
    for evaluate in (sb3_evaluate_policy, evaluate_policy):
        env = make_vec_env("CartPole-v1", n_envs=3, seed=5)  # Monitor-wrapped, 7 episodes spread over 3 envs
        results.append(evaluate(model, env, n_eval_episodes=7, deterministic=True, return_episode_rewards=True))
    assert results[0] == results[1] and len(results[0][0]) == 7
    mean, std = evaluate_policy(model, make_vec_env("CartPole-v1", n_envs=3, seed=5), n_eval_episodes=7)
    assert mean == pytest.approx(np.mean(results[0][0])) and std == pytest.approx(np.std(results[0][0]))


class _Recorder:
    """Wraps ``model.predict`` and keeps what every call was given and returned."""

    def __init__(self, model: ClippedPPO) -> None:
        self.calls: list[dict] = []
        self._predict = model.predict
        model.predict = self  # type: ignore[method-assign]

    def __call__(self, observation, state=None, episode_start=None, deterministic=False, action_masks=None):
        actions, new_state = self._predict(observation, state, episode_start, deterministic, action_masks=action_masks)
        self.calls.append(
            dict(state=state, starts=np.copy(episode_start), masks=action_masks, actions=actions, returned=new_state)
        )
        return actions, new_state


def test_a_masked_lstm_policy_gets_its_states_back_and_the_masks() -> None:
    def masked_env():
        return InvalidActionEnvDiscrete(dim=8, n_invalid_actions=4)

    model = ClippedPPO("MlpLstmPolicy", make_vec_env(masked_env, n_envs=2, seed=0), **TINY)
    model.learn(64)
    recorder = _Recorder(model)
    env = make_vec_env(masked_env, n_envs=2, seed=3)
    returns, lengths = evaluate_policy(model, env, n_eval_episodes=2, return_episode_rewards=True)
    assert len(returns) == 2 and all(length == 100 for length in lengths)  # the env's episodes are 100 steps
    calls = recorder.calls
    assert calls[0]["state"] is None and calls[0]["starts"].all()
    for previous, call in zip(calls, calls[1:], strict=False):
        assert call["state"] is previous["returned"]  # sb3-contrib 2.9's masked version passes None here
        assert call["masks"] is not None and call["masks"].shape == (2, 8)
        assert call["masks"][np.arange(2), call["actions"]].all()  # only valid actions were taken


def test_use_masking_false_and_envs_without_masks_pass_no_masks() -> None:
    model = ClippedPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1, seed=0), **TINY)
    recorder = _Recorder(model)
    evaluate_policy(model, make_vec_env("CartPole-v1", n_envs=1, seed=0), n_eval_episodes=1)
    assert all(call["masks"] is None for call in recorder.calls)
    masked = InvalidActionEnvDiscrete(dim=8, n_invalid_actions=4)
    model = ClippedPPO("MlpPolicy", masked, **TINY)
    recorder = _Recorder(model)
    evaluate_policy(model, make_vec_env(lambda: masked, n_envs=1), n_eval_episodes=1, use_masking=False)
    assert all(call["masks"] is None for call in recorder.calls)
    assert get_action_masks(make_vec_env(lambda: masked, n_envs=1)).shape == (1, 8)


def test_a_model_whose_predict_takes_no_masks_is_evaluated_without_them() -> None:
    def masked_env():
        return InvalidActionEnvDiscrete(dim=8, n_invalid_actions=4)

    model = PPO("MlpPolicy", make_vec_env(masked_env, n_envs=1, seed=0), n_steps=32, batch_size=16, device="cpu")
    returns, _ = evaluate_policy(model, make_vec_env(masked_env, n_envs=1, seed=1), 1, return_episode_rewards=True)
    assert len(returns) == 1


def test_reward_threshold_and_the_monitor_warning() -> None:
    model = ClippedPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1, seed=0), **TINY)
    with pytest.raises(AssertionError, match="below threshold"):
        evaluate_policy(model, make_vec_env("CartPole-v1", n_envs=1, seed=0), n_eval_episodes=1, reward_threshold=1e6)
    with pytest.warns(UserWarning, match="not wrapped with a Monitor"):
        evaluate_policy(model, gym.make("CartPole-v1"), n_eval_episodes=1)
