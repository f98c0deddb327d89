"""LeanAdamStep: the fused Adam kernel called directly gives optimizer.step()'s update, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.optim import LeanAdamStep

pytestmark = pytest.mark.skipif(not hasattr(th, "_fused_adam_"), reason="this torch has no fused Adam kernel")


def _params(seed: int = 0) -> list[th.nn.Parameter]:
    generator = th.Generator().manual_seed(seed)
    return [th.nn.Parameter(th.randn(shape, generator=generator)) for shape in [(16, 8), (16,), (4, 16), (4,)]]


def _clone(params: list[th.nn.Parameter]) -> list[th.nn.Parameter]:
    return [th.nn.Parameter(p.detach().clone()) for p in params]


def _set_grads(params: list[th.nn.Parameter], step: int) -> None:
    generator = th.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = th.randn(p.shape, generator=generator)


def _step_both(reference, lean_step, reference_params, lean_params, step: int) -> None:
    """The same gradients on both parameter sets, then one step of each optimizer."""
    _set_grads(reference_params, step)
    _set_grads(lean_params, step)
    reference.step()
    lean_step()


class _CountingStep:
    """Counts the steps that went through ``optimizer.step()`` (LeanAdamStep._full_step)."""

    def __init__(self, lean: LeanAdamStep) -> None:
        self.calls, full_step = 0, lean._full_step

        def counting_full_step() -> None:
            self.calls += 1
            full_step()

        lean._full_step = counting_full_step  # type: ignore[method-assign]


def _assert_same(reference: th.optim.Optimizer, lean: th.optim.Optimizer) -> None:
    for p, q in zip(reference.param_groups[0]["params"], lean.param_groups[0]["params"], strict=True):
        assert th.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert th.equal(reference.state[p][key], lean.state[q][key])


@pytest.mark.parametrize(
    ("optimizer_class", "kwargs"),
    [
        (th.optim.Adam, dict(lr=3e-4, eps=1e-5)),
        (th.optim.Adam, dict(lr=1e-3, weight_decay=0.1, maximize=True)),
        (th.optim.AdamW, dict(lr=1e-3, weight_decay=0.05, betas=(0.8, 0.95))),
    ],
    ids=["adam", "adam-l2-maximize", "adamw"],
)
def test_lean_step_equals_optimizer_step_bit_for_bit(optimizer_class, kwargs) -> None:
    reference_params = _params()
    lean_params = _clone(reference_params)
    reference = optimizer_class(reference_params, fused=True, **kwargs)
    lean_optimizer = optimizer_class(lean_params, fused=True, **kwargs)
    lean = LeanAdamStep(lean_optimizer)
    assert lean.enabled
    full_steps = _CountingStep(lean)
    for step in range(12):
        for group in (*reference.param_groups, *lean_optimizer.param_groups):
            group["lr"] = kwargs["lr"] * (1.0 - step / 12)  # a schedule changes the rate between steps
        _set_grads(reference_params, step)
        _set_grads(lean_params, step)
        reference.step()
        lean.step()
        _assert_same(reference, lean_optimizer)
    assert full_steps.calls == 1  # only the first step, which creates the state, went through optimizer.step()


def test_replaced_state_and_missing_gradients_fall_back_to_the_full_step(monkeypatch) -> None:
    # per-tensor kernel calls, bit for bit with optimizer.step() (flat buffers round small tensors differently)
    monkeypatch.setenv("SB3_PPO_EXT_FLAT_BUFFERS", "0")
    reference_params, lean_params, reference, lean_optimizer, lean = _adam_pair()
    # new state tensors (a deep copy: load_state_dict may keep the given tensors), the cached ones are stale
    lean_optimizer.load_state_dict(copy.deepcopy(reference.state_dict()))
    full_steps = _CountingStep(lean)
    for step in range(3, 6):
        _step_both(reference, lean.step, reference_params, lean_params, step)
        _assert_same(reference, lean_optimizer)
    assert full_steps.calls == 0  # the loaded state is taken over: the step after a load is a lean one
    # one state entry replaced in place of the optimizer (same values, new tensor): taken over as well
    lean_optimizer.state[lean_params[2]]["exp_avg_sq"] = lean_optimizer.state[lean_params[2]]["exp_avg_sq"].clone()
    _set_grads(reference_params, 6)
    _set_grads(lean_params, 6)
    reference.step()
    lean.step()
    _assert_same(reference, lean_optimizer)
    assert full_steps.calls == 0
    assert lean_optimizer.state[lean_params[2]]["exp_avg_sq"] is lean._groups[0].exp_avg_sqs[2]
    for params in (reference_params, lean_params):  # Adam skips a parameter without gradient
        _set_grads(params, 7)
        params[1].grad = None
    reference.step()
    lean.step()
    _assert_same(reference, lean_optimizer)
    assert full_steps.calls == 1


def test_update_steps_check_once_per_update_and_equal_optimizer_step() -> None:
    reference_params, lean_params = _params(), _params()
    reference = th.optim.Adam(reference_params, lr=1e-3, fused=True)
    lean_optimizer = th.optim.Adam(lean_params, lr=1e-3, fused=True)
    lean = LeanAdamStep(lean_optimizer)
    full_steps = _CountingStep(lean)
    checks = []
    can_shortcut = lean._can_shortcut
    lean._can_shortcut = lambda: (checks.append(1), can_shortcut())[1]  # type: ignore[method-assign]
    step = 0
    for update in range(3):  # three train() calls of four minibatch steps
        lean_step = lean.update_steps()
        for _ in range(4):
            _set_grads(reference_params, step)
            _set_grads(lean_params, step)
            reference.step()
            lean_step()
            _assert_same(reference, lean_optimizer)
            step += 1
        # the first step creates the state (a check, a cache attempt, a check, a full step, a check); each
        # later update checks once
        assert full_steps.calls == 1
        assert len(checks) == 3 + update
    # a parameter without gradient within an update: that step goes through optimizer.step(), as Adam skips it
    lean_step = lean.update_steps()
    lean_step_count = full_steps.calls
    for params in (reference_params, lean_params):
        _set_grads(params, step)
    reference.step()
    lean_step()
    for params in (reference_params, lean_params):
        _set_grads(params, step + 1)
        params[1].grad = None
    reference.step()
    lean_step()
    _assert_same(reference, lean_optimizer)
    assert full_steps.calls == lean_step_count + 1


def _adam_pair() -> tuple[list[th.nn.Parameter], list[th.nn.Parameter], th.optim.Adam, th.optim.Adam, LeanAdamStep]:
    """Two identical parameter sets with their Adams, the second stepped by LeanAdamStep, after 3 steps each."""
    reference_params, lean_params = _params(), _params()
    reference = th.optim.Adam(reference_params, lr=1e-3, fused=True)
    lean_optimizer = th.optim.Adam(lean_params, lr=1e-3, fused=True)
    lean = LeanAdamStep(lean_optimizer)
    for step in range(3):
        _set_grads(reference_params, step)
        _set_grads(lean_params, step)
        reference.step()
        lean.step()
    return reference_params, lean_params, reference, lean_optimizer, lean


def test_step_counters_are_shared_and_survive_a_save_and_load(tmp_path) -> None:
    reference_params, lean_params, reference, lean_optimizer, lean = _adam_pair()
    counters = [lean_optimizer.state[p]["step"] for p in lean_params]
    assert all(c.dim() == 0 and c._base is counters[0]._base for c in counters)  # one add_ moves them all
    _assert_same(reference, lean_optimizer)
    th.save(lean_optimizer.state_dict(), tmp_path / "optimizer.pt")
    restored = th.optim.Adam(lean_params, lr=1e-3, fused=True)
    restored.load_state_dict(th.load(tmp_path / "optimizer.pt"))
    lean = LeanAdamStep(restored)
    for step in range(3, 6):
        _step_both(reference, lean.step, reference_params, lean_params, step)
        _assert_same(reference, restored)
        # each counter is its own 0-d tensor to optimizer.step() (a fallback step moves each once)
        assert all(restored.state[p]["step"].item() == step + 1 for p in lean_params)


def test_a_step_replaced_on_the_instance_is_called() -> None:
    params = _params()
    optimizer = th.optim.Adam(params, lr=1e-3, fused=True)
    calls = []
    original = optimizer.step
    optimizer.step = lambda *a, **k: (calls.append(1), original(*a, **k))[1]  # type: ignore[method-assign]
    lean = LeanAdamStep(optimizer)
    for step in range(3):
        _set_grads(params, step)
        lean.step()
    assert len(calls) == 3


def test_hooks_and_unsupported_options_use_optimizer_step() -> None:
    assert not LeanAdamStep.supports(th.optim.Adam(_params(), fused=False))
    assert not LeanAdamStep.supports(th.optim.Adam(_params(), fused=True, amsgrad=True))
    assert not LeanAdamStep.supports(th.optim.SGD(_params(), lr=0.1))
    params = _params()
    optimizer = th.optim.Adam(params, lr=1e-3, fused=True)
    seen = []
    optimizer.register_step_post_hook(lambda *_: seen.append(1))
    lean = LeanAdamStep(optimizer)
    for step in range(3):
        _set_grads(params, step)
        lean.step()
    assert len(seen) == 3  # every step went through optimizer.step(), hooks included


def test_clippedppo_trains_identically_with_and_without_the_lean_step(monkeypatch) -> None:
    final = {}
    monkeypatch.setenv("SB3_PPO_EXT_FLAT_BUFFERS", "0")  # the flat gradient clip sums in another order
    for flag in ("1", "0"):
        monkeypatch.setenv("SB3_PPO_EXT_LEAN_ADAM", flag)
        model = ClippedPPO(
            "MlpPolicy",
            make_vec_env("CartPole-v1", n_envs=2, seed=0),
            n_steps=64,
            batch_size=32,
            n_epochs=3,
            seed=0,
            device="cpu",
        )
        model.learn(256)
        assert model._learn._lean.enabled == (flag == "1")
        final[flag] = [p.detach().clone() for p in model.policy.parameters()]
    for lean, full in zip(final["1"], final["0"], strict=True):
        assert th.equal(lean, full)


def _step_in_place(params: list[th.nn.Parameter], step: int) -> None:
    """Gradients written into the existing ``.grad`` tensors, as the closed-form backward does."""
    generator = th.Generator().manual_seed(1000 + step)
    for p in params:
        values = th.randn(p.shape, generator=generator)
        if p.grad is None:
            p.grad = values
        else:
            p.grad.copy_(values)


def test_flat_buffers_hold_every_tensor_and_step_as_adam() -> None:
    reference_params, lean_params = _params(), _params()
    reference = th.optim.Adam(reference_params, lr=1e-3, fused=True)
    lean_optimizer = th.optim.Adam(lean_params, lr=1e-3, fused=True)
    steps = LeanAdamStep(lean_optimizer).update_steps()
    for step in range(6):
        _step_in_place(reference_params, step)
        _step_in_place(lean_params, step)
        reference.step()
        steps.step()
        # the kernel's vector body and its scalar tail round differently: a 4-element bias, alone a tail, is
        # now inside one long tensor; the same update within float32 rounding
        for p, q in zip(reference_params, lean_params, strict=True):
            th.testing.assert_close(q, p, rtol=1e-6, atol=1e-9)
            for key in ("exp_avg", "exp_avg_sq"):
                th.testing.assert_close(lean_optimizer.state[q][key], reference.state[p][key], rtol=1e-5, atol=1e-12)
            assert th.equal(lean_optimizer.state[q]["step"], reference.state[p]["step"])
    flat = steps.lean._groups[0].flat
    assert flat is not None and flat.intact() and flat.grads_intact()
    offset = 0
    for p in lean_params:  # parameters, gradients and moments are views of one tensor each, 64-byte aligned
        state = lean_optimizer.state[p]
        for tensor, base in (
            (p, flat.data),
            (p.grad, flat.grad),
            (state["exp_avg"], flat.exp_avg),
            (state["exp_avg_sq"], flat.exp_avg_sq),
        ):
            assert tensor.data_ptr() == base.data_ptr() + offset * 4
            assert tensor.data_ptr() % 64 == 0
        offset += -(-p.numel() // 16) * 16
    assert offset == flat.data.numel()
    padding = th.ones(flat.data.numel(), dtype=th.bool)
    for p in lean_params:
        start = (p.data_ptr() - flat.data.data_ptr()) // 4
        padding[start : start + p.numel()] = False
    for base in (flat.data, flat.grad, flat.exp_avg, flat.exp_avg_sq):
        assert th.all(base[padding] == 0)  # Adam leaves the padding at zero


def test_flat_clip_equals_the_per_tensor_clip() -> None:
    params = _params()
    optimizer = th.optim.Adam(params, lr=1e-3, fused=True)
    steps = LeanAdamStep(optimizer).update_steps()
    _step_in_place(params, 0)
    steps.step()  # the full first step re-homes the group
    _step_in_place(params, 1)
    assert steps.lean.flat_grad(params) is not None
    expected_grads = [p.grad.clone() for p in params]
    clones = [th.nn.Parameter(p.detach().clone()) for p in params]
    for clone, grad in zip(clones, expected_grads, strict=True):
        clone.grad = grad.clone()
    expected_norm = th.nn.utils.clip_grad_norm_(clones, max_norm=0.5)
    norm = steps.clip_grad_norm(params, 0.5)
    th.testing.assert_close(norm, expected_norm, rtol=1e-6, atol=0)
    for p, clone in zip(params, clones, strict=True):
        th.testing.assert_close(p.grad, clone.grad, rtol=1e-6, atol=1e-9)
    assert th.linalg.vector_norm(steps.lean.flat_grad(params)) == pytest.approx(0.5, rel=1e-5)
    # a gradient assigned anew (as autograd does) leaves the flat buffer: the per-tensor path takes over
    params[0].grad = params[0].grad.clone()
    assert steps.lean.flat_grad(params) is None
    assert steps.clip_grad_norm(params, float("inf")) == pytest.approx(0.5, rel=1e-5)
    steps.step()  # per-parameter kernel call on the views; still no full step
    assert steps.lean._groups[0].flat.intact()


def test_moved_parameters_are_rehomed_before_the_next_step() -> None:
    params = _params()
    optimizer = th.optim.Adam(params, lr=1e-3, fused=True)
    lean = LeanAdamStep(optimizer)
    counting = _CountingStep(lean)
    for step in range(2):
        _step_in_place(params, step)
        lean.step()
    assert counting.calls == 1
    old_flat = lean._groups[0].flat
    params[2].data = params[2].data.clone()  # what .to() or a user's assignment does
    assert not old_flat.intact()
    _step_in_place(params, 2)
    lean.step()
    assert counting.calls == 1 and lean._groups[0].flat is not old_flat and lean._groups[0].flat.intact()
