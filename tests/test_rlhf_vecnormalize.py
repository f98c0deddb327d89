"""The reference reads observations through its own frozen VecNormalize statistics, in both modes."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.errors import ConfigurationError
from sb3_ppo_ext.extensions import Extension
from sb3_ppo_ext.rlhf import Reference
from sb3_ppo_ext.rlhf.observations import RAW_OBSERVATIONS
from sb3_ppo_ext.rlhf.penalty import RewardKLPenalty

SMALL = dict(n_steps=64, batch_size=128, n_epochs=2, device="cpu")


def _pendulum(seed: int, normalize: bool = True) -> Any:
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=seed)
    return VecNormalize(env) if normalize else env


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[ClippedPPO, str, str]:
    """A reference trained under its own VecNormalize, saved with its statistics (which the fine-tuning env lacks)."""
    env = _pendulum(5)
    model = ClippedPPO("MlpPolicy", env, seed=5, **SMALL).learn(1024)
    folder = tmp_path_factory.mktemp("reference")
    model.save(folder / "sft")
    env.save(str(folder / "stats.pkl"))
    return model, str(folder / "sft.zip"), str(folder / "stats.pkl")


class _Record(Extension):
    """Per step: the raw observations, actions, log-probabilities, the penalty's log-ratio (reward mode), the
    penalised and the env's rewards and VecNormalize's scale; per minibatch: its observations, actions and the
    reference's log-probabilities the loss got. Its hooks run after the package's own."""

    def __init__(self) -> None:
        self.steps: list[dict[str, np.ndarray]] = []
        self.minibatches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def rollout_start(self, model: Any, env: Any, rollout_buffer: Any) -> None:
        self._model = model

    def acted(self, step: Any) -> None:
        venv = self._model.get_vec_normalize_env()
        raw = self._model._last_obs if venv is None else venv.get_original_obs()
        penalty = self._model.extension(RewardKLPenalty)
        self.steps.append(
            dict(
                raw=np.array(raw),
                actions=step.actions.numpy().copy(),
                log_probs=step.log_probs.numpy().copy(),
                step_kl=None if penalty is None else penalty._step_kl.numpy().copy(),
            )
        )

    def shape_rewards(self, rewards: np.ndarray, step: Any) -> np.ndarray:
        venv = self._model.get_vec_normalize_env()
        self.steps[-1]["rewards"] = rewards.copy()
        if venv is not None:
            self.steps[-1]["env_reward"] = venv.get_original_reward()
            self.steps[-1]["scale"] = np.sqrt(venv.ret_rms.var + venv.epsilon)
        return rewards

    def minibatch(self, batch: Any) -> Any:
        if batch.reference is not None:
            self.minibatches.append(
                (batch.observations.numpy().copy(), batch.actions.numpy().copy(), batch.reference.log_prob.numpy())
            )
        return batch


def _ref_log_prob(reference: ClippedPPO, statistics: Any, raw: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """What the reference says, reading ``raw`` normalised by ``statistics`` (VecNormalize's formula, written out)."""
    obs = raw
    if statistics is not None:
        rms, eps, clip = statistics
        obs = np.clip((raw - rms.mean) / np.sqrt(rms.var + eps), -clip, clip)
    with th.no_grad():
        distribution = reference.policy.get_distribution(th.as_tensor(obs, dtype=th.float32))
        return distribution.log_prob(th.as_tensor(actions)).numpy()


def _check_reward_steps(record: _Record, reference: ClippedPPO, statistics: Any, env: Any, beta: float) -> None:
    """Every step's log-ratio and penalised reward against the recomputation (the penalty in raw units)."""
    for step in record.steps:
        kl = step["log_probs"] - _ref_log_prob(reference, statistics, step["raw"], step["actions"])
        np.testing.assert_allclose(step["step_kl"], kl, rtol=1e-4, atol=1e-5)
        if env is not None:
            env_reward = np.clip(step["env_reward"] / step["scale"], -env.clip_reward, env.clip_reward)
            np.testing.assert_allclose(step["rewards"], env_reward - beta * kl / step["scale"], rtol=1e-4, atol=1e-5)


def _own_statistics(pretrained: tuple[ClippedPPO, str, str]) -> tuple[Any, float, float]:
    with open(pretrained[2], "rb") as file:
        saved = pickle.load(file)
    return saved.obs_rms, saved.epsilon, saved.clip_obs


def test_reward_mode_reads_the_references_own_statistics_given_with_it(pretrained) -> None:
    reference, path, stats = pretrained
    record = _Record()
    env = _pendulum(0)
    model = ClippedPPO(
        "MlpPolicy",
        env,
        seed=0,
        ref_policy=Reference(path, vec_normalize=stats),
        ref_kl_coef=0.5,
        extensions=[record],
        **SMALL,
    )
    model.learn(256)
    own = _own_statistics(pretrained)
    assert not np.allclose(own[0].mean, env.obs_rms.mean, atol=1e-3)  # the env's statistics are others
    np.testing.assert_array_equal(model._ref_obs_rms[0].mean, own[0].mean)
    _check_reward_steps(record, reference, own, env, beta=0.5)


@pytest.mark.parametrize("batch_size", [128, 32])  # the whole rollout as one minibatch; shuffled minibatches
def test_loss_mode_reads_frozen_statistics_not_the_live_ones(pretrained, batch_size) -> None:
    reference, path, stats = pretrained
    record = _Record()
    env = _pendulum(0)
    model = ClippedPPO(
        "MlpPolicy",
        env,
        seed=0,
        ref_policy=Reference(path, vec_normalize=stats),
        ref_kl_mode="loss",
        extensions=[record],
        **{**SMALL, "batch_size": batch_size},
    )
    model.learn(256)
    own = _own_statistics(pretrained)
    raw = np.concatenate([s["raw"] for s in record.steps[-64:]])  # the last rollout, in the buffer's order
    stored = model.rollout_buffer.observations.reshape(-1, 3)
    for observations, actions, got in record.minibatches[-(128 // batch_size) * 2 :]:
        # each minibatch row's raw observation: the stored row it equals (its index in the rollout)
        rows = [int(np.flatnonzero((stored == row).all(axis=1))[0]) for row in observations]
        expected = _ref_log_prob(reference, own, raw[rows], actions)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        live = _ref_log_prob(reference, None, observations, actions)  # what reading the stored rows would give
        assert np.abs(live - got).max() > 1e-2


def test_a_model_keeps_its_own_vecnormalize_and_false_means_raw_observations(pretrained) -> None:
    reference, _, _ = pretrained
    for source, expected in ((reference, "own"), (Reference(reference, vec_normalize=False), RAW_OBSERVATIONS)):
        record = _Record()
        env = _pendulum(0)
        model = ClippedPPO("MlpPolicy", env, seed=0, ref_policy=source, ref_kl_coef=0.5, extensions=[record], **SMALL)
        model.learn(128)
        if expected == "own":
            rms = reference.get_vec_normalize_env().obs_rms
            np.testing.assert_array_equal(model._ref_obs_rms[0].mean, rms.mean)
            assert model._ref_obs_rms[0] is not rms  # a copy: frozen
            statistics = model._ref_obs_rms
        else:
            assert model._ref_obs_rms == RAW_OBSERVATIONS
            statistics = None
        _check_reward_steps(record, reference, statistics, env, beta=0.5)


def test_without_vecnormalize_in_the_env_the_reference_still_reads_its_own_statistics(pretrained) -> None:
    reference, path, stats = pretrained
    for mode in ("reward", "loss"):
        record = _Record()
        model = ClippedPPO(
            "MlpPolicy",
            _pendulum(0, normalize=False),
            seed=0,
            ref_policy=Reference(path, vec_normalize=stats),
            ref_kl_mode=mode,
            ref_kl_coef=0.5,
            extensions=[record],
            **SMALL,
        )
        model.learn(128)
        own = _own_statistics(pretrained)
        if mode == "reward":
            _check_reward_steps(record, reference, own, None, beta=0.5)
        else:
            observations, actions, got = record.minibatches[-1]
            np.testing.assert_allclose(got, _ref_log_prob(reference, own, observations, actions), rtol=1e-4, atol=1e-5)


def test_statistics_saved_beside_the_reference_path_are_found(pretrained, tmp_path) -> None:
    reference, path, stats = pretrained
    reference.save(tmp_path / "sft")
    (tmp_path / "sft_vecnormalize.pkl").write_bytes(Path(stats).read_bytes())
    for source in (str(tmp_path / "sft.zip"), Reference(str(tmp_path / "sft.zip"))):
        model = ClippedPPO("MlpPolicy", _pendulum(0), seed=0, ref_policy=source, **SMALL)
        np.testing.assert_array_equal(model._ref_obs_rms[0].var, _own_statistics(pretrained)[0].var)


def test_the_frozen_statistics_are_saved_with_the_model(pretrained, tmp_path) -> None:
    _, path, stats = pretrained
    model = ClippedPPO("MlpPolicy", _pendulum(0), seed=0, ref_policy=Reference(path, vec_normalize=stats), **SMALL)
    model.learn(128)
    model.save(tmp_path / "model")
    loaded = ClippedPPO.load(tmp_path / "model", env=_pendulum(1), device="cpu")
    np.testing.assert_array_equal(loaded._ref_obs_rms[0].mean, model._ref_obs_rms[0].mean)
    loaded.learn(128)
    np.testing.assert_array_equal(loaded._ref_obs_rms[0].var, model._ref_obs_rms[0].var)


def test_bad_statistics_are_refused(pretrained, tmp_path) -> None:
    _, path, _ = pretrained
    with pytest.raises(ConfigurationError, match="no such file"):
        Reference(path, vec_normalize=str(tmp_path / "missing.pkl"))
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"not": "a VecNormalize"}))
    with pytest.raises(ConfigurationError, match="holds a dict, not a VecNormalize"):
        Reference(path, vec_normalize=str(other))
    with pytest.raises(ConfigurationError, match=r"vec_normalize=3\) is invalid"):
        Reference(path, vec_normalize=3)
    with pytest.raises(ConfigurationError, match=r"Reference\(policy=None\) is invalid"):
        Reference(None)
    cartpole = VecNormalize(make_vec_env("CartPole-v1", n_envs=1))
    with pytest.raises(ConfigurationError, match=r"statistics are for observations of shape \(4,\)"):
        ClippedPPO("MlpPolicy", _pendulum(0), ref_policy=Reference(path, vec_normalize=cartpole))
