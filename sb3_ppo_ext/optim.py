"""The optimizer step's helpers: gradient-norm clipping (``max_grad_norm``), the KL-adaptive rate, a lean Adam step."""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import torch as th
from torch.optim import optimizer as optimizer_module

# torch._foreach_norm (in torch since 1.13) computes every tensor's norm in one call; the public
# get_total_norm/clip_grads_with_norm_ pair regroups the tensors by device and dtype on every call,
# which doubled the cost of the clip on PPO's small networks (about 200 vs 100 us per minibatch here)
_FOREACH_NORM = getattr(th, "_foreach_norm", None)


def clip_grad_norm(parameters: list[th.Tensor], max_norm: float, flat_grad: th.Tensor | None = None) -> th.Tensor:
    """Scale gradients in place so their global L2 norm is at most ``max_norm``; return the norm before.

    Same arithmetic as ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``
    capped at 1); ``max_norm=inf`` only measures the norm.

    :param parameters: the parameters whose ``.grad`` to scale (those without a gradient are skipped).
    :param max_norm: the largest global L2 norm allowed.
    :param flat_grad: one tensor of which every ``.grad`` of ``parameters`` is a view
        (:meth:`LeanAdamStep.flat_grad`), or None; the norm then sums in another order (rounding differs).
    :return: the global norm before clipping.
    """
    if flat_grad is not None:
        # every gradient is a view of this one tensor: one norm and one scale instead of one per parameter
        # the coefficient as a Python float: tensor arithmetic on a 0-d tensor costs ~10 us per op here
        total_norm = th.linalg.vector_norm(flat_grad)
        coefficient = max_norm / (total_norm.item() + 1e-6)
        if coefficient < 1.0:  # a NaN norm scales nothing: the caller refuses the update
            flat_grad.mul_(coefficient)
        return total_norm
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


