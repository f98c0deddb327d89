"""The adaptive beta in Ziegler et al.'s units (KL per episode, horizon in episodes), against a recomputation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch as th
from conftest import RolloutRecorder
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.errors import ConfigurationError
from sb3_ppo_ext.rlhf import AdaptiveKLCoef
from sb3_ppo_ext.rlhf.reference import AdaptiveKLController

SMALL = dict(n_steps=64, batch_size=64, n_epochs=2, device="cpu")


@pytest.fixture(scope="module")
def reference() -> ClippedPPO:
    return ClippedPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=5), seed=5, **SMALL).learn(256)


def _ziegler(beta: float, kl: float | None, n: float, target: float, horizon: int) -> float:
    """Ziegler et al. (2019), eq. 2 and lm-human-preferences' AdaptiveKLController, written out."""
    if kl is None:
        return beta
    error = np.clip(kl / target - 1.0, -0.2, 0.2)
    return beta * (1.0 + error * n / horizon)


def _per_step_kl(reference: ClippedPPO, rollouts: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """log pi_old - log pi_ref of every stored step, [n_steps, n_envs], from the buffer and the reference."""
    kls = []
    for data in rollouts:
        obs = th.as_tensor(data["observations"].reshape(-1, 4))
        actions = th.as_tensor(data["actions"].reshape(-1)).long()
        with th.no_grad():
            ref = reference.policy.get_distribution(obs).log_prob(actions).numpy().reshape(data["log_probs"].shape)
        kls.append(data["log_probs"].astype(np.float64) - ref)
    return kls


def _episodes(values: list[np.ndarray], dones: list[np.ndarray]) -> list[list[float]]:
    """Per rollout, the sums of ``values`` over each episode that ended in it (sums carried across rollouts)."""
    running = np.zeros(values[0].shape[1])
    ended = []
    for rollout, done in zip(values, dones, strict=True):
        ended.append([])
        for t in range(len(rollout)):
            running += rollout[t]
            for env in np.flatnonzero(done[t]):
                ended[-1].append(running[env])
                running[env] = 0.0
    return ended


@pytest.mark.parametrize(
    ("target_per", "horizon_in", "target", "horizon"),
    [("episode", "episodes", 0.4, 30), ("episode", "steps", 0.4, 600), ("step", "episodes", 0.02, 30)],
)
def test_reward_mode_moves_beta_as_ziegler_et_al_in_the_units_asked(
    reference, target_per, horizon_in, target, horizon
) -> None:
    record = RolloutRecorder()
    coef = AdaptiveKLCoef(initial=0.3, target=target, target_per=target_per, horizon=horizon, horizon_in=horizon_in)
    model = ClippedPPO(
        "MlpPolicy",
        make_vec_env("CartPole-v1", n_envs=2, seed=0),
        seed=0,
        ref_policy=reference,
        ref_kl_coef=coef,
        extensions=[record],
        **SMALL,
    )
    model.learn(64 * 2 * 5)
    kls = _per_step_kl(reference, record.rollouts)
    per_episode = _episodes(kls, [r["dones"] for r in record.rollouts])
    # the first rollout was penalised with the initial beta (CartPole pays 1 per step; no truncation here)
    np.testing.assert_allclose(record.rollouts[0]["rewards"], 1.0 - 0.3 * kls[0], rtol=1e-4, atol=1e-5)
    beta = 0.3
    assert sum(len(e) > 0 for e in per_episode) >= 3
    for kl, episodes, after, logged in zip(kls, per_episode, record.betas, record.logged, strict=True):
        measured = (np.mean(episodes) if episodes else None) if target_per == "episode" else kl.mean()
        n = len(episodes) if horizon_in == "episodes" else kl.size
        beta = _ziegler(beta, measured, n, target, horizon)
        assert after == pytest.approx(beta, rel=1e-5)
        if episodes:
            assert logged["rlhf/kl_sampled_per_episode"] == pytest.approx(np.mean(episodes), rel=1e-4, abs=1e-6)
    assert beta != pytest.approx(0.3, rel=1e-3)  # the test saw beta move


def test_loss_mode_per_episode_is_the_exact_kl_times_the_mean_episode_length(reference) -> None:
    record = RolloutRecorder()
    model = ClippedPPO(
        "MlpPolicy",
        make_vec_env("CartPole-v1", n_envs=2, seed=0),
        seed=0,
        ref_policy=reference,
        ref_kl_mode="loss",
        ref_kl_coef=AdaptiveKLCoef(initial=0.2, target=0.05, target_per="episode", horizon=20),
        extensions=[record],
        **SMALL,
    )
    model.learn(64 * 2 * 4)
    ones = [np.ones(r["dones"].shape) for r in record.rollouts]
    lengths = _episodes(ones, [r["dones"] for r in record.rollouts])
    beta = 0.2
    for episode_lengths, after, logged in zip(lengths, record.betas, record.logged, strict=True):
        per_episode = logged["train/ref_kl"] * np.mean(episode_lengths) if episode_lengths else None
        beta = _ziegler(beta, per_episode, len(episode_lengths), 0.05, 20)  # horizon in episodes: the default
        assert after == pytest.approx(beta, rel=1e-5)
        if episode_lengths:
            assert logged["rlhf/kl_exact_per_episode"] == pytest.approx(per_episode, rel=1e-5)
    assert beta != pytest.approx(0.2, rel=1e-3)


def test_the_object_per_step_trains_exactly_as_the_string_adaptive(reference) -> None:
    def train(coef: Any, **kwargs: Any) -> ClippedPPO:
        env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
        model = ClippedPPO("MlpPolicy", env, seed=0, ref_policy=reference, ref_kl_coef=coef, **kwargs, **SMALL)
        return model.learn(384)

    string = train("adaptive", ref_kl_target=0.01, ref_kl_horizon=1000)
    obj = train(AdaptiveKLCoef(target=0.01, target_per="step", horizon=1000))
    assert obj.ref_kl_coef == string.ref_kl_coef != 0.1
    for a, b in zip(string.policy.parameters(), obj.policy.parameters(), strict=True):
        assert th.equal(a, b)


def test_the_controller_and_its_units_are_saved_and_old_controllers_load_per_step(reference, tmp_path) -> None:
    coef = AdaptiveKLCoef(initial=0.5, target=3.0, target_per="episode", horizon=100)
    model = ClippedPPO("MlpPolicy", "CartPole-v1", seed=0, ref_policy=reference, ref_kl_coef=coef, **SMALL)
    model.learn(128)
    model.save(tmp_path / "model")
    loaded = ClippedPPO.load(tmp_path / "model", device="cpu")
    controller = loaded._ref_kl_controller
    assert (controller.target_per, controller.horizon_in, controller.value) == (
        "episode",
        "episodes",
        model.ref_kl_coef,
    )
    old = AdaptiveKLController.__new__(AdaptiveKLController)
    old.__dict__.update(value=0.1, target=0.02, horizon=10_000)  # as pickled before the units existed
    assert (old.target_per, old.horizon_in, old.counts_episodes) == ("step", "steps", False)


def test_one_settings_object_serves_several_models(reference) -> None:
    coef = AdaptiveKLCoef(target=0.001, target_per="step", horizon=100)
    first = ClippedPPO("MlpPolicy", "CartPole-v1", seed=0, ref_policy=reference, ref_kl_coef=coef, **SMALL)
    first.learn(128)
    second = ClippedPPO("MlpPolicy", "CartPole-v1", seed=0, ref_policy=reference, ref_kl_coef=coef, **SMALL)
    assert first.ref_kl_coef != 0.1 and second.ref_kl_coef == 0.1 and coef.initial == 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target=0.0, target_per="step"), r"AdaptiveKLCoef\(target=0.0\) is invalid"),
        (dict(target=float("inf"), target_per="step"), r"target=inf\) is invalid"),
        (dict(target="6", target_per="episode"), r"target='6'\) is invalid"),
        (dict(target=6.0, target_per="sequence"), r"target_per='sequence'\) is invalid: pass 'step'"),
        (dict(target=6.0, target_per="episode", initial=0.0), r"initial=0.0\) is invalid.*cannot leave 0"),
        (dict(target=6.0, target_per="episode", initial=-1), r"initial=-1\) is invalid"),
        (dict(target=6.0, target_per="episode", horizon=0), r"horizon=0\) is invalid"),
        (dict(target=6.0, target_per="episode", horizon=10.5), r"horizon=10.5\) is invalid"),
        (dict(target=6.0, target_per="episode", horizon=True), r"horizon=True\) is invalid"),
        (dict(target=6.0, target_per="episode", horizon_in="tokens"), r"horizon_in='tokens'\) is invalid"),
    ],
)
def test_bad_settings_are_refused_when_the_object_is_made(kwargs, match) -> None:
    with pytest.raises(ConfigurationError, match=match):
        AdaptiveKLCoef(**kwargs)


def test_the_target_per_has_no_default_and_the_horizon_follows_the_target() -> None:
    with pytest.raises(TypeError):
        AdaptiveKLCoef(target=6.0)  # type: ignore[call-arg]
    assert AdaptiveKLCoef(target=6.0, target_per="episode").horizon_unit == "episodes"
    assert AdaptiveKLCoef(target=0.1, target_per="step").horizon_unit == "steps"
    assert AdaptiveKLCoef(target=6.0, target_per="episode", horizon_in="steps").controller().horizon_in == "steps"


def test_target_and_horizon_beside_the_object_are_refused(reference) -> None:
    coef = AdaptiveKLCoef(target=6.0, target_per="episode")
    for kwargs in (dict(ref_kl_target=0.1), dict(ref_kl_horizon=500)):
        with pytest.raises(ConfigurationError, match="the object holds the target and the horizon"):
            ClippedPPO("MlpPolicy", "CartPole-v1", ref_policy=reference, ref_kl_coef=coef, **kwargs)
    with pytest.raises(ConfigurationError, match=r"ref_kl_coef='adaptve' is invalid.*AdaptiveKLCoef"):
        ClippedPPO("MlpPolicy", "CartPole-v1", ref_policy=reference, ref_kl_coef="adaptve")
