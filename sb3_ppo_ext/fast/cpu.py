"""Which CPU runs the arithmetic, and the choices of arithmetic that follow from it (measured per CPU).

Each choice changes rounding (~1 ulp) and is taken only on CPUs where it was measured faster; elsewhere the
arithmetic stays as the committed results (and the bit-identity pins) were made. Environment variables override
each choice to compare the forms on a new CPU.

**The tanh form.**
A tanh layer can run as PyTorch's ``tanh_``/``tanh_backward`` or as ``2 sigmoid(2 z) - 1`` and ``g - (g h) h``.
The two round differently (~1 ulp) and their speed depends on the CPU's vector kernels, not on its capability
alone (docs/throughput.md, "third round" and "fourth round"), quiet micro-timings at ``[2, 256, 64]``, one thread:

============================  ==============  ==============  ==================  ==============
CPU (torch's capability)      ``tanh_``       sigmoid form    ``tanh_backward``   two-op form
============================  ==============  ==============  ==================  ==============
Intel Xeon (AVX512)           16 us           31 us           9.6 us              18.3 us
AMD EPYC, Zen 4 (AVX512)      92 us           29 us           6.4 us              14.0 us
AMD EPYC (AVX2)               ~3x sigmoid     --              not measured        --
============================  ==============  ==============  ==================  ==============

On the AMD EPYC with AVX512 an in-process A/B of CartPole's update measured the fused pair 1.15x slower and
the fused derivative alone (with the sigmoid forward) no faster: the fused kernels are for Intel CPUs with AVX512.
There NumPy's own float32 ``tanh`` (SIMD, in place on the tensor's memory) takes 12.5 us at ``[2, 256, 64]``, and
CartPole's update ran 0.956x the time with it than with the sigmoid form (in-process A/B, 120 alternating
``train()`` calls), so the AMD EPYC with AVX512 computes the forward ``tanh`` through NumPy (the rollout's
:class:`~sb3_ppo_ext.fast.acting.NumpyActor` already did) and the derivative with ``tanh_backward`` (0.987x the
update's time against ``g - (g h) h`` in two more A/Bs); other CPUs keep the sigmoid form below Intel's AVX512.

**Weight gradients of narrow inputs.** A layer's weight gradient is ``g^T x`` (``[out, B] @ [B, in]``). Where
``in`` is small (CartPole's 4 observations, Hopper's 11), MKL on the AMD EPYC with AVX512 takes a slow path for
that shape: 42-47 us at ``B = 256``, ``in = 4`` (two networks), as long as a 64 x 64 product, while ``(x^T g)^T``
(``[in, B] @ [B, out]``, then a transposed copy) takes 10-11 us; at ``in >= 12`` the two are even (quiet micro-
timings, one thread, ``B`` 64 to 1024). The transposed route is taken there for layers with fewer than
:data:`NARROW_INPUT` inputs.

**The heads in NumPy.** After the hidden layers, a closed-form minibatch step works on ``[B]`` and
``[B, n_actions]`` arrays: some 40 operations of 1-3 us each in PyTorch here. On the AMD EPYC with AVX512 NumPy
runs them in about half the time when the head's outputs are laid out ``[n_actions, B]`` (NumPy reduces slowly over
a short last axis: 10 us for the max of ``[256, 2]`` along it). In-process A/Bs of ``train()`` (alternating, quiet,
one thread), heads in NumPy against torch: CartPole (Zoo) 0.932x the time (loss_and_grad 446 against 485 us per
minibatch), HalfCheetah (Zoo) 0.975x (895 against 932 us). :mod:`sb3_ppo_ext.fast.numpy_head` says what it covers.

**The hidden layers in NumPy.** With the heads in NumPy, the layers' products and elementwise passes can follow
(:mod:`sb3_ppo_ext.fast.numpy_layers`): NumPy's OpenBLAS (on one thread, as torch) runs the three products of a
``[2, B, H]`` layer pair about as fast as MKL here: B = 256, H = 64: 136 against 144 us; B = 256, H = 256: 1843
against 2042 us; but B = 64, H = 256 (HalfCheetah's Zoo settings): 600 against 540 us. Each elementwise pass costs
about 1 us less. In-process A/Bs of ``train()``: CartPole (Zoo) 0.891x the time (loss_and_grad 405 against 465
us), HalfCheetah (Zoo) 0.982x.
"""

