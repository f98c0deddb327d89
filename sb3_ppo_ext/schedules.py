"""Pickle-safe schedules of SB3's ``progress_remaining`` (1 at the start of training, 0 at the end)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearSchedule:
    """Linear annealing from ``start`` (progress 1) to ``end`` (progress 0), e.g. 3e-4 -> 0 (seed section 6)."""

    start: float
    end: float = 0.0

    def __call__(self, progress_remaining: float) -> float:
        """Return the value for ``progress_remaining`` in [0, 1]."""
        # clamped: the last rollout overshoots total_timesteps, which makes progress slightly negative
        return self.end + (self.start - self.end) * min(max(progress_remaining, 0.0), 1.0)


@dataclass(frozen=True)
class ConstantSchedule:
    """A schedule that always returns ``value`` (pickle-safe, unlike a lambda)."""

    value: float

    def __call__(self, progress_remaining: float) -> float:
        """Return ``value`` whatever the progress."""
        return self.value


def linear(start: float, end: float = 0.0) -> LinearSchedule:
    """Return a :class:`LinearSchedule` from ``start`` to ``end``; ``linear(3e-4)`` is the seed's default."""
    return LinearSchedule(float(start), float(end))


def parse_schedule(value: str | float) -> float | LinearSchedule:
    """Read RL Zoo's schedule strings: ``"lin_3e-4"`` -> ``linear(3e-4)``; plain numbers pass through."""
    if isinstance(value, str):
        if value.startswith("lin_"):
            return linear(float(value[len("lin_") :]))
        return float(value)
    return value
