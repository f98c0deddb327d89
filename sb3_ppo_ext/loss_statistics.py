"""The closed-form path's loss statistics, computed at their first read for many minibatches at once.

Outside autograd the loss *values* (policy, value and entropy losses, clip fraction, approximate KL...) feed only
the logger, ``target_kl`` and a few extensions; the gradients need only the ratio. Computing them for each
minibatch costs about 25 tensor operations of 3-6 us each on a small CPU batch, some 10% of a CartPole minibatch
step. :class:`DeferredStatistics` keeps each minibatch's inputs instead and hands out a :class:`DeferredTerms`;
the first read of any field computes the terms of every minibatch waiting, as one stack of ``[m, B]`` through
the same :class:`~sb3_ppo_ext.losses.PPOLoss` formulas (each averages over the last dimension). A reader that
needs a value at once (``target_kl``, several ranks' all-reduce, an extension's ``minibatch_done``) simply
triggers the computation then; ``record_update`` reads every field at the end of each update, so nothing waits
into the next rollout.

Values are those of the per-minibatch computation: a one-row stack gives the same bits; several rows may round
differently in the last place with several threads (a reduction's split), which only the logged means see.
"""

from __future__ import annotations

from typing import Any

import torch as th

from sb3_ppo_ext.losses import LossTerms, PolicyEvaluation, PPOBatch, PPOLoss

__all__ = ["DeferredStatistics", "DeferredTerms"]

# the inputs waiting, in elements of one per-sample field, at which they are computed anyway (bounds the memory)
MAX_WAITING_ELEMENTS = 1 << 20
# the minibatch's fields the terms read, after the evaluation's
_BATCH_FIELDS = ("old_log_prob", "old_values", "advantages", "returns")


class DeferredTerms:
    """Stands for one minibatch's :class:`~sb3_ppo_ext.losses.LossTerms`; any attribute read computes them.

    :param statistics: the :class:`DeferredStatistics` that holds the minibatch's inputs.
    """

    __slots__ = ("_statistics", "_terms", "_rows", "_index")

    def __init__(self, statistics: DeferredStatistics) -> None:
        self._statistics: DeferredStatistics | None = statistics
        self._terms: LossTerms | None = None
        self._rows: LossTerms | None = None  # the stack this minibatch was computed in, and its row there
        self._index = 0

    def resolve(self) -> LossTerms:
        """The terms (computed now, with every other minibatch waiting, if not yet).

        :return: the minibatch's loss terms.
        """
        if self._terms is None:
            if self._rows is None:
                assert self._statistics is not None
                self._statistics.compute()
            if self._terms is None:
                assert self._rows is not None
                index = self._index
                self._terms = LossTerms(*(None if value is None else value[index] for value in self._rows))
        return self._terms

    @property
    def computed(self) -> bool:
        """Whether the terms are computed (reading them computes nothing more).

        :return: True after the computation that included this minibatch.
        """
        return self._terms is not None or self._rows is not None

    def stacked_row(self) -> tuple[LossTerms, int] | None:
        """The terms of every minibatch computed with this one, ``[m]`` each, and this one's row (computing them now).

        :func:`sb3_ppo_ext.losses.mean_of` averages consecutive rows straight from the stack.

        :return: ``(stacked terms, row)``, or None where this minibatch's terms were computed on their own.
        """
        if self._rows is None and self._terms is None:
            assert self._statistics is not None
            self._statistics.compute()
        return None if self._rows is None else (self._rows, self._index)

    def _set(self, terms: LossTerms) -> None:
        self._terms, self._statistics = terms, None

    def _set_row(self, rows: LossTerms, index: int) -> None:
        self._rows, self._index, self._statistics = rows, index, None

    def __getattr__(self, name: str) -> Any:
        # the fields, and LossTerms' own methods (``_replace``, ``_asdict``)
        return getattr(self.resolve(), name)

    def __repr__(self) -> str:
        return f"DeferredTerms({self.resolve()!r})" if self.computed else "DeferredTerms(<not computed yet>)"


class DeferredStatistics:
    """The inputs of the minibatches whose terms nobody has read yet, for one :class:`~sb3_ppo_ext.losses.PPOLoss`.

    Each minibatch's inputs are packed into one ``[k, B]`` tensor at once: one small allocation kept alive instead
    of eight, which kept the heap of a masked CartPole-sized run about 7 MB larger.

    :param loss: the update's objective (its clip ranges and coefficients give the terms).
    """

    def __init__(self, loss: PPOLoss) -> None:
        self.loss = loss
        self._waiting: list[tuple[DeferredTerms, tuple[Any, ...], th.Tensor]] = []
        self._elements = 0

    def add(self, evaluation: PolicyEvaluation, batch: PPOBatch) -> DeferredTerms:
        """Keep a minibatch's inputs; its terms come at the first read.

        :param evaluation: the policy's outputs for the minibatch (no graph).
        :param batch: the minibatch.
        :return: the object that stands for its terms.
        """
        terms = DeferredTerms(self)
        fields = [*evaluation, *(getattr(batch, name) for name in _BATCH_FIELDS)]
        # NumPy arrays (the NumPy head's evaluation) as tensors on their memory: the stack below copies them
        fields = [field if field is None or isinstance(field, th.Tensor) else th.from_numpy(field) for field in fields]
        present = [field for field in fields if field is not None]
        log_prob = fields[1]
        shape, dtype = log_prob.shape, log_prob.dtype
        if any(field.shape != shape or field.dtype != dtype for field in present):  # not seen in our policies
            targets = dict(zip(_BATCH_FIELDS, fields[4:], strict=True))
            evaluation, batch = PolicyEvaluation(*fields[:4]), batch._replace(**targets)
            terms._set(self.loss(evaluation, batch))
            return terms
        key = (shape, dtype, *(field is None for field in fields))
        self._waiting.append((terms, key, th.stack(present)))
        self._elements += log_prob.numel()
        if self._elements >= MAX_WAITING_ELEMENTS:
            self.compute()
        return terms

    def compute(self) -> None:
        """The terms of every minibatch waiting, one stack per minibatch size and set of fields."""
        waiting, self._waiting, self._elements = self._waiting, [], 0
        groups: dict[tuple[Any, ...], list[tuple[DeferredTerms, tuple[Any, ...], th.Tensor]]] = {}
        for item in waiting:
            groups.setdefault(item[1], []).append(item)
        with th.no_grad():
            for key, group in groups.items():
                rows = th.stack([packed for _, _, packed in group])  # [m, k, B]
                columns = iter(rows.unbind(1))
                fields = [None if absent else next(columns) for absent in key[2:]]
                evaluation = PolicyEvaluation(*fields[:4])
                batch = PPOBatch(None, None, *fields[4:])
                stacked = self.loss(evaluation, batch)
                for i, (terms, _, _) in enumerate(group):
                    terms._set_row(stacked, i)  # its own 0-d terms are made at their first read, if any
