"""The exception and warning classes of sb3_ppo_ext.

Every error we raise for bad input or bad data subclasses :class:`ClippedPPOError`, itself a
``ValueError``. Where SB3 raises another built-in type for the same input (``AssertionError``,
``NotImplementedError``, ``EOFError``...), our class subclasses that one too, so ``except`` clauses
written against SB3 keep working. The checks that raise them live in :mod:`sb3_ppo_ext.reliability.checks`,
:mod:`sb3_ppo_ext.reliability.finite` and :mod:`sb3_ppo_ext.reliability.checkpoints`.
"""


class ClippedPPOError(ValueError):
    """Base class of the errors raised by sb3_ppo_ext for bad input or bad data."""


class ConfigurationError(ClippedPPOError):
    """A constructor argument, schedule value, policy or space that cannot work."""


class ConfigurationAssertionError(ConfigurationError, AssertionError):
    """A configuration error that SB3's PPO reports with ``assert``: catchable as ``AssertionError`` too."""


class UnsupportedSpaceError(ConfigurationAssertionError, NotImplementedError):
    """An observation or action space ClippedPPO cannot handle.

    SB3 reports these with ``AssertionError`` (action spaces) or ``NotImplementedError`` (observation
    spaces); this class is both, and a ``ValueError``.
    """


class SpaceMismatchError(ConfigurationError):
    """An environment whose spaces differ from those of the model it is given to (SB3: ``ValueError``)."""


class ModelFileError(ClippedPPOError):
    """A file that cannot be loaded as a ClippedPPO model: truncated, corrupt, or another algorithm's."""


class NotAModelFileError(ModelFileError, AssertionError):
    """A readable zip archive without a model in it (SB3 reports this with ``assert``)."""


class NonFiniteError(ClippedPPOError, FloatingPointError):
    """NaN or inf in environment data, a loss term or a gradient."""


class ActionMaskError(ClippedPPOError):
    """An invalid-action mask from the env that cannot be applied: wrong size, not boolean, no valid action."""


class PredictInputError(ClippedPPOError):
    """An argument of ``predict()`` that does not fit the model: a recurrent ``state`` or an ``episode_start``.

    The message names the argument, the shape given, the shape expected and what to pass instead.
    """


class ParameterMismatchError(ClippedPPOError, RuntimeError):
    """Parameters for ``set_parameters``/``load`` that do not fit the model: missing or unexpected entries, shapes.

    Raised before anything is changed, with every offending entry listed. Also a ``RuntimeError``, the type of
    torch's ``load_state_dict`` error it replaces (SB3's ``load`` catches that type).
    """


class PreferenceDataError(ClippedPPOError):
    """A preference segment the reward model cannot encode: actions or observations outside their space."""


class ExportError(ClippedPPOError):
    """A policy or option that :mod:`sb3_ppo_ext.export` cannot turn into an ONNX/TorchScript graph; says what to do."""


class UnsupportedExportError(ExportError, NotImplementedError):
    """A kind of policy the exporter does not handle (sb3-contrib's recurrent ones): also a ``NotImplementedError``."""


class EnvWorkerError(ClippedPPOError, EOFError):
    """A ``SubprocVecEnv`` worker process died (SB3 would raise ``EOFError``/``BrokenPipeError`` or hang)."""


class DistributedConfigurationError(ConfigurationError):
    """Ranks of a data-parallel run whose settings cannot train together (different ``n_envs``, ``n_steps``...)."""


class DistributedError(RuntimeError):
    """A collective of a data-parallel run failed: another rank died, or did not answer within the timeout.

    Not a :class:`ClippedPPOError`: the input is fine, a process is gone. A ``RuntimeError``, as the
    ``torch.distributed`` error it replaces.
    """


class ConfigurationWarning(UserWarning):
    """A configuration that works but is probably not what was meant.

    Where SB3's PPO warns for the same configuration, the message starts with SB3's text, so filters
    such as ``warnings.filterwarnings("ignore", message="You have specified a mini-batch size")`` still match.
    """


class ResumeWarning(UserWarning):
    """A run resumed from a checkpoint continues, but not bit for bit as the uninterrupted run would have.

    Raised when part of a resumable checkpoint's state could not be restored (the envs of a ``SubprocVecEnv``,
    another VecEnv layout, attributes that could not be copied): the message names what was not restored.
    """


__all__ = [
    "ActionMaskError",
    "ClippedPPOError",
    "ConfigurationAssertionError",
    "ConfigurationError",
    "ConfigurationWarning",
    "DistributedConfigurationError",
    "DistributedError",
    "EnvWorkerError",
    "ExportError",
    "ModelFileError",
    "NonFiniteError",
    "NotAModelFileError",
    "ParameterMismatchError",
    "PredictInputError",
    "PreferenceDataError",
    "ResumeWarning",
    "SpaceMismatchError",
    "UnsupportedExportError",
    "UnsupportedSpaceError",
]
