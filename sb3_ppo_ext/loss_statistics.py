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


class DeferredTerms:
    """Stands for one minibatch's :class:`~sb3_ppo_ext.losses.LossTerms`; any attribute read computes them.

    :param statistics: the :class:`DeferredStatistics` that holds the minibatch's inputs.
    """

    __slots__ = ("_statistics", "_terms")

    def __init__(self, statistics: DeferredStatistics) -> None:
        self._statistics: DeferredStatistics | None = statistics
        self._terms: LossTerms | None = None

    def resolve(self) -> LossTerms:
        """The terms (computed now, with every other minibatch waiting, if not yet).

        :return: the minibatch's loss terms.
        """
        if self._terms is None:
            assert self._statistics is not None
            self._statistics.compute()
        assert self._terms is not None
        return self._terms

    def _set(self, terms: LossTerms) -> None:
        self._terms, self._statistics = terms, None

    def __getattr__(self, name: str) -> Any:
        # the fields, and LossTerms' own methods (``_replace``, ``_asdict``)
        return getattr(self.resolve(), name)

    def __repr__(self) -> str:
        return f"DeferredTerms({self._terms!r})" if self._terms is not None else "DeferredTerms(<not computed yet>)"


class DeferredStatistics:
    """The inputs of the minibatches whose terms nobody has read yet, for one :class:`~sb3_ppo_ext.losses.PPOLoss`.

    :param loss: the update's objective (its clip ranges and coefficients give the terms).
    """

    def __init__(self, loss: PPOLoss) -> None:
        self.loss = loss
        self._waiting: list[tuple[DeferredTerms, PolicyEvaluation, PPOBatch]] = []
        self._elements = 0

    def add(self, evaluation: PolicyEvaluation, batch: PPOBatch) -> DeferredTerms:
        """Keep a minibatch's inputs; its terms come at the first read.

        :param evaluation: the policy's outputs for the minibatch (no graph).
        :param batch: the minibatch.
        :return: the object that stands for its terms.
        """
        terms = DeferredTerms(self)
        inputs = PPOBatch(None, None, batch.old_log_prob, batch.old_values, batch.advantages, batch.returns)
        self._waiting.append((terms, evaluation, inputs))
        self._elements += evaluation.log_prob.numel()
        if self._elements >= MAX_WAITING_ELEMENTS:
            self.compute()
        return terms

    def compute(self) -> None:
        """The terms of every minibatch waiting, one stack per minibatch size and set of fields."""
        waiting, self._waiting, self._elements = self._waiting, [], 0
        groups: dict[tuple[Any, ...], list[tuple[DeferredTerms, PolicyEvaluation, PPOBatch]]] = {}
        for item in waiting:
            evaluation = item[1]
            key = (evaluation.log_prob.shape, evaluation.entropy is None, evaluation.ref_kl is None)
            groups.setdefault(key, []).append(item)
        with th.no_grad():
            for group in groups.values():
                evaluation = _stacked(PolicyEvaluation, [item[1] for item in group])
                batch = _stacked(PPOBatch, [item[2] for item in group])
                stacked = self.loss(evaluation, batch)
                columns = [None if value is None else value.unbind(0) for value in stacked]
                for i, (terms, _, _) in enumerate(group):
                    terms._set(LossTerms(*(None if column is None else column[i] for column in columns)))


def _stacked(cls: Any, rows: list[Any]) -> Any:
    """One ``cls`` (a NamedTuple) whose tensor fields are the rows' fields stacked as ``[m, ...]``."""
    first = rows[0]
    if len(rows) == 1:
        return cls(*(None if value is None else value.unsqueeze(0) for value in first))
    return cls(
        *(
            None if value is None else th.stack([getattr(row, name) for row in rows])
            for name, value in zip(cls._fields, first, strict=True)
        )
    )
