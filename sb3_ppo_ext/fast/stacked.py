"""The actor's and the critic's hidden layers as one batch of two: half the operations of two stacks.

PPO's default MLP policy has two networks of the same shape (``net_arch=[64, 64]`` for each), both reading the
same observations. Layer by layer, their matrix products can run as one batched product (``baddbmm``/``bmm`` on
``[2, out, in]``), and their activations and activation derivatives as one elementwise operation on
``[2, B, out]``: the same arithmetic (each matrix of a batched product is computed as the single product would
be), in half the calls, which on a CPU at these sizes is a large part of their cost.

The ``[2, out, in]`` weights are strided views over the storage both networks' parameters live in, which
:class:`~sb3_ppo_ext.optim.FlatBuffers` provides after the first optimizer step: the two layers' weights sit at a
fixed distance from each other, and so do their biases and their gradients. Where they do not (before the first
step, parameters moved, gradients assigned anew), :meth:`StackedLayers.views` says so and the kernel runs the two
stacks one after the other.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import numpy as np
import torch as th

from sb3_ppo_ext.fast.cpu import NARROW_INPUT, fused_tanh, numpy_tanh, transposed_narrow_grads

_NUMPY_FLOATS = (th.float32, th.float64)
_RELU_BACKWARD = th.ops.aten.threshold_backward.default
_TANH_BACKWARD = th.ops.aten.tanh_backward.default


# the forms this CPU runs fastest (fast/cpu.py says which and why)
FUSED_TANH = fused_tanh()
NUMPY_TANH = numpy_tanh()
TRANSPOSED_NARROW_GRADS = transposed_narrow_grads()

# below this many elements (per network) tanh_ (one op) beats the four ops of the sigmoid form; the kernel's
# separate stacks use the same constants
_SMALL_TANH = sys.maxsize if FUSED_TANH or NUMPY_TANH else 2048


def tanh_(z: th.Tensor) -> th.Tensor:
    """``tanh(z)`` in place: NumPy's kernel where ``NUMPY_TANH`` holds, else PyTorch's.

    NumPy's applies to float32 and float64 CPU tensors without grad (a half-precision policy keeps PyTorch's).

    :param z: a fresh pre-activation (the layer's product), overwritten.
    :return: ``z``.
    """
    if NUMPY_TANH and z.is_cpu and not z.requires_grad and z.dtype in _NUMPY_FLOATS:
        array = z.numpy()
        np.tanh(array, out=array)
        return z
    return th.tanh_(z)


def tanh_grad(grad: th.Tensor, h: th.Tensor) -> th.Tensor:
    """``grad * tanh'(z)`` from the layer's output ``h = tanh(z)``: ``grad * (1 - h^2)`` in the platform's form.

    :param grad: ``dL/dh``.
    :param h: the layer's output.
    :return: ``dL/dz``.
    """
    if FUSED_TANH or NUMPY_TANH:  # PyTorch's fused derivative: 6.3 against 16 us at [2, 256, 64] on both CPUs
        return _TANH_BACKWARD(grad, h)
    # one op fewer than grad * (1 - h * h); the committed AVX2 results were made with this form
    return th.addcmul(grad, grad * h, h, value=-1.0)


def weight_grad(grad: th.Tensor, inputs: th.Tensor, out: th.Tensor | None = None) -> th.Tensor:
    """A layer's weight gradient ``grad^T @ inputs`` (``[..., out, in]``; one layer or a batch of two).

    Layers of few inputs take ``(inputs^T @ grad)^T`` where ``TRANSPOSED_NARROW_GRADS`` holds (fast/cpu.py).

    :param grad: ``dL/dz``, ``[B, out]`` or ``[2, B, out]``.
    :param inputs: the layer's inputs, ``[B, in]`` or ``[2, B, in]``.
    :param out: the tensor to write into (the parameter's ``.grad``), or None for a new one.
    :return: the gradient (``out`` when given).
    """
    product = th.bmm if grad.dim() == 3 else th.mm
    if TRANSPOSED_NARROW_GRADS and inputs.shape[-1] < NARROW_INPUT:
        transposed = product(inputs.transpose(-2, -1), grad).transpose(-2, -1)
        return transposed.contiguous() if out is None else out.copy_(transposed)
    return product(grad.transpose(-2, -1), inputs, out=out)


class _PairViews(NamedTuple):
    """One layer of both networks as ``[2, ...]`` views: weights, biases (``[2, 1, out]``) and their gradients."""

    weight: th.Tensor
    bias: th.Tensor
    weight_grad: th.Tensor | None  # None: the gradients are not views of one storage
    bias_grad: th.Tensor | None
    kind: str


def _pair_view(first: th.Tensor, second: th.Tensor, shape: tuple[int, ...], inner: tuple[int, ...]) -> th.Tensor | None:
    """``[2, *shape]`` strided view of two same-shaped contiguous tensors of one storage, ``second`` after ``first``."""
    if first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr():
        return None
    if not (first.is_contiguous() and second.is_contiguous()):
        return None
    distance = second.storage_offset() - first.storage_offset()
    if distance <= 0:
        return None
    return first.as_strided((2, *shape), (distance, *inner), first.storage_offset())


def _layer_views(pi: Any, vf: Any) -> _PairViews | None:
    """The pair's views, or None when the parameters are not laid out for it."""
    out_features, in_features = pi.weight.shape
    weight = _pair_view(pi.weight, vf.weight, (out_features, in_features), (in_features, 1))
    bias = _pair_view(pi.bias, vf.bias, (1, out_features), (0, 1))
    if weight is None or bias is None:
        return None
    weight_grad = bias_grad = None
    if all(t.grad is not None for t in (pi.weight, vf.weight, pi.bias, vf.bias)):
        weight_grad = _pair_view(pi.weight.grad, vf.weight.grad, (out_features, in_features), (in_features, 1))
        bias_grad = _pair_view(pi.bias.grad, vf.bias.grad, (out_features,), (1,))
        if weight_grad is None or bias_grad is None:
            weight_grad = bias_grad = None
    return _PairViews(weight, bias, weight_grad, bias_grad, pi.kind)


def pair_layers(pairs: list[tuple[Any, Any]]) -> list[tuple[th.Tensor, th.Tensor, str]] | None:
    """Both networks' weights ``[2, out, in]`` and biases ``[2, 1, out]`` per layer, or None where not laid out so.

    :param pairs: ``(actor layer, critic layer)`` per layer (:attr:`StackedLayers.pairs`).
    :return: ``(weights, biases, kind)`` per layer (views of the parameters), or None.
    """
    views = [_layer_views(pi, vf) for pi, vf in pairs]
    if any(view is None for view in views):
        return None
    return [(view.weight, view.bias, view.kind) for view in views if view is not None]


class StackedLayers:
    """Both networks' hidden layers run as a batch of two, where their parameters' layout allows it.

    :param pi_layers: the actor's layers (the kernel's ``_Layer`` tuples: weight, bias, kind).
    :param vf_layers: the critic's layers, of the same shapes and activations.
    """

    def __init__(self, pi_layers: list[Any], vf_layers: list[Any]) -> None:
        self.pairs = list(zip(pi_layers, vf_layers, strict=True))
        self._parameters = [
            param for pi, vf in self.pairs for layer in (pi, vf) for param in (layer.weight, layer.bias)
        ]
        self._key: list[int] = []
        self._views: list[_PairViews] | None = None

    @staticmethod
    def supports(pi_layers: list[Any], vf_layers: list[Any]) -> bool:
        """Whether both networks have the same layer shapes and activations (and at least one layer).

        :param pi_layers: the actor's layers.
        :param vf_layers: the critic's layers.
        :return: whether they can run as a batch of two.
        """
        return len(pi_layers) == len(vf_layers) > 0 and all(
            pi.weight.shape == vf.weight.shape and pi.kind == vf.kind and pi.weight.dtype == vf.weight.dtype
            for pi, vf in zip(pi_layers, vf_layers, strict=True)
        )

    def views(self) -> list[_PairViews] | None:
        """Every layer's ``[2, ...]`` views, or None when the parameters are not laid out for them.

        :return: the views (rebuilt whenever a parameter or gradient moved), or None.
        """
        # every minibatch step asks: one flat comprehension over the parameters, not four nested generators
        key = [p.data_ptr() for p in self._parameters] + [
            0 if (grad := p.grad) is None else grad.data_ptr() for p in self._parameters
        ]
        if key != self._key:
            views = [_layer_views(pi, vf) for pi, vf in self.pairs]
            self._views = None if any(v is None for v in views) else views  # type: ignore[assignment]
            self._key = key
        return self._views

    @staticmethod
    def forward(x: th.Tensor, views: list[_PairViews]) -> list[th.Tensor]:
        """``[x as [2, B, in], h1, ..., hL]``, each ``h`` ``[2, B, out]`` (index 0: the actor, 1: the critic).

        :param x: ``[B, in]`` features both networks read.
        :param views: :meth:`views`.
        :return: every layer's input and the last output.
        """
        outs = [x.expand(2, *x.shape)]
        for weight, bias, _, _, kind in views:
            h = outs[-1]
            if kind == "tanh" and h.shape[1] * weight.shape[1] > _SMALL_TANH:
                # as kernel._forward: 2 z straight from the product (exact), then 2 sigmoid(2 z) - 1
                z2 = th.baddbmm(bias, h, weight.transpose(1, 2), beta=2.0, alpha=2.0)
                outs.append(th.sigmoid_(z2).mul_(2.0).sub_(1.0))
                continue
            z = th.baddbmm(bias, h, weight.transpose(1, 2))
            outs.append(tanh_(z) if kind == "tanh" else th.relu_(z))
        return outs

    def backward(self, grad: th.Tensor, outs: list[th.Tensor], views: list[_PairViews]) -> None:
        """Backpropagate ``[2, B, out]`` output gradients through both networks, writing every ``.grad``.

        :param grad: ``dL/dh_L`` of the actor (index 0) and the critic (index 1).
        :param outs: :meth:`forward`'s activations.
        :param views: the views :meth:`forward` ran with.
        """
        for i in range(len(views) - 1, -1, -1):
            weight, _, weight_grads, bias_grad, kind = views[i]
            h = outs[i + 1]
            if kind == "tanh":
                grad = tanh_grad(grad, h)
            else:
                grad = _RELU_BACKWARD(grad, h, 0)
            inputs = outs[i]
            if weight_grads is not None and bias_grad is not None:
                weight_grad(grad, inputs, out=weight_grads)
                th.sum(grad, 1, out=bias_grad)
            else:
                for k, layer in enumerate(self.pairs[i]):
                    layer.weight.grad = weight_grad(grad[k], inputs[k])
                    layer.bias.grad = grad[k].sum(0)
            if i > 0:
                grad = th.bmm(grad, weight)
