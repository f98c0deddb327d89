"""Both networks' hidden layers in NumPy: the closed-form update's forward and backward pass without torch.

Where the heads already run in NumPy (:mod:`sb3_ppo_ext.fast.numpy_head`), the hidden layers are the rest of a
minibatch step: on CartPole's Zoo settings four ``[2, 256, 64]``-sized products and some 20 elementwise operations
and reductions, each a torch call of 2-5 us beside its arithmetic. :class:`NumpyLayers` runs them on NumPy views of
the same ``[2, ...]`` parameter and gradient views :class:`~sb3_ppo_ext.fast.stacked.StackedLayers` uses (the
optimizer's flat buffers), every intermediate in a workspace kept per minibatch size: freeing and allocating
128 KB arrays each step let glibc hand its heap's top back to the OS and fault it in again
(docs/throughput.md, fourth round).

NumPy's products run in its own BLAS (OpenBLAS), held to torch's thread count during the step
(:class:`~sb3_ppo_ext.fast.numpy_head.BlasThreads`). The tanh derivative is ``g - (g h) h``; the results agree with
the torch path to float32 rounding (``tests/test_fast_numpy_layers.py``). Where it is used:
:func:`sb3_ppo_ext.fast.cpu.numpy_layers`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch as th

from sb3_ppo_ext.fast.cpu import NUMPY_LAYERS_MAX_WIDTH, numpy_layers
from sb3_ppo_ext.fast.numpy_head import _array, _grad_array


class _Pair(NamedTuple):
    """One layer of both networks: ``[2, ...]`` arrays (stacked) or a pair of each network's own (see ``arrays``)."""

    weight: Any
    bias: Any
    weight_grad: Any
    bias_grad: Any
    kind: str


class _Workspace:
    """Every array one minibatch size needs: the layers' outputs and the backward pass's gradients."""

    def __init__(self, batch_size: int, widths: list[int]) -> None:
        shape = [(2, batch_size, width) for width in widths]
        self.outs = [np.empty(s, np.float32) for s in shape]  # h_1 .. h_L
        self.grads = [np.empty(s, np.float32) for s in shape]  # dL/dz_l
        self.scratch = [np.empty(s, np.float32) for s in shape]
        self.masks = [np.empty(s, bool) for s in shape]
        self.inputs: list[np.ndarray] = []  # dL/dh_l for l < L, [2, B, width of layer l]
        self.ones = np.ones(batch_size, np.float32)


