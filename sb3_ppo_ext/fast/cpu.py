"""Which CPU runs the arithmetic, and the one choice of arithmetic that follows from it (the tanh form).

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
the fused derivative alone (with the sigmoid forward) no faster, so one rule serves: the fused kernels on
Intel CPUs with AVX512, the sigmoid form elsewhere.
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


def fused_tanh() -> bool:
    """Whether tanh layers use PyTorch's own ``tanh_``/``tanh_backward`` kernels at every size (module docstring).

    ``SB3_PPO_EXT_FUSED_TANH=0``/``1`` overrides the choice (e.g. to compare the forms on a new CPU).

    :return: True on Intel CPUs where torch runs AVX512 kernels.
    """
    forced = os.environ.get("SB3_PPO_EXT_FUSED_TANH")
    if forced in ("0", "1"):
        return forced == "1"
    return th.backends.cpu.get_cpu_capability() == "AVX512" and "AMD" not in cpu_model().upper()
