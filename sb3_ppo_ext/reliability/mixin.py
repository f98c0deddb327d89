"""SB3 algorithm overrides that turn silent failures into clear errors and make saves atomic.

:class:`ReliabilityMixin` goes before SB3's ``OnPolicyAlgorithm`` in ``ClippedPPO``'s bases; each method
calls SB3's own and adds one guarantee:

* ``_setup_learn``: a dead ``SubprocVecEnv`` worker becomes :class:`~sb3_ppo_ext.errors.EnvWorkerError`
  instead of ``EOFError`` or a hang (:mod:`sb3_ppo_ext.reliability.worker_guard`), the reset observations are
  checked for NaN/inf before the policy sees them (:mod:`sb3_ppo_ext.reliability.finite`), and a model loaded
  from a resumable checkpoint gets its RNG and env state back at the first rollout's start when the run goes on
  (``reset_num_timesteps=False``; :func:`~sb3_ppo_ext.reliability.checkpoints.with_resume`);
* ``save``: the zip is written to a temporary file and renamed over the target
  (:mod:`sb3_ppo_ext.reliability.checkpoints`), so a process killed mid-save leaves the previous file intact;
* ``load``: truncated, corrupt or foreign files raise :class:`~sb3_ppo_ext.errors.ModelFileError`;
* ``load``/``set_env``: an env whose spaces differ from the model's raises
  :class:`~sb3_ppo_ext.errors.SpaceMismatchError` naming both spaces;
* ``set_parameters`` (which ``load`` calls too): all or nothing, every entry checked before any is loaded
  (:class:`~sb3_ppo_ext.errors.ParameterMismatchError`), and a given dict is copied, so that two models
  loaded from one ``get_parameters()`` dict share no tensor (Adam's moments included);
* data-parallel runs (:mod:`sb3_ppo_ext.distributed`): ``save`` writes on rank 0 only, and
  ``load(..., distributed=False)`` loads a plain single-process model inside a data-parallel run.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback

from sb3_ppo_ext import distributed as data_parallel
from sb3_ppo_ext.reliability import checkpoints
from sb3_ppo_ext.reliability.checks import check_parameters, space_mismatch_error
from sb3_ppo_ext.reliability.finite import check_env_data
from sb3_ppo_ext.reliability.worker_guard import guard_subprocess_workers

SelfReliable = TypeVar("SelfReliable", bound="ReliabilityMixin")

#: the state dict of a frozen reference policy (``ref_policy``): saved with the model, not a trainable parameter
_REFERENCE = "ref_policy"


def _copied(value: Any) -> Any:
    """``value`` with every tensor cloned; dicts (a state_dict's ``_metadata`` kept), lists and tuples rebuilt."""
    if isinstance(value, th.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        result = value.copy()  # same class (an OrderedDict stays one); its entries are replaced below
        for key, item in value.items():
            result[key] = _copied(item)
        if hasattr(value, "_metadata"):  # module versions, read by load_state_dict; dict.copy() drops attributes
            result._metadata = copy.deepcopy(value._metadata)  # type: ignore[attr-defined]
        return result
    if isinstance(value, list):
        return [_copied(item) for item in value]
    if type(value) is tuple:
        return tuple(_copied(item) for item in value)
    return value


@contextmanager
def _space_mismatch_as_clear_error(model_description: str) -> Iterator[None]:
    """Re-raise SB3's "spaces do not match" ``ValueError`` as a ``SpaceMismatchError``; others pass through."""
    try:
        yield
    except ValueError as error:
        mismatch = space_mismatch_error(error, model_description)
        if mismatch is None:
            raise
        raise mismatch from error


class ReliabilityMixin:
    """Clear errors and atomic saves on top of an SB3 algorithm (see the module docstring).

    The class using it defines ``check_finite`` and ``n_steps``.
    """

    check_finite: bool
    env: Any
    _last_obs: Any
    n_steps: int
    num_timesteps: int

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        guard_subprocess_workers(self.env)
        # a resumable checkpoint's state (RNGs, envs, last observations) is put back at the first rollout's start
        callback = checkpoints.with_resume(self, callback, reset_num_timesteps)  # type: ignore[arg-type]
        result = super()._setup_learn(  # type: ignore[misc]
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        if self.check_finite and self._last_obs is not None:
            # the reset observations, before the policy sees them
            check_env_data(self._last_obs, None, step=-1, n_steps=self.n_steps, num_timesteps=self.num_timesteps)
        return result

    def save(self, path: Any, exclude: Any = None, include: Any = None) -> None:
        """Save like SB3 (same file, ``.zip`` added when there is no suffix), but atomically.

        The zip is written to a temporary file next to the target, fsynced and renamed over it: a
        process killed during the save leaves the previous file intact (:mod:`sb3_ppo_ext.reliability.checkpoints`).
        In a data-parallel run only rank 0 writes (the ranks hold the same model); the others return at once.

        :param path: a path (``.zip`` is added when it has no suffix) or a binary file object, written directly.
        :param exclude: names of attributes not to save, besides SB3's defaults.
        :param include: names of attributes to save although excluded by default.
        """
        if not getattr(self, "_dist", data_parallel.SINGLE_PROCESS).is_main_process:
            return
        checkpoints.save_atomically(self, path, exclude=exclude, include=include, save=super().save)  # type: ignore[misc]

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfReliable],
        path: Any,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfReliable:
        """Load like SB3's ``load``, with clear errors for bad files and envs.

        Raises :class:`~sb3_ppo_ext.errors.ModelFileError` for truncated, corrupt or foreign files and
        :class:`~sb3_ppo_ext.errors.SpaceMismatchError` for an ``env`` whose spaces differ from the model's.
        Under ``torchrun`` every rank must call it (rank 0's parameters are broadcast), unless
        ``distributed=False`` is passed: then this process loads a model of its own.

        :param path: a path (``.zip`` may be left out, as in SB3) or a binary file object.
        :param env: the env to run the model in, checked against the saved spaces; None: none yet.
        :param device: the device to load the model onto.
        :param custom_objects: saved attributes to replace instead of unpickling them, as in SB3.
        :param print_system_info: print the saving and the current system's versions.
        :param force_reset: reset ``env`` before the next ``learn`` (SB3's default).
        :return: the loaded model.
        """
        source = checkpoints.check_model_file(path)
        distributed = kwargs.pop("distributed", None)
        with _space_mismatch_as_clear_error(f"the model in {path}"), data_parallel.loading(distributed):
            return super().load(  # type: ignore[misc]
                source,
                env=env,
                device=device,
                custom_objects=custom_objects,
                print_system_info=print_system_info,
                force_reset=force_reset,
                **kwargs,
            )

    def set_parameters(
        self, load_path_or_dict: Any, exact_match: bool = True, device: th.device | str = "auto"
    ) -> None:
        """SB3's ``set_parameters``, all or nothing, and copying what it is given.

        Every entry is checked against the model before any is loaded
        (:func:`~sb3_ppo_ext.reliability.checks.check_parameters`): unknown or (with ``exact_match``) missing
        objects and keys, and tensors or optimizer moments of another shape, are reported together in one
        :class:`~sb3_ppo_ext.errors.ParameterMismatchError` (also a ``RuntimeError``, as torch's), and the model is
        left unchanged. A dict is copied first: torch's optimizer ``load_state_dict`` keeps the tensors it is given,
        so without the copy two models loaded from one ``get_parameters()`` dict would update each other's Adam
        moments (and the dict). A frozen reference (``ref_policy``) is not a trainable parameter: a dict without
        ``"ref_policy"``, e.g. a pretrained model's ``get_parameters()``, loads with ``exact_match=True`` too and
        the reference stays as it is.

        :param load_path_or_dict: a model file (path or file object), or a dict of ``get_parameters()``'s form:
            object name (``"policy"``, ``"policy.optimizer"``, ...) to its state dict.
        :param exact_match: every object and key of the model must be given (a frozen reference excepted).
        :param device: the device to load a file's tensors onto.
        """
        if isinstance(load_path_or_dict, dict):
            params = load_path_or_dict
        else:
            source = checkpoints.check_model_file(load_path_or_dict)
            _, params, _ = load_from_zip_file(source, device=device, load_data=False)
        has_reference = _REFERENCE in self._get_torch_save_params()[0]  # type: ignore[attr-defined]
        check_parameters(self, params, exact_match, optional=(_REFERENCE,) if has_reference else ())
        if params is load_path_or_dict:
            params = _copied(params)
        reference_left_out = has_reference and _REFERENCE not in params
        super().set_parameters(  # type: ignore[misc]
            params, exact_match=exact_match and not reference_left_out, device=device
        )

    def set_env(self, env: GymEnv, force_reset: bool = True) -> None:
        """SB3's ``set_env``, with :class:`~sb3_ppo_ext.errors.SpaceMismatchError` for mismatched spaces.

        :param env: the new env (wrapped in a VecEnv if it is not one); its spaces must be the model's.
        :param force_reset: reset it before the next ``learn``, rather than continuing from its last observations.
        """
        with _space_mismatch_as_clear_error("this model"):
            super().set_env(env, force_reset=force_reset)  # type: ignore[misc]
