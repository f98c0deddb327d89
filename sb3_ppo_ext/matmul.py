"""Large CPU matrix products through oneDNN: the same ``x @ W^T + b``, about twice as fast here.

PyTorch computes ``nn.Linear`` and ``@`` on a CPU with its BLAS (MKL in the official wheels), but its
convolutions with oneDNN. On CPUs where MKL does not pick its fastest kernels (AMD EPYC on the
benchmark machine), oneDNN's matrix product is about 2.2x faster for the products that dominate PPO's
bigger networks: NatureCNN's 3136x512 layer (3.4 vs 7.7 ms forward at batch 256) and 256x256 MuJoCo
layers at batch 64 (50 vs 83 us). Small products (CartPole's 64-unit layers) stay on the BLAS, where
oneDNN's per-call overhead loses.

The values are the same product up to float rounding order. oneDNN is used only for float32 CPU
tensors when the product has at least :data:`MIN_MACS` multiply-adds and a one-time probe confirmed
that the installed torch has the kernel and that it agrees with the BLAS; otherwise everything goes
through ``torch.addmm``/``torch.mm`` as usual. A policy opts in with its ``onednn_matmul`` argument
(default: :func:`wants_onednn_matmul`, i.e. CNN policies and very large layers, because oneDNN's
first use costs ~7 MB of resident memory). Switch it off everywhere with
``SB3_PPO_EXT_ONEDNN_MATMUL=0`` or :func:`set_onednn_matmul`.
"""

from __future__ import annotations

import os
from typing import Any

import torch as th
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

# smallest rows * inner * columns product sent to oneDNN (below it, its call overhead loses)
MIN_MACS = 2**21

_state: dict[str, bool | None] = {
    "enabled": os.environ.get("SB3_PPO_EXT_ONEDNN_MATMUL", "1").strip().lower() not in {"0", "false", "no", "off"},
    "available": None,  # probed on first use
}


def set_onednn_matmul(enabled: bool) -> None:
    """Turn the oneDNN path for large CPU matrix products on or off (process-wide).

    :param enabled: True to use oneDNN for large products, False for the BLAS.
    """
    _state["enabled"] = bool(enabled)


def _kernel() -> Any:
    return th.ops.mkldnn._linear_pointwise


def onednn_matmul_available() -> bool:
    """True when this torch build has oneDNN's matmul kernel and it agrees with the BLAS product.

    :return: the probe's answer (probed once per process, then cached).
    """
    if _state["available"] is None:
        try:
            generator = th.Generator().manual_seed(0)
            x, w, b, y = (th.randn(shape, generator=generator) for shape in ((5, 7), (3, 7), (3,), (5, 4)))
            ok = th.allclose(_kernel()(x, w, b, "none", [], ""), th.addmm(b, x, w.t()), atol=1e-5)
            # transposed (non-contiguous) operands, as in the backward pass
            ok = ok and th.allclose(_kernel()(x.t(), y.t(), None, "none", [], ""), x.t() @ y, atol=1e-5)
            _state["available"] = bool(th.backends.mkldnn.is_available() and ok)
        except Exception:  # no mkldnn ops in this build, or a signature change in a future torch
            _state["available"] = False
    return bool(_state["available"])


def _use_onednn(a: th.Tensor, b: th.Tensor, macs: int) -> bool:
    return (
        macs >= MIN_MACS
        and bool(_state["enabled"])
        and a.device.type == "cpu"
        and a.dtype == th.float32
        and b.dtype == th.float32
        and onednn_matmul_available()
    )


def addmm(bias: th.Tensor | None, x: th.Tensor, weight: th.Tensor) -> th.Tensor:
    """``x @ weight.T + bias`` for a 2-D ``x`` (no autograd through the oneDNN branch).

    :param bias: ``[out]`` bias.
    :param x: ``[B, in]`` inputs.
    :param weight: ``[out, in]`` weights.
    :return: ``[B, out]``.
    """
    if _use_onednn(x, weight, x.shape[0] * x.shape[1] * weight.shape[0]):
        return _kernel()(x, weight, bias, "none", [], "")
    return th.mm(x, weight.t()) if bias is None else th.addmm(bias, x, weight.t())


def mm(a: th.Tensor, b: th.Tensor) -> th.Tensor:
    """``a @ b`` for 2-D tensors (no autograd through the oneDNN branch).

    :param a: ``[n, k]``.
    :param b: ``[k, m]``.
    :return: ``[n, m]``.
    """
    if _use_onednn(a, b, a.shape[0] * a.shape[1] * b.shape[1]):
        return _kernel()(a, b.t(), None, "none", [], "")
    return a @ b


class _LinearFunction(th.autograd.Function):
    """``x @ W^T + b`` with both passes through :func:`addmm`/:func:`mm`."""

    @staticmethod
    def forward(ctx: Any, x: th.Tensor, weight: th.Tensor, bias: th.Tensor | None) -> th.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return addmm(bias, x, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: th.Tensor) -> tuple[th.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = mm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = mm(grad.t(), x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _exporting() -> bool:
    # tracing (torch.jit.trace, ONNX export) and torch.compile should see the standard op
    return bool(th.jit.is_tracing() or th.onnx.is_in_onnx_export() or th.compiler.is_compiling())


def linear(x: th.Tensor, weight: th.Tensor, bias: th.Tensor | None = None) -> th.Tensor:
    """``F.linear`` that sends large float32 CPU products through oneDNN, autograd included.

    :param x: ``[..., in]`` inputs.
    :param weight: ``[out, in]`` weights.
    :param bias: ``[out]`` bias, or None.
    :return: ``[..., out]``.
    """
    if _exporting() or x.dim() != 2 or not _use_onednn(x, weight, x.shape[0] * x.shape[1] * weight.shape[0]):
        return F.linear(x, weight, bias)
    if th.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _LinearFunction.apply(x, weight, bias)
    return _kernel()(x, weight, bias, "none", [], "")


class FastLinear(nn.Linear):
    """``nn.Linear`` computed with :func:`linear`; same parameters, same ``state_dict``."""

    def forward(self, input: th.Tensor) -> th.Tensor:  # noqa: A002 - nn.Linear's argument name
        """``input @ weight.T + bias``.

        :param input: ``[..., in_features]``.
        :return: ``[..., out_features]``.
        """
        if input.dim() == 2:
            return linear(input, self.weight, self.bias)
        return F.linear(input, self.weight, self.bias)


def wants_onednn_matmul(module: nn.Module) -> bool:
    """The ``onednn_matmul=None`` rule: convolutions present, or a Linear layer with >= 2^20 weights.

    oneDNN's first use costs about 7 MB of resident memory (its code and buffers), once per process.
    With convolutions that is paid anyway; for a big Linear layer the ~2x faster products are worth it;
    for 64- or 256-unit MLPs (CartPole, MuJoCo) the gain is a few percent, so they stay on the BLAS.

    :param module: a policy (or any module).
    :return: whether ``onednn_matmul=None`` turns oneDNN on for it.
    """
    modules = list(module.modules())
    if any(isinstance(sub, nn.Conv2d) for sub in modules):
        return True
    return any(isinstance(sub, nn.Linear) and sub.weight.numel() >= 2**20 for sub in modules)


def use_fast_linears(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Linear`` inside ``module`` into a :class:`FastLinear`, in place.

    Only the class changes (``FastLinear`` adds no state), so parameters, optimizer references and
    saved weights are untouched; subclasses of ``nn.Linear`` are left alone.

    :param module: a policy (or any module).
    :return: the same ``module``.
    """
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = FastLinear
    return module
