"""Hand-derived PPO gradients for plain MLP actor-critics: the same update as autograd, in fewer ops.

On a CPU, a PPO minibatch step on a small MLP is dominated by per-operation overhead (autograd graph
bookkeeping, one small kernel per node), not by arithmetic. For the most common policy, our
:class:`~sb3_ppo_ext.policies.ActorCriticPolicy` with a parameter-free features extractor
(``Flatten``), ``Linear``/``Tanh``/``ReLU`` stacks and a Categorical or diagonal-Gaussian head, the
backward pass has a short closed form: the forward pass keeps the activations, and the loss's
derivatives with respect to ``V``, ``log pi`` and ``H`` (:meth:`sb3_ppo_ext.losses.PPOLoss.with_gradients`)
go back through the head (:meth:`~sb3_ppo_ext.distributions.ActionHead.param_grads`) and the layers in a
handful of matrix products. No loss formula lives here.

:meth:`MLPActorCriticKernel.supports` admits only policies whose acting and evaluation code is exactly
ours; anything else (CNNs, Dict observations, gSDE, MultiDiscrete, MultiBinary, overridden methods,
custom modules, hooks, extra or frozen parameters) goes through autograd.
``tests/test_fast_kernel.py`` checks losses and parameter updates against a plain autograd step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch as th
import torch.nn.functional as F  # noqa: N812
from gymnasium import spaces
from stable_baselines3.common.torch_layers import FlattenExtractor
from torch import nn
from torch.nn.modules import module as torch_module

from sb3_ppo_ext.distributions import CategoricalHead, DiagGaussianHead, HeadEvaluation
from sb3_ppo_ext.fast.acting import MAX_ROWS, NumpyActor
from sb3_ppo_ext.fast.numpy_head import HeadState, NumpyHead
from sb3_ppo_ext.fast.numpy_layers import NumpyLayers
from sb3_ppo_ext.fast.stacked import _RELU_BACKWARD, _SMALL_TANH, StackedLayers, tanh_, tanh_grad, weight_grad
from sb3_ppo_ext.losses import OutputGradients, PolicyEvaluation
from sb3_ppo_ext.matmul import FastLinear, addmm, mm
from sb3_ppo_ext.policies import ActorCriticMLP, ActorCriticPolicy

# the layer types whose forward pass is exactly x @ W^T + b
_PLAIN_LINEARS = (nn.Linear, FastLinear)
# the policy methods the kernel stands in for (directly or through the ones that call them): an
# override of any of them in a subclass must run, so such a policy goes through autograd
_REPLACED_METHODS = (
    "forward",
    "_predict",
    "evaluate_actions",
    "evaluate_with_params",
    "_evaluate_latents",
    "predict_values",
    "extract_features",
    "get_distribution",
    "_latents",
    "_act",
    "_actor_latent",
    "_head_params",
    "split_head_output",
    "mask_tensor",
)


def _stack_layers(sequential: nn.Sequential) -> list[tuple[nn.Linear, str]] | None:
    """``[(linear, "tanh" | "relu"), ...]`` for a Linear/activation stack, else None."""
    modules = list(sequential)
    if len(modules) % 2:
        return None
    layers = []
    for linear, activation in zip(modules[::2], modules[1::2], strict=True):
        if type(linear) not in _PLAIN_LINEARS:
            return None
        if type(activation) is nn.Tanh:
            layers.append((linear, "tanh"))
        elif type(activation) is nn.ReLU:
            layers.append((linear, "relu"))
        else:
            return None
    return layers


def _tanh(z: th.Tensor) -> th.Tensor:
    """``tanh(z)`` in place on a fresh tensor; ``2 sigmoid(2 z) - 1`` for large tensors.

    On the AMD EPYC VMs measured (AVX2 and AVX512), PyTorch's CPU tanh kernel was about 3x slower than its sigmoid
    on a 256x64 minibatch; the sigmoid form agrees with ``torch.tanh`` to within 2.5e-7 (absolute). For the small
    batches of acting (8 x 64), and at every size where ``stacked.FUSED_TANH`` (Intel AVX512) or
    ``stacked.NUMPY_TANH`` (AMD AVX512) holds, one ``tanh_`` call is faster. The backward pass only needs ``1 - h^2``.
    """
    if z.numel() <= _SMALL_TANH:
        return tanh_(z)
    return th.sigmoid_(z.mul_(2.0)).mul_(2.0).sub_(1.0)


def _addmm(bias: th.Tensor, x: th.Tensor, weight: th.Tensor, onednn: bool) -> th.Tensor:
    # F.linear is addmm(bias, x, weight.t()) in one call from Python (the transpose happens in C++)
    return addmm(bias, x, weight) if onednn else F.linear(x, weight, bias)


def _mm(a: th.Tensor, b: th.Tensor, onednn: bool) -> th.Tensor:
    return mm(a, b) if onednn else a @ b


def _write_grad(param: th.Tensor, grad: th.Tensor, inputs: th.Tensor, onednn: bool) -> None:
    """``param.grad = grad^T @ inputs`` (``stacked.weight_grad``), into the existing ``.grad`` when there is one.

    Reusing the buffers avoids allocating and freeing every weight gradient on every minibatch (256 KB
    each for a 256x256 layer), which let glibc's heap grow by a few MB over a run.
    """
    if onednn:
        param.grad = mm(grad.t(), inputs)
    elif param.grad is not None:
        weight_grad(grad, inputs, out=param.grad)
    else:
        param.grad = weight_grad(grad, inputs)


class _Layer(NamedTuple):
    """One layer of a stack: its parameters (held directly: ``Module.__getattr__`` costs on every access)."""

    weight: nn.Parameter
    bias: nn.Parameter
    kind: str  # "tanh" | "relu"


def _layers(sequential: nn.Sequential) -> list[_Layer]:
    stack = _stack_layers(sequential)
    assert stack is not None, "use MLPActorCriticKernel.supports() first"
    return [_Layer(linear.weight, linear.bias, kind) for linear, kind in stack]


def _write_bias_grad(bias: th.Tensor, grad: th.Tensor, onednn: bool) -> None:
    """``bias.grad = grad.sum(0)``, into the existing ``.grad`` tensor when there is one."""
    if bias.grad is not None and not onednn:
        th.sum(grad, 0, out=bias.grad)
    else:
        bias.grad = grad.sum(0)


def _forward(x: th.Tensor, layers: list[_Layer], onednn: bool) -> list[th.Tensor]:
    """Inputs of every layer plus the final output: ``[x, h1, ..., hL]``."""
    outs = [x]
    for weight, bias, kind in layers:
        h = outs[-1]
        if kind == "tanh" and not onednn and h.shape[0] * weight.shape[0] > _SMALL_TANH:
            # the sigmoid form's 2 z straight from the matrix product (alpha = beta = 2): scaling by a power of
            # two is exact, so this is 2 * (x W^T + b) bit for bit, one operation fewer
            z2 = th.addmm(bias, h, weight.t(), beta=2.0, alpha=2.0)
            outs.append(th.sigmoid_(z2).mul_(2.0).sub_(1.0))
            continue
        z = _addmm(bias, h, weight, onednn)
        outs.append(_tanh(z) if kind == "tanh" else th.relu_(z))
    return outs


def _backward(grad: th.Tensor, outs: list[th.Tensor], layers: list[_Layer], onednn: bool) -> None:
    """Backpropagate ``dL/dh_L`` through the stack, writing ``.grad`` of every weight and bias."""
    for i in range(len(layers) - 1, -1, -1):
        weight, bias, kind = layers[i]
        h = outs[i + 1]
        if kind == "tanh":
            grad = tanh_grad(grad, h)
        else:
            # grad * (h > 0) as autograd's fused kernel: same values, 10 instead of 42-54 us for 64 x 256 here
            grad = _RELU_BACKWARD(grad, h, 0)
        _write_grad(weight, grad, outs[i], onednn)
        _write_bias_grad(bias, grad, onednn)
        if i > 0:
            grad = _mm(grad, weight, onednn)


class Activations(NamedTuple):
    """What the backward pass of one minibatch needs from its forward pass."""

    pi_outs: list[th.Tensor]
    vf_outs: list[th.Tensor]
    head_params: tuple[th.Tensor, ...]
    head_evaluation: HeadEvaluation
    reference_params: tuple[th.Tensor, ...] | None = None  # the reference's head parameters (the KL term)
    stacked: tuple[list[th.Tensor], list[Any]] | None = None  # both networks as a batch of two: outs, views
    numpy_head: HeadState | None = None  # the heads ran in NumPy (fast.numpy_head): the evaluation is NumPy arrays
    numpy_layers: tuple[Any, ...] | None = None  # the hidden layers too (fast.numpy_layers): (x, arrays, workspace)


def _has_hooks(module: nn.Module) -> bool:
    """Module or parameter hooks anywhere inside ``module``: the kernel would skip them, autograd runs them."""
    for sub in module.modules():
        if sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or sub._backward_pre_hooks:
            return True
    # global module hooks (torch.nn.modules.module.register_module_*_hook) apply to every module
    global_hooks = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    global_hooks += ("_global_backward_pre_hooks",)
    if any(getattr(torch_module, name, None) for name in global_hooks):
        return True
    return any(
        getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None)
        for p in module.parameters()
    )


class MLPActorCriticKernel:
    """Acting, evaluation and hand-derived gradients for a plain MLP :class:`ActorCriticPolicy`.

    :param policy: the policy; check :meth:`supports` first.
    """

    def __init__(self, policy: ActorCriticPolicy) -> None:
        self.policy = policy
        self.pi_layers = _layers(policy.mlp_extractor.policy_net)
        self.vf_layers = _layers(policy.mlp_extractor.value_net)
        # the heads: (weight, bias)
        self.action_net = (policy.action_net.weight, policy.action_net.bias)
        self.value_net = (policy.value_net.weight, policy.value_net.bias)
        assert policy.action_head is not None
        self.head = policy.action_head
        self.onednn = bool(getattr(policy, "onednn_matmul", False))
        space = policy.observation_space
        self.flat_float_obs = isinstance(space, spaces.Box) and len(space.shape) == 1
        # a rollout step's few rows: acting in NumPy (fast.acting) skips torch's per-operation cost
        self.numpy_actor = NumpyActor(self) if NumpyActor.supports(self) else None
        # actor and critic of one shape: their layers as a batch of two (fast.stacked)
        stackable = not self.onednn and StackedLayers.supports(self.pi_layers, self.vf_layers)
        self.stacked = StackedLayers(self.pi_layers, self.vf_layers) if stackable else None
        # the heads and the loss's derivatives in NumPy where this CPU's rule says so (fast.numpy_head)
        self.numpy_head = NumpyHead(self) if not self.onednn and NumpyHead.supports(self) else None
        # and the hidden layers, where they are narrow (fast.numpy_layers)
        self.numpy_layers = NumpyLayers(self) if NumpyLayers.supports(self) else None

    @staticmethod
    def owned_parameters(policy: ActorCriticPolicy) -> list[nn.Parameter] | None:
        """The parameters whose gradients the kernel writes, or None when the networks are not plain stacks.

        :param policy: the policy.
        :return: the parameters, or None.
        """
        stacks = (_stack_layers(policy.mlp_extractor.policy_net), _stack_layers(policy.mlp_extractor.value_net))
        if any(stack is None for stack in stacks):
            return None
        linears = [linear for stack in stacks for linear, _ in stack or ()] + [policy.action_net, policy.value_net]
        owned = [p for linear in linears for p in (linear.weight, linear.bias)]
        if isinstance(policy.action_head, DiagGaussianHead) and not policy.state_dependent_std:
            owned.append(policy.log_std)
        return owned

    @classmethod
    def supports(cls, policy: Any) -> bool:
        """True when the policy's acting and evaluation code is exactly ours and the kernel owns every gradient.

        :param policy: the policy.
        :return: whether the kernel can act for it and differentiate it.
        """
        if not isinstance(policy, ActorCriticPolicy) or policy.sde_dist is not None:
            return False
        if any(getattr(type(policy), name) is not getattr(ActorCriticPolicy, name) for name in _REPLACED_METHODS):
            return False
        extractors = (policy.pi_features_extractor, policy.vf_features_extractor)
        if any(type(extractor) is not FlattenExtractor for extractor in extractors):
            return False
        if type(policy.mlp_extractor) is not ActorCriticMLP or type(policy.action_head) not in (
            CategoricalHead,
            DiagGaussianHead,
        ):
            return False
        if any(type(head) not in _PLAIN_LINEARS for head in (policy.action_net, policy.value_net)):
            return False
        if _has_hooks(policy) or getattr(policy, "training_params_transform", None) is not None:
            return False
        owned = cls.owned_parameters(policy)
        if owned is None:
            return False
        # extra parameters (a subclass's own) need autograd; frozen ones keep no gradient under autograd
        parameters = list(policy.parameters())
        return {id(p) for p in parameters} == {id(p) for p in owned} and all(p.requires_grad for p in parameters)

    def _features(self, obs: Any) -> tuple[th.Tensor, th.Tensor]:
        """Actor and critic inputs (the same tensor when the extractor is shared)."""
        policy = self.policy
        if self.flat_float_obs and isinstance(obs, th.Tensor) and obs.dtype == th.float32:
            # a flat float Box: preprocessing (.float()) and Flatten are both the identity
            return obs, obs
        features = policy.extract_features(obs, policy.pi_features_extractor)
        if policy.vf_features_extractor is policy.pi_features_extractor:
            return features, features
        return features, policy.extract_features(obs, policy.vf_features_extractor)

    def _hidden(self, obs: Any) -> tuple[list[th.Tensor], list[th.Tensor], Any]:
        """Layer activations of both stacks and the stacked state.

        Where both networks run as a batch of two (:mod:`sb3_ppo_ext.fast.stacked`), the per-network lists hold
        their last outputs only and the last element is ``(outs, views)`` for the backward pass; else None.
        """
        features, vf_features = self._features(obs)
        views = self.stacked.views() if self.stacked is not None and features is vf_features else None
        if views is not None:
            outs = StackedLayers.forward(features, views)
            return [outs[-1][0]], [outs[-1][1]], (outs, views)
        return _forward(features, self.pi_layers, self.onednn), _forward(vf_features, self.vf_layers, self.onednn), None

    def _forward(
        self, obs: Any, action_masks: Any = None
    ) -> tuple[list[th.Tensor], list[th.Tensor], tuple[th.Tensor, ...], th.Tensor, Any]:
        """:meth:`_hidden`, then the head's (masked) parameters and ``V(s)`` as ``[B, 1]``.

        A masked Categorical is the same head on logits with the invalid ones at ``MASKED_LOGIT``: its
        probabilities there are exactly 0, so ``param_grads`` needs no change and gives them no gradient.
        """
        policy = self.policy
        pi_outs, vf_outs, stacked = self._hidden(obs)
        head_out = F.linear(pi_outs[-1], *self.action_net)
        values = F.linear(vf_outs[-1], *self.value_net)
        params = policy.split_head_output(head_out)
        if action_masks is not None:
            params = self.head.mask(params, policy.mask_tensor(action_masks))
        return pi_outs, vf_outs, params, values, stacked

    def act(self, obs: Any, action_masks: Any = None) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """``policy.forward(obs)`` without per-module call overhead: ``(actions, values [B, 1], log_prob)``.

        :param obs: a batch of observations.
        :param action_masks: invalid-action masks, or None.
        :return: ``(actions, values [B, 1], log_prob [B])``.
        """
        numpy_actor = self.numpy_actor
        if (
            numpy_actor is not None
            and action_masks is None
            and isinstance(obs, th.Tensor)
            and obs.dtype in (th.float32, th.float64)  # a float64 Box: preprocessing's .float() in NumPy
            and obs.device.type == "cpu"
            and obs.dim() == 2
            and obs.shape[0] <= MAX_ROWS
        ):
            return numpy_actor.act(obs)
        _, _, params, values, _ = self._forward(obs, action_masks)
        actions = self.head.sample(params, deterministic=False)
        log_prob = self.head.log_prob(params, actions)
        return actions.reshape((-1, *self.policy.action_space.shape)), values, log_prob

    def evaluate(
        self,
        obs: Any,
        actions: th.Tensor,
        action_masks: Any = None,
        reference_params: tuple[th.Tensor, ...] | None = None,
    ) -> tuple[PolicyEvaluation, Activations]:
        """``policy.evaluate_actions`` (values flattened) and the activations :meth:`backward` needs.

        Call :meth:`backward` with these activations before the next ``evaluate`` of a minibatch of the same size:
        where the layers run in NumPy, their activations live in a workspace that the next one overwrites.

        :param obs: a batch of observations.
        :param actions: the actions taken.
        :param action_masks: invalid-action masks, or None.
        :param reference_params: the reference policy's head parameters on the same observations: the evaluation
            then carries ``KL(pi || pi_ref)`` per sample (the reference-KL term, ``ref_kl_mode="loss"``).
        :return: the policy's evaluation and the activations.
        """
        numpy_head = self.numpy_head
        if numpy_head is not None and action_masks is None and reference_params is None:
            return self._evaluate_numpy(numpy_head, obs, actions)
        pi_outs, vf_outs, params, values, stacked = self._forward(obs, action_masks)
        head_evaluation = self.head.evaluate(params, actions)
        ref_kl = None if reference_params is None else self.head.kl(params, reference_params)
        evaluation = PolicyEvaluation(values.squeeze(1), head_evaluation.log_prob, head_evaluation.entropy, ref_kl)
        return evaluation, Activations(pi_outs, vf_outs, params, head_evaluation, reference_params, stacked)

    def _evaluate_numpy(
        self, numpy_head: NumpyHead, obs: Any, actions: th.Tensor
    ) -> tuple[PolicyEvaluation, Activations]:
        """:meth:`evaluate` with the heads in NumPy, and the hidden layers too where :class:`NumpyLayers` runs them."""
        no_head = HeadEvaluation(None, None)  # type: ignore[arg-type]
        features = None if self.numpy_layers is None else self._features(obs)[0]
        with numpy_head.blas:  # NumPy's BLAS on torch's threads
            if features is not None and features.dtype == th.float32:
                assert self.numpy_layers is not None
                arrays = self.numpy_layers.arrays()
                x = features.detach().numpy()
                workspace = self.numpy_layers.workspace(x.shape[0])
                outs = NumpyLayers.forward(x, arrays, workspace)
                evaluation, state = numpy_head.evaluate(outs[-1][0], outs[-1][1], actions)
                return evaluation, Activations([], [], (), no_head, None, None, state, (x, arrays, workspace))
            pi_outs, vf_outs, stacked = self._hidden(obs)
            evaluation, state = numpy_head.evaluate(pi_outs[-1], vf_outs[-1], actions)
        return evaluation, Activations(pi_outs, vf_outs, (), no_head, None, stacked, state)

    def backward(self, activations: Activations, grads: OutputGradients) -> None:
        """Set ``.grad`` of every policy parameter from ``dL/d(V, log pi, H)`` (chain rule, by hand).

        :param activations: what :meth:`evaluate` kept of the forward pass.
        :param grads: ``dL/d(V, log pi, H, KL_ref)`` per sample (``PPOLoss.with_gradients``).
        """
        policy = self.policy
        pi_outs, vf_outs, params, head_evaluation, reference_params, stacked, numpy_state, numpy_layers = activations
        if numpy_state is not None:
            assert self.numpy_head is not None
            with self.numpy_head.blas:
                grad = self.numpy_head.backward(numpy_state, grads)
                if numpy_layers is not None:
                    NumpyLayers.backward(grad, *numpy_layers)
                    return
            self._backward_hidden(th.from_numpy(grad), pi_outs, vf_outs, stacked)
            return
        param_grads = self.head.param_grads(params, head_evaluation, grads.log_prob, grads.entropy)
        if grads.ref_kl is not None:
            assert reference_params is not None, "evaluate() without reference_params has no KL term"
            kl_grads = self.head.kl_grads(params, reference_params, grads.ref_kl)
            param_grads = tuple(g + k for g, k in zip(param_grads, kl_grads, strict=True))
        if isinstance(self.head, DiagGaussianHead) and not self.head.state_dependent_std:
            grad_head, (grad_log_std,) = param_grads[0], param_grads[1:]
            _write_bias_grad(policy.log_std, grad_log_std, False)  # in place: it may be a view of a flat buffer
        else:
            # the inverse of policy.split_head_output: one gradient row per head output
            grad_head = th.cat(param_grads, dim=1) if len(param_grads) > 1 else param_grads[0]
        grad_values = grads.values.unsqueeze(1)
        (action_weight, action_bias), (value_weight, value_bias) = self.action_net, self.value_net
        _write_grad(action_weight, grad_head, pi_outs[-1], False)
        _write_bias_grad(action_bias, grad_head, False)
        _write_grad(value_weight, grad_values, vf_outs[-1], False)
        _write_bias_grad(value_bias, grad_values, False)
        if stacked is not None:
            grad = th.empty((2, *pi_outs[-1].shape), dtype=grad_head.dtype, device=grad_head.device)
            th.mm(grad_head, action_weight, out=grad[0])
            th.mm(grad_values, value_weight, out=grad[1])
            self._backward_hidden(grad, pi_outs, vf_outs, stacked)
            return
        if self.pi_layers:
            _backward(grad_head @ action_weight, pi_outs, self.pi_layers, self.onednn)
        if self.vf_layers:
            _backward(grad_values @ value_weight, vf_outs, self.vf_layers, self.onednn)

    def _backward_hidden(
        self, grad: th.Tensor, pi_outs: list[th.Tensor], vf_outs: list[th.Tensor], stacked: Any
    ) -> None:
        """Backpropagate ``dL/dh`` of both networks' last hidden outputs (``[2, B, hidden]``) through their layers."""
        if stacked is not None:
            assert self.stacked is not None
            self.stacked.backward(grad, *stacked)
            return
        _backward(grad[0], pi_outs, self.pi_layers, self.onednn)
        _backward(grad[1], vf_outs, self.vf_layers, self.onednn)
