"""Input checks and failure handling: bad input becomes a clear error, a failure never a corrupted model.

``checks`` (arguments and spaces), ``finite`` (NaN/inf in env data and updates), ``checkpoints`` (atomic
writes, checked model files), ``worker_guard`` (a dead ``SubprocVecEnv`` worker), ``mixin``
(:class:`~sb3_ppo_ext.reliability.mixin.ReliabilityMixin`, which ``ClippedPPO`` inherits).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # ``from sb3_ppo_ext.reliability import ReliabilityMixin`` (the old module's name) without importing the mixin,
    # which needs sb3_ppo_ext.distributed, whenever a sibling module is imported
    if name == "ReliabilityMixin":
        from sb3_ppo_ext.reliability.mixin import ReliabilityMixin

        return ReliabilityMixin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
