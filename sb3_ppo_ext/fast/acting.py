"""Acting on a rollout step's few observations in NumPy: the policy's forward pass without torch's per-op cost.

A rollout step runs the policy on one observation per env. At that size a torch operation costs its dispatch
(about 3-6 us each on a 2-core CPU, some 20 of them per step), not its arithmetic, while a NumPy ufunc or
small BLAS call costs about a microsecond. :class:`NumpyActor` runs the same network on zero-copy NumPy views
of the policy's parameters and draws its noise from torch's generator, in the same amount and order as the
torch path (:meth:`~sb3_ppo_ext.fast.kernel.MLPActorCriticKernel.act`), so seeding works as before. It serves
the plain MLP policies :class:`~sb3_ppo_ext.fast.kernel.MLPActorCriticKernel` supports, with a Categorical or
diagonal-Gaussian head (state-independent std), float32 on the CPU, without action masks; the values agree with
the torch path to float32 rounding (``tests/test_fast_acting.py``). ``SB3_PPO_EXT_NUMPY_ACTING=0`` turns it off.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch as th

from sb3_ppo_ext.distributions import _HALF_LOG_2PI, CategoricalHead, DiagGaussianHead
from sb3_ppo_ext.fast.stacked import pair_layers

# above this many rows the matrix products dominate and torch's kernels are as fast or faster
MAX_ROWS = 64
_TINY = np.float32(np.finfo(np.float32).tiny)


def _stack(x: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray, str]]) -> np.ndarray:
    """The hidden layers: ``act(x @ W^T + b)`` for each ``(W^T, b, kind)`` (or ``[2, ...]`` of both networks)."""
    for weight_t, bias, kind in layers:
        x = x @ weight_t
        x += bias
        if kind == "tanh":
            np.tanh(x, out=x)
        else:
            np.maximum(x, 0.0, out=x)
    return x


def numpy_servable(kernel: Any) -> bool:
    """Whether NumPy code can stand in for the kernel's policy (what NumpyActor and NumpyHead both need).

    A Categorical or state-independent diagonal-Gaussian head, every parameter float32 on the CPU.

    :param kernel: the policy's kernel.
    :return: whether the head and parameters allow NumPy.
    """
    head = kernel.head
    if type(head) is DiagGaussianHead:
        if head.state_dependent_std:
            return False
    elif type(head) is not CategoricalHead:
        return False
    return all(p.device.type == "cpu" and p.dtype == th.float32 for p in kernel.policy.parameters())


class NumpyActor:
    """The rollout's ``act`` (actions, values, log-probabilities) in NumPy for a supported kernel's policy.

    :param kernel: an :class:`~sb3_ppo_ext.fast.kernel.MLPActorCriticKernel` for which :meth:`supports` holds.
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.categorical = isinstance(kernel.head, CategoricalHead)
        self.action_shape = tuple(kernel.policy.action_space.shape)
        self._parameters = [
            *[tensor for layer in kernel.pi_layers for tensor in (layer.weight, layer.bias)],
            *[tensor for layer in kernel.vf_layers for tensor in (layer.weight, layer.bias)],
            *kernel.action_net,
            *kernel.value_net,
            *(() if self.categorical else (kernel.policy.log_std,)),
        ]
        self._pointers: list[int] = []
        self._arrays: tuple[Any, ...] = ()

    @staticmethod
    def supports(kernel: Any) -> bool:
        """Whether the kernel's policy is float32 on the CPU with a head this class samples.

        :param kernel: the policy's kernel.
        :return: whether :class:`NumpyActor` can act for it.
        """
        if os.environ.get("SB3_PPO_EXT_NUMPY_ACTING", "1") == "0" or not kernel.flat_float_obs:
            return False
        return numpy_servable(kernel)

    def _views(self) -> tuple[Any, ...]:
        """NumPy views of the parameters, made again whenever one of them moved (flat buffers, a load)."""
        pointers = [p.data_ptr() for p in self._parameters]
        if pointers != self._pointers:
            kernel = self.kernel

            def layers(stack: list[Any]) -> list[tuple[np.ndarray, np.ndarray, str]]:
                return [(layer.weight.detach().numpy().T, layer.bias.detach().numpy(), layer.kind) for layer in stack]

            action_weight, action_bias = (t.detach().numpy() for t in kernel.action_net)
            value_weight, value_bias = (t.detach().numpy() for t in kernel.value_net)
            log_std = None if self.categorical else kernel.policy.log_std.detach().numpy()
            # actor and critic of one shape as a batch of two where their parameters allow (fast.stacked): half
            # the NumPy calls per step, the same products (one BLAS call per network each, as before)
            pairs = None if kernel.stacked is None else pair_layers(kernel.stacked.pairs)
            if pairs is not None:
                pairs = [(w.detach().numpy().transpose(0, 2, 1), b.detach().numpy(), kind) for w, b, kind in pairs]
            self._arrays = (
                layers(kernel.pi_layers),
                layers(kernel.vf_layers),
                pairs,
                (action_weight.T, action_bias),
                (value_weight.T, value_bias),
                log_std,
            )
            self._pointers = pointers
        return self._arrays

    def act(self, obs: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Sample actions for a batch of flat float32 observations.

        :param obs: ``[B, obs_dim]`` float32 or float64 CPU tensor (cast to float32, as preprocessing does),
            ``B <= MAX_ROWS``.
        :return: ``(actions, values [B, 1], log_prob [B])`` as tensors, like the torch path.
        """
        pi_layers, vf_layers, pairs, action_head, value_head, log_std = self._views()
        (action_weight_t, action_bias), (value_weight_t, value_bias) = action_head, value_head
        x = obs.numpy()
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if pairs is not None:
            pi_h, vf_h = _stack(x, pairs)  # [2, B, hidden]
        else:
            pi_h, vf_h = _stack(x, pi_layers), _stack(x, vf_layers)
        head_out = pi_h @ action_weight_t
        head_out += action_bias
        values = vf_h @ value_weight_t
        values += value_bias
        if self.categorical:
            actions, log_prob = self._categorical(head_out)
        else:
            actions, log_prob = self._gaussian(head_out, log_std)
        return th.from_numpy(actions.reshape((-1, *self.action_shape))), th.from_numpy(values), th.from_numpy(log_prob)

    @staticmethod
    def _categorical(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gumbel-max sampling (:func:`~sb3_ppo_ext.distributions.gumbel_max_sample`) and ``log softmax`` there."""
        exponential = th.empty(logits.shape).exponential_().numpy()  # torch's generator: the same stream
        np.maximum(exponential, _TINY, out=exponential)
        actions = (logits - np.log(exponential)).argmax(axis=-1)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_normalizer = np.log(np.exp(shifted).sum(axis=-1))
        log_prob = shifted[np.arange(len(actions)), actions] - log_normalizer
        return actions, log_prob

    @staticmethod
    def _gaussian(mean: np.ndarray, log_std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``mean + std * eps`` and the diagonal Gaussian's ``log pi(a)``, as the head computes them."""
        noise = th.randn(mean.shape).numpy()  # torch's generator: the same stream as randn_like
        actions = mean + np.exp(log_std) * noise
        z = (actions - mean) * np.exp(-log_std)
        log_prob = (-0.5 * z * z - log_std - _HALF_LOG_2PI).sum(axis=-1, dtype=np.float32)
        return actions, log_prob
