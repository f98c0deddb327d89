"""GAE against a brute-force lambda-return, and the time-limit truncation bootstrap."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import CounterEnv, DictObsEnv
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.gae import bootstrap_truncations, compute_gae

GAMMA = 0.9


def make_rollout(seed: int = 0, T: int = 14, N: int = 4) -> dict[str, np.ndarray]:
    """A rollout with terminations and truncations mid-rollout and at the last step.

    ``ends[t, i]``: 0 no episode end after step t, 1 termination, 2 truncation (time limit) whose terminal
    observation has value ``term_values[t, i]``.
    """
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(T, N))
    values = rng.normal(size=(T, N))
    term_values = rng.normal(size=(T, N))
    last_values = rng.normal(size=N)
    ends = np.zeros((T, N), dtype=int)
    ends[3, 0], ends[9, 0] = 1, 2  # termination then truncation in env 0
    ends[5, 1] = 2  # truncation mid-rollout
    ends[T - 1, 1] = 1  # termination on the last step
    ends[T - 1, 2] = 2  # truncation on the last step
    ends[0, 2] = 1  # one-step episode at the very start
    ends[6, 2], ends[7, 2] = 2, 1  # back-to-back episode ends
    # env 3: no episode end at all, bootstraps from last_values
    return dict(rewards=rewards, values=values, term_values=term_values, last_values=last_values, ends=ends)


def brute_force_lambda_return(r: dict[str, np.ndarray], gamma: float, lam: float) -> np.ndarray:
    """Explicit lambda-return: ``(1 - lam) * sum_n lam^(n-1) G^(n)`` with the tail weight on the full return.

    ``G^(n) = sum_{k<n} gamma^k r_{t+k} + gamma^n V_{t+n}``, where the bootstrap after the last step of an
    episode is 0 (termination), ``V(terminal_obs)`` (truncation) or ``last_values`` (rollout end).
    """
    rewards, values, ends = r["rewards"], r["values"], r["ends"]
    T, N = rewards.shape
    out = np.zeros((T, N))
    for i in range(N):
        for t in range(T):
            end = t  # last step of the episode segment that contains t
            while end < T - 1 and ends[end, i] == 0:
                end += 1
            if ends[end, i] == 1:
                tail = 0.0
            elif ends[end, i] == 2:
                tail = r["term_values"][end, i]
            else:
                tail = r["last_values"][i]
            horizon = end - t + 1

            def n_step(n: int, i: int = i, t: int = t, horizon: int = horizon, tail: float = tail) -> float:
                ret = sum(gamma**k * rewards[t + k, i] for k in range(n))
                bootstrap = values[t + n, i] if n < horizon else tail
                return ret + gamma**n * bootstrap

            lam_return = sum((1 - lam) * lam ** (n - 1) * n_step(n) for n in range(1, horizon))
            lam_return += lam ** (horizon - 1) * n_step(horizon)
            out[t, i] = lam_return
    return out


def sb3_inputs(r: dict[str, np.ndarray], gamma: float) -> dict[str, np.ndarray]:
    """What the rollout buffer sees: truncations folded into the reward, SB3's episode_starts convention."""
    ends = r["ends"]
    dones = (ends > 0).astype(np.float32)
    rewards = r["rewards"] + gamma * np.where(ends == 2, r["term_values"], 0.0)
    episode_starts = np.zeros_like(dones)
    episode_starts[1:] = dones[:-1]
    episode_starts[0] = 1.0  # the previous rollout ended an episode: must not matter here
    return dict(
        rewards=rewards,
        values=r["values"],
        episode_starts=episode_starts,
        last_values=r["last_values"],
        last_dones=dones[-1],
    )


@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_gae_equals_brute_force_lambda_return(lam: float, seed: int) -> None:
    r = make_rollout(seed)
    expected_returns = brute_force_lambda_return(r, GAMMA, lam)
    advantages, returns = compute_gae(**sb3_inputs(r, GAMMA), gamma=GAMMA, gae_lambda=lam)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(advantages, expected_returns - r["values"], rtol=1e-5, atol=1e-5)


def test_gae_lambda_zero_is_one_step_td_error() -> None:
    r = make_rollout(3)
    inputs = sb3_inputs(r, GAMMA)
    advantages, _ = compute_gae(**inputs, gamma=GAMMA, gae_lambda=0.0)
    ends = r["ends"]
    next_values = np.concatenate([r["values"][1:], r["last_values"][None]])
    # no value of the next state across an episode end; truncations are in the reward already
    td = inputs["rewards"] + GAMMA * next_values * (ends == 0) - r["values"]
    np.testing.assert_allclose(advantages, td, rtol=1e-5, atol=1e-5)


def test_gae_lambda_one_is_monte_carlo_return_minus_value() -> None:
    rewards = np.array([[1.0], [2.0], [3.0], [4.0]])
    values = np.array([[0.5], [0.1], [0.2], [0.3]])
    starts = np.array([[0.0], [0.0], [1.0], [0.0]])  # episode [r0, r1] ends (terminated), then [r2, r3]
    _, returns = compute_gae(rewards, values, starts, np.array([10.0]), np.array([0.0]), gamma=0.5, gae_lambda=1.0)
    # hand-computed: 1 + 0.5 * 2 = 2; 2; 3 + 0.5 * 4 + 0.25 * 10 = 7.5; 4 + 0.5 * 10 = 9
    np.testing.assert_allclose(returns[:, 0], [2.0, 2.0, 7.5, 9.0], rtol=1e-6)


