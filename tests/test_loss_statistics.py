"""The closed-form path's deferred loss statistics against the per-minibatch computation."""

from __future__ import annotations

import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO, loss_statistics
from sb3_ppo_ext.backends import ClosedFormBackend
from sb3_ppo_ext.loss_statistics import DeferredStatistics
from sb3_ppo_ext.losses import LossTerms, PolicyEvaluation, PPOBatch, PPOLoss, _stacked_column, mean_of


def _minibatch(seed: int, size: int, entropy: bool = True) -> tuple[PolicyEvaluation, PPOBatch]:
    g = th.Generator().manual_seed(seed)
    n = lambda: th.randn(size, generator=g)  # noqa: E731
    evaluation = PolicyEvaluation(n(), 0.3 * n() - 1.0, n().abs() if entropy else None)
    batch = PPOBatch(None, None, 0.3 * n() - 1.0, n(), n(), n())
    return evaluation, batch


LOSSES = [
    PPOLoss(0.2),
    PPOLoss(0.1, clip_range_vf=0.3, vf_clip_mode="max", ent_coef=0.01, vf_coef=0.7, dual_clip=3.0),
    PPOLoss(0.3, clip_range_vf=0.2, vf_clip_mode="sb3"),
]


@pytest.mark.parametrize("loss", LOSSES)
def test_deferred_terms_equal_each_minibatch_computed_alone(loss: PPOLoss) -> None:
    # two sizes (a short last minibatch) and one minibatch without a closed-form entropy: three stacks
    inputs = [_minibatch(i, 64) for i in range(5)] + [_minibatch(9, 17), _minibatch(10, 64, entropy=False)]
    later = DeferredStatistics(loss)
    deferred = [later.add(evaluation, batch) for evaluation, batch in inputs]
    assert all(not d.computed for d in deferred)  # nothing computed before a read
    first = deferred[0].clip_fraction
    assert all(d.computed for d in deferred)  # one read computes every one waiting
    with th.no_grad():
        expected = [loss(evaluation, batch) for evaluation, batch in inputs]
    assert th.equal(first, expected[0].clip_fraction)
    for got, want in zip(deferred, expected, strict=True):
        for name in LossTerms._fields:
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.shape == b.shape == ()
                # one thread: a row of a stack reduces as the minibatch alone does, bit for bit
                assert th.equal(a, b), (name, a, b)
        assert got._replace(loss=th.zeros(())).policy_loss is got.policy_loss  # LossTerms' methods pass through


def test_a_read_between_minibatches_computes_only_those_waiting() -> None:
    later = DeferredStatistics(PPOLoss(0.2))
    first = later.add(*_minibatch(0, 32))
    assert first.approx_kl.shape == ()  # as target_kl reads it: at once
    second = later.add(*_minibatch(1, 32))
    assert not second.computed and first.computed
    assert th.equal(second.approx_kl, PPOLoss(0.2)(*_minibatch(1, 32)).approx_kl)


def test_waiting_inputs_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_statistics, "MAX_WAITING_ELEMENTS", 100)
    later = DeferredStatistics(PPOLoss(0.2))
    first, second = later.add(*_minibatch(0, 64)), later.add(*_minibatch(1, 64))
    assert first.computed and second.computed and not later._waiting
    assert "not computed" not in repr(first)


def test_training_logs_the_same_statistics_deferred_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    def train() -> dict[str, float]:
        env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
        model = ClippedPPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=3, seed=0, device="cpu")
        model.learn(256)
        assert type(model._learn.backend(model.policy, model.fast_update)) is ClosedFormBackend
        return {k: v for k, v in model.logger.name_to_value.items() if k.startswith("train/")}

    added: list[int] = []
    add = DeferredStatistics.add
    monkeypatch.setattr(DeferredStatistics, "add", lambda self, *a: added.append(1) or add(self, *a))
    threads = th.get_num_threads()
    th.set_num_threads(1)  # with several threads a stack's rows may round differently from a minibatch alone
    try:
        deferred = train()
        assert len(added) == 2 * 3 * 4  # 2 updates x 3 epochs x 4 minibatches, each deferred
        monkeypatch.setattr(ClosedFormBackend, "_statistics_of", lambda self, loss: None)  # each computed at once
        assert train() == deferred
    finally:
        th.set_num_threads(threads)


def test_means_over_deferred_terms_read_the_stack_and_equal_the_per_minibatch_means() -> None:
    loss = LOSSES[1]
    inputs = [_minibatch(i, 64) for i in range(6)]
    later = DeferredStatistics(loss)
    deferred = [later.add(evaluation, batch) for evaluation, batch in inputs]
    with th.no_grad():
        alone = [loss(evaluation, batch) for evaluation, batch in inputs]
    epochs = [deferred[:3], deferred[3:]]
    assert _stacked_column(deferred, "value_loss") is not None  # consecutive rows of one stack: a slice of it
    assert _stacked_column(deferred[::-1], "value_loss") is None  # any other order: stacked again, row by row
    assert _stacked_column(alone, "value_loss") is None
    for name in ("policy_loss", "value_loss", "entropy_loss", "clip_fraction", "approx_kl"):
        expected = th.stack([getattr(t, name) for t in alone]).mean().item()
        assert mean_of(epochs, name) == expected
        assert mean_of(deferred[::-1], name) == pytest.approx(expected, rel=1e-6)
        assert mean_of(epochs[-1], name) == th.stack([getattr(t, name) for t in alone[3:]]).mean().item()
