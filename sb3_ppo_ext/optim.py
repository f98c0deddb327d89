"""The optimizer step's helpers: gradient-norm clipping (``max_grad_norm``), the KL-adaptive rate, a lean Adam step."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch as th
from torch.optim import optimizer as optimizer_module

# torch._foreach_norm (in torch since 1.13) computes every tensor's norm in one call; the public
# get_total_norm/clip_grads_with_norm_ pair regroups the tensors by device and dtype on every call,
# which doubled the cost of the clip on PPO's small networks (about 200 vs 100 us per minibatch here)
_FOREACH_NORM = getattr(th, "_foreach_norm", None)


def clip_grad_norm(parameters: list[th.Tensor], max_norm: float) -> th.Tensor:
    """Scale gradients in place so their global L2 norm is at most ``max_norm``; return the norm before.

    Same arithmetic as ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``
    capped at 1); ``max_norm=inf`` only measures the norm.

    :param parameters: the parameters whose ``.grad`` to scale (those without a gradient are skipped).
    :param max_norm: the largest global L2 norm allowed.
    :return: the global norm before clipping.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return th.zeros(())
    if _FOREACH_NORM is None:  # pragma: no cover - a torch without the private kernel
        return th.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_norm)
    total_norm = th.linalg.vector_norm(th.stack(_FOREACH_NORM(grads)))
    if max_norm != float("inf"):
        th._foreach_mul_(grads, th.clamp(max_norm / (total_norm + 1e-6), max=1.0))
    return total_norm