from __future__ import annotations

import os
import platform

import torch as th


def cpu_model() -> str:
    """The CPU model of the machine running (``/proc/cpuinfo``'s model name, else what ``platform`` says).

    :return: e.g. ``"Intel(R) Xeon(R) Processor"``.
    """
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return model


#: layers with fewer inputs than this compute their weight gradient as ``(x^T g)^T`` where
#: :func:`transposed_narrow_grads` holds
NARROW_INPUT = 12


def _forced(variable: str) -> bool | None:
    """``True``/``False`` where the environment variable is ``1``/``0``, else None (the CPU's rule applies)."""
    value = os.environ.get(variable)
    return value == "1" if value in ("0", "1") else None


def _avx512(amd: bool) -> bool:
    """Whether torch runs AVX512 kernels here on an AMD CPU (``amd=True``) or on another vendor's."""
    return th.backends.cpu.get_cpu_capability() == "AVX512" and ("AMD" in cpu_model().upper()) == amd


def fused_tanh() -> bool:
    """Whether tanh layers use PyTorch's own ``tanh_``/``tanh_backward`` kernels at every size (module docstring).

    ``SB3_PPO_EXT_FUSED_TANH=0``/``1`` overrides the choice (e.g. to compare the forms on a new CPU).

    :return: True on Intel CPUs where torch runs AVX512 kernels.
    """
    forced = _forced("SB3_PPO_EXT_FUSED_TANH")
    return _avx512(amd=False) if forced is None else forced


def numpy_tanh() -> bool:
    """Whether tanh layers compute ``tanh`` with NumPy's kernel, in place on the tensor (module docstring).

    ``SB3_PPO_EXT_NUMPY_TANH=0``/``1`` overrides the choice; where :func:`fused_tanh` holds too, NumPy's wins.

    :return: True on AMD CPUs where torch runs AVX512 kernels.
    """
    forced = _forced("SB3_PPO_EXT_NUMPY_TANH")
    return _avx512(amd=True) if forced is None else forced


def numpy_head() -> bool:
    """Whether the closed-form update runs the heads and the loss's derivatives in NumPy (module docstring).

    ``SB3_PPO_EXT_NUMPY_HEAD=0``/``1`` overrides the choice.

    :return: True on AMD CPUs where torch runs AVX512 kernels.
    """
    forced = _forced("SB3_PPO_EXT_NUMPY_HEAD")
    return _avx512(amd=True) if forced is None else forced


#: the widest hidden layer :func:`numpy_layers` runs in NumPy: measured faster up to 256 units (module docstring);
#: wider, OpenBLAS's products on few rows fall further behind MKL's (+11% at 64 x 256 x 256)
NUMPY_LAYERS_MAX_WIDTH = 256


def numpy_layers() -> bool:
    """Whether the closed-form update runs the hidden layers in NumPy too, where they are narrow (module docstring).

    ``SB3_PPO_EXT_NUMPY_LAYERS=0``/``1`` overrides the choice; it takes effect with :func:`numpy_head` only.

    :return: True on AMD CPUs where torch runs AVX512 kernels.
    """
    forced = _forced("SB3_PPO_EXT_NUMPY_LAYERS")
    return _avx512(amd=True) if forced is None else forced


def transposed_narrow_grads() -> bool:
    """Whether narrow layers' weight gradients are computed as ``(x^T g)^T`` (module docstring).

    ``SB3_PPO_EXT_NARROW_GRAD=0``/``1`` overrides the choice.

    :return: True on AMD CPUs where torch runs AVX512 kernels.
    """
    forced = _forced("SB3_PPO_EXT_NARROW_GRAD")
    return _avx512(amd=True) if forced is None else forced
