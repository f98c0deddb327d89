"""A clear error instead of ``EOFError`` or a hang when a ``SubprocVecEnv`` worker process dies.

SB3's ``SubprocVecEnv`` talks to each worker through a pipe. When a worker dies (a crash in native
code, ``os._exit``, the OOM killer), the main process gets ``EOFError``/``BrokenPipeError`` without
saying which env died, or, with ``start_method="fork"``, waits forever: workers forked earlier hold
copies of the dead worker's end of the pipe, so the end-of-file never arrives.

:func:`guard_subprocess_workers` replaces the pipes of every ``SubprocVecEnv`` inside a VecEnv
with :class:`GuardedConnection` proxies that poll while checking that the worker is alive, and turn
a dead worker into :class:`~sb3_ppo_ext.errors.EnvWorkerError` naming the env index, pid and exit
code. ``ClippedPPO.learn`` calls it; nothing changes while the workers are alive.
"""

from __future__ import annotations

import signal
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from stable_baselines3.common.vec_env import SubprocVecEnv, VecEnv

from sb3_ppo_ext.errors import EnvWorkerError

# Seconds between liveness checks while waiting for a worker's answer (only when it is slow to answer).
POLL_INTERVAL = 0.1
_PIPE_ERRORS = (EOFError, BrokenPipeError, ConnectionResetError)


def _describe_exit(process: BaseProcess) -> str:
    process.join(timeout=1.0)  # a worker that just closed its pipe needs a moment to report its exit code
    code = process.exitcode
    if code is None:
        return "closed its pipe but is still running"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class GuardedConnection:
    """A proxy of a worker's ``multiprocessing`` connection that raises :class:`EnvWorkerError` if it dies.

    :param connection: the main process's end of the pipe.
    :param process: the worker process.
    :param env_index: index of the worker's env in the ``SubprocVecEnv``.
    """

    def __init__(self, connection: Connection, process: BaseProcess, env_index: int) -> None:
        self.connection = connection
        self.process = process
        self.env_index = env_index
        self.dead = False

    def _error(self, doing: str) -> EnvWorkerError:
        self.dead = True
        return EnvWorkerError(
            f"SubprocVecEnv worker for env {self.env_index} (pid {self.process.pid}) {_describe_exit(self.process)} "
            f"while {doing}. Its environment crashed (look for its traceback above) or the process was killed "
            "(SIGKILL often means out of memory). The VecEnv cannot be used any more: fix the env, then resume "
            "training from your last checkpoint (see sb3_ppo_ext.reliability.checkpoints)."
        )

    def send(self, message: Any) -> None:
        """Send ``message`` to the worker; a ``close`` request to a dead worker is silently dropped.

        :param message: SB3's ``(command, data)`` tuple.
        :raises EnvWorkerError: the worker is dead (for anything but ``close``).
        """
        if self.dead and isinstance(message, tuple) and message and message[0] == "close":
            return
        try:
            self.connection.send(message)
        except _PIPE_ERRORS as error:
            if isinstance(message, tuple) and message and message[0] == "close":
                return
            raise self._error(f"sending it {message[0] if isinstance(message, tuple) else 'a message'!r}") from error

    def recv(self) -> Any:
        """Wait for the worker's answer, checking every ``POLL_INTERVAL`` seconds that it is still alive.

        :return: what the worker sent.
        :raises EnvWorkerError: the worker died before answering.
        """
        if self.dead:
            raise self._error("waiting for its answer")
        while not self.connection.poll(POLL_INTERVAL):
            if not self.process.is_alive():
                raise self._error("waiting for its answer")
        try:
            return self.connection.recv()
        except _PIPE_ERRORS as error:
            raise self._error("waiting for its answer") from error

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connection, name)


def _close_after_crash(venv: SubprocVecEnv) -> None:
    """``close()`` that works after a worker died: skip the answers a dead worker will never send."""
    if any(getattr(remote, "dead", False) for remote in venv.remotes):
        venv.waiting = False
    type(venv).close(venv)


def guard_subprocess_workers(venv: VecEnv | None) -> None:
    """Guard every ``SubprocVecEnv`` in ``venv``'s wrapper chain (idempotent; other VecEnvs are left alone).

    :param venv: the VecEnv the algorithm trains on (wrappers such as ``VecNormalize`` are looked through).
    """
    env: Any = venv
    while env is not None:
        if isinstance(env, SubprocVecEnv) and not getattr(env, "_sb3_ppo_ext_guarded", False):
            env.remotes = [
                remote if isinstance(remote, GuardedConnection) else GuardedConnection(remote, process, index)
                for index, (remote, process) in enumerate(zip(env.remotes, env.processes, strict=True))
            ]
            env.close = lambda env=env: _close_after_crash(env)  # type: ignore[method-assign]
            env._sb3_ppo_ext_guarded = True  # type: ignore[attr-defined]
        env = getattr(env, "venv", None)


__all__ = ["GuardedConnection", "guard_subprocess_workers"]
