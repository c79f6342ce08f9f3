"""The bounded-loss receiver: per-(step, bucket) bitmaps, sums with counts, completion rule.

DLCP (Wang et al., "Domain-specific Communication Optimization for Distributed DNN Training")
lets a step finish without its last packets when SGD can tolerate the loss. A
:class:`Reduction` is one aggregator's share of one reduction: it sums the packets it owns from
every sender and keeps a bitmap of who contributed to each packet (one bit per sender in a
``uint64``, so at most 64 workers). It is complete when

- every packet of every sender arrived, or
- its deadline passed, at least ``1 - bound`` of the (sender, packet) pairs arrived, every sender
  was heard from, and every packet a sender marked protected arrived;

otherwise the missing packets are requested again (:meth:`Reduction.missing`). Missing values
are zero-filled and each packet is averaged over the senders that contributed to it (sum times
``senders / count``). Summed in arrival order by default; ``ordered`` keeps each sender's
values apart and sums them in sender order, so that ranks reducing the same packets
themselves (direct exchange) hold bit-identical sums whatever order the packets came in
(float addition is not associative). An :class:`Assembly` is a worker's view of the result:
the aggregated packets of every owner, complete when all arrived (reliable) or, for a parameter server's pull
with ``pull_bound > 0``, when enough did.
"""

from __future__ import annotations

import enum

import numpy as np
import torch

__all__ = ["Assembly", "Outcome", "Reduction"]


class Outcome(enum.Enum):
    WAIT = "wait"
    FULL = "full"
    """Everything arrived."""
    BOUNDED = "bounded"
    """The deadline passed with enough, and all protected packets, arrived."""
    NACK = "nack"
    """The deadline passed without enough: request the missing packets again."""


class Reduction:
    """One owner's share of one reduction: sums, contributor bitmap, protected counts.

    ``owned`` are the global packet indices this owner aggregates (``i % owners == position``);
    ``senders`` the node ids whose contributions are expected. Values are summed in float32, in
    arrival order, or in sender order with ``ordered`` (each sender's values kept apart until
    :meth:`result`).
    """

    __slots__ = (
        "_finished",
        "_first_seen",
        "_local",
        "bound",
        "classes",
        "done",
        "got",
        "last_arrival",
        "mask",
        "owned",
        "parts",
        "per",
        "protected_expected",
        "protected_got",
        "ready_at",
        "senders",
        "started_at",
        "sums",
        "total",
    )

    def __init__(
        self,
        *,
        total: int,
        per: int,
        owned: np.ndarray,
        senders: list[int],
        bound: float,
        now: float,
        ordered: bool = False,
    ) -> None:
        self.total = total
        self.per = per
        self.owned = owned
        self.senders = senders
        self.bound = bound
        self.sums = torch.zeros(len(owned), per, dtype=torch.float32)
        self.parts = (
            {s: torch.zeros(len(owned), per, dtype=torch.float32) for s in senders} if ordered else None
        )
        self.mask = np.zeros(len(owned), dtype=np.uint64)
        self.classes = np.full(len(owned), 255, dtype=np.uint8)  # most important class seen per packet
        self._local = np.full(total, -1, dtype=np.int64)
        self._local[owned] = np.arange(len(owned))
        self.got = dict.fromkeys(senders, 0)
        self.protected_got = dict.fromkeys(senders, 0)
        self.protected_expected: dict[int, int] = {}
        self._first_seen: dict[int, float] = {}
        self._finished: dict[int, float] = {}  # sender -> when a packet of its tail arrived
        self.started_at = now  # first contact; the deadline counts from when every sender started
        self.ready_at: float | None = None
        self.last_arrival = now
        self.done = False

    def add(
        self,
        sender: int,
        index: np.ndarray,
        values: torch.Tensor,
        classes: np.ndarray,
        protected: int,
        now: float,
        tail: bool = False,
    ) -> int:
        """Add ``sender``'s packets ``index`` (global) with ``values`` (k, per); returns how many were new.

        ``tail``: the batch holds one of the last packets the sender sends this owner, so the
        sender has finished sending and what is still missing was lost (or is just behind).
        """
        if sender not in self.got:
            return 0
        self._first_seen.setdefault(sender, now)
        if tail:
            self._finished.setdefault(sender, now)
        self.protected_expected[sender] = protected
        local = self._local[index]
        bit = np.uint64(1 << sender)
        fresh = (local >= 0) & ((self.mask[np.maximum(local, 0)] & bit) == 0)
        # a retransmission and its original may arrive in one batch: keep the first of each
        _, first = np.unique(local, return_index=True)
        keep = np.zeros(len(local), dtype=bool)
        keep[first] = True
        fresh &= keep
        if not fresh.any():
            return 0
        rows = np.flatnonzero(fresh)
        slots = torch.from_numpy(local[rows])
        fresh_values = values[torch.from_numpy(rows)].float()
        if self.parts is None:
            self.sums.index_add_(0, slots, fresh_values)
        else:
            self.parts[sender].index_copy_(0, slots, fresh_values)
        self.mask[local[rows]] |= bit
        self.classes[local[rows]] = np.minimum(self.classes[local[rows]], classes[rows])
        self.got[sender] += len(rows)
        self.last_arrival = now
        if self.got[sender] == len(self.owned):
            self._finished.setdefault(sender, now)
        self.protected_got[sender] += int((classes[rows] == 0).sum())
        if self.ready_at is None and self.enough():
            self.ready_at = now
        return len(rows)

    # -- the completion rule ------------------------------------------------------------------

    @property
    def expected(self) -> int:
        return len(self.owned) * len(self.senders)

    @property
    def received(self) -> int:
        return sum(self.got.values())

    def all_started_at(self) -> float | None:
        """When the last sender's first packet arrived (None while some sender is unheard)."""
        if len(self._first_seen) < len(self.senders):
            return None
        return max(self._first_seen.values())

    def finish(self, sender: int, now: float) -> None:
        """``sender`` says it sent everything (its END arrived)."""
        if sender in self.got:
            self._first_seen.setdefault(sender, now)
            self._finished.setdefault(sender, now)

    def all_finished_at(self) -> float | None:
        """When the last sender finished sending (None while some sender's tail is unseen)."""
        if len(self._finished) < len(self.senders):
            return None
        return max(self._finished.values())

    def _protected_ok(self) -> bool:
        return all(
            s in self.protected_expected and self.protected_got[s] >= self.protected_expected[s]
            for s in self.senders
        )

    def enough(self) -> bool:
        """At least ``1 - bound`` of the pairs and every protected packet arrived."""
        if self.received >= self.expected:
            return True
        return self.received >= (1.0 - self.bound) * self.expected - 1e-9 and self._protected_ok()

    def decide(self, deadline_passed: bool) -> Outcome:
        if self.received >= self.expected:
            return Outcome.FULL
        if not deadline_passed:
            return Outcome.WAIT
        return Outcome.BOUNDED if self.enough() else Outcome.NACK

    def missing(self, sender: int) -> tuple[np.ndarray, bool]:
        """Global indices of ``sender``'s packets not yet here, and whether only protected ones are wanted.

        When enough arrived but some protected packet is missing, the receiver cannot tell which
        of the missing ones were protected: it lists them all and asks for protected ones only.
        """
        bit = np.uint64(1 << sender)
        absent = self.owned[(self.mask & bit) == 0]
        enough_values = self.received >= (1.0 - self.bound) * self.expected - 1e-9
        return absent, bool(enough_values and absent.size)

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
        """(averaged values (n owned, per) in ``dtype``, contributor bitmap per owned packet)."""
        count = np.bitwise_count(self.mask).astype(np.int64)
        senders = len(self.senders)
        if self.parts is not None:
            for sender in sorted(self.parts):
                self.sums += self.parts[sender]
            self.parts = None
        values = self.sums
        partial = np.flatnonzero(count < senders)
        if partial.size:  # average over who contributed; untouched where everyone did (exact)
            scale = torch.from_numpy(senders / np.maximum(count[partial], 1)).float()
            scale[torch.from_numpy(count[partial] == 0)] = 0.0
            values[torch.from_numpy(partial)] *= scale[:, None]
        return values.to(dtype), self.mask.copy()


