"""Pickle-safe schedules of SB3's ``progress_remaining`` (1 at the start of training, 0 at the end).

:class:`LinearDecay` (built by :func:`linear` and by :func:`parse_schedule` from the Zoo's ``lin_<x>``
strings) goes from ``start`` to ``end`` over the whole run. It is not SB3's ``LinearSchedule(start, end,
end_fraction)``, hence the other name; for a constant use SB3's
``stable_baselines3.common.utils.ConstantSchedule`` (or a plain float).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

# imported under another name: ``ConstantSchedule`` must stay free for __getattr__ (old pickles)
from stable_baselines3.common.utils import ConstantSchedule as _SB3ConstantSchedule

__all__ = ["LinearDecay", "linear", "parse_schedule"]


@dataclass(frozen=True)
class LinearDecay:
    """Linear annealing from ``start`` (progress 1) to ``end`` (progress 0), e.g. 3e-4 -> 0 (seed section 6).

    :param start: the value at the start of training (``progress_remaining`` 1).
    :param end: the value at the end of training (``progress_remaining`` 0).
    """

    start: float
    end: float = 0.0

    def __call__(self, progress_remaining: float) -> float:
        """The value at a point of training.

        :param progress_remaining: SB3's progress, 1 at the start and 0 at the end (clamped to [0, 1]).
        :return: ``end + (start - end) * progress_remaining``.
        """
        # clamped: the last rollout overshoots total_timesteps, which makes progress slightly negative
        return self.end + (self.start - self.end) * min(max(progress_remaining, 0.0), 1.0)


def linear(start: float, end: float = 0.0) -> LinearDecay:
    """A pickle-safe linear schedule, for ``learning_rate``, ``clip_range`` or ``clip_range_vf``.

    :param start: the value at the start of training.
    :param end: the value at the end of training.
    :return: a :class:`LinearDecay` from ``start`` to ``end``; ``linear(3e-4)`` is the seed's default.
    """
    return LinearDecay(float(start), float(end))


def parse_schedule(value: str | float) -> float | LinearDecay:
    """Read RL Zoo's schedule strings: ``"lin_3e-4"`` -> ``linear(3e-4)``; plain numbers pass through.

    :param value: a Zoo value: ``"lin_<x>"``, a number, or a number as a string.
    :return: a :class:`LinearDecay` for ``"lin_<x>"``, else the number.
    :raises ValueError: for a string that is neither ``"lin_<x>"`` nor a number.
    """
    if isinstance(value, str):
        if value.startswith("lin_"):
            return linear(float(value[len("lin_") :]))
        return float(value)
    return value


class _LegacyConstantSchedule(_SB3ConstantSchedule):
    """SB3's ``ConstantSchedule`` for models saved with this module's former ``ConstantSchedule(value)``."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        # the former class stored its number as ``value``; SB3's calls it ``val``
        state = dict(state)
        if "value" in state:
            state["val"] = state.pop("value")
        self.__dict__.update(state)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SB3ConstantSchedule) and other.val == self.val

    def __hash__(self) -> int:
        return hash(self.val)


# Classes this module defined before they were renamed so as not to shadow SB3's classes of the same
# names. Saved models pickle their schedules by module and class name, so these names must still
# resolve here for old files to load; they are not exported.
_RENAMED: dict[str, tuple[type, str]] = {
    "LinearSchedule": (LinearDecay, "sb3_ppo_ext.schedules.LinearDecay"),
    "ConstantSchedule": (_LegacyConstantSchedule, "stable_baselines3.common.utils.ConstantSchedule"),
}


def __getattr__(name: str) -> type:
    if name in _RENAMED:
        cls, replacement = _RENAMED[name]
        warnings.warn(
            f"sb3_ppo_ext.schedules.{name} is deprecated, use {replacement}", DeprecationWarning, stacklevel=2
        )
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
