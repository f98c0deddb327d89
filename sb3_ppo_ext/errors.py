"""The project's error classes.

Every error we raise for bad input subclasses :class:`ClippedPPOError`, itself a ``ValueError``. Where
SB3's PPO raises ``AssertionError`` for the same input, we raise :class:`ConfigurationAssertionError`,
which is both, so ``except AssertionError`` written against SB3 keeps working.
"""

from __future__ import annotations


class ClippedPPOError(ValueError):
    """Base class of the errors raised by sb3_ppo_ext for bad input or bad data."""


class ConfigurationError(ClippedPPOError):
    """A constructor argument, schedule value, policy or space that cannot work."""


class ConfigurationAssertionError(ConfigurationError, AssertionError):
    """A configuration error that SB3's PPO reports with ``assert``: catchable as ``AssertionError`` too."""


class NonFiniteError(ClippedPPOError, FloatingPointError):
    """NaN or inf in environment data, a loss term or a gradient."""
