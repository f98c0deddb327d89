"""sb3_ppo_ext.errors: every error is a ClippedPPOError and also the built-in type SB3 raises for the same input."""

from __future__ import annotations

import inspect
import warnings

import pytest

from sb3_ppo_ext import errors
from sb3_ppo_ext.errors import (
    ClippedPPOError,
    ConfigurationAssertionError,
    ConfigurationError,
    ConfigurationWarning,
    EnvWorkerError,
    ModelFileError,
    NonFiniteError,
    NotAModelFileError,
    ParameterMismatchError,
    PredictInputError,
    PreferenceDataError,
    SpaceMismatchError,
    UnsupportedSpaceError,
)

# (class, the built-in types that `except` clauses written against SB3 may name for the same input)
SB3_COMPATIBLE = [
    (ConfigurationError, (ValueError,)),
    (ConfigurationAssertionError, (ValueError, AssertionError)),
    (UnsupportedSpaceError, (ValueError, AssertionError, NotImplementedError)),
    (SpaceMismatchError, (ValueError,)),
    (ModelFileError, (ValueError,)),
    (NotAModelFileError, (ValueError, AssertionError)),
    (NonFiniteError, (ValueError, FloatingPointError)),
    (EnvWorkerError, (ValueError, EOFError)),
    (ParameterMismatchError, (ValueError, RuntimeError)),  # RuntimeError: torch's load_state_dict, caught by SB3's load
    (PredictInputError, (ValueError,)),
    (PreferenceDataError, (ValueError,)),
]


@pytest.mark.parametrize(("error", "builtins"), SB3_COMPATIBLE, ids=[c[0].__name__ for c in SB3_COMPATIBLE])
def test_every_error_is_ours_and_catchable_as_sb3s(error: type[Exception], builtins: tuple[type, ...]) -> None:
    raised = error("message")
    assert isinstance(raised, ClippedPPOError)
    for builtin in builtins:
        with pytest.raises(builtin, match="message"):
            raise raised


def test_configuration_errors_share_a_base() -> None:
    for error in (ConfigurationAssertionError, UnsupportedSpaceError, SpaceMismatchError):
        assert issubclass(error, ConfigurationError)
    assert issubclass(NotAModelFileError, ModelFileError)


def test_configuration_warning_is_a_user_warning_not_an_error() -> None:
    assert issubclass(ConfigurationWarning, UserWarning)
    assert not issubclass(ConfigurationWarning, ClippedPPOError)
    with pytest.warns(UserWarning, match="suspicious"):
        warnings.warn("suspicious", ConfigurationWarning, stacklevel=1)


def test_the_module_holds_only_documented_exception_and_warning_classes() -> None:
    public = {name: getattr(errors, name) for name in dir(errors) if not name.startswith("_")}
    public.pop("annotations", None)  # from __future__, should the module ever use it
    assert set(public) == set(errors.__all__)
    for name, value in public.items():
        assert inspect.isclass(value) and issubclass(value, (Exception, Warning)), name
        assert value.__module__ == errors.__name__, name
        assert inspect.getdoc(value), name
