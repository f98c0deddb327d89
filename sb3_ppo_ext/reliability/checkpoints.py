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
import re
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import CheckpointCallback

from sb3_ppo_ext.errors import ModelFileError, NotAModelFileError

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
    """SB3's ``CheckpointCallback`` (same arguments, same file names) with atomic writes.

    Every file goes through :func:`atomic_write`, and the model is written last, after the
    ``VecNormalize`` statistics and replay buffer of the same step: a model checkpoint on disk always
    has its companions, so :func:`latest_checkpoint` can resume from it.

    :param save_freq: save every ``save_freq`` calls of the callback (env steps of the VecEnv).
    :param save_path: the folder for the checkpoints.
    :param name_prefix: common prefix of the checkpoint files.
    :param save_replay_buffer: also save the replay buffer (off-policy algorithms).
    :param save_vecnormalize: also save the ``VecNormalize`` statistics.
    :param verbose: 2 prints every saved path.
    """

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq != 0:
            return True
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
        model_path = self._checkpoint_path(extension="zip")
        save_atomically(self.model, model_path)
        if self.verbose >= 2:
            print(f"Saving model checkpoint to {model_path}")
        return True


def find_checkpoints(save_path: PathLike, name_prefix: str = "rl_model") -> list[Checkpoint]:
    """All model checkpoints named like ``CheckpointCallback``'s in ``save_path``, oldest first (not checked).

    :param save_path: the callback's folder.
    :param name_prefix: the callback's ``name_prefix``.
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
    """
    for checkpoint in reversed(find_checkpoints(save_path, name_prefix)):
        try:
            check_model_file(checkpoint.path)
        except ModelFileError as error:
            warnings.warn(f"Skipping checkpoint {checkpoint.path}: {error}")
            continue
        return checkpoint
    return None


__all__ = [
    "AtomicCheckpointCallback",
    "Checkpoint",
    "atomic_write",
    "check_model_file",
    "find_checkpoints",
    "latest_checkpoint",
    "pickle_atomically",
    "resolve_save_path",
    "save_atomically",
]
