"""Saving that never destroys the last good file, clear errors for unloadable files, and resuming.

* :func:`atomic_write` writes to a temporary file in the target's folder, ``fsync``s it and renames
  it over the target with ``os.replace`` (atomic on POSIX and Windows), then ``fsync``s the folder.
  A process killed at any moment leaves either the old file or the new one, never a mix.
  ``ClippedPPO.save`` goes through it; :func:`save_atomically` does the same for any SB3 model.
* :func:`check_model_file` reads a model file before SB3 does and raises
  :class:`~sb3_ppo_ext.errors.ModelFileError` for empty, truncated, corrupt or foreign files.
* :class:`AtomicCheckpointCallback` is SB3's ``CheckpointCallback`` with atomic writes, and
  :func:`latest_checkpoint` finds the newest loadable checkpoint to resume from::

      checkpoint = latest_checkpoint("checkpoints/")
      if checkpoint is None:
          model = ClippedPPO("MlpPolicy", env, learning_rate=linear(3e-4))
      else:
          model = ClippedPPO.load(checkpoint.path, env=env)
      model.learn(TOTAL - model.num_timesteps, callback=AtomicCheckpointCallback(10_000, "checkpoints/"),
                  reset_num_timesteps=False)

  ``learn(TOTAL - num_timesteps, reset_num_timesteps=False)`` keeps SB3's ``_total_timesteps`` at
  ``TOTAL``, so schedules resume at the same progress as in an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import random
import re
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import cloudpickle
import gymnasium as gym
import numpy as np
import torch as th
from gymnasium.utils import EzPickle
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, ConvertCallback
from stable_baselines3.common.monitor import ResultsWriter
from stable_baselines3.common.type_aliases import MaybeCallback
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecEnvWrapper, VecNormalize

from sb3_ppo_ext.errors import ModelFileError, NotAModelFileError, ResumeWarning

PathLike = str | pathlib.Path

# -- atomic writes ---------------------------------------------------------------------------------


def _default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file (0o666 minus the umask); mkstemp uses 0o600."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: pathlib.Path) -> None:
    """Make a rename durable: fsync the folder that holds it (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _KeepOpenWriter(io.BufferedWriter):
    """A binary writer that ``close()`` only flushes, for savers that close the file they are given."""

    def close(self) -> None:
        if not self.closed:
            self.flush()

    def really_close(self) -> None:
        io.BufferedWriter.close(self)


@contextmanager
def atomic_write(path: PathLike) -> Iterator[io.BufferedWriter]:
    """Open ``path`` for writing so that it is replaced in one step, and only if the write completes.

    Yields a binary file object. On success the data is flushed and fsynced, the temporary file is
    renamed over ``path`` and the folder is fsynced; on an exception the temporary file is removed
    and ``path`` is untouched. A process killed meanwhile may leave a hidden ``.<name>.*.tmp`` file
    next to ``path``, which is safe to delete. Symbolic links are followed: their target is replaced.

    :param path: the file to write; its folder must exist.
    :return: (yielded) the binary file object to write to, a temporary file until the block ends.
    """
    target = pathlib.Path(os.path.realpath(path))
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    writer = _KeepOpenWriter(io.FileIO(fd, "wb"))
    try:
        yield writer
        writer.flush()
        os.fsync(fd)
        writer.really_close()
        mode = target.stat().st_mode & 0o7777 if target.exists() else _default_file_mode()
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        writer.really_close()
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    _fsync_directory(target.parent)


def resolve_save_path(path: PathLike, suffix: str = "zip") -> pathlib.Path:
    """The file SB3's ``save`` would write for ``path``: ``.zip`` added when there is no suffix.

    As in SB3, a missing parent folder is created and a path naming a folder becomes ``<path>_2``.

    :param path: the path given to ``save``.
    :param suffix: the suffix to add when ``path`` has none.
    :return: the file to write.
    """
    target = pathlib.Path(path)
    if target.suffix == "" and suffix:
        target = pathlib.Path(f"{target}.{suffix}")
    if target.is_dir():
        warnings.warn(f"Path '{target}' is a folder. Will save instead to {target}_2")
        target = pathlib.Path(f"{target}_2")
    if not target.parent.exists():
        warnings.warn(f"Path '{target.parent}' does not exist. Will create it.")
        target.parent.mkdir(parents=True, exist_ok=True)
    return target


def save_atomically(
    model: BaseAlgorithm,
    path: PathLike | io.BufferedIOBase,
    exclude: Any = None,
    include: Any = None,
    save: Callable[..., None] | None = None,
) -> None:
    """Save ``model`` like ``model.save(path, exclude, include)``, but atomically (see :func:`atomic_write`).

    File objects are written to directly (there is nothing to rename).

    :param model: any SB3 algorithm.
    :param path: where to save; ``.zip`` is added when it has no suffix, as in SB3.
    :param exclude: names of attributes not to save.
    :param include: names of attributes to save although excluded by default.
    :param save: the function that writes the zip to a file object; default ``model.save``.
    """
    save = model.save if save is None else save
    if not isinstance(path, (str, pathlib.Path)):
        save(path, exclude=exclude, include=include)
        return
    with atomic_write(resolve_save_path(path)) as file:
        save(file, exclude=exclude, include=include)


def pickle_atomically(obj: Any, path: PathLike) -> None:
    """``pickle.dump(obj)`` into ``path`` atomically (used for ``VecNormalize`` statistics).

    :param obj: the object to pickle.
    :param path: the file to write.
    """
    with atomic_write(path) as file:
        pickle.dump(obj, file)


# -- loading ---------------------------------------------------------------------------------------

# Keys of a saved model that PPO-style algorithms have and others (A2C, DQN, SAC, ...) lack.
PPO_KEYS = ("n_steps", "batch_size", "n_epochs", "clip_range", "gae_lambda")
# Saved policy modules -> algorithm, to name the algorithm of a foreign file in the error.
_ALGORITHM_OF_MODULE = {
    "dqn": "DQN",
    "sac": "SAC",
    "td3": "TD3 or DDPG",
    "qrdqn": "QRDQN",
    "tqc": "TQC",
    "ars": "ARS",
    "crossq": "CrossQ",
    "her": "HER",
    "maskable": "MaskablePPO",
    "ppo_mask": "MaskablePPO",
    "recurrent": "RecurrentPPO",
    "ppo_recurrent": "RecurrentPPO",
}
# sb3-contrib's PPO variants save PPO's keys but need their own policy inputs (masks, LSTM states).
_FOREIGN_PPO_MODULES = ("sb3_contrib.",)


def _guess_algorithm(data: dict[str, Any], module: str) -> str:
    for part in reversed(module.split(".")):
        if part in _ALGORITHM_OF_MODULE:
            return _ALGORITHM_OF_MODULE[part]
    if "cg_max_steps" in data:
        return "TRPO"
    if "gae_lambda" in data and "clip_range" not in data:
        return "A2C"
    return "an algorithm other than PPO"


def _policy_description(policy: Any) -> tuple[str, str]:
    """``(module, class name)`` of the saved policy class, read from SB3's JSON without unpickling it."""
    if not isinstance(policy, dict):
        return "", ""
    module = str(policy.get("__module__", ""))
    match = re.search(r"<function (\w+)\.__init__", str(policy.get("__init__", "")))
    return module, match.group(1) if match else ""


def _check_algorithm(data: dict[str, Any], where: str) -> None:
    module, name = _policy_description(data.get("policy_class"))
    missing = [key for key in PPO_KEYS if key not in data]
    if missing or module.startswith(_FOREIGN_PPO_MODULES):
        algorithm = _guess_algorithm(data, module)
        policy = f"{module}.{name}" if name else module or "unknown"
        reason = f"it has no {', '.join(missing)}" if missing else "its policy needs inputs ClippedPPO does not give"
        raise ModelFileError(
            f"{where} holds a model of another algorithm ({algorithm}; policy class {policy}), not a ClippedPPO or "
            f"SB3 PPO model: {reason}. Load it with that algorithm's load()."
        )


def _open_source(path: PathLike | io.BufferedIOBase) -> tuple[pathlib.Path | io.BytesIO, str]:
    if not isinstance(path, (str, pathlib.Path)):
        return io.BytesIO(path.read()), "the given file object"
    source = pathlib.Path(path)
    if not source.exists() and source.suffix != ".zip" and pathlib.Path(f"{source}.zip").exists():
        source = pathlib.Path(f"{source}.zip")  # SB3's load adds .zip the same way
    if not source.exists():
        raise FileNotFoundError(f"No model file at '{path}' (nor '{path}.zip').")
    if source.is_dir():
        raise ModelFileError(f"'{source}' is a folder, not a model file (the .zip written by model.save()).")
    return source, f"'{source}'"


_LOCAL_HEADER_PEEK = 30 + 1024  # a zip local file header is 30 bytes, then the entry's name


def _first_entry_name(head: bytes) -> str | None:
    """The name in the zip local file header at the start of ``head``, or None."""
    if head[:4] != b"PK\x03\x04" or len(head) < 30:
        return None
    name_length = int.from_bytes(head[26:28], "little")
    if len(head) < 30 + name_length:
        return None
    return head[30 : 30 + name_length].decode("utf-8", errors="replace")


def check_model_file(path: PathLike | io.BufferedIOBase) -> pathlib.Path | io.BytesIO:
    """Check that ``path`` holds a loadable ClippedPPO (or SB3 PPO) model and return what to load from.

    Raises :class:`~sb3_ppo_ext.errors.ModelFileError` for an empty or truncated file, a file that is
    not a zip archive, an archive with a damaged member (CRC check of every entry) or an unreadable
    ``data`` entry, and a model of another algorithm; :class:`~sb3_ppo_ext.errors.NotAModelFileError`
    (also an ``AssertionError``, like SB3's check) for a zip archive that is not a model.

    :param path: a path (``.zip`` may be left out, as in SB3) or a binary file object.
    :return: the resolved path, or the file object's content as a ``BytesIO``.
    """
    source, where = _open_source(path)
    content = source.getvalue() if isinstance(source, io.BytesIO) else None
    size = len(content) if content is not None else source.stat().st_size  # type: ignore[union-attr]
    if size == 0:
        raise ModelFileError(f"{where} is empty (0 bytes): the save that wrote it did not finish.")
    if content is not None:
        head = content[:_LOCAL_HEADER_PEEK]
    else:
        with open(source, "rb") as file:  # type: ignore[arg-type]
            head = file.read(_LOCAL_HEADER_PEEK)
    truncated = ModelFileError(
        f"{where} is a truncated or damaged zip archive ({size} bytes; its directory of entries is missing or does "
        "not list its first entry): a save was probably interrupted by a tool that does not write atomically "
        "(ClippedPPO.save never leaves such a file). Use an earlier checkpoint."
    )
    try:
        archive = zipfile.ZipFile(source)
    except zipfile.BadZipFile as error:
        if head[:4] == b"PK\x03\x04":
            raise truncated from error
        raise ModelFileError(
            f"{where} is not a zip archive, so not a model saved by ClippedPPO or SB3 (those are the .zip files "
            "written by model.save())."
        ) from error
    with archive:
        try:
            damaged = archive.testzip()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
            raise ModelFileError(f"{where} is a corrupt zip archive ({error}). Use an earlier checkpoint.") from error
        if damaged is not None:
            raise ModelFileError(
                f"{where} is corrupt: its entry '{damaged}' fails the CRC check. Use an earlier checkpoint."
            )
        names = archive.namelist()
        # the torch files inside a model are zips themselves: when the model's own directory was cut off,
        # zipfile finds an inner one instead, which does not list the model's first entry
        first_entry = _first_entry_name(head)
        if first_entry is not None and first_entry not in names:
            raise truncated
        if "data" not in names or "policy.pth" not in names:
            raise NotAModelFileError(
                f"{where} is a zip archive but not a model saved by ClippedPPO or SB3: it lacks the 'data' and "
                f"'policy.pth' entries (it has {names[:8]})."
            )
        try:
            data = json.loads(archive.read("data").decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelFileError(f"{where} is corrupt: its 'data' entry is not valid JSON ({error}).") from error
    if not isinstance(data, dict):
        raise NotAModelFileError(f"{where} is not a model: its 'data' entry is not a JSON object.")
    _check_algorithm(data, where)
    return source


# -- checkpoints -----------------------------------------------------------------------------------


class Checkpoint(NamedTuple):
    """A checkpoint written by :class:`AtomicCheckpointCallback` (or SB3's ``CheckpointCallback``)."""

    path: pathlib.Path
    num_timesteps: int
    vecnormalize_path: pathlib.Path | None


class AtomicCheckpointCallback(CheckpointCallback):
    """SB3's ``CheckpointCallback`` (same arguments, same file names) with atomic writes, optionally resumable exactly.

    Every file goes through :func:`atomic_write`, and the model is written last, after the
    ``VecNormalize`` statistics and replay buffer of the same step: a model checkpoint on disk always
    has its companions, so :func:`latest_checkpoint` can resume from it.

    With ``exact_resume=True`` each checkpoint also carries a :class:`ResumeState` (RNG states, the envs'
    state, the last observations, LSTM states; see :func:`capture_resume_state`), so that ``load`` +
    ``learn(TOTAL - num_timesteps, reset_num_timesteps=False)`` ends with the parameters of the uninterrupted
    run, bit for bit, where the envs' state can be copied (``DummyVecEnv``; docs/reliability.md lists what is
    and is not restored). A checkpoint is then taken at a rollout boundary, where no rollout is half collected:
    a save point (every ``save_freq`` calls) is written at the start of the next rollout (or at the end of
    training, after the last update) and named after the step count there, the save point's own when it falls
    on a rollout's last step (``save_freq`` a multiple of ``n_steps``). A save point whose rollout is cut short
    (a callback stopped training) is not written.

    :param save_freq: save every ``save_freq`` calls of the callback (env steps of the VecEnv).
    :param save_path: the folder for the checkpoints.
    :param name_prefix: common prefix of the checkpoint files.
    :param save_replay_buffer: also save the replay buffer (off-policy algorithms).
    :param save_vecnormalize: also save the ``VecNormalize`` statistics.
    :param verbose: 2 prints every saved path.
    :param exact_resume: write resumable checkpoints at rollout boundaries (above); False (default): SB3's
        behaviour, the model as it is at the save point.
    """

    def __init__(
        self,
        save_freq: int,
        save_path: str,
        name_prefix: str = "rl_model",
        save_replay_buffer: bool = False,
        save_vecnormalize: bool = False,
        verbose: int = 0,
        *,
        exact_resume: bool = False,
    ) -> None:
        super().__init__(save_freq, save_path, name_prefix, save_replay_buffer, save_vecnormalize, verbose)
        self.exact_resume = exact_resume
        self._pending = False  # a save point passed; written at the next rollout boundary (exact_resume)
        self._updates_at_rollout_end: int | None = None  # train() ran after the last rollout iff _n_updates grew

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq != 0:
            return True
        if self.exact_resume:
            self._pending = True
        else:
            self._write(save_atomically)
        return True

    def _on_rollout_start(self) -> None:
        self._updates_at_rollout_end = None
        if self._pending:
            self._write(lambda model, path: save_resumable(model, path, at="rollout_start"))

    def _on_rollout_end(self) -> None:
        self._updates_at_rollout_end = self.model._n_updates

    def _on_training_end(self) -> None:
        # a boundary only if the last rollout was completed and an update followed it (not stopped mid-rollout)
        ended = self._updates_at_rollout_end
        if self._pending and ended is not None and self.model._n_updates > ended:
            self._write(lambda model, path: save_resumable(model, path, at="training_end"))

    def _write(self, save: Callable[[BaseAlgorithm, pathlib.Path], None]) -> None:
        """The companions, then the model with ``save(model, path)``, named after the model's step count now."""
        self._pending = False
        self.num_timesteps = self.model.num_timesteps
        if self.save_vecnormalize and self.model.get_vec_normalize_env() is not None:
            vec_normalize_path = self._checkpoint_path("vecnormalize_", extension="pkl")
            pickle_atomically(self.model.get_vec_normalize_env(), vec_normalize_path)
            if self.verbose >= 2:
                print(f"Saving model VecNormalize to {vec_normalize_path}")
        if self.save_replay_buffer and getattr(self.model, "replay_buffer", None) is not None:
            replay_buffer_path = self._checkpoint_path("replay_buffer_", extension="pkl")
            with atomic_write(replay_buffer_path) as file:
                self.model.save_replay_buffer(file)  # type: ignore[attr-defined]
            if self.verbose >= 2:
                print(f"Saving model replay buffer checkpoint to {replay_buffer_path}")
        model_path = pathlib.Path(self._checkpoint_path(extension="zip"))
        save(self.model, model_path)
        if self.verbose >= 2:
            print(f"Saving model checkpoint to {model_path}")


def find_checkpoints(save_path: PathLike, name_prefix: str = "rl_model") -> list[Checkpoint]:
    """All model checkpoints named like ``CheckpointCallback``'s in ``save_path``, oldest first (not checked).

    :param save_path: the callback's folder.
    :param name_prefix: the callback's ``name_prefix``.
    :return: the checkpoints by ``num_timesteps``, each with its ``VecNormalize`` file when one exists; empty when
        the folder does not exist.
    """
    folder = pathlib.Path(save_path)
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(name_prefix)}_(\d+)_steps\.zip$")
    found = []
    for entry in folder.iterdir():
        match = pattern.match(entry.name)
        if match:
            steps = int(match.group(1))
            vecnormalize = folder / f"{name_prefix}_vecnormalize_{steps}_steps.pkl"
            found.append(Checkpoint(entry, steps, vecnormalize if vecnormalize.exists() else None))
    return sorted(found, key=lambda checkpoint: checkpoint.num_timesteps)


def latest_checkpoint(save_path: PathLike, name_prefix: str = "rl_model") -> Checkpoint | None:
    """The newest checkpoint in ``save_path`` that passes :func:`check_model_file`, or None.

    Unloadable files (e.g. written non-atomically by a process that was killed) are skipped with a warning.

    :param save_path: the callback's folder.
    :param name_prefix: the callback's ``name_prefix``.
    :return: the checkpoint with the most timesteps that loads, or None when there is none.
    """
    for checkpoint in reversed(find_checkpoints(save_path, name_prefix)):
        try:
            check_model_file(checkpoint.path)
        except ModelFileError as error:
            warnings.warn(f"Skipping checkpoint {checkpoint.path}: {error}")
            continue
        return checkpoint
    return None


# -- exact resume ------------------------------------------------------------------------------------

#: the model attribute that carries a pickled :class:`ResumeState` in a resumable checkpoint's ``data``
RESUME_ATTRIBUTE = "_resume_state"
ResumePoint = Literal["rollout_start", "training_end"]
# VecNormalize: its running statistics (restored whatever the envs) and what belongs to the episodes in flight
_VECNORMALIZE_STATISTICS = ("obs_rms", "ret_rms")
_VECNORMALIZE_EPISODES = ("returns", "old_obs", "old_reward")
# attributes of a VecEnv layer that describe it rather than hold state, and links to the next layer
_STRUCTURAL = frozenset(
    {"observation_space", "action_space", "metadata", "render_mode", "num_envs", "class_attributes"}
)
# attributes holding I/O (Monitor's log file) are left as they are, without a warning
_IO_TYPES: tuple[type, ...] = (io.IOBase, ResultsWriter)
# gSDE: the exploration matrices sampled at each rollout start (plain attributes, not in the state dict)
_SDE_ATTRIBUTES = ("weights_dist", "exploration_mat", "exploration_matrices")


def _new_instance(cls: type) -> Any:
    return cls.__new__(cls)


def _set_attributes(obj: Any, state: dict[str, Any]) -> Any:
    vars(obj).update(state)
    return obj


class _StatePickler(cloudpickle.Pickler):
    """cloudpickle, but gymnasium's ``EzPickle`` objects keep their state.

    ``EzPickle`` (MuJoCo, Box2D and Atari envs) pickles the constructor's arguments, so unpickling builds a new
    env: its physics state and RNG would be lost.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, EzPickle) and hasattr(obj, "__dict__"):
            return _new_instance, (type(obj),), dict(vars(obj)), None, None, _set_attributes
        return super().reducer_override(obj)


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _StatePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _map_tensors(value: Any, function: Callable[[th.Tensor], th.Tensor]) -> Any:
    """``value`` with ``function`` applied to every tensor in its (named) tuples, lists and dicts."""
    if isinstance(value, th.Tensor):
        return function(value)
    if isinstance(value, tuple):
        items = [_map_tensors(item, function) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_map_tensors(item, function) for item in value]
    if isinstance(value, dict):
        return {key: _map_tensors(item, function) for key, item in value.items()}
    return value


@dataclass
class ResumeState:
    """What a run needs, besides the saved model, to continue bit for bit from a rollout boundary.

    :param at: where it was captured: ``"rollout_start"`` (in ``on_rollout_start``, after gSDE's noise was
        sampled) or ``"training_end"`` (after the last update, before the next rollout's noise).
    :param num_timesteps: the model's step count then; a model at another count does not restore it.
    :param rng: torch's (CPU, and CUDA where initialised), NumPy's global and Python's ``random`` states.
    :param last_obs: ``model._last_obs`` (the observations the next step acts on).
    :param last_episode_starts: ``model._last_episode_starts``.
    :param last_original_obs: ``model._last_original_obs`` (before ``VecNormalize``).
    :param lstm_states: ``model._last_lstm_states`` (a recurrent policy's states of each env), on the CPU.
    :param sde_noise: gSDE's exploration matrices (with ``use_sde``).
    :param env_layout: the VecEnv's layers (outermost first), each env's wrapper chain and the number of envs:
        the state is restored only into envs of the same layout.
    :param env_state: per VecEnv layer and per wrapper of each env, the attributes copied (None: the envs' own
        state was not captured, only the ``VecNormalize`` statistics).
    :param env_missing: why the envs' own state was not captured (None: it was).
    :param env_skipped: attributes that could not be copied (left as they are on restore), as ``Class.name``.
    :param statistics: per VecEnv layer, ``VecNormalize``'s running statistics (restored whenever the layouts
        match, even without the envs' state); empty for other layers.
    """

    at: ResumePoint
    num_timesteps: int
    rng: dict[str, Any]
    last_obs: Any
    last_episode_starts: Any
    last_original_obs: Any
    lstm_states: Any
    sde_noise: dict[str, Any] | None
    env_layout: tuple[Any, ...]
    env_state: dict[str, Any] | None
    env_missing: str | None
    env_skipped: list[str] = field(default_factory=list)
    statistics: list[dict[str, Any]] = field(default_factory=list)


def _vec_layers(venv: VecEnv) -> tuple[list[VecEnvWrapper], VecEnv]:
    layers = []
    while isinstance(venv, VecEnvWrapper):
        layers.append(venv)
        venv = venv.venv
    return layers, venv


def _env_chain(env: Any) -> list[Any]:
    """A gymnasium env and its wrappers, outermost first."""
    chain = [env]
    while isinstance(chain[-1], gym.Wrapper):
        chain.append(chain[-1].env)
    return chain


def _env_layout(venv: VecEnv) -> tuple[Any, ...]:
    layers, base = _vec_layers(venv)
    envs = (
        [[type(e).__qualname__ for e in _env_chain(env)] for env in base.envs] if isinstance(base, DummyVecEnv) else []
    )
    return tuple(type(layer).__qualname__ for layer in [*layers, base]), venv.num_envs, envs


def _copyable(obj: Any, skip: frozenset[str], skipped: list[str]) -> dict[str, Any]:
    """``obj``'s attributes but ``skip``, each checked to pickle; those that do not are named in ``skipped``."""
    state = {}
    for name, value in vars(obj).items():
        if name in skip:
            continue
        if isinstance(value, _IO_TYPES):
            continue
        try:
            _dumps(value)
        except Exception:  # anything a pickler raises: the attribute stays as it is
            skipped.append(f"{type(obj).__qualname__}.{name}")
            continue
        state[name] = value
    return state


def _capture_env(venv: VecEnv) -> tuple[dict[str, Any] | None, list[dict[str, Any]], str | None, list[str]]:
    """The envs' state (or None and why not), the VecNormalize statistics, and the attributes skipped."""
    layers, base = _vec_layers(venv)
    statistics = [
        {name: getattr(layer, name) for name in _VECNORMALIZE_STATISTICS} if isinstance(layer, VecNormalize) else {}
        for layer in layers
    ]
    if not isinstance(base, DummyVecEnv):
        return (
            None,
            statistics,
            (
                f"the envs run in a {type(base).__name__}, whose envs live in other processes (or elsewhere this "
                "process cannot copy): only a DummyVecEnv's envs are copied"
            ),
            [],
        )
    skipped: list[str] = []
    wrappers = []
    for layer in layers:
        if isinstance(layer, VecNormalize):
            wrappers.append({name: getattr(layer, name) for name in _VECNORMALIZE_EPISODES})
        else:
            wrappers.append(_copyable(layer, _STRUCTURAL | {"venv"}, skipped))
    envs = [
        [
            _copyable(e, frozenset({"env"}) if isinstance(e, gym.Wrapper) else frozenset(), skipped)
            for e in _env_chain(env)
        ]
        for env in base.envs
    ]
    state = {"wrappers": wrappers, "base": _copyable(base, _STRUCTURAL | {"envs"}, skipped), "envs": envs}
    return state, statistics, None, skipped


def _rng_states(device: th.device) -> dict[str, Any]:
    states: dict[str, Any] = {"torch": th.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if device.type == "cuda" and th.cuda.is_initialized():
        states["cuda"] = th.cuda.get_rng_state_all()
    return states


def capture_resume_state(model: BaseAlgorithm, at: ResumePoint = "rollout_start") -> ResumeState:
    """Capture what ``model``'s run needs to continue exactly from here, a rollout boundary.

    Call it where no rollout is half collected: in a callback's ``on_rollout_start`` (``at="rollout_start"``) or
    after ``learn()`` returned having completed its last rollout and update (``at="training_end"``).
    :class:`AtomicCheckpointCallback` with ``exact_resume=True`` and :func:`save_resumable` do.

    :param model: the model, with its env.
    :param at: where it is called (see :class:`ResumeState`).
    :return: the state, copied (later steps do not change it).
    """
    env = model.get_env()
    if env is None:
        raise ValueError("capture_resume_state needs a model with an env (model.set_env(env)).")
    env_state, statistics, missing, skipped = _capture_env(env)
    sde = None
    if getattr(model, "use_sde", False):
        dist = getattr(model.policy, "sde_dist", None) or getattr(model.policy, "action_dist", None)
        sde = {name: getattr(dist, name) for name in _SDE_ATTRIBUTES if hasattr(dist, name)}
    state = ResumeState(
        at=at,
        num_timesteps=int(model.num_timesteps),
        rng=_rng_states(model.device),
        last_obs=model._last_obs,
        last_episode_starts=model._last_episode_starts,
        last_original_obs=model._last_original_obs,
        lstm_states=_map_tensors(getattr(model, "_last_lstm_states", None), lambda t: t.detach().cpu()),
        sde_noise=sde,
        env_layout=_env_layout(env),
        env_state=env_state,
        env_missing=missing,
        env_skipped=skipped,
        statistics=statistics,
    )
    # a deep copy through the same pickler that writes the checkpoint: nothing shared with the live run
    return pickle.loads(_dumps(state))


def save_resumable(model: BaseAlgorithm, path: PathLike, at: ResumePoint = "training_end") -> None:
    """``model.save(path)`` (atomically) with a :class:`ResumeState`, so that resuming from it is exact.

    ``ClippedPPO.load(path, env=...)`` then ``learn(..., reset_num_timesteps=False)`` restores the state at the
    first rollout's start. Call it between ``learn()`` calls (``at="training_end"``, after a ``learn()`` that was
    not stopped mid-rollout by a callback), or from a callback's ``on_rollout_start`` (``at="rollout_start"``).

    :param model: the model, with its env.
    :param path: the file to write (``.zip`` added when there is no suffix).
    :param at: where it is called (see :class:`ResumeState`).
    """
    blob = _dumps(capture_resume_state(model, at))
    setattr(model, RESUME_ATTRIBUTE, blob)
    try:
        save_atomically(model, path)
    finally:
        delattr(model, RESUME_ATTRIBUTE)


def _restore_rng(states: dict[str, Any]) -> None:
    th.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["random"])
    if "cuda" in states and th.cuda.is_available() and len(states["cuda"]) == th.cuda.device_count():
        th.cuda.set_rng_state_all(states["cuda"])


def _restore_env(venv: VecEnv, state: ResumeState) -> None:
    layers, base = _vec_layers(venv)
    for layer, statistics in zip(layers, state.statistics, strict=True):
        vars(layer).update(statistics)
    if state.env_state is None:
        return
    for layer, attributes in zip(layers, state.env_state["wrappers"], strict=True):
        vars(layer).update(attributes)
    vars(base).update(state.env_state["base"])
    for env, chain in zip(base.envs, state.env_state["envs"], strict=True):  # type: ignore[attr-defined]
        for obj, attributes in zip(_env_chain(env), chain, strict=True):
            vars(obj).update(attributes)


def restore_resume_state(model: BaseAlgorithm, state: ResumeState) -> list[str]:
    """Put ``state`` back into ``model`` and its env: called at the first rollout's start of a resumed ``learn``.

    The RNG states are always restored. The envs' state, the last observations and LSTM states only into envs of
    the checkpoint's layout whose state the checkpoint holds; otherwise the run goes on from the envs as they are
    (freshly reset by ``learn``), with the ``VecNormalize`` statistics restored when the layouts match.

    :param model: the model, at the start of its first rollout after ``load``.
    :param state: the checkpoint's state.
    :return: what was not restored, one phrase each (empty: the run continues exactly).
    """
    not_restored: list[str] = []
    if model.num_timesteps != state.num_timesteps:
        steps = f"the checkpoint was taken at {state.num_timesteps} steps, the model is at {model.num_timesteps}"
        return [f"anything: {steps}"]
    _restore_rng(state.rng)
    env = model.get_env()
    assert env is not None
    layout = _env_layout(env)
    if layout != state.env_layout:
        not_restored.append(f"the envs' state: the checkpoint's VecEnv is {state.env_layout}, this one {layout}")
    else:
        _restore_env(env, state)
        if state.env_missing is not None:
            not_restored.append(f"the envs' state ({state.env_missing}); the VecNormalize statistics were restored")
        elif state.env_skipped:
            not_restored.append(f"these env attributes, which could not be copied: {', '.join(state.env_skipped)}")
    if state.env_state is not None and layout == state.env_layout:
        model._last_obs = state.last_obs
        model._last_episode_starts = state.last_episode_starts
        model._last_original_obs = state.last_original_obs
        if state.lstm_states is not None:
            model._last_lstm_states = _map_tensors(state.lstm_states, lambda t: t.to(model.device))  # type: ignore[attr-defined]
    if getattr(model, "use_sde", False):
        dist = getattr(model.policy, "sde_dist", None) or getattr(model.policy, "action_dist", None)
        if state.at == "training_end":
            model.policy.reset_noise(env.num_envs)  # as the uninterrupted run's next rollout did, from the same RNG
        elif state.sde_noise:
            vars(dist).update(_map_tensors(state.sde_noise, lambda t: t.to(model.device)))
    return not_restored


class ResumeCallback(BaseCallback):
    """Restores a :class:`ResumeState` at the first rollout's start (``ReliabilityMixin._setup_learn`` adds it).

    There, and not in ``load``, because ``learn`` resets the envs and gSDE samples its noise between the two.

    :param state: the checkpoint's state.
    """

    def __init__(self, state: ResumeState) -> None:
        super().__init__()
        self.state: ResumeState | None = state
        #: what was not restored (set at the first rollout's start; empty: the run continues exactly)
        self.not_restored: list[str] = []

    def _on_rollout_start(self) -> None:
        if self.state is None:
            return
        state, self.state = self.state, None
        self.not_restored = restore_resume_state(self.model, state)
        if self.not_restored:
            warnings.warn(
                "Resumed from a resumable checkpoint without restoring "
                + "; ".join(self.not_restored)
                + ". Training goes on, but not bit for bit as the uninterrupted run (docs/reliability.md, "
                "'Crash and resume').",
                ResumeWarning,
                stacklevel=2,
            )

    def _on_step(self) -> bool:
        return True


def with_resume(model: BaseAlgorithm, callback: MaybeCallback, reset_num_timesteps: bool) -> MaybeCallback:
    """``callback``, preceded by a :class:`ResumeCallback` when ``model`` was loaded from a resumable checkpoint.

    The checkpoint's state is taken off the model either way (a later save does not carry it); it is restored
    only when the run continues (``reset_num_timesteps=False``).

    :param model: the model whose ``learn`` starts.
    :param callback: ``learn``'s callback argument.
    :param reset_num_timesteps: ``learn``'s argument.
    :return: the callback argument to pass on.
    """
    blob = vars(model).pop(RESUME_ATTRIBUTE, None)
    if blob is None or reset_num_timesteps:
        return callback
    restore = ResumeCallback(pickle.loads(blob))
    if callback is None:
        return [restore]
    if isinstance(callback, list):
        return [restore, *callback]
    return [restore, callback if isinstance(callback, BaseCallback) else ConvertCallback(callback)]


__all__ = [
    "RESUME_ATTRIBUTE",
    "AtomicCheckpointCallback",
    "Checkpoint",
    "ResumeCallback",
    "ResumeState",
    "capture_resume_state",
    "restore_resume_state",
    "save_resumable",
    "with_resume",
    "atomic_write",
    "check_model_file",
    "find_checkpoints",
    "latest_checkpoint",
    "pickle_atomically",
    "resolve_save_path",
    "save_atomically",
]
