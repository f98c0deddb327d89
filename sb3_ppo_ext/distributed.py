"""Data-parallel ClippedPPO on ``torch.distributed``: the process group and every collective, in one place.

``torchrun --nproc_per_node=N train.py`` (or ``torchrun --nnodes=M ...`` across hosts) starts the same
user script N times. Each process (rank) owns its envs and its rollout (``n_envs``, ``n_steps`` and
``batch_size`` are per rank, the global batch is their sum) and trains the same parameters: gradients
are averaged across ranks before every optimizer step, the way DDP does it, but without a module
wrapper (PPO's update calls ``evaluate_actions`` and a closed-form kernel, not ``forward``).

:func:`setup` picks the context once, in ``ClippedPPO.__init__``: :class:`DataParallel` when a process
group of more than one rank exists or can be created from ``torchrun``'s environment (``WORLD_SIZE > 1``;
gloo on CPU, nccl on CUDA), else :data:`SINGLE_PROCESS`, whose methods return their inputs unchanged:
one process trains bit for bit as before. ``ppo.py`` calls the context once at each synchronisation
point:

===========================================  ====================================================================
ppo.py                                       with N ranks
===========================================  ====================================================================
``__init__``: :func:`setup`                  process group from ``env://``; ``cuda:LOCAL_RANK`` for a CUDA device
``set_random_seed``: ``rank_seed``           rank r seeds with ``seed + r * n_envs`` (env i: ``seed + r * n_envs + i``)
``_setup_model``, ``set_parameters``:        parameters, buffers and optimizer state broadcast from rank 0 (so
``broadcast_model``                          also after ``load``)
``_setup_learn``: ``setup_learn``            same settings checked on every rank; rank 0 alone logs, prints and
                                             runs I/O callbacks; VecNormalize statistics aligned; the model
                                             broadcast again
``collect_rollouts``: ``global_steps``       ``num_timesteps`` counts every rank's env steps (schedules,
                                             callbacks and ``total_timesteps`` are global)
``collect_rollouts``: ``end_rollout``        every rank goes on only if all do (a callback's stop reaches
                                             all); VecNormalize statistics merged; episodes gathered on rank 0
``_train_epochs``: ``normalize_advantages``  mean and std of the minibatch over all ranks (all-reduced count,
                                             sum, sum of squares); ``advantage_normalization="local"``: per rank
``_train_epochs``: ``reduce_update``         one all-reduce per minibatch: mean of the gradients and of the
                                             loss statistics, so ``target_kl`` stops every rank at once
===========================================  ====================================================================

Rules the ranks keep: every rank constructs the model, calls ``learn``, ``load`` and ``set_parameters``
(collectives), in the same order; ``save`` writes on rank 0 only and is no collective, so rank-0-only
code (callbacks) may save. A rank that dies makes the others raise :class:`~sb3_ppo_ext.errors.DistributedError`
at their next collective (at once when its connections close, else after ``timeout_s``).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th
import torch.distributed as dist
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EvalCallback,
    EventCallback,
    ProgressBarCallback,
)
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.type_aliases import MaybeCallback
from stable_baselines3.common.utils import get_device

from sb3_ppo_ext import losses
from sb3_ppo_ext.errors import ConfigurationError, DistributedConfigurationError, DistributedError

# how long a collective waits for the other ranks before DistributedError; a rank that dies on the same host
# is noticed at once (its sockets close), a host that vanishes or a rank stuck in a long rank-0-only
# evaluation only after this time, so it must exceed the longest EvalCallback evaluation
DEFAULT_TIMEOUT_S = 600.0
ADVANTAGE_NORMALIZATIONS = ("global", "local")
# the eps of losses.normalize_advantages
_ADVANTAGE_EPS = 1e-8
# torch's at::internal::GRAIN_SIZE: reductions of this many elements or more may be split across threads
_GRAIN_SIZE = 32768
# callbacks that only read the model and write files or the terminal: they run on rank 0 alone
RANK_ZERO_CALLBACKS: tuple[type[BaseCallback], ...] = (EvalCallback, CheckpointCallback, ProgressBarCallback)


@dataclass(frozen=True)
class DistributedConfig:
    """Options of a data-parallel run (``ClippedPPO(distributed=DistributedConfig(...))`` or a dict of them).

    :param backend: ``"gloo"``, ``"nccl"``...; None: nccl for a CUDA device, gloo otherwise. Used only when
        ClippedPPO creates the process group (an initialised one is used as it is).
    :param timeout_s: seconds a collective waits for the other ranks before
        :class:`~sb3_ppo_ext.errors.DistributedError` (only when ClippedPPO creates the process group).
    :param advantage_normalization: ``"global"``: a minibatch's advantages are normalised with the mean and
        std of that minibatch on all ranks together (as one process with the global batch); ``"local"``:
        with each rank's own.
    """

    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    advantage_normalization: str = "global"

    def __post_init__(self) -> None:
        if self.advantage_normalization not in ADVANTAGE_NORMALIZATIONS:
            raise ConfigurationError(
                f"advantage_normalization={self.advantage_normalization!r}; use one of {ADVANTAGE_NORMALIZATIONS}."
            )
        if not self.timeout_s > 0:
            raise ConfigurationError(f"timeout_s={self.timeout_s!r} must be > 0 (seconds).")


# ClippedPPO.load(..., distributed=False) reaches the constructor that SB3's load calls through this
_LOAD_DISTRIBUTED: ContextVar[Any] = ContextVar("sb3_ppo_ext_load_distributed", default=None)


@contextlib.contextmanager
def loading(distributed: Any) -> Iterator[None]:
    """Within, a ClippedPPO built with ``distributed=None`` (SB3's ``load`` does so) uses ``distributed``.

    :param distributed: the ``distributed`` argument ``load`` was given.
    """
    token = _LOAD_DISTRIBUTED.set(distributed)
    try:
        yield
    finally:
        _LOAD_DISTRIBUTED.reset(token)


def _config(distributed: Any) -> DistributedConfig:
    if distributed is None or distributed is True:
        return DistributedConfig()
    if isinstance(distributed, DistributedConfig):
        return distributed
    if isinstance(distributed, dict):
        try:
            return DistributedConfig(**distributed)
        except TypeError as error:
            raise ConfigurationError(f"distributed={distributed!r}: {error}") from None
    raise ConfigurationError(
        f"distributed={distributed!r}; use None (detect torchrun), True, False, a DistributedConfig or a dict of "
        "its fields."
    )


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def world_size() -> int:
    """The number of ranks.

    :return: the process group's size, else torchrun's ``WORLD_SIZE``, else 1.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_world_size()


def rank() -> int:
    """The rank of this process.

    :return: the process group's rank, else torchrun's ``RANK``, else 0.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    """Whether this process is rank 0 (the one that logs, saves and prints), also before any model exists.

    :return: True on rank 0 and without torchrun.
    """
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (e.g. before other ranks read a file rank 0 wrote); nothing with one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def setup(distributed: Any, device: th.device | str) -> tuple[SingleProcess, th.device | str]:
    """The context for a new ClippedPPO, and its device (``cuda:LOCAL_RANK`` for ``"auto"``/``"cuda"``).

    :param distributed: None: data-parallel when a process group of several ranks is initialised or
        ``WORLD_SIZE > 1`` (torchrun); True (the same; one process when there is none), False (never),
        a :class:`DistributedConfig` or a dict of its fields.
    :param device: the model's ``device`` argument.
    :return: the context (:class:`SingleProcess` or :class:`DataParallel`) and the device to use.
    """
    if distributed is None:
        distributed = _LOAD_DISTRIBUTED.get()
    if distributed is False:
        return SINGLE_PROCESS, device
    config = _config(distributed)
    if world_size() <= 1 or not dist.is_available():
        return SINGLE_PROCESS, device
    device = _rank_device(device)
    if not dist.is_initialized():
        backend = config.backend or ("nccl" if get_device(device).type == "cuda" else "gloo")
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=config.timeout_s))
        atexit.register(_destroy_process_group)
        timeout = f"{config.timeout_s:g} s"
    else:
        timeout = "the process group's timeout"
    return DataParallel(config, timeout), device


def _rank_device(device: th.device | str) -> th.device | str:
    """One GPU per rank: ``"auto"``/``"cuda"`` become ``cuda:LOCAL_RANK``; an explicit index is kept."""
    resolved = get_device(device)
    if (
        resolved.type != "cuda"
        or (isinstance(device, str) and ":" in device)
        or (isinstance(device, th.device) and device.index is not None)
    ):
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0) % max(th.cuda.device_count(), 1)
    th.cuda.set_device(local_rank)
    return th.device("cuda", local_rank)


# How long the exit hook lets gloo's worker threads release their last work (see below).
EXIT_GRACE_S = 0.2


def _destroy_process_group() -> None:
    """Exit hook of the process group this module started, run while the interpreter is still whole.

    A gloo worker thread frees each finished collective's tensors a moment after the caller has woken
    up, and freeing a tensor that has a Python object takes the GIL. If the main thread has by then
    begun to finalise the interpreter, that thread is killed inside a C++ destructor and the process
    aborts ("terminate called without an active exception", SIGABRT): a rank that exits right after
    ``learn`` (torchrun's rank 1 while rank 0 evaluates) did so in 6 of 78 runs on 2 busy cores.
    Destroying the group does not join those threads, so we also hand them the GIL for a short grace.
    """
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        time.sleep(EXIT_GRACE_S)


class SingleProcess:
    """One process: every method returns its input; ClippedPPO trains exactly as without this module."""

    enabled = False
    rank = 0
    world_size = 1
    is_main_process = True
    _last_normalized: tuple[th.Tensor, int, th.Tensor] | None = None
    _epoch_normalized: tuple[th.Tensor, int, th.Tensor] | None = None

    def rank_seed(self, seed: int | None, n_envs: int) -> int | None:
        """The seed of this rank's generators and envs (env i gets ``rank_seed + i``).

        :param seed: the model's seed.
        :param n_envs: this rank's envs.
        :return: this rank's seed.
        """
        return seed

    def global_steps(self, steps: int) -> int:
        """Env steps of all ranks together when each made ``steps``.

        :param steps: this rank's env steps.
        :return: the env steps of all ranks.
        """
        return steps

    def minibatches(self, batches: Iterable[Any], normalize: bool) -> Iterable[Any]:
        """The minibatches of an epoch (``normalize``: their advantages are normalised one by one).

        :param batches: this rank's minibatches of the epoch.
        :param normalize: normalise advantages per minibatch.
        :return: the minibatches, their advantages normalised over every rank when ``normalize``.
        """
        return batches

    def normalize_advantages(self, advantages: th.Tensor) -> th.Tensor:
        """``(A - mean) / (std + eps)`` (:func:`sb3_ppo_ext.losses.normalize_advantages`).

        A minibatch holding the whole rollout (CartPole's Zoo settings) is the same tensor in every epoch: its
        normalised advantages are computed once per update, not once per epoch.

        :param advantages: this rank's advantages.
        :return: the normalised advantages.
        """
        last = self._last_normalized
        if last is not None and last[0] is advantages and last[1] == advantages._version:
            return last[2]
        row = self._row_of_normalized_epoch(advantages)
        if row is not None:
            return row
        normalized = losses.normalize_advantages(advantages)
        self._last_normalized = (advantages, advantages._version, normalized)
        return normalized

    def _row_of_normalized_epoch(self, advantages: th.Tensor) -> th.Tensor | None:
        """The minibatch's normalised advantages when it is row ``k`` of its epoch's shuffled advantages.

        The rollout buffer yields each minibatch's advantages as a slice of one shuffled tensor per epoch; viewed as
        ``[M, B]``, all M minibatches are normalised in one call instead of M (5 small ops each, ~45 us per
        minibatch on HalfCheetah's batch of 64). Only float32 below torch's parallel grain: there a row's mean and
        std are bitwise those of the minibatch alone (tested); anything else returns None and takes the plain path.
        """
        base, n = advantages._base, advantages.numel()
        if base is None or advantages.dtype != th.float32 or not 1 < n < _GRAIN_SIZE or advantages.dim() != 1:
            return None
        if base.dim() != 1 or base.stride(0) != 1 or advantages.stride(0) != 1:
            return None
        offset = advantages.storage_offset() - base.storage_offset()
        rows = base.numel() // n
        if offset % n or offset + n > rows * n:
            return None  # not aligned on a row, or the smaller last minibatch
        epoch = self._epoch_normalized
        if epoch is not None and epoch[0] is base and epoch[1] == base._version:
            if epoch[2].shape[-1] != n:
                return None  # the epoch's smaller last minibatch
        else:
            epoch = (base, base._version, losses.normalize_advantages(base[: rows * n].view(rows, n)))
            self._epoch_normalized = epoch
        return epoch[2][offset // n]

    def reduce_update(self, parameters: list[th.Tensor], terms: losses.LossTerms) -> losses.LossTerms:
        """The gradients (``.grad``) and loss statistics of a minibatch, averaged over ranks.

        :param parameters: the parameters whose ``.grad`` to average.
        :param terms: the minibatch's loss terms.
        :return: the loss terms averaged over ranks.
        """
        return terms

    def all_gather(self, array: np.ndarray) -> np.ndarray:
        """Every rank's ``array`` (same shape on each), side by side along the last axis, in rank order.

        :param array: this rank's array.
        :return: the concatenation of every rank's array.
        """
        return array

    def end_rollout(
        self, model: Any, continue_training: bool, statistics: dict[str, float], names: tuple[str, ...]
    ) -> tuple[bool, dict[str, float]]:
        """After a rollout: whether every rank goes on, and the extensions' ``statistics`` over every rank.

        :param model: the model.
        :param continue_training: whether this rank's callbacks let training go on.
        :param statistics: this rank's extension statistics (:meth:`~sb3_ppo_ext.extensions.Extension.rollout_end`).
        :param names: the statistics every rank reports, in one order.
        :return: whether every rank goes on, and the statistics averaged over ranks.
        """
        return continue_training, statistics

    def broadcast_model(self, model: Any) -> None:
        """Parameters, buffers and optimizer state from rank 0.

        :param model: the model, changed in place on ranks other than 0.
        """

    def setup_learn(self, model: Any, setup_learn: Callable[..., Any], *args: Any) -> Any:
        """``model._setup_learn(*args)`` (SB3's), with the ranks set up around it.

        :param model: the model.
        :param setup_learn: SB3's ``_setup_learn`` of the model.
        :param args: its arguments.
        :return: what it returns.
        """
        return setup_learn(*args)


SINGLE_PROCESS = SingleProcess()


class DataParallel(SingleProcess):
    """N ranks of an initialised process group training one model (see the module docstring).

    :param config: the options.
    :param timeout: how the timeout reads in error messages.
    :param group: the process group (None: the default one, made by ``torchrun`` or :func:`setup`).
    """

    enabled = True

    def __init__(
        self, config: DistributedConfig, timeout: str = "the process group's timeout", group: Any = None
    ) -> None:
        self.config = config
        self.timeout = timeout
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.is_main_process = self.rank == 0
        self.backend = dist.get_backend(group)
        # the global rank of the group's rank 0, which broadcasts and gathers
        self._root = 0 if group is None else dist.get_global_rank(group, 0)
        # advantages whose statistics are all-reduced or on their way: (tensor, its version, moments, work or None)
        self._pending: list[tuple[th.Tensor, int, th.Tensor, Any]] = []
        # VecNormalize statistics at the last merge (the same on every rank): deltas are taken against them
        self._base_stats: list[tuple[np.ndarray, np.ndarray, float]] | None = None

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r})"

    # -- collectives -------------------------------------------------------------------------------

    def _collective(self, what: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, group=..., **kwargs)`` on this context's process group, failures made clear."""
        return self._guarded(what, function, *args, group=self.group, **kwargs)

    def _guarded(self, what: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)``; a failure (a rank died, or a timeout) becomes DistributedError."""
        try:
            return function(*args, **kwargs)
        except DistributedError:
            raise
        except RuntimeError as error:
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: the {what} failed: another rank died or did not answer "
                f"within {self.timeout} (see that rank's output for its own error). torch.distributed said: "
                f"{str(error).strip()[:500]}"
            ) from error

    @property
    def _collective_device(self) -> th.device:
        """Where small tensors go for a collective: the current GPU for nccl, the CPU otherwise."""
        if self.backend == "nccl":
            return th.device("cuda", th.cuda.current_device())
        return th.device("cpu")

    def _all_reduce(self, what: str, tensor: th.Tensor) -> th.Tensor:
        self._collective(what, dist.all_reduce, tensor)
        return tensor

    # -- seeds and counts --------------------------------------------------------------------------

    def rank_seed(self, seed: int | None, n_envs: int) -> int | None:
        """``seed + rank * n_envs``; without a seed, torch's generator is seeded from the OS (see below).

        :param seed: the model's seed.
        :param n_envs: this rank's envs.
        :return: this rank's seed.
        """
        if seed is None:
            # unseeded torch generators start alike in every process: the ranks would draw the same noise
            th.seed()
            return None
        return seed + self.rank * n_envs

    def global_steps(self, steps: int) -> int:
        """``steps * world_size``.

        :param steps: this rank's env steps.
        :return: the env steps of all ranks.
        """
        # setup_learn checked that every rank has the same n_envs and n_steps
        return steps * self.world_size

    # -- the update --------------------------------------------------------------------------------

    def minibatches(self, batches: Iterable[Any], normalize: bool) -> Iterator[Any]:
        """The minibatches, each one's advantage statistics all-reduced in the background one minibatch ahead.

        The all-reduce of the next minibatch's count, sum and sum of squares runs (gloo, in its own thread) while
        this one computes its gradients, so that global normalisation adds no waiting of its own.

        :param batches: this rank's minibatches of the epoch.
        :param normalize: normalise advantages per minibatch.
        :return: the minibatches, their advantages normalised over every rank when ``normalize``.
        """
        if not normalize or self.config.advantage_normalization == "local":
            yield from batches
            return
        iterator = iter(batches)
        current = next(iterator, None)
        if current is not None:
            self._start_moments(current.advantages)
        while current is not None:
            following = next(iterator, None)
            if following is not None:
                self._start_moments(following.advantages)
            yield current
            current = following

    def _start_moments(self, advantages: th.Tensor) -> None:
        """Launch the asynchronous all-reduce of the statistics of ``advantages`` (unless already known)."""
        if self._known_moments(advantages) is not None:
            return
        moments = _moments(advantages).to(self._collective_device)
        work = self._collective("advantage statistics all-reduce", dist.all_reduce, moments, async_op=True)
        self._pending.append((advantages, advantages._version, moments, work))

    def _known_moments(self, advantages: th.Tensor) -> tuple[th.Tensor, Any] | None:
        """The all-reduced (or pending) statistics of this very tensor, unchanged since.

        E.g. the whole rollout as the one minibatch of every epoch: its statistics are all-reduced once.
        """
        for tensor, version, moments, work in self._pending:
            if tensor is advantages and version == advantages._version:
                return moments, work
        return None

    def normalize_advantages(self, advantages: th.Tensor) -> th.Tensor:
        """Normalised with the count, sum and sum of squares of the minibatches of all ranks (all-reduced).

        :param advantages: this rank's advantages.
        :return: the normalised advantages.
        """
        if self.config.advantage_normalization == "local":
            return losses.normalize_advantages(advantages)
        known = self._known_moments(advantages)
        if known is None:  # not announced by minibatches(): all-reduce now
            moments = self._all_reduce(
                "advantage statistics all-reduce", _moments(advantages).to(self._collective_device)
            )
        else:
            moments, work = known
            if work is not None:
                self._guarded("advantage statistics all-reduce", work.wait)
            # keep only this tensor's entry (finished) and those still ahead of it
            index = next(i for i, entry in enumerate(self._pending) if entry[0] is advantages)
            self._pending = [(advantages, advantages._version, moments, None), *self._pending[index + 1 :]]
        count, total, squares = moments.tolist()
        if count <= 1:
            return advantages
        mean = total / count
        std = math.sqrt(max(squares - total * mean, 0.0) / (count - 1))  # unbiased, as Tensor.std
        return (advantages - mean) / (std + _ADVANTAGE_EPS)

    def reduce_update(self, parameters: list[th.Tensor], terms: losses.LossTerms) -> losses.LossTerms:
        """Mean of ``.grad`` and of the loss statistics over ranks, in one all-reduce of one flat buffer.

        :param parameters: the parameters whose ``.grad`` to average.
        :param terms: the minibatch's loss terms.
        :return: the loss terms averaged over ranks.
        """
        # every rank's minibatches have the same size (same settings, checked), so the global loss is the mean
        # of the ranks' losses and its gradient the mean of their gradients; one buffer, one all-reduce
        grads = [p.grad for p in parameters]
        names = [name for name in losses.LossTerms._fields if getattr(terms, name) is not None]
        dtype = next((g.dtype for g in grads if g is not None), th.float32)
        device = next((g.device for g in grads if g is not None), terms.loss.device)
        pieces = [
            g.reshape(-1) if g is not None else th.zeros(p.numel(), dtype=dtype, device=device)
            for p, g in zip(parameters, grads, strict=True)
        ]
        pieces.append(th.stack([getattr(terms, name).detach().to(device, dtype) for name in names]))
        flat = self._all_reduce("gradient all-reduce", th.cat(pieces))
        flat.div_(self.world_size)
        offset = 0
        for p, g in zip(parameters, grads, strict=True):
            size = p.numel()
            if g is not None:  # a parameter without gradient keeps none (Adam skips it)
                g.copy_(flat[offset : offset + size].view_as(g))
            offset += size
        statistics = flat[offset:].clone()  # not a view: the history must not keep the gradient buffer alive
        return terms._replace(**{name: statistics[i].to(getattr(terms, name).dtype) for i, name in enumerate(names)})

    def all_gather(self, array: np.ndarray) -> np.ndarray:
        """Every rank's ``array``, concatenated along the last axis in rank order (one all-gather).

        :param array: this rank's array.
        :return: the concatenation of every rank's array.
        """
        tensor = th.as_tensor(np.ascontiguousarray(array)).to(self._collective_device)
        parts = [th.empty_like(tensor) for _ in range(self.world_size)]
        self._collective("rollout all-gather", dist.all_gather, parts, tensor)
        return np.concatenate([part.cpu().numpy() for part in parts], axis=-1)

    # -- the rollout -------------------------------------------------------------------------------

    def end_rollout(
        self, model: Any, continue_training: bool, statistics: dict[str, float], names: tuple[str, ...]
    ) -> tuple[bool, dict[str, float]]:
        """True if every rank goes on; VecNormalize statistics merged, each statistic averaged, episodes gathered.

        A statistic is averaged over the ranks that measured it (a rank stopped by a callback measured none).

        :param model: the model.
        :param continue_training: whether this rank's callbacks let training go on.
        :param statistics: this rank's extension statistics (:meth:`~sb3_ppo_ext.extensions.Extension.rollout_end`).
        :param names: the statistics every rank reports, in one order.
        :return: whether every rank goes on, and the statistics averaged over ranks.
        """
        # one all-reduce: [ranks going on, (sum, ranks with it) per statistic, VecNormalize deltas...]; then the
        # episodes gathered on rank 0. The same two collectives on every rank, stop or not.
        header = [float(continue_training)]
        for name in names:
            header += [float(statistics.get(name, 0.0)), float(name in statistics)]
        stats = _running_stats(model.get_vec_normalize_env())
        deltas = self._stats_deltas(stats)
        buffer = th.as_tensor(np.concatenate([np.asarray(header), *deltas]), dtype=th.float64)
        reduced = self._all_reduce("end-of-rollout all-reduce", buffer.to(self._collective_device)).cpu().numpy()
        going_on = reduced[0]
        merged = {}
        for i, name in enumerate(names):
            total, ranks = reduced[1 + 2 * i], reduced[2 + 2 * i]
            if ranks > 0:
                merged[name] = float(total / ranks)
        self._merge_stats(stats, reduced[len(header) :])
        self._gather_episodes(model)
        if going_on == self.world_size:
            return True, merged
        # a rank that stopped mid-rollout counted fewer steps: all take the largest count, so that the ranks of a
        # later learn(reset_num_timesteps=False) run the same number of rollouts
        steps = th.tensor([model.num_timesteps], dtype=th.int64, device=self._collective_device)
        self._collective("step count all-reduce", dist.all_reduce, steps, op=dist.ReduceOp.MAX)
        model.num_timesteps = int(steps.item())
        return False, merged

    def _stats_deltas(self, stats: list[RunningMeanStd]) -> list[np.ndarray]:
        """Per statistic: count, sum and sum of squares (about the base mean) of the data since the last merge."""
        if self._base_stats is None:  # learn() not set up: nothing to merge on any rank
            return []
        deltas = []
        for rms, (base_mean, base_var, base_count) in zip(stats, self._base_stats, strict=True):
            mean, var, count = np.asarray(rms.mean, np.float64), np.asarray(rms.var, np.float64), float(rms.count)
            shift = mean - base_mean
            first = count * shift
            second = count * var + count * shift**2 - base_count * base_var
            deltas += [np.array([count - base_count]), first.reshape(-1), second.reshape(-1)]
        return deltas

    def _merge_stats(self, stats: list[RunningMeanStd], sums: np.ndarray) -> None:
        """Every rank's statistics become base + all ranks' deltas (the statistics of the union), in place."""
        if not stats or self._base_stats is None:
            return
        offset = 0
        merged = []
        for rms, (base_mean, base_var, base_count) in zip(stats, self._base_stats, strict=True):
            size = base_mean.size
            delta_count = sums[offset]
            first = sums[offset + 1 : offset + 1 + size].reshape(base_mean.shape)
            second = sums[offset + 1 + size : offset + 1 + 2 * size].reshape(base_mean.shape)
            offset += 1 + 2 * size
            count = base_count + delta_count
            shift = first / count
            var = np.maximum((base_count * base_var + second) / count - shift**2, 0.0)
            _set_stats(rms, base_mean + shift, var, count)
            merged.append((np.array(base_mean + shift), np.array(var), float(count)))
        self._base_stats = merged

    def _gather_episodes(self, model: Any) -> None:
        """Rank 0's episode buffers get the episodes the other ranks finished during the rollout."""
        buffers = [getattr(model, name, None) for name in ("ep_info_buffer", "ep_success_buffer")]
        new = [_take_new(buffer) for buffer in buffers]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main_process else None
        self._collective("episode statistics gather", dist.gather_object, new, gathered, dst=self._root)
        if gathered is None:
            return
        for other in gathered[1:]:
            for buffer, episodes in zip(buffers, other, strict=True):
                if buffer is not None:
                    deque.extend(buffer, episodes)  # not counted as this rank's new episodes

    # -- the model -----------------------------------------------------------------------------------

    def broadcast_model(self, model: Any) -> None:
        """Rank 0's parameters and buffers (one broadcast per dtype) and optimizer state, into every rank's.

        :param model: the model, changed in place on ranks other than 0.
        """
        tensors = [t for module in _modules(model) for t in module.state_dict().values()]
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            group = [t for t in tensors if t.dtype == dtype]
            device = group[0].device if self.backend != "nccl" else self._collective_device
            flat = th.cat([t.detach().reshape(-1).to(device) for t in group])
            self._collective("parameter broadcast", dist.broadcast, flat, src=self._root)
            offset = 0
            for t in group:
                with th.no_grad():
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        optimizer = getattr(getattr(model, "policy", None), "optimizer", None)
        if optimizer is not None:
            state = [optimizer.state_dict() if self.is_main_process else None]
            self._collective("optimizer state broadcast", dist.broadcast_object_list, state, src=self._root)
            if not self.is_main_process:
                optimizer.load_state_dict(state[0])

    def setup_learn(self, model: Any, setup_learn: Callable[..., Any], *args: Any) -> Any:
        """Settings checked, model broadcast, statistics aligned, I/O on rank 0 only; SB3's setup in between.

        :param model: the model.
        :param setup_learn: SB3's ``_setup_learn`` of the model.
        :return: what it returns.
        """
        total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar = args
        if not self.is_main_process:
            # rank 0 alone prints, writes tensorboard files and runs the callbacks that evaluate or save
            model.verbose, model.tensorboard_log, progress_bar = 0, None, False
            callback = without_rank_zero_callbacks(callback)
        self._check_same_settings(model)
        self.broadcast_model(model)
        self._align_stats(model)
        result = setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        if not self.is_main_process:
            model.set_logger(Logger(folder=None, output_formats=[]))
        for name in ("ep_info_buffer", "ep_success_buffer"):
            buffer = getattr(model, name, None)
            if buffer is not None and not isinstance(buffer, CountingDeque):
                setattr(model, name, CountingDeque(buffer, maxlen=buffer.maxlen))
        return result

    def _check_same_settings(self, model: Any) -> None:
        """Every rank must make the same number of minibatches of the same size: else collectives mismatch."""
        vec_normalize = model.get_vec_normalize_env()
        settings = {
            "n_envs": model.n_envs,
            "n_steps": model.n_steps,
            "batch_size": model.batch_size,
            "n_epochs": model.n_epochs,
            "normalize_advantage": model.normalize_advantage,
            "target_kl": model.target_kl,
            "parameters": sum(p.numel() for p in model.policy.parameters()),
            "policy": type(model.policy).__name__,
            "VecNormalize": None
            if vec_normalize is None
            else [rms.mean.shape for rms in _running_stats(vec_normalize)],
            "advantage_normalization": self.config.advantage_normalization,
            "normalize_value_targets": getattr(model, "normalize_value_targets", False),
        }
        everyone: list[Any] = [None] * self.world_size
        self._collective("settings check", dist.all_gather_object, everyone, settings)
        differ = {name: [ranks[name] for ranks in everyone] for name in settings}
        differ = {name: values for name, values in differ.items() if any(v != values[0] for v in values)}
        if differ:
            listed = "; ".join(f"{name}: {values}" for name, values in differ.items())
            raise DistributedConfigurationError(
                f"the {self.world_size} ranks of this data-parallel run differ in {listed} (rank 0 first). Every rank "
                "must build the same model and env settings (n_envs, n_steps, batch_size are per rank)."
            )

    def _align_stats(self, model: Any) -> None:
        """VecNormalize statistics from rank 0, the base of the next merge (before SB3 resets the envs)."""
        stats = _running_stats(model.get_vec_normalize_env())
        payload = [[(rms.mean, rms.var, rms.count) for rms in stats] if self.is_main_process else None]
        self._collective("VecNormalize statistics broadcast", dist.broadcast_object_list, payload, src=self._root)
        for rms, (mean, var, count) in zip(stats, payload[0], strict=True):
            _set_stats(rms, mean, var, count)
        self._base_stats = [
            (np.array(rms.mean, np.float64), np.array(rms.var, np.float64), float(rms.count)) for rms in stats
        ]


class DataParallelMixin:
    """What ``ClippedPPO`` needs from the data-parallel context beyond its loops: seeding, parameters, set-up.

    The class using it sets ``self._dist`` (:func:`setup`) in its constructor; with one process every method is
    SB3's own.
    """

    _dist: SingleProcess
    n_envs: int

    @property
    def distributed(self) -> SingleProcess:
        """The data-parallel context: ``rank``, ``world_size``, ``is_main_process`` (one process: 0, 1, True)."""
        return self._dist

    def set_random_seed(self, seed: int | None = None) -> None:
        """SB3's seeding; with several ranks, rank r seeds with ``seed + r * n_envs`` (env i: ``+ i``).

        :param seed: the seed; None: SB3's behaviour (no seeding).
        """
        super().set_random_seed(
            self._dist.rank_seed(  # type: ignore[misc]
                seed, getattr(self, "n_envs", 1) or 1
            )
        )

    def set_parameters(
        self, load_path_or_dict: Any, exact_match: bool = True, device: th.device | str = "auto"
    ) -> None:
        """SB3's ``set_parameters``; with several ranks, rank 0's are then broadcast (call it on every rank).

        :param load_path_or_dict: a saved model's path, or a dict of parameters (SB3's).
        :param exact_match: every parameter must be given (SB3's).
        :param device: SB3's.
        """
        super().set_parameters(load_path_or_dict, exact_match=exact_match, device=device)  # type: ignore[misc]
        self._dist.broadcast_model(self)

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        # with several ranks: same settings checked, rank 0 alone logs and runs I/O callbacks, statistics aligned
        setup = super()._setup_learn  # type: ignore[misc]
        return self._dist.setup_learn(
            self, setup, total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )


class CountingDeque(deque):
    """An episode buffer that counts what this rank adds (SB3 calls ``extend`` and ``append``).

    :param iterable: the initial items.
    :param maxlen: the longest length (SB3's ``stats_window_size``).
    """

    def __init__(self, iterable: Any = (), maxlen: int | None = None) -> None:
        super().__init__(iterable, maxlen)
        self.added = 0

    def append(self, item: Any) -> None:
        """``deque.append``, counted.

        :param item: the item.
        """
        super().append(item)
        self.added += 1

    def extend(self, items: Any) -> None:
        """``deque.extend``, counted.

        :param items: the items.
        """
        items = list(items)
        super().extend(items)
        self.added += len(items)


def _take_new(buffer: Any) -> list[Any]:
    """The entries this rank added since the last call (the most recent ``maxlen`` of them)."""
    if not isinstance(buffer, CountingDeque) or buffer.added == 0:
        return []
    new = list(buffer)[-min(buffer.added, len(buffer)) :]
    buffer.added = 0
    return new


def _moments(advantages: th.Tensor) -> th.Tensor:
    """``[count, sum, sum of squares]`` in float64."""
    values = advantages.detach().to(th.float64)
    count = th.tensor(float(values.numel()), dtype=th.float64, device=values.device)
    return th.stack((count, values.sum(), values.square().sum()))


def _running_stats(vec_normalize: Any) -> list[RunningMeanStd]:
    """A VecNormalize's running statistics in a fixed order: observations (per key, sorted), then returns."""
    if vec_normalize is None:
        return []
    stats = []
    obs_rms = getattr(vec_normalize, "obs_rms", None)
    if isinstance(obs_rms, dict):
        stats += [obs_rms[key] for key in sorted(obs_rms)]
    elif obs_rms is not None:
        stats.append(obs_rms)
    if getattr(vec_normalize, "ret_rms", None) is not None:
        stats.append(vec_normalize.ret_rms)
    return stats


def _set_stats(rms: RunningMeanStd, mean: np.ndarray, var: np.ndarray, count: float) -> None:
    """The statistics of ``rms`` (the object stays: the VecNormalize and whatever else holds it see them)."""
    rms.mean = np.array(mean, dtype=np.float64)
    rms.var = np.array(var, dtype=np.float64)
    rms.count = float(count)


def _modules(model: Any) -> list[th.nn.Module]:
    """The modules whose state must be the same on every rank: the policy, and the reference policy if any."""
    modules = [model.policy]
    if getattr(model, "ref_policy", None) is not None:
        modules.append(model.ref_policy)
    return modules


def is_rank_zero_callback(callback: BaseCallback) -> bool:
    """Whether ``callback`` runs on rank 0 only.

    Its ``rank_zero_only`` attribute says so when it has one; else its type (evaluation, checkpoints, progress
    bar), or an event callback (``EveryNTimesteps``...) around such a callback.

    :param callback: an SB3 callback.
    :return: whether it runs on rank 0 only.
    """
    flag = getattr(callback, "rank_zero_only", None)
    if flag is not None:
        return bool(flag)
    if isinstance(callback, RANK_ZERO_CALLBACKS):
        return True
    inner = getattr(callback, "callback", None) if isinstance(callback, EventCallback) else None
    return inner is not None and is_rank_zero_callback(inner)


def without_rank_zero_callbacks(callback: Any) -> Any:
    """The callbacks that ranks other than 0 run: ``callback`` without the rank-0-only ones (lists recursed).

    :param callback: a callback, a list of them, or None.
    :return: the callbacks every rank runs.
    """
    if callback is None:
        return None
    if isinstance(callback, list):
        return [c for c in (without_rank_zero_callbacks(c) for c in callback) if c is not None]
    if isinstance(callback, CallbackList):
        return CallbackList(without_rank_zero_callbacks(list(callback.callbacks)))
    if isinstance(callback, BaseCallback) and is_rank_zero_callback(callback):
        return None
    return callback


__all__ = [
    "ADVANTAGE_NORMALIZATIONS",
    "DEFAULT_TIMEOUT_S",
    "RANK_ZERO_CALLBACKS",
    "SINGLE_PROCESS",
    "DataParallel",
    "DistributedConfig",
    "SingleProcess",
    "barrier",
    "is_main_process",
    "is_rank_zero_callback",
    "loading",
    "rank",
    "setup",
    "without_rank_zero_callbacks",
    "world_size",
]
