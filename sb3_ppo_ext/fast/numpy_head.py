"""The closed-form update's heads in NumPy: the action and value heads, their log-probabilities and gradients.

In a minibatch step of :class:`~sb3_ppo_ext.fast.kernel.MLPActorCriticKernel`, the hidden layers are a few large
operations, but everything after them works on ``[B]`` and ``[B, n_actions]`` arrays: the two head products, the
log-softmax or Gaussian density, the loss's derivatives (:meth:`~sb3_ppo_ext.losses.PPOLoss.with_gradients`), the
head's parameter gradients and the gradient handed back to the layers, some 40 small operations. In PyTorch each
costs its dispatch (3-6 us on these CPUs); a NumPy ufunc on the same memory costs about 1 us. :class:`NumpyHead`
runs that part in NumPy on zero-copy views of the policy's parameters, the layers' outputs and the ``.grad``
tensors, and hands back ``dL/dh`` of both networks as one ``[2, B, hidden]`` tensor for the layers' backward pass.

The formulas are the heads' own (:class:`~sb3_ppo_ext.distributions.CategoricalHead`,
:class:`~sb3_ppo_ext.distributions.DiagGaussianHead`: ``evaluate`` and ``param_grads``) written for NumPy, as
:class:`~sb3_ppo_ext.fast.acting.NumpyActor` does for sampling; the loss's derivatives stay in
:mod:`sb3_ppo_ext.losses`, whose gradient functions take NumPy arrays too. ``tests/test_fast_numpy_head.py``
checks every output and gradient against the torch heads.

NumPy rounds ``exp``/``log`` differently from PyTorch (~1 ulp), so the update's bits change where it is used: the
CPUs where it was measured faster (:func:`sb3_ppo_ext.fast.cpu.numpy_head`). It serves float32 CPU policies with a
Categorical or state-independent diagonal-Gaussian head and steps without action masks or a reference-KL term.
NumPy's products run in its own BLAS (OpenBLAS), whose thread count is not torch's: each step holds it to
``torch.get_num_threads()`` and restores it after (:class:`BlasThreads`), so the update takes the cores the user
gave torch, as the torch path does (with NumPy's default of every core, a step's time swung with the other cores'
load).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import torch as th

from sb3_ppo_ext.distributions import _HALF_LOG_2PI, CategoricalHead
from sb3_ppo_ext.fast.acting import numpy_servable
from sb3_ppo_ext.fast.cpu import numpy_head
from sb3_ppo_ext.losses import OutputGradients, PolicyEvaluation


class BlasThreads:
    """Sets NumPy's OpenBLAS to torch's thread count for a step and back after (``with blas_threads: ...``).

    :param controller: threadpoolctl's controller of NumPy's OpenBLAS.
    """

    def __init__(self, controller: Any) -> None:
        self.controller = controller
        self._previous = 0

    @staticmethod
    @functools.cache
    def find() -> BlasThreads | None:
        """NumPy's bundled OpenBLAS, where threadpoolctl finds it (looked up once).

        :return: a :class:`BlasThreads`, or None (another BLAS, or none found: NumPy does not compute the update).
        """
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - a dependency of the package
            return None
        libraries = [
            library
            for library in ThreadpoolController().select(user_api="blas").lib_controllers
            if library.internal_api == "openblas" and "numpy" in library.filepath  # NumPy's own, not SciPy's
        ]
        return BlasThreads(libraries[0]) if len(libraries) == 1 else None

    def __enter__(self) -> None:
        controller = self.controller
        self._previous = controller.get_num_threads()
        threads = th.get_num_threads()
        if threads != self._previous:
            controller.set_num_threads(threads)

    def __exit__(self, *exc: object) -> None:
        if self.controller.get_num_threads() != self._previous:
            self.controller.set_num_threads(self._previous)


class HeadState(NamedTuple):
    """What :meth:`NumpyHead.backward` needs from :meth:`NumpyHead.evaluate` (NumPy arrays)."""

    pi_h: np.ndarray  # [B, hidden] the actor's last hidden output
    vf_h: np.ndarray  # [B, hidden] the critic's
    actions: np.ndarray  # [B] indices (Categorical) or [B, action_dim]
    saved: tuple[np.ndarray, ...]  # Categorical: (log_p, probs); Gaussian: (z, inv_std)
    entropy: np.ndarray


def _array(values: th.Tensor | np.ndarray) -> np.ndarray:
    return values if isinstance(values, np.ndarray) else values.detach().numpy()


def _grad_array(param: th.Tensor) -> np.ndarray:
    """``param.grad`` as a NumPy view (a zero gradient is created first where there is none)."""
    if param.grad is None:
        param.grad = th.zeros_like(param)
    return param.grad.numpy()


class NumpyHead:
    """The kernel's heads and their gradients in NumPy, for a policy :meth:`supports` admits.

    :param kernel: the policy's :class:`~sb3_ppo_ext.fast.kernel.MLPActorCriticKernel`.
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.categorical = isinstance(kernel.head, CategoricalHead)
        self.log_std = None if self.categorical else kernel.policy.log_std
        self._parameters = [*kernel.action_net, *kernel.value_net, *(() if self.log_std is None else (self.log_std,))]
        self._pointers: list[int] = []
        self._arrays: tuple[np.ndarray, ...] = ()
        self._grad_out: np.ndarray | None = None  # [2, B, hidden], reused: see backward
        self.blas = BlasThreads.find()

    @staticmethod
    def supports(kernel: Any) -> bool:
        """Whether this CPU's rule picks NumPy, NumPy's OpenBLAS is found, and the head, dtype and device allow it.

        :param kernel: the policy's kernel.
        :return: whether :class:`NumpyHead` can stand in for the torch heads.
        """
        if not numpy_head() or not kernel.pi_layers or not kernel.vf_layers or BlasThreads.find() is None:
            return False
        if kernel.pi_layers[-1].weight.shape[0] != kernel.vf_layers[-1].weight.shape[0]:
            return False
        return numpy_servable(kernel)

    def _views(self) -> tuple[np.ndarray, ...]:
        """NumPy views of the head parameters, made again whenever one of them moved (flat buffers, a load)."""
        pointers = [p.data_ptr() for p in self._parameters]
        if pointers != self._pointers:
            self._arrays = tuple(p.detach().numpy() for p in self._parameters)
            self._pointers = pointers
        return self._arrays

    def evaluate(
        self, pi_h: th.Tensor | np.ndarray, vf_h: th.Tensor | np.ndarray, actions: th.Tensor
    ) -> tuple[PolicyEvaluation, HeadState]:
        """``V(s)``, ``log pi(a|s)`` and ``H`` from both networks' last hidden outputs, as NumPy arrays.

        The head's outputs are computed transposed, ``[n_outputs, B]``: NumPy reduces over a short last axis
        slowly (10 us for the max of ``[256, 2]`` along it, 1 us along the first).

        :param pi_h: ``[B, hidden]`` the actor's last hidden output (a tensor or an array).
        :param vf_h: ``[B, hidden]`` the critic's.
        :param actions: the actions taken (indices for a Categorical head).
        :return: the evaluation (NumPy arrays) and what :meth:`backward` needs.
        """
        action_weight, action_bias, value_weight, value_bias, *log_std = self._views()
        pi, vf, taken = _array(pi_h), _array(vf_h), actions.numpy()
        head_out = action_weight @ pi.T  # [n_outputs, B]
        head_out += action_bias[:, None]
        values = (value_weight @ vf.T)[0]
        values += value_bias
        if self.categorical:
            log_prob, entropy, saved = self._categorical(head_out, taken)
        else:
            log_prob, entropy, saved = self._gaussian(head_out, log_std[0], taken)
        return PolicyEvaluation(values, log_prob, entropy), HeadState(pi, vf, taken, saved, entropy)

    @staticmethod
    def _categorical(logits: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
        """``CategoricalHead.evaluate`` on ``[n, B]`` logits: ``log p = log_softmax``, ``log pi(a)``, ``H``."""
        shifted = logits - np.maximum.reduce(logits, axis=0)
        exp = np.exp(shifted)
        total = np.add.reduce(exp, axis=0)
        log_p = shifted - np.log(total)
        probs = exp / total
        log_prob = log_p[actions, np.arange(len(actions))]
        entropy = np.add.reduce(probs * log_p, axis=0)
        np.negative(entropy, out=entropy)
        return log_prob, entropy, (log_p, probs)

    @staticmethod
    def _gaussian(
        mean: np.ndarray, log_std: np.ndarray, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
        """``DiagGaussianHead.evaluate`` on ``[action_dim, B]`` means: ``z = (a - mean) / std``, ``log pi``, ``H``."""
        inv_std = np.exp(-log_std)[:, None]
        z = (actions.reshape(mean.shape[::-1]).T - mean) * inv_std
        log_prob = np.add.reduce(-0.5 * z * z - (log_std[:, None] + _HALF_LOG_2PI), axis=0)
        entropy = np.full(mean.shape[1], (log_std + (0.5 + _HALF_LOG_2PI)).sum(dtype=np.float32), dtype=np.float32)
        return log_prob, entropy, (z, inv_std)

    def backward(self, state: HeadState, grads: OutputGradients) -> np.ndarray:
        """Write the heads' ``.grad`` from ``dL/d(V, log pi, H)``; return ``dL/dh`` of both networks.

        :param state: :meth:`evaluate`'s state.
        :param grads: the loss's derivatives (NumPy arrays, ``PPOLoss.with_gradients``).
        :return: ``[2, B, hidden]`` (the actor's, the critic's): a buffer the next step overwrites.
        """
        action_weight, _, value_weight, _, *_ = self._views()
        grad_log_prob, grad_entropy = grads.log_prob, grads.entropy
        if self.categorical:
            log_p, probs = state.saved
            # d log pi(a) / d logits = onehot(a) - p;  dH / d logits = -p (log p + H)   ([n, B])
            grad_head = probs * -grad_log_prob
            grad_head[state.actions, np.arange(len(state.actions))] += grad_log_prob
            if grad_entropy is not None:
                grad_head -= probs * (log_p + state.entropy) * grad_entropy
        else:
            z, inv_std = state.saved
            # d log pi / d mean = z / std;  d log pi / d log_std = z^2 - 1;  dH / d log_std = 1   ([action_dim, B])
            grad_head = grad_log_prob * z * inv_std
            grad_log_std = grad_log_prob * (z * z - 1.0)
            if grad_entropy is not None:
                grad_log_std += grad_entropy
            assert self.log_std is not None
            np.add.reduce(grad_log_std, axis=1, out=_grad_array(self.log_std))
        action_net, value_net = self.kernel.action_net, self.kernel.value_net
        np.matmul(grad_head, state.pi_h, out=_grad_array(action_net[0]))
        np.add.reduce(grad_head, axis=1, out=_grad_array(action_net[1]))
        grad_values = grads.values
        np.matmul(grad_values[None], state.vf_h, out=_grad_array(value_net[0]))
        _grad_array(value_net[1])[0] = grad_values.sum()
        shape = (2, *state.pi_h.shape)
        grad_out = self._grad_out
        if grad_out is None or grad_out.shape != shape:
            # one buffer for every step: a fresh 128 KB array each step let glibc hand its heap's top back to the
            # OS and fault it in again (docs/throughput.md, fourth round)
            grad_out = self._grad_out = np.empty(shape, np.float32)
        np.matmul(grad_head.T, action_weight, out=grad_out[0])
        np.multiply(grad_values[:, None], value_weight, out=grad_out[1])
        return grad_out
