"""What the frozen reference reads under ``VecNormalize``: observations normalised by frozen statistics.

A reference trained under ``VecNormalize`` read observations normalised by its training's statistics. Fine-tuning
moves the env's statistics on; a reference that read the live normalised observations would change its outputs
although its weights are frozen. So the reference reads the env's *raw* observation normalised by statistics
that never update, decided once (:func:`reference_obs_statistics`) and saved with the model (``_ref_obs_rms``):

* the reference's own, when given (``Reference(model_or_path, vec_normalize=path_or_VecNormalize)``), found
  beside a path (``<model>_vecnormalize.pkl``), or held by a model's own ``VecNormalize`` env;
* :data:`RAW_OBSERVATIONS`: the reference reads raw observations (``vec_normalize=False``, or statistics saved
  with ``norm_obs=False``);
* else, when the env normalises observations, the env's statistics as they were at the first rollout.

In reward mode the raw observation of each step comes from ``VecNormalize.get_original_obs()``. In loss mode the
reference reads the minibatches, which hold observations normalised by the live statistics of their step: the
rollout keeps, per stored observation, what the reference reads (:class:`ReferenceObservations`), and each
minibatch's rows are looked up there by their bytes (two steps with byte-identical stored observations but
different raw ones, which needs the live statistics to differ exactly so, would share one).
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecNormalize

from sb3_ppo_ext.errors import ConfigurationError

__all__ = [
    "RAW_OBSERVATIONS",
    "ObsStatistics",
    "ReferenceObservations",
    "load_obs_statistics",
    "normalize_observations",
    "reference_obs_statistics",
    "statistics_of",
]

#: the reference reads raw observations (it was trained without observation normalisation)
RAW_OBSERVATIONS = "raw"

#: ``(obs_rms, epsilon, clip_obs)`` of a ``VecNormalize`` (copied), or :data:`RAW_OBSERVATIONS`
ObsStatistics = Any


def statistics_of(venv: VecNormalize) -> ObsStatistics:
    """A frozen copy of a ``VecNormalize``'s observation statistics.

    :param venv: the ``VecNormalize`` (live or unpickled).
    :return: ``(obs_rms, epsilon, clip_obs)`` copied, or :data:`RAW_OBSERVATIONS` when it does not normalise
        observations.
    """
    if not venv.norm_obs:
        return RAW_OBSERVATIONS
    return (copy.deepcopy(venv.obs_rms), float(venv.epsilon), float(venv.clip_obs))


def _unpickle_vec_normalize(path: Path, argument: str) -> VecNormalize:
    if not path.is_file():
        raise ConfigurationError(
            f"{argument}={str(path)!r}: no such file. Pass the path VecNormalize.save() wrote (e.g. "
            "'model_vecnormalize.pkl'), a VecNormalize object, or False for a reference trained on raw observations."
        )
    try:
        with open(path, "rb") as file:
            saved = pickle.load(file)
    except Exception as error:  # pickle raises many kinds on a file of another format
        raise ConfigurationError(
            f"{argument}={str(path)!r} could not be read as a saved VecNormalize: {error}"
        ) from None
    if not isinstance(saved, VecNormalize):
        raise ConfigurationError(
            f"{argument}={str(path)!r} holds a {type(saved).__name__}, not a VecNormalize: pass the file "
            "VecNormalize.save() wrote."
        )
    return saved


def load_obs_statistics(vec_normalize: Any) -> ObsStatistics | None:
    """The statistics of ``Reference(..., vec_normalize=...)``, loaded and copied.

    :param vec_normalize: a saved ``VecNormalize``'s path, a ``VecNormalize``, ``False`` (raw observations), or
        None (found later).
    :return: the frozen statistics, or None for None.
    :raises ConfigurationError: for a missing or unreadable file, or another type.
    """
    if vec_normalize is None:
        return None
    if vec_normalize is False:
        return RAW_OBSERVATIONS
    if isinstance(vec_normalize, VecNormalize):
        return statistics_of(vec_normalize)
    if isinstance(vec_normalize, str | Path):
        return statistics_of(_unpickle_vec_normalize(Path(vec_normalize), "Reference(vec_normalize)"))
    raise ConfigurationError(
        f"Reference(vec_normalize={vec_normalize!r}) is invalid: pass the path VecNormalize.save() wrote, a "
        "VecNormalize object, False (the reference reads raw observations) or None (found automatically)."
    )


def reference_obs_statistics(source: Any) -> ObsStatistics | None:
    """The reference's own observation statistics, where its source says them; None where it does not.

    :param source: the ``ref_policy`` argument: a :class:`~sb3_ppo_ext.rlhf.reference.Reference` with statistics,
        a path with a ``<stem>_vecnormalize.pkl`` beside it, or a model whose env is a ``VecNormalize``.
    :return: the frozen statistics, or None (then the env's are frozen at the first rollout, where it normalises).
    """
    if hasattr(source, "obs_statistics"):  # a Reference: its statistics, else those its policy's source has
        if source.obs_statistics is not None:
            return source.obs_statistics
        source = source.policy
    if isinstance(source, str | Path):
        path = Path(source)
        beside = path.with_name(f"{path.name.removesuffix('.zip')}_vecnormalize.pkl")
        return statistics_of(_unpickle_vec_normalize(beside, "ref_policy")) if beside.is_file() else None
    if isinstance(source, BaseAlgorithm):
        venv = source.get_vec_normalize_env()
        return None if venv is None else statistics_of(venv)
    return None


def check_obs_statistics(statistics: ObsStatistics | None, observation_space: Any) -> None:
    """The reference's statistics must fit the model's observations.

    :param statistics: the frozen statistics, :data:`RAW_OBSERVATIONS` or None.
    :param observation_space: the model's observation space.
    :raises ConfigurationError: when a mean's shape differs from its observation's.
    """
    if not isinstance(statistics, tuple):
        return
    obs_rms = statistics[0]
    pairs = obs_rms.items() if isinstance(obs_rms, dict) else [(None, obs_rms)]
    for key, rms in pairs:
        space = observation_space if key is None else getattr(observation_space, "spaces", {}).get(key)
        shape = getattr(space, "shape", None)
        if shape is None or tuple(np.shape(rms.mean)) != tuple(shape):
            name = "observations" if key is None else f"observations[{key!r}]"
            raise ConfigurationError(
                f"The reference's VecNormalize statistics are for {name} of shape {tuple(np.shape(rms.mean))}, the "
                f"model's are {shape}: pass the statistics saved with the reference (Reference(..., vec_normalize=))."
            )


def normalize_observations(obs: Any, statistics: ObsStatistics) -> Any:
    """``VecNormalize``'s observation normalisation with frozen statistics (raw observations for RAW).

    :param obs: raw observations (an array, or a dict of arrays).
    :param statistics: ``(obs_rms, epsilon, clip_obs)`` or :data:`RAW_OBSERVATIONS`.
    :return: what the reference reads, as float32 arrays (keys VecNormalize did not normalise pass unchanged).
    """
    if not isinstance(statistics, tuple):
        return obs
    obs_rms, epsilon, clip_obs = statistics
    if isinstance(obs, dict):
        return {
            key: _normalize(value, obs_rms[key], epsilon, clip_obs) if key in obs_rms else value
            for key, value in obs.items()
        }
    return _normalize(obs, obs_rms, epsilon, clip_obs)


def _normalize(obs: Any, obs_rms: Any, epsilon: float, clip_obs: float) -> np.ndarray:
    normalized = (obs - obs_rms.mean) / np.sqrt(obs_rms.var + epsilon)
    return np.clip(normalized, -clip_obs, clip_obs).astype(np.float32)


def _to_numpy(obs: Any) -> Any:
    if isinstance(obs, dict):
        return {key: _to_numpy(value) for key, value in obs.items()}
    return obs.detach().cpu().numpy() if isinstance(obs, th.Tensor) else np.asarray(obs)


def _row_keys(obs: Any) -> list[bytes]:
    """One ``bytes`` per row of a batch of observations (an array or a dict of arrays)."""
    parts = [obs[key] for key in sorted(obs)] if isinstance(obs, dict) else [obs]
    # floats compared as float64: the buffer may store another float type than the env returned (exact widening)
    parts = [part.astype(np.float64) if np.issubdtype(part.dtype, np.floating) else part for part in parts]
    flat = [np.ascontiguousarray(part).reshape(len(part), -1).view(np.uint8) for part in parts]
    rows = np.concatenate(flat, axis=1) if len(flat) > 1 else flat[0]
    return [row.tobytes() for row in rows]


class ReferenceObservations:
    """Loss mode under ``VecNormalize``: per stored observation of the rollout, what the reference reads."""

    def __init__(self) -> None:
        self._rows: dict[bytes, Any] = {}

    def clear(self) -> None:
        """Forget the last rollout."""
        self._rows = {}

    def add(self, stored: Any, reference_view: Any) -> None:
        """One rollout step of every env.

        :param stored: the observations as the buffer stores them (a tensor or a dict of tensors).
        :param reference_view: what the reference reads for them (an array or a dict of arrays).
        """
        keys = _row_keys(_to_numpy(stored))
        for i, key in enumerate(keys):
            if isinstance(reference_view, dict):
                self._rows[key] = {name: value[i] for name, value in reference_view.items()}
            else:
                self._rows[key] = reference_view[i]

    def lookup(self, stored: Any, device: th.device) -> Any:
        """What the reference reads for a minibatch's stored observations.

        :param stored: the minibatch's observations (a tensor or a dict of tensors).
        :param device: the model's device.
        :return: the reference's observations, as tensors on ``device``.
        :raises RuntimeError: for an observation the rollout did not store.
        """
        try:
            rows = [self._rows[key] for key in _row_keys(_to_numpy(stored))]
        except KeyError:
            raise RuntimeError(
                "A minibatch holds an observation the last rollout did not store: the reference cannot read it "
                "through its frozen VecNormalize statistics. Do not change the buffer's observations after the rollout."
            ) from None
        if isinstance(rows[0], dict):
            return {key: th.as_tensor(np.stack([row[key] for row in rows]), device=device) for key in rows[0]}
        return th.as_tensor(np.stack(rows), device=device)


def reference_view(raw: Any, statistics: ObsStatistics, device: th.device) -> Any:
    """Raw observations as the reference reads them, as tensors on ``device``.

    :param raw: raw observations (arrays or tensors, or a dict of them).
    :param statistics: the frozen statistics or :data:`RAW_OBSERVATIONS`.
    :param device: the model's device.
    :return: a tensor (or a dict of tensors).
    """
    view = normalize_observations(_to_numpy(raw), statistics)
    if isinstance(view, dict):
        return {key: th.as_tensor(value, device=device) for key, value in view.items()}
    return th.as_tensor(view, device=device)