@functools.cache
def fused_adam_supported(device_type: str) -> bool:
    """Whether this torch build runs a fused Adam step on ``device_type`` (tried once on a tiny tensor, cached).

    setup.cfg allows torch>=2.3, but fused Adam on CPU only arrived in torch 2.4 (on MPS later); depending on
    the version an unsupported device fails at construction or at the first step, so the probe does both.

    :param device_type: ``"cpu"``, ``"cuda"``, ``"mps"``, ...
    :return: whether fused Adam works there.
    """
    try:
        param = th.zeros(1, device=device_type, requires_grad=True)
        optimizer = th.optim.Adam([param], fused=True)
        param.grad = th.ones_like(param)
        optimizer.step()
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def fast_optimizer_kwargs(optimizer_class: type[th.optim.Optimizer], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Add ``fused=True`` for Adam/AdamW unless the caller chose an implementation or torch lacks it.

    The fused kernel updates every parameter in one call instead of ~10 small ops per tensor; on
    PPO's small networks that is about a sixth of a minibatch step (see benchmarks/throughput.py).

    :param optimizer_class: the policy's optimizer class.
    :param kwargs: the policy's ``optimizer_kwargs``.
    :return: the keyword arguments to build the optimizer with.
    """
    if not issubclass(optimizer_class, (th.optim.Adam, th.optim.AdamW)) or {"fused", "foreach"} & kwargs.keys():
        return kwargs
    # the optimizer is built while the parameters sit on torch's default device; SB3 moves them afterwards, to
    # CUDA (fused there since torch 2.0) or, only when asked, to MPS
    devices = {th.empty(0).device.type} | ({"mps"} if th.backends.mps.is_available() else set())
    if all(fused_adam_supported(device) for device in devices):
        return {**kwargs, "fused": True}
    return kwargs


class LeanAdamStep:
    """``optimizer.step()`` of a fused Adam/AdamW as one direct call of torch's fused kernel per parameter group.

    ``torch.optim.Adam.step`` spends most of its time in Python around the kernel (hooks, profiler records,
    gathering each parameter's state, grouping tensors by device): about 0.2-0.5 ms per call on a 2-core CPU
    against 0.05-0.1 ms for the kernel, which on PPO's small MLPs is a large share of a minibatch step. This
    calls ``torch._fused_adam_`` (``_fused_adamw_``) on the optimizer's own state tensors with the group's
    current hyperparameters: the same arithmetic, bit for bit (``tests/test_optim.py``). It runs
    ``optimizer.step()`` instead whenever the shortcut might differ: the first step (no state yet), state
    replaced since the last step (``load_state_dict``), a parameter without gradient, step hooks, AMP
    gradient scaling, ``step`` replaced on the instance, or an option the shortcut does not handle.
    ``SB3_PPO_EXT_LEAN_ADAM=0`` turns it off.

    :param optimizer: a fused Adam/AdamW (see :meth:`supports`).
    """

    def __init__(self, optimizer: th.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.enabled = self.supports(optimizer) and os.environ.get("SB3_PPO_EXT_LEAN_ADAM", "1") != "0"
        # per group: (params, exp_avgs, exp_avg_sqs, steps), taken from the optimizer's state after a full step
        self._groups: list[tuple[list[th.Tensor], list[th.Tensor], list[th.Tensor], list[th.Tensor]]] | None = None
        self._state: Any = None

    @staticmethod
    def supports(optimizer: th.optim.Optimizer) -> bool:
        """Whether the optimizer is a plain fused Adam/AdamW on CPU or CUDA with options the shortcut handles.

        :param optimizer: the optimizer.
        :return: whether :class:`LeanAdamStep` can step it.
        """
        if type(optimizer) not in (th.optim.Adam, th.optim.AdamW) or not hasattr(th, "_fused_adam_"):
            return False
        return all(
            group.get("fused")
            and not group.get("amsgrad")
            and not group.get("differentiable")
            and not group.get("capturable")
            and all(isinstance(beta, float) for beta in group["betas"])
            for group in optimizer.param_groups
        )

    def step(self) -> None:
        """One Adam step on every parameter with a gradient."""
        self._checked_step()

    def _checked_step(self) -> bool:
        """:meth:`step` after the full check; returns whether the shortcut holds for the next step."""
        if self.enabled and self._can_shortcut():
            self._fused_steps()
            return True
        self.optimizer.step()  # the first step (it creates the state), or one the shortcut must not take
        self._cache()
        return self.enabled and self._can_shortcut()

    def update_steps(self) -> Callable[[], None]:
        """:meth:`step` for the minibatches of one update (one ``train()`` call), checked once.

        The full check (state, hooks, options: a loop over every parameter's state, about 0.1 ms here) runs at
        the first step only: nothing outside the update runs between its minibatch steps. Every step still
        checks that each parameter has a gradient.
        """
        checked = False

        def step() -> None:
            nonlocal checked
            if checked and self._groups is not None:
                grads = [[p.grad for p in params] for params, *_ in self._groups]
                if all(g is not None for group in grads for g in group):
                    self._fused_steps(grads)
                    return
            checked = self._checked_step()

        return step

    def _fused_steps(self, grads: list[list[th.Tensor]] | None = None) -> None:
        """The fused kernel on every group's cached state tensors (``grads``: each group's, if already gathered)."""
        assert self._groups is not None
        for index, (group, (params, exp_avgs, exp_avg_sqs, steps)) in enumerate(
            zip(self.optimizer.param_groups, self._groups, strict=True)
        ):
            if not params:
                continue
            kernel = th._fused_adamw_ if group.get("decoupled_weight_decay", False) else th._fused_adam_
            steps[0]._base.add_(1)  # every counter of the group at once: see _shared_step_counters
            beta1, beta2 = group["betas"]
            kernel(
                params,
                [p.grad for p in params] if grads is None else grads[index],
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                amsgrad=False,
                maximize=group["maximize"],
                grad_scale=None,
                found_inf=None,
            )

    def _can_shortcut(self) -> bool:
        optimizer = self.optimizer
        if (
            self._groups is None
            or optimizer.state is not self._state
            or len(self._groups) != len(optimizer.param_groups)
        ):
            return False
        if _optimizer_hooks(optimizer) or getattr(optimizer, "grad_scale", None) is not None:
            return False
        if "step" in optimizer.__dict__:  # step replaced on this instance (a wrapper, a test's counter): call it
            return False
        for group, (params, exp_avgs, exp_avg_sqs, steps) in zip(optimizer.param_groups, self._groups, strict=True):
            if len(group["params"]) != len(params) or any(
                a is not b for a, b in zip(group["params"], params, strict=True)
            ):
                return False
            for param, exp_avg, exp_avg_sq, step in zip(params, exp_avgs, exp_avg_sqs, steps, strict=True):
                state = optimizer.state.get(param)
                if (
                    param.grad is None
                    or state is None
                    or state.get("exp_avg") is not exp_avg
                    or state.get("exp_avg_sq") is not exp_avg_sq
                    or state.get("step") is not step
                ):
                    return False
        return True

    def _cache(self) -> None:
        """Remember the state tensors the fused kernel updates (after a full step created or replaced them)."""
        self._groups, self._state = None, None
        if not self.enabled:
            return
        groups = []
        for group in self.optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if len(params) != len(group["params"]):
                return
            states = [self.optimizer.state.get(p, {}) for p in params]
            if any(not {"exp_avg", "exp_avg_sq", "step"} <= state.keys() for state in states):
                return
            groups.append(
                (
                    params,
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    _shared_step_counters(states),
                )
            )
        self._groups, self._state = groups, self.optimizer.state


def _shared_step_counters(states: list[dict[str, Any]]) -> list[th.Tensor]:
    """Each state's ``step`` counter replaced by a 0-d view of one shared 1-d tensor (same values); returns them.

    The fused kernel reads one counter per parameter, and ``_foreach_add_(counters, 1)`` costs about 35 us for
    the 13 counters of a PPO policy here, against 7 us for one ``add_`` on the tensor they all view.
    ``optimizer.step()`` and ``state_dict()`` see ordinary 0-d tensors.
    """
    counters = [state["step"] for state in states]
    if not counters:
        return counters
    base = counters[0]._base
    if base is not None and base.dim() == 1 and len(base) == len(counters):
        if all(c._base is base and c.data_ptr() == base[i].data_ptr() for i, c in enumerate(counters)):
            return counters  # already shared (cached again after a fallback step)
    shared = th.stack([c.detach() for c in counters])
    views = list(shared.unbind(0))
    for state, view in zip(states, views, strict=True):
        state["step"] = view
    return views


def _optimizer_hooks(optimizer: th.optim.Optimizer) -> bool:
    """Whether any step hook (this optimizer's or a global one) is registered."""
    return bool(
        getattr(optimizer, "_optimizer_step_pre_hooks", None)
        or getattr(optimizer, "_optimizer_step_post_hooks", None)
        or optimizer_module._global_optimizer_pre_hooks
        or optimizer_module._global_optimizer_post_hooks
    )


def __getattr__(name: str) -> Any:
    # the KL-adaptive learning rate moved to its stabiliser module; its old path keeps working
    if name == "KLAdaptiveLearningRate":
        from sb3_ppo_ext.stabilizers.adaptive_lr import KLAdaptiveLearningRate

        return KLAdaptiveLearningRate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
