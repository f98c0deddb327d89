"""Autograd and closed-form backends: every loss term, head and whole update agrees; the fast path is never unsafe.

* :class:`PPOLoss` differentiated by autograd equals :meth:`PPOLoss.with_gradients`, term by term.
* :meth:`ActionHead.param_grads` equals autograd through the head.
* ``ClippedPPO.train`` gives the same update with ``fast_update`` on and off.
* ``ClosedFormBackend`` falls back to autograd for a loss without closed form, and
  ``MLPActorCriticKernel.supports`` refuses every policy whose behaviour it could not reproduce.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.logger import configure
from stable_baselines3.common.torch_layers import FlattenExtractor
from torch import nn

from sb3_ppo_ext import ActorCriticPolicy, ClippedPPO, backends
from sb3_ppo_ext.backends import AutogradBackend, ClosedFormBackend, select_backend
from sb3_ppo_ext.distributions import CategoricalHead, DiagGaussianHead
from sb3_ppo_ext.fast.kernel import MLPActorCriticKernel
from sb3_ppo_ext.losses import LossTerms, PolicyEvaluation, PPOBatch, PPOLoss
from sb3_ppo_ext.optim import fast_optimizer_kwargs

# -- every loss term: autograd of PPOLoss.__call__ vs PPOLoss.with_gradients ------------------------------

B = 64

# (clip_range, clip_range_vf, vf_clip_mode, ent_coef, vf_coef, closed-form entropy)
TERM_CASES = {
    "surrogate-only": (0.2, None, "max", 0.0, 0.0, True),
    "value-unclipped": (0.1, None, "max", 0.0, 0.5, True),
    "value-max": (0.3, 0.2, "max", 0.0, 1.0, True),
    "value-sb3": (0.2, 0.3, "sb3", 0.0, 0.25, True),
    "entropy-closed-form": (0.2, None, "max", 0.05, 0.5, True),
    "entropy-log-prob-estimate": (0.15, 0.25, "max", 0.03, 0.5, False),
    "all-terms-max": (0.1, 0.1, "max", 0.01, 2.0, True),
    "all-terms-sb3": (0.25, 0.15, "sb3", 0.02, 0.5, True),
    "no-entropy-term-without-closed-form": (0.2, 0.2, "sb3", 0.0, 0.5, False),
}


def _random_inputs(seed: int, with_entropy: bool) -> tuple[PolicyEvaluation, PPOBatch]:
    """float64 leaf outputs (ratios in [0.5, 1.8], value moves in [-1, 1]) and a batch around them."""
    gen = th.Generator().manual_seed(seed)
    old_log_prob = -th.rand(B, generator=gen, dtype=th.float64) * 3
    log_ratio = (th.rand(B, generator=gen, dtype=th.float64) * 1.3 - 0.7).clamp(-0.69, 0.59)
    old_values = th.randn(B, generator=gen, dtype=th.float64)
    delta = (th.rand(B, generator=gen, dtype=th.float64) * 2 - 1) ** 3  # dense near 0, up to +-1
    evaluation = PolicyEvaluation(
        (old_values + delta).requires_grad_(True),
        (old_log_prob + log_ratio).requires_grad_(True),
        (th.rand(B, generator=gen, dtype=th.float64) * 2).requires_grad_(True) if with_entropy else None,
    )
    batch = PPOBatch(
        observations=None,
        actions=th.zeros(B),
        old_log_prob=old_log_prob,
        old_values=old_values,
        advantages=th.randn(B, generator=gen, dtype=th.float64),
        returns=old_values + th.randn(B, generator=gen, dtype=th.float64),
    )
    return evaluation, batch


def _assert_data_exercises_clipping(evaluation: PolicyEvaluation, batch: PPOBatch, loss: PPOLoss) -> None:
    """Every branch of the clipped terms has samples, so a wrong branch cannot go unnoticed."""
    ratio = th.exp(evaluation.log_prob.detach() - batch.old_log_prob)
    adv = batch.advantages
    eps = loss.clip_range
    outside = (ratio - 1).abs() > eps
    flat = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))
    assert (~outside).sum() >= 5, "no ratio inside the clip range"
    assert flat.sum() >= 5, "no sample on a flat (clipped) part of the surrogate"
    assert (outside & ~flat).sum() >= 5, "no sample outside the clip range on the pessimistic unclipped side"
    if loss.clip_range_vf is not None:
        delta = evaluation.values.detach() - batch.old_values
        v_outside = delta.abs() > loss.clip_range_vf
        assert (~v_outside).sum() >= 5 and v_outside.sum() >= 5, "values not on both sides of the value clip range"
        v_clip = batch.old_values + delta.clamp(-loss.clip_range_vf, loss.clip_range_vf)
        unclipped_larger = (evaluation.values.detach() - batch.returns) ** 2 > (v_clip - batch.returns) ** 2
        assert (v_outside & unclipped_larger).sum() >= 3, "max form: no clipped sample keeping its gradient"
        assert (v_outside & ~unclipped_larger).sum() >= 3, "max form: no clipped sample losing its gradient"


def _numpy_loss(evaluation: PolicyEvaluation, batch: PPOBatch, loss: PPOLoss) -> float:
    """The total loss written out independently in NumPy."""
    values, log_prob = evaluation.values.detach().numpy(), evaluation.log_prob.detach().numpy()
    old_values, returns, adv = batch.old_values.numpy(), batch.returns.numpy(), batch.advantages.numpy()
    ratio = np.exp(log_prob - batch.old_log_prob.numpy())
    policy = -np.minimum(ratio * adv, np.clip(ratio, 1 - loss.clip_range, 1 + loss.clip_range) * adv).mean()
    if loss.clip_range_vf is None:
        value = ((values - returns) ** 2).mean()
    else:
        v_clip = old_values + np.clip(values - old_values, -loss.clip_range_vf, loss.clip_range_vf)
        if loss.vf_clip_mode == "sb3":
            value = ((v_clip - returns) ** 2).mean()
        else:
            value = np.maximum((values - returns) ** 2, (v_clip - returns) ** 2).mean()
    if evaluation.entropy is None:
        entropy = log_prob.mean()
    else:
        entropy = -evaluation.entropy.detach().numpy().mean()
    return float(policy + loss.vf_coef * value + loss.ent_coef * entropy)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", list(TERM_CASES), ids=list(TERM_CASES))
def test_closed_form_output_gradients_equal_autograd(case: str, seed: int) -> None:
    clip_range, clip_range_vf, mode, ent_coef, vf_coef, with_entropy = TERM_CASES[case]
    loss = PPOLoss(clip_range, clip_range_vf, mode, ent_coef, vf_coef)  # type: ignore[arg-type]
    evaluation, batch = _random_inputs(seed, with_entropy)
    _assert_data_exercises_clipping(evaluation, batch, loss)

    autograd_terms = loss(evaluation, batch)
    assert autograd_terms.loss.requires_grad
    autograd_terms.loss.backward()
    closed_terms, grads = loss.with_gradients(evaluation, batch)

    assert autograd_terms.loss.item() == pytest.approx(_numpy_loss(evaluation, batch, loss), rel=1e-12)
    assert not closed_terms.loss.requires_grad
    for name in LossTerms._fields:
        a, c = getattr(autograd_terms, name), getattr(closed_terms, name)
        if a is None:  # terms this loss does not have (the reference KL)
            assert c is None, name
            continue
        th.testing.assert_close(a.detach(), c, rtol=0, atol=1e-14, msg=name)
        if name != "loss":
            assert not a.requires_grad, name
    # the diagnostics against their definitions
    ratio = th.exp(evaluation.log_prob.detach() - batch.old_log_prob)
    assert closed_terms.clip_fraction.item() == pytest.approx(((ratio - 1).abs() > clip_range).double().mean().item())
    kl = (ratio - 1 - th.log(ratio)).mean().item()
    assert closed_terms.approx_kl.item() == pytest.approx(kl, rel=1e-12)
    assert 0 < closed_terms.clip_fraction.item() < 1

    th.testing.assert_close(grads.values, evaluation.values.grad, rtol=0, atol=1e-12)
    th.testing.assert_close(grads.log_prob, evaluation.log_prob.grad, rtol=0, atol=1e-12)
    if evaluation.entropy is None or ent_coef == 0:
        assert grads.entropy is None
        if evaluation.entropy is not None:
            assert evaluation.entropy.grad is None  # logged only, out of the graph
    else:
        th.testing.assert_close(grads.entropy, evaluation.entropy.grad, rtol=0, atol=1e-12)
    if vf_coef != 0:
        assert grads.values.abs().max() > 0  # not trivially equal


# -- action heads: param_grads vs autograd --------------------------------------------------------------------


def _head_case(kind: str, gen: th.Generator) -> tuple[Any, tuple[th.Tensor, ...], th.Tensor]:
    n, d = 16, 3
    if kind == "categorical":
        return CategoricalHead(5), (th.randn(n, 5, generator=gen, dtype=th.float64) * 2,), th.randint(0, 5, (n,))
    mean = th.randn(n, d, generator=gen, dtype=th.float64)
    actions = mean + th.randn(n, d, generator=gen, dtype=th.float64) * 1.5
    if kind == "gaussian-state-independent":
        return DiagGaussianHead(d), (mean, th.tensor([-0.5, 0.0, 0.4], dtype=th.float64)), actions
    log_std = th.randn(n, d, generator=gen, dtype=th.float64) * 0.5
    return DiagGaussianHead(d, state_dependent_std=True), (mean, log_std), actions


@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("kind", ["categorical", "gaussian-state-independent", "gaussian-state-dependent"])
def test_head_param_grads_equal_autograd(kind: str, with_entropy: bool) -> None:
    gen = th.Generator().manual_seed(7)
    head, params, actions = _head_case(kind, gen)
    n = actions.shape[0]
    g_logp = th.randn(n, generator=gen, dtype=th.float64)
    g_h = th.randn(n, generator=gen, dtype=th.float64) if with_entropy else None

    leaves = tuple(p.clone().requires_grad_(True) for p in params)
    evaluation = head.evaluate(leaves, actions)
    objective = (g_logp * evaluation.log_prob).sum()
    if g_h is not None:
        objective = objective + (g_h * evaluation.entropy).sum()
    objective.backward()

    with th.no_grad():
        grads = head.param_grads(params, head.evaluate(params, actions), g_logp, g_h)
    assert len(grads) == len(params)
    for grad, leaf in zip(grads, leaves, strict=True):
        if leaf.dim() == 1:  # the shared log_std: per-sample rows, summed over the batch
            assert grad.shape == (n, leaf.shape[0])
            grad = grad.sum(0)
        th.testing.assert_close(grad, leaf.grad, rtol=1e-10, atol=1e-12)
        assert leaf.grad.abs().max() > 0


# -- whole update: fast_update on and off ---------------------------------------------------------------------


def _collect(model: ClippedPPO) -> None:
    model.set_logger(configure(folder=None, format_strings=[]))
    _, callback = model._setup_learn(model.n_steps * model.n_envs, None, True, "test", False)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)


def _train(model: ClippedPPO, fast_update: bool) -> tuple[dict[str, float], dict[str, th.Tensor]]:
    model.fast_update = fast_update
    model._n_updates = 0
    model._current_progress_remaining = 1.0
    th.manual_seed(123)  # the same minibatch shuffle
    model.train()
    logged = {k: v for k, v in model.logger.name_to_value.items() if k.startswith("train/")}
    return logged, {name: p.detach().clone() for name, p in model.policy.named_parameters()}


@pytest.mark.parametrize(
    ("env_id", "kwargs"),
    [
        ("CartPole-v1", dict(ent_coef=0.01, clip_range=0.05)),
        ("CartPole-v1", dict(ent_coef=0.0, clip_range_vf=0.05, vf_clip_mode="max", clip_range=0.03)),
        ("CartPole-v1", dict(ent_coef=0.02, clip_range_vf=0.05, vf_clip_mode="sb3", clip_range=0.02)),
        ("Pendulum-v1", dict(ent_coef=0.01, clip_range_vf=0.1, clip_range=0.03)),
        ("Pendulum-v1", dict(ent_coef=0.01, clip_range_vf=0.1, vf_clip_mode="sb3", clip_range=0.05,
                             policy_kwargs=dict(state_dependent_std=True))),
    ],
)  # fmt: skip
def test_train_is_the_same_with_both_backends(env_id: str, kwargs: dict[str, Any]) -> None:
    model = ClippedPPO(
        "MlpPolicy", env_id, n_steps=64, batch_size=32, n_epochs=2, learning_rate=1e-3, seed=5, device="cpu", **kwargs
    )
    model.fast_update = True
    assert isinstance(select_backend(model.policy, model.fast_update), ClosedFormBackend)
    model.fast_update = False
    assert type(select_backend(model.policy, model.fast_update)) is AutogradBackend
    _collect(model)
    initial = {name: p.detach().clone() for name, p in model.policy.named_parameters()}
    policy_state = copy.deepcopy(model.policy.state_dict())
    optimizer_state = copy.deepcopy(model.policy.optimizer.state_dict())

    fast_logs, fast_params = _train(model, fast_update=True)
    model.policy.load_state_dict(policy_state)
    model.policy.optimizer.load_state_dict(optimizer_state)
    slow_logs, slow_params = _train(model, fast_update=False)

    assert fast_logs.keys() == slow_logs.keys()
    for key in ("train/loss", "train/policy_gradient_loss", "train/value_loss", "train/entropy_loss"):
        assert key in fast_logs
    for key, value in slow_logs.items():
        assert fast_logs[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert slow_logs["train/clip_fraction"] > 0  # the surrogate's clipping was exercised
    for name, param in slow_params.items():
        np.testing.assert_allclose(fast_params[name].numpy(), param.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
        assert not th.equal(param, initial[name]), f"{name} did not move"


@pytest.mark.parametrize(
    ("env_id", "policy_kwargs"),
    [("CartPole-v1", {}), ("Pendulum-v1", {}), ("Pendulum-v1", dict(state_dependent_std=True))],
)
def test_reference_kl_in_the_loss_keeps_the_closed_form_and_trains_as_autograd(
    env_id: str, policy_kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = dict(n_steps=64, batch_size=32, n_epochs=2, learning_rate=1e-3, device="cpu")
    reference = ClippedPPO("MlpPolicy", env_id, seed=9, policy_kwargs=policy_kwargs, **settings)
    with th.no_grad():  # a reference far from the fresh policy: its head is not the near-uniform 0.01-gain one
        reference.policy.action_net.weight.normal_(0.0, 1.0, generator=th.Generator().manual_seed(0))
        if hasattr(reference.policy, "log_std"):
            reference.policy.log_std.fill_(-1.0)
    model = ClippedPPO(
        "MlpPolicy", env_id, seed=5, ent_coef=0.01, ref_policy=reference, ref_kl_coef=0.5, ref_kl_mode="loss",
        policy_kwargs=policy_kwargs, **settings,
    )  # fmt: skip
    _collect(model)
    policy_state = copy.deepcopy(model.policy.state_dict())
    optimizer_state = copy.deepcopy(model.policy.optimizer.state_dict())
    fallbacks: list[int] = []
    backend = model._learn.backend(model.policy, model.fast_update)
    assert isinstance(backend, ClosedFormBackend)
    autograd_step = backend.autograd.loss_and_grad
    monkeypatch.setattr(backend.autograd, "loss_and_grad", lambda *a: (fallbacks.append(1), autograd_step(*a))[1])
    fast_logs, fast_params = _train(model, fast_update=True)
    assert not fallbacks  # the KL term's gradient came from the head, not from autograd
    model.policy.load_state_dict(policy_state)
    model.policy.optimizer.load_state_dict(optimizer_state)
    slow_logs, slow_params = _train(model, fast_update=False)

    assert fast_logs["train/ref_kl"] > 0.01
    for key, value in slow_logs.items():
        assert fast_logs[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for name, param in slow_params.items():
        np.testing.assert_allclose(fast_params[name].numpy(), param.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("head", ["categorical", "gaussian"])
def test_head_kl_gradient_equals_autograd(head: str) -> None:
    from sb3_ppo_ext.distributions import CategoricalHead, DiagGaussianHead

    generator = th.Generator().manual_seed(3)
    if head == "categorical":
        action_head: Any = CategoricalHead(5)
        mine = (th.randn(6, 5, generator=generator, dtype=th.float64).requires_grad_(),)
        theirs = (th.randn(6, 5, generator=generator, dtype=th.float64),)
        mine[0].data[0, 1] = -1e8  # a masked-out action, in both
        theirs[0][0, 1] = -1e8
    else:
        action_head = DiagGaussianHead(3)
        mine = (
            th.randn(6, 3, generator=generator, dtype=th.float64).requires_grad_(),
            th.randn(3, generator=generator, dtype=th.float64).mul(0.3).requires_grad_(),
        )
        theirs = (th.randn(6, 3, generator=generator, dtype=th.float64), th.randn(3, generator=generator).double())
    weights = th.rand(6, generator=generator, dtype=th.float64)
    (action_head.kl(mine, theirs) * weights).sum().backward()
    closed = action_head.kl_grads(tuple(p.detach() for p in mine), theirs, weights)
    for by_hand, param in zip(closed, mine, strict=True):
        expected = param.grad
        got = by_hand if by_hand.shape == expected.shape else by_hand.sum(0)  # a shared log_std sums over samples
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)


def _rollout_batch(model: ClippedPPO) -> PPOBatch:
    _collect(model)
    sample = next(model.rollout_buffer.get(32))
    actions = sample.actions.long().flatten() if isinstance(model.action_space, spaces.Discrete) else sample.actions
    return PPOBatch(
        sample.observations, actions, sample.old_log_prob, sample.old_values, sample.advantages, sample.returns
    )


def _grads_of(policy: nn.Module) -> dict[str, th.Tensor]:
    return {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}


# -- fast-path safety: anything not exactly ours goes through autograd ----------------------------------------


def _tiny(policy: Any, env_id: str = "CartPole-v1", **kwargs: Any) -> ClippedPPO:
    return ClippedPPO(policy, env_id, n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu", **kwargs)


def test_stock_policies_use_the_closed_form_backend() -> None:
    """The baseline of the refusals below: the same settings with the stock policy do take the fast path."""
    for env_id in ("CartPole-v1", "Pendulum-v1"):
        model = _tiny("MlpPolicy", env_id)
        assert MLPActorCriticKernel.supports(model.policy)
        assert isinstance(select_backend(model.policy, model.fast_update), ClosedFormBackend)
        assert type(select_backend(model.policy, fast_update=False)) is AutogradBackend


# every method whose behaviour the kernel's act/evaluate reproduces (directly or through its callers)
_OVERRIDABLE = (
    "forward",
    "_predict",
    "evaluate_actions",
    "predict_values",
    "extract_features",
    "get_distribution",
    "_latents",
    "_act",
    "_actor_latent",
    "_head_params",
    "split_head_output",
)
# those a learn() call goes through (rollout or update), so the override must have run
_USED_BY_LEARN = {
    "forward",
    "evaluate_actions",
    "predict_values",
    "extract_features",
    "_latents",
    "_act",
    "_head_params",
    "split_head_output",
}


def _counting_subclass(name: str) -> tuple[type[ActorCriticPolicy], list[str]]:
    calls: list[str] = []
    original = getattr(ActorCriticPolicy, name)

    def override(self: ActorCriticPolicy, *args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return original(self, *args, **kwargs)

    return type(f"Overrides_{name}", (ActorCriticPolicy,), {name: override}), calls


@pytest.mark.parametrize("name", _OVERRIDABLE)
def test_policy_with_an_overridden_method_goes_through_autograd(name: str) -> None:
    policy_class, calls = _counting_subclass(name)
    model = _tiny(policy_class)
    assert not MLPActorCriticKernel.supports(model.policy)
    assert type(select_backend(model.policy, model.fast_update)) is AutogradBackend
    if name in _USED_BY_LEARN:
        model.learn(32)
        assert calls, f"the override of {name} never ran during learn()"
    elif name == "_predict":
        model.predict(model.env.reset())
        assert calls


def test_forward_override_runs_in_rollouts() -> None:
    policy_class, calls = _counting_subclass("forward")
    model = _tiny(policy_class)
    _collect(model)
    assert len(calls) == model.n_steps  # one call per rollout step, none bypassed by the kernel


class _LearnedValueBias(ActorCriticPolicy):
    """Adds a learned scalar to every value estimate."""

    def __init__(self, observation_space: Any, action_space: Any, lr_schedule: Any, **kwargs: Any) -> None:
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)
        self.value_bias = nn.Parameter(th.zeros(1))
        self.optimizer = self.optimizer_class(
            self.parameters(), lr=lr_schedule(1), **fast_optimizer_kwargs(self.optimizer_class, self.optimizer_kwargs)
        )

    def forward(self, obs: Any, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        actions, values, log_prob = super().forward(obs, deterministic)
        return actions, values + self.value_bias, log_prob

    def evaluate_actions(self, obs: Any, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        values, log_prob, entropy = super().evaluate_actions(obs, actions)
        return values + self.value_bias, log_prob, entropy

    def predict_values(self, obs: Any) -> th.Tensor:
        return super().predict_values(obs) + self.value_bias


def test_extra_parameter_of_a_subclass_is_trained() -> None:
    model = _tiny(_LearnedValueBias, learning_rate=1e-2)
    assert not MLPActorCriticKernel.supports(model.policy)
    assert type(select_backend(model.policy, model.fast_update)) is AutogradBackend
    model.learn(64)
    assert model.policy.value_bias.item() != 0.0
    assert model.policy.value_bias.grad is not None and model.policy.value_bias.grad.abs().item() > 0


def test_extra_parameter_registered_on_a_stock_policy_goes_through_autograd() -> None:
    model = _tiny("MlpPolicy")
    model.policy.register_parameter("extra", nn.Parameter(th.zeros(1)))
    assert not MLPActorCriticKernel.supports(model.policy)


class _CountingFlatten(FlattenExtractor):
    calls = 0

    def forward(self, observations: th.Tensor) -> th.Tensor:
        type(self).calls += 1
        return super().forward(observations)


@pytest.mark.parametrize("share", [True, False])
def test_custom_features_extractor_goes_through_autograd(share: bool) -> None:
    _CountingFlatten.calls = 0
    kwargs = dict(features_extractor_class=_CountingFlatten, share_features_extractor=share)
    model = _tiny("MlpPolicy", policy_kwargs=kwargs)
    assert not MLPActorCriticKernel.supports(model.policy)
    assert type(select_backend(model.policy, model.fast_update)) is AutogradBackend
    model.learn(32)
    assert _CountingFlatten.calls > model.n_steps  # every rollout step and the update


_MODULE_HOOKS = {
    "forward": lambda m, calls: m.register_forward_hook(lambda *a: calls.append(1)),
    "forward_pre": lambda m, calls: m.register_forward_pre_hook(lambda *a: calls.append(1)),
    "full_backward": lambda m, calls: m.register_full_backward_hook(lambda *a: calls.append(1)),
    "full_backward_pre": lambda m, calls: m.register_full_backward_pre_hook(lambda *a: calls.append(1)),
}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("where", ["policy", "value_net", "hidden_layer"])
@pytest.mark.parametrize("hook", list(_MODULE_HOOKS))
def test_module_hook_forces_autograd(hook: str, where: str) -> None:
    model = _tiny("MlpPolicy")
    modules = {
        "policy": model.policy,
        "value_net": model.policy.value_net,
        "hidden_layer": model.policy.mlp_extractor.policy_net[0],
    }
    calls: list[int] = []
    _MODULE_HOOKS[hook](modules[where], calls)
    assert not MLPActorCriticKernel.supports(model.policy)
    assert type(select_backend(model.policy, model.fast_update)) is AutogradBackend
    if where != "policy":  # the policy's own __call__ hooks only run in rollouts (forward)
        model.learn(32)
        assert calls


def test_backend_is_chosen_once_per_learn_call_and_again_at_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny("MlpPolicy")
    chosen: list[Any] = []
    real_select = backends.select_backend
    monkeypatch.setattr(backends, "select_backend", lambda *a: (chosen.append(1), real_select(*a))[1])
    model.learn(96)  # three rollouts and three updates
    assert len(chosen) == 1
    assert isinstance(model._learn.backend(model.policy, model.fast_update), ClosedFormBackend)
    # a hook registered between two learn() calls: the next one chooses again, and autograd runs the hook
    calls: list[int] = []
    model.policy.mlp_extractor.value_net[0].register_forward_hook(lambda *a: calls.append(1))
    model.learn(32, reset_num_timesteps=False)
    assert len(chosen) == 2
    assert type(model._learn.backend(model.policy, model.fast_update)) is AutogradBackend
    assert calls
    model.fast_update = False  # switched by hand between updates: chosen again at the next use
    model.policy.mlp_extractor.value_net[0]._forward_hooks.clear()
    assert type(model._learn.backend(model.policy, model.fast_update)) is AutogradBackend
    assert len(chosen) == 3


@pytest.mark.parametrize("hook", ["register_hook", "register_post_accumulate_grad_hook"])
def test_parameter_gradient_hook_is_honoured(hook: str) -> None:
    """A hook on a parameter's gradient (here: freezing it) runs under autograd; the kernel would skip it."""
    model = _tiny("MlpPolicy")  # fast_update=True by default
    weight = model.policy.value_net.weight
    before = weight.detach().clone()
    calls: list[int] = []
    if hook == "register_hook":
        weight.register_hook(lambda grad: calls.append(1) or grad * 0.0)
    else:

        def zero_grad(param: th.Tensor) -> None:
            calls.append(1)
            param.grad.zero_()

        weight.register_post_accumulate_grad_hook(zero_grad)
    assert not MLPActorCriticKernel.supports(model.policy)
    assert type(select_backend(model.policy, model.fast_update)) is AutogradBackend
    model.learn(64)
    assert calls, "the gradient hook never ran"
    assert th.equal(weight.detach(), before), "a parameter frozen by its gradient hook moved"