class Assembly:
    """A worker's result of one reduction: the aggregated packets of every owner.

    Complete when every packet is here, or (``bound > 0``, a parameter server's pull) when the
    deadline passed with at least ``1 - bound`` of them and every protected one.
    """

    __slots__ = ("bound", "classes", "have", "last_arrival", "mask", "started_at", "total", "values")

    def __init__(self, *, total: int, per: int, dtype: torch.dtype, bound: float, now: float) -> None:
        self.total = total
        self.bound = bound
        self.values = torch.zeros(total, per, dtype=dtype)
        self.have = np.zeros(total, dtype=bool)
        self.mask = np.zeros(total, dtype=np.uint64)
        self.classes = np.full(total, 255, dtype=np.uint8)
        self.started_at = now
        self.last_arrival: dict[int, float] = {}  # owner -> when its last packet arrived

    def add(
        self,
        owner: int,
        index: np.ndarray,
        values: torch.Tensor,
        mask: np.ndarray,
        classes: np.ndarray,
        now: float,
    ) -> None:
        fresh = ~self.have[index]
        if not fresh.any():
            return
        rows = np.flatnonzero(fresh)
        self.values[torch.from_numpy(index[rows])] = values[torch.from_numpy(rows)]
        self.have[index[rows]] = True
        self.mask[index[rows]] = mask[rows]
        self.classes[index[rows]] = classes[rows]
        self.last_arrival[owner] = now

    @property
    def complete(self) -> bool:
        return bool(self.have.all())

    def complete_enough(self) -> bool:
        if self.bound == 0:
            return self.complete
        if self.have.sum() < (1.0 - self.bound) * self.total - 1e-9:
            return False
        # an absent packet's class is unknown; as with a push, protected ones must all be here
        return not (self.classes[~self.have] == 0).any()

    def missing(self) -> np.ndarray:
        return np.flatnonzero(~self.have)