class FlatBuffers:
    """One parameter group re-homed into flat tensors: parameters, gradients and both Adam moments.

    Every parameter's ``.data`` and ``.grad`` and its ``exp_avg``/``exp_avg_sq`` become views of one contiguous
    tensor each, in the group's order, with unchanged values. The fused Adam kernel then updates one tensor
    instead of one per parameter (Adam is elementwise), the gradient clip takes one norm, and the closed-form
    backward writes its gradients straight into ``grad``. Whatever replaces a view (autograd assigning a
    fresh ``.grad``, ``.to()`` moving ``.data``, a reloaded optimizer state) is noticed by :meth:`intact` and
    :meth:`grads_intact`; the caller then steps the parameters one by one.

    :param params: the group's parameters (each with a ``.grad``), all of one dtype and device.
    :param states: their optimizer states, each with ``exp_avg`` and ``exp_avg_sq``.
    """

    def __init__(self, params: list[th.Tensor], states: list[dict[str, Any]]) -> None:
        # every view starts on a 64-byte boundary, as a tensor of its own would: matrix-product kernels may round
        # differently on unaligned data. The padding stays zero (zero gradient, zero moments: Adam leaves it).
        align = max(1, 64 // params[0].element_size())
        starts, total = [], 0
        for param in params:
            starts.append(total)
            total += -(-param.numel() // align) * align
        self.params = list(params)
        self.data = th.zeros(total, dtype=params[0].dtype, device=params[0].device)
        self.grad, self.exp_avg, self.exp_avg_sq = (th.zeros_like(self.data) for _ in range(3))
        self.grads: list[th.Tensor] = []
        self.exp_avgs: list[th.Tensor] = []
        self.exp_avg_sqs: list[th.Tensor] = []
        with th.no_grad():
            for param, state, start in zip(params, states, starts, strict=True):
                end = start + param.numel()
                data = self.data[start:end].view_as(param)
                data.copy_(param.data)
                param.data = data
                self.grads.append(self._adopt(self.grad, start, end, param.grad))
                param.grad = self.grads[-1]
                self.exp_avgs.append(self._adopt(self.exp_avg, start, end, state["exp_avg"]))
                state["exp_avg"] = self.exp_avgs[-1]
                self.exp_avg_sqs.append(self._adopt(self.exp_avg_sq, start, end, state["exp_avg_sq"]))
                state["exp_avg_sq"] = self.exp_avg_sqs[-1]
        self._data_ptrs = [p.data_ptr() for p in params]

    @staticmethod
    def _adopt(flat: th.Tensor, start: int, end: int, values: th.Tensor) -> th.Tensor:
        view = flat[start:end].view_as(values)
        view.copy_(values)
        return view

    @staticmethod
    def eligible(params: list[th.Tensor], states: list[dict[str, Any]]) -> bool:
        """Whether the group can be re-homed: dense tensors of one dtype and device, with gradients and moments.

        :param params: the group's parameters.
        :param states: their optimizer states.
        :return: whether :class:`FlatBuffers` can hold them.
        """
        if not params or os.environ.get("SB3_PPO_EXT_FLAT_BUFFERS", "1") == "0":
            return False
        first = params[0]
        return all(
            p.layout == th.strided
            and p.dtype == first.dtype
            and p.device == first.device
            and p.grad is not None
            and p.grad.shape == p.shape
            and state["exp_avg"].shape == p.shape
            and state["exp_avg_sq"].shape == p.shape
            for p, state in zip(params, states, strict=True)
        )

    def intact(self) -> bool:
        """Whether every parameter's ``.data`` is still its view of :attr:`data` (nothing moved or replaced it).

        :return: whether the parameters live in the flat buffer.
        """
        return all(p.data_ptr() == ptr for p, ptr in zip(self.params, self._data_ptrs, strict=True))

    def grads_intact(self) -> bool:
        """Whether every ``.grad`` is still its view of ``grad`` (written in place, not assigned anew).

        :return: whether ``grad`` holds the current gradients.
        """
        return all(p.grad is g for p, g in zip(self.params, self.grads, strict=True))


class _Group(NamedTuple):
    """What the fused kernel updates in one parameter group: the tensors cached from the optimizer's state."""

    params: list[th.Tensor]
    exp_avgs: list[th.Tensor]
    exp_avg_sqs: list[th.Tensor]
    steps: list[th.Tensor]
    flat: FlatBuffers | None


class LeanAdamStep:
    """``optimizer.step()`` of a fused Adam/AdamW as one direct call of torch's fused kernel per parameter group.

    ``torch.optim.Adam.step`` spends most of its time in Python around the kernel (hooks, profiler records,
    gathering each parameter's state, grouping tensors by device): about 0.2-0.5 ms per call on a 2-core CPU
    against 0.05-0.1 ms for the kernel, which on PPO's small MLPs is a large share of a minibatch step. This
    calls ``torch._fused_adam_`` (``_fused_adamw_``) on the optimizer's own state tensors with the group's
    current hyperparameters: the same arithmetic, bit for bit (``tests/test_optim.py``). After the first full
    step each group is re-homed into :class:`FlatBuffers`, so the kernel (and the gradient clip) runs on one
    tensor per group. It runs ``optimizer.step()`` instead whenever the shortcut might differ: the first step
    (no state yet), state replaced since the last step (``load_state_dict``), parameters moved, a parameter
    without gradient, step hooks, AMP gradient scaling, ``step`` replaced on the instance, or an option the
    shortcut does not handle. ``SB3_PPO_EXT_LEAN_ADAM=0`` turns it off, ``SB3_PPO_EXT_FLAT_BUFFERS=0`` the
    flat buffers alone.

    :param optimizer: a fused Adam/AdamW (see :meth:`supports`).
    """

    def __init__(self, optimizer: th.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.enabled = self.supports(optimizer) and os.environ.get("SB3_PPO_EXT_LEAN_ADAM", "1") != "0"
        self._groups: list[_Group] | None = None  # taken from the optimizer's state after a full step
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
        if self._take_over():
            self._fused_steps()
            return True
        self._full_step()
        return self.enabled and self._can_shortcut()

    def _take_over(self) -> bool:
        """Whether the shortcut holds, after taking over state replaced or parameters moved since the last step.

        A loaded model's optimizer state is taken over (and re-homed into flat buffers) before its first step and
        its first gradient clip, so that the update after a load rounds as every other (a resumed run equals the
        uninterrupted one).
        """
        shortcut = self.enabled and self._can_shortcut()
        if self.enabled and not shortcut:
            self._cache()
            shortcut = self._can_shortcut()
        return shortcut

    def _full_step(self) -> None:
        """``optimizer.step()``: the first step (it creates the state), or one the shortcut must not take."""
        self.optimizer.step()
        self._cache()

    def update_steps(self) -> UpdateSteps:
        """The optimizer steps and gradient clips of one update (one ``train()`` call), checked once.

        :return: an :class:`UpdateSteps`.
        """
        return UpdateSteps(self)

    def flat_grad(self, parameters: list[th.Tensor]) -> th.Tensor | None:
        """The one tensor of which every ``.grad`` of ``parameters`` is a view, or None.

        :param parameters: the parameters to clip (in the optimizer's order).
        :return: the flat gradient of the optimizer's only group when ``parameters`` are exactly its parameters
            and their gradients were written in place; else None.
        """
        groups = self._groups
        if groups is None or len(groups) != 1 or groups[0].flat is None:
            return None
        flat = groups[0].flat
        if len(parameters) != len(flat.params) or any(a is not b for a, b in zip(parameters, flat.params, strict=True)):
            return None
        return flat.grad if flat.grads_intact() else None

    def _shortcut_step(self) -> bool:
        """A step without the full check (within an update); False when some gradient is missing."""
        assert self._groups is not None
        grads = []
        for group in self._groups:
            if group.flat is not None and group.flat.grads_intact():
                grads.append(None)
                continue
            group_grads = [p.grad for p in group.params]
            if any(g is None for g in group_grads):
                return False
            grads.append(group_grads)
        self._fused_steps(grads)
        return True

    def _fused_steps(self, grads: list[list[th.Tensor] | None] | None = None) -> None:
        """The fused kernel on every group's cached state tensors.

        :param grads: each group's gradients if already gathered; None for a group (or all) whose flat
            buffers hold them, or whose ``.grad`` attributes are to be read.
        """
        assert self._groups is not None
        for index, (options, group) in enumerate(zip(self.optimizer.param_groups, self._groups, strict=True)):
            if not group.params:
                continue
            kernel = th._fused_adamw_ if options.get("decoupled_weight_decay", False) else th._fused_adam_
            group.steps[0]._base.add_(1)  # every counter of the group at once: see _shared_step_counters
            group_grads = None if grads is None else grads[index]
            flat = group.flat
            if flat is not None and group_grads is None and flat.grads_intact():
                # one tensor each: the same elementwise update as the per-parameter call
                tensors = ([flat.data], [flat.grad], [flat.exp_avg], [flat.exp_avg_sq], [group.steps[0]])
            else:
                if group_grads is None:
                    group_grads = [p.grad for p in group.params]
                tensors = (group.params, group_grads, group.exp_avgs, group.exp_avg_sqs, group.steps)
            params, group_grads, exp_avgs, exp_avg_sqs, steps = tensors
            beta1, beta2 = options["betas"]
            kernel(
                params,
                group_grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                lr=options["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=options["weight_decay"],
                eps=options["eps"],
                amsgrad=False,
                maximize=options["maximize"],
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
        for options, group in zip(optimizer.param_groups, self._groups, strict=True):
            params = group.params
            if len(options["params"]) != len(params) or any(
                a is not b for a, b in zip(options["params"], params, strict=True)
            ):
                return False
            if group.flat is not None and not group.flat.intact():
                return False  # a parameter moved out of its flat buffer: a full step re-homes them
            for param, exp_avg, exp_avg_sq, step in zip(
                params, group.exp_avgs, group.exp_avg_sqs, group.steps, strict=True
            ):
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
        for options in self.optimizer.param_groups:
            params = [p for p in options["params"] if p.grad is not None]
            if len(params) != len(options["params"]):
                return
            states = [self.optimizer.state.get(p, {}) for p in params]
            if any(not {"exp_avg", "exp_avg_sq", "step"} <= state.keys() for state in states):
                return
            flat = FlatBuffers(params, states) if FlatBuffers.eligible(params, states) else None
            groups.append(
                _Group(
                    params,
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    _shared_step_counters(states),
                    flat,
                )
            )
        self._groups, self._state = groups, self.optimizer.state


class UpdateSteps:
    """The gradient clips and optimizer steps of one update (one ``train()`` call).

    The full check of :class:`LeanAdamStep` (state, hooks, options: a loop over every parameter's state, about
    0.1 ms here) runs at the first step only: nothing outside the update runs between its minibatch steps.
    Every step still checks that each parameter has a gradient.

    :param lean: the optimizer's :class:`LeanAdamStep`.
    """

    def __init__(self, lean: LeanAdamStep) -> None:
        self.lean = lean
        self._checked = False

    def clip_grad_norm(self, parameters: list[th.Tensor], max_norm: float) -> th.Tensor:
        """:func:`clip_grad_norm`, on the flat gradient where the parameters have one.

        :param parameters: the parameters whose ``.grad`` to scale.
        :param max_norm: the largest global L2 norm allowed.
        :return: the global norm before clipping.
        """
        if not self._checked:
            self.lean._take_over()  # a loaded state's flat buffers exist before the update's first clip
        return clip_grad_norm(parameters, max_norm, self.lean.flat_grad(parameters))

    def step(self) -> None:
        """One optimizer step."""
        lean = self.lean
        if self._checked and lean._groups is not None and lean._shortcut_step():
            return
        self._checked = lean._checked_step()

    __call__ = step


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