class NumpyLayers:
    """The stacked hidden layers' forward and backward pass in NumPy, for a kernel :meth:`supports` admits.

    :param kernel: the policy's :class:`~sb3_ppo_ext.fast.kernel.MLPActorCriticKernel`.
    """

    def __init__(self, kernel: Any) -> None:
        self.stacked = kernel.stacked
        self.widths = [pi.weight.shape[0] for pi, _ in self.stacked.pairs]
        self._key: Any = None
        self._arrays: list[_Pair] = []
        self._workspaces: dict[int, _Workspace] = {}

    @staticmethod
    def supports(kernel: Any) -> bool:
        """Whether this CPU's rule picks NumPy for the layers and the policy's layers allow it.

        Both networks must run as a batch of two (:class:`~sb3_ppo_ext.fast.stacked.StackedLayers`), in float32 on
        the CPU, no wider than :data:`~sb3_ppo_ext.fast.cpu.NUMPY_LAYERS_MAX_WIDTH`, and the heads in NumPy.

        :param kernel: the policy's kernel.
        :return: whether :class:`NumpyLayers` can run its hidden layers.
        """
        if not numpy_layers() or kernel.stacked is None or kernel.numpy_head is None:
            return False
        pairs = kernel.stacked.pairs
        return all(pi.weight.shape[0] <= NUMPY_LAYERS_MAX_WIDTH for pi, _ in pairs) and all(
            pi.weight.dtype == th.float32 and pi.weight.device.type == "cpu" for pi, _ in pairs
        )

    def arrays(self) -> tuple[bool, list[_Pair]]:
        """NumPy views of every layer's weights, biases and gradients: ``(stacked, layers)``.

        ``stacked``: each field is a ``[2, ...]`` view of both networks' tensors (the optimizer's flat buffers,
        :meth:`~sb3_ppo_ext.fast.stacked.StackedLayers.views`); else (before the first optimizer step, after a
        load) each is a pair of the networks' own arrays, a missing ``.grad`` created as zeros. Both run the same
        BLAS calls per network (bit for bit the same results), so a resumed run computes as the uninterrupted one.

        :return: ``(stacked, [(weight, bias, weight_grad, bias_grad, kind), ...])``.
        """
        views = self.stacked.views()
        if views is None or any(view.weight_grad is None or view.bias_grad is None for view in views):
            return False, [
                _Pair(
                    (_array(pi.weight), _array(vf.weight)),
                    (_array(pi.bias), _array(vf.bias)),
                    (_grad_array(pi.weight), _grad_array(vf.weight)),
                    (_grad_array(pi.bias), _grad_array(vf.bias)),
                    pi.kind,
                )
                for pi, vf in self.stacked.pairs
            ]
        if views is not self._key:
            self._arrays = [
                _Pair(_array(v.weight), _array(v.bias), v.weight_grad.numpy(), v.bias_grad.numpy(), v.kind)
                for v in views
            ]
            self._key = views
        return True, self._arrays

    def workspace(self, batch_size: int) -> _Workspace:
        """The arrays for minibatches of ``batch_size`` rows (made once per size).

        :param batch_size: the minibatch's rows.
        :return: the workspace.
        """
        workspace = self._workspaces.get(batch_size)
        if workspace is None:
            workspace = self._workspaces[batch_size] = _Workspace(batch_size, self.widths)
            workspace.inputs = [np.empty((2, batch_size, width), np.float32) for width in self.widths[:-1]]
        return workspace

    @staticmethod
    def forward(x: np.ndarray, arrays: tuple[bool, list[_Pair]], workspace: _Workspace) -> list[np.ndarray]:
        """``[h_1, ..., h_L]``, each ``[2, B, out]`` (index 0: the actor, 1: the critic), in the workspace.

        :param x: ``[B, in]`` float32 features both networks read.
        :param arrays: :meth:`arrays`.
        :param workspace: :meth:`workspace` for ``B``.
        :return: the layers' outputs.
        """
        stacked, layers = arrays
        h = x
        for (weight, bias, _, _, kind), out in zip(layers, workspace.outs, strict=True):
            if stacked:
                np.matmul(h, weight.transpose(0, 2, 1), out=out)  # x: [B, in] against both networks' [in, out]
                out += bias
            else:
                for k in (0, 1):
                    np.matmul(h if h.ndim == 2 else h[k], weight[k].T, out=out[k])
                    out[k] += bias[k]
            if kind == "tanh":
                np.tanh(out, out=out)
            else:
                np.maximum(out, 0.0, out=out)
            h = out
        return workspace.outs

    @staticmethod
    def backward(grad: np.ndarray, x: np.ndarray, arrays: tuple[bool, list[_Pair]], workspace: _Workspace) -> None:
        """Backpropagate ``dL/dh_L`` (``[2, B, out]``) through both networks, writing every ``.grad`` in place.

        :param grad: the heads' ``dL/dh`` of the last hidden outputs.
        :param x: the features :meth:`forward` read.
        :param arrays: the arrays :meth:`forward` ran with.
        :param workspace: its workspace.
        """
        stacked, layers = arrays
        outs, ones = workspace.outs, workspace.ones
        for i in range(len(layers) - 1, -1, -1):
            weight, _, weight_grad, bias_grad, kind = layers[i]
            h, dz, scratch = outs[i], workspace.grads[i], workspace.scratch[i]
            if kind == "tanh":  # dL/dz = g (1 - h^2) = g - (g h) h
                np.multiply(grad, h, out=scratch)
                scratch *= h
                np.subtract(grad, scratch, out=dz)
            else:  # dL/dz = g where h > 0
                mask = workspace.masks[i]
                np.greater(h, 0.0, out=mask)
                np.multiply(grad, mask, out=dz)
            inputs = outs[i - 1] if i > 0 else x
            below = None if i == 0 else workspace.inputs[i - 1]  # dL/dh of the layer's input
            # dL/dW = dz^T h_in; dL/db = the rows' sum (ones @ dz); dL/dh_in = dz W
            if stacked:
                np.matmul(dz.transpose(0, 2, 1), inputs, out=weight_grad)
                np.matmul(ones, dz, out=bias_grad)
                if below is not None:
                    np.matmul(dz, weight, out=below)
            else:
                for k in (0, 1):
                    np.matmul(dz[k].T, inputs if inputs.ndim == 2 else inputs[k], out=weight_grad[k])
                    np.matmul(ones, dz[k], out=bias_grad[k])
                    if below is not None:
                        np.matmul(dz[k], weight[k], out=below[k])
            if below is not None:
                grad = below