def test_gae_ignores_first_episode_start() -> None:
    """``episode_starts[0]`` refers to the step before the rollout, which GAE never looks at."""
    inputs = sb3_inputs(make_rollout(4), GAMMA)
    a1, _ = compute_gae(**inputs, gamma=GAMMA, gae_lambda=0.95)
    inputs["episode_starts"] = inputs["episode_starts"].copy()
    inputs["episode_starts"][0] = 0.0
    a2, _ = compute_gae(**inputs, gamma=GAMMA, gae_lambda=0.95)
    np.testing.assert_array_equal(a1, a2)


def test_gae_last_dones_cut_the_bootstrap() -> None:
    rewards = np.ones((2, 1))
    values = np.zeros((2, 1))
    starts = np.zeros((2, 1))
    _, open_returns = compute_gae(rewards, values, starts, np.array([5.0]), np.array([0.0]), 1.0, 1.0)
    _, done_returns = compute_gae(rewards, values, starts, np.array([5.0]), np.array([1.0]), 1.0, 1.0)
    np.testing.assert_allclose(open_returns[:, 0], [7.0, 6.0])
    np.testing.assert_allclose(done_returns[:, 0], [2.0, 1.0])


# -- truncation bootstrap (gae.bootstrap_truncations, as ClippedPPO calls it) ----------------------------------------


def _box_model(n_envs: int = 3) -> ClippedPPO:
    return ClippedPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=n_envs, seed=0), n_steps=8, batch_size=8, seed=0)


def test_bootstrap_truncations_only_for_time_limit_truncations() -> None:
    model = _box_model(n_envs=4)
    rng = np.random.default_rng(0)
    terminal = rng.normal(size=(4, 4)).astype(np.float32)
    infos = [
        {"TimeLimit.truncated": True, "terminal_observation": terminal[0]},  # truncated: bootstrap
        {"TimeLimit.truncated": False, "terminal_observation": terminal[1]},  # terminated: never
        {"terminal_observation": terminal[2]},  # terminated (no flag): never
        {},  # still running
    ]
    dones = np.array([True, True, True, False])
    rewards = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    bootstrap_truncations(rewards, dones, infos, model.gamma, model.policy.obs_to_tensor, model._state_values)
    with th.no_grad():
        v0 = model.policy.predict_values(th.as_tensor(terminal[:1])).item()
    assert v0 != 0.0
    np.testing.assert_allclose(rewards, [1.0 + model.gamma * v0, 2.0, 3.0, 4.0], rtol=1e-6)


def test_bootstrap_truncations_several_envs_and_dict_observations() -> None:
    env = make_vec_env(DictObsEnv, n_envs=3, seed=0)
    model = ClippedPPO("MultiInputPolicy", env, n_steps=8, batch_size=8, seed=0, gamma=0.5)
    env.observation_space.seed(0)
    terminal = [env.observation_space.sample() for _ in range(3)]
    infos = [{"TimeLimit.truncated": True, "terminal_observation": obs} for obs in terminal]
    infos[1]["TimeLimit.truncated"] = False
    rewards = np.zeros(3, dtype=np.float32)
    dones = np.array([True, True, True])
    bootstrap_truncations(rewards, dones, infos, model.gamma, model.policy.obs_to_tensor, model._state_values)
    expected = []
    for obs in terminal:
        obs_tensor, _ = model.policy.obs_to_tensor(obs)
        with th.no_grad():
            expected.append(0.5 * model.policy.predict_values(obs_tensor).item())
    # one batched forward pass vs one pass per observation: float32 rounding differs by ~1e-8
    np.testing.assert_allclose(rewards, [expected[0], 0.0, expected[2]], rtol=1e-5, atol=1e-6)


class _StopAfterRollout(BaseCallback):
    def _on_step(self) -> bool:
        return True


def test_rollout_rewards_bootstrap_truncations_not_terminations() -> None:
    """End to end: only the steps cut by the TimeLimit carry ``1 + gamma * V(terminal_obs)``."""
    env = make_vec_env(lambda: gym.wrappers.TimeLimit(CounterEnv(), max_episode_steps=5), n_envs=1, seed=0)
    model = ClippedPPO("MlpPolicy", env, n_steps=24, batch_size=24, gamma=0.7, seed=0)
    model._setup_learn(24, callback=None)
    callback = _StopAfterRollout()
    callback.init_callback(model)
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=24)
    rewards = model.rollout_buffer.rewards[:, 0]
    with th.no_grad():
        v_terminal = model.policy.predict_values(th.tensor([[0.5]])).item()
    # episodes: 5 steps truncated, 3 steps terminated, 5 truncated, 3 terminated, ... (period 8)
    t = np.arange(24)
    truncated_steps = t % 8 == 4
    terminated_steps = t % 8 == 7
    np.testing.assert_allclose(rewards[truncated_steps], 1.0 + 0.7 * v_terminal, rtol=1e-5)
    np.testing.assert_array_equal(rewards[~truncated_steps], 1.0)
    # the episode ends reach GAE as episode starts of the following step
    starts = model.rollout_buffer.episode_starts[:, 0]
    np.testing.assert_array_equal(starts[1:], (truncated_steps | terminated_steps)[:-1].astype(np.float32))
