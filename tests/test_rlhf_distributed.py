"""The adaptive beta in episode units under data parallelism: 2 gloo ranks, each with its own episodes.

Each rank records its rollouts; the test recomputes, from the buffers and the reference, every episode's KL (or
length) on both ranks, pools the episodes of both ranks, and replays Ziegler et al.'s update with the pooled
mean and the total count. The ranks' envs are seeded apart, so that their episode counts differ and the mean
of the ranks' means (the wrong pooling) would be told apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import RolloutRecorder
from stable_baselines3.common.env_util import make_vec_env
from test_distributed import launch, ok
from test_rlhf_controller import SMALL, _episodes, _per_step_kl, _ziegler

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.rlhf import AdaptiveKLCoef

INITIAL, TARGET, HORIZON = 0.3, 0.4, 30


def _rank_worker(rank: int, out: Path, reference_path: str, mode: str) -> dict[str, Any]:
    record = RolloutRecorder()
    coef = AdaptiveKLCoef(initial=INITIAL, target=TARGET, target_per="episode", horizon=HORIZON)
    model = ClippedPPO(
        "MlpPolicy",
        make_vec_env("CartPole-v1", n_envs=2, seed=100 * rank),
        seed=0,
        ref_policy=reference_path,
        ref_kl_mode=mode,
        ref_kl_coef=coef,
        extensions=[record],
        **SMALL,
    )
    model.learn(2 * 64 * 2 * 5)  # global steps: 5 rollouts of 2 ranks x 2 envs x 64 steps
    return dict(rollouts=record.rollouts, betas=record.betas, logged=record.logged)


@pytest.fixture(scope="module")
def reference_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reference") / "reference.zip"
    env = make_vec_env("CartPole-v1", n_envs=2, seed=5)
    ClippedPPO("MlpPolicy", env, seed=5, **SMALL).learn(256).save(path)
    return path


@pytest.mark.parametrize("mode", ["reward", "loss"])
def test_two_ranks_move_beta_with_the_kl_and_episodes_of_both(reference_path: Path, tmp_path: Path, mode: str) -> None:
    ranks = ok(launch(_rank_worker, tmp_path, str(reference_path), mode, timeout=240))
    reference = ClippedPPO.load(reference_path, device="cpu")
    if mode == "reward":  # each episode's summed log pi_old - log pi_ref
        values = [_per_step_kl(reference, rank["rollouts"]) for rank in ranks]
    else:  # each episode's length
        values = [[np.ones(r["dones"].shape) for r in rank["rollouts"]] for rank in ranks]
    per_rank = [_episodes(v, [r["dones"] for r in rank["rollouts"]]) for v, rank in zip(values, ranks, strict=True)]

    beta, told_apart = INITIAL, False
    for i, (first, second) in enumerate(zip(*per_rank, strict=True)):
        pooled = first + second
        if first and second and len(first) != len(second):
            told_apart |= abs(np.mean(pooled) - (np.mean(first) + np.mean(second)) / 2) > 1e-3 * abs(np.mean(pooled))
        logged = ranks[0]["logged"][i]
        if mode == "reward":
            measured = np.mean(pooled) if pooled else None
            key = "rlhf/kl_sampled_per_episode"
        else:  # the exact KL per step (all-reduced with the loss statistics) times the pooled mean length
            assert logged["train/ref_kl"] == ranks[1]["logged"][i]["train/ref_kl"]
            measured = logged["train/ref_kl"] * np.mean(pooled) if pooled else None
            key = "rlhf/kl_exact_per_episode"
        beta = _ziegler(beta, measured, len(pooled), TARGET, HORIZON)  # horizon in episodes: both ranks' count
        assert ranks[0]["betas"][i] == ranks[1]["betas"][i] == pytest.approx(beta, rel=1e-5), i
        if pooled:
            assert logged[key] == pytest.approx(measured, rel=1e-4, abs=1e-6), i
    assert told_apart, "the ranks' episodes never differed in number: the test cannot see the pooling"
    assert beta != pytest.approx(INITIAL, rel=1e-3)