@pytest.mark.parametrize(
    ("env_id", "policy_kwargs"),
    [
        ("CartPole-v1", {}),
        ("CartPole-v1", dict(activation_fn=nn.ReLU, net_arch=dict(pi=[16], vf=[8, 8]), share_features_extractor=False)),
        ("CartPole-v1", dict(net_arch=[])),
        ("Pendulum-v1", {}),
        ("Pendulum-v1", dict(state_dependent_std=True)),
    ],
)
def test_closed_form_step_leaves_no_stale_gradient(env_id: str, policy_kwargs: dict[str, Any]) -> None:
    model = ClippedPPO(
        "MlpPolicy", env_id, n_steps=32, batch_size=32, seed=2, device="cpu", policy_kwargs=policy_kwargs
    )
    assert MLPActorCriticKernel.supports(model.policy)
    batch = _rollout_batch(model)
    loss = PPOLoss(0.2, 0.2, "max", 0.01, 0.5)
    reference_terms = AutogradBackend(model.policy).loss_and_grad(loss, batch)
    expected = _grads_of(model.policy)
    assert expected.keys() == {name for name, _ in model.policy.named_parameters()}

    for param in model.policy.parameters():
        param.grad = th.full_like(param, 1e6)
    terms = ClosedFormBackend(model.policy).loss_and_grad(loss, batch)
    th.testing.assert_close(terms.loss, reference_terms.loss, rtol=1e-5, atol=1e-6)
    for name, param in model.policy.named_parameters():
        assert param.grad is not None, name
        th.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
