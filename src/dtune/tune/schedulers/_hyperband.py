"""HyperBand: synchronous successive halving over brackets of different aggressiveness.

Li, Jamieson, DeSalvo, Rostamizadeh, Talwalkar, "Hyperband: A Novel Bandit-Based Approach to
Hyperparameter Optimization", JMLR 18(185), 2018 (arXiv:1603.06560).

With ``R = max_t`` and ``eta = reduction_factor``, ``s_max = floor(log_eta R)``. Bracket ``s``
(``s_max`` down to 0, then again) takes ``n = ceil((s_max + 1) / (s + 1) * eta**s)`` trials and
has rungs at ``round(R * eta**(i - s))`` for ``i = 0..s``; of the ``n_i`` trials that reach rung
``i``, the best ``max(1, floor(n_i / eta))`` go on and the rest stop; the last rung is ``max_t``.
For ``max_t=81, eta=3`` the brackets hold 81, 34, 15, 8 and 5 trials (see :meth:`plan`).

Synchronous means a rung is compared only once all its trials have reached it. A trial that
must wait is PAUSED (it checkpoints and frees its slot) and is resumed from its checkpoint when
promoted, so **trainables must checkpoint**: a class trainable does so on every pause; a
function trainable must report ``checkpoint=`` and restore from ``dtune.get_checkpoint()``,
or resuming it fails with an error saying so. Two refinements keep slots busy without changing
any outcome: a trial that is already certain to be among the best of its rung goes on at once,
and one already certain to be outside stops at once.

Working within the runner's contract (see ``_common.SlotView``): the scheduler keeps one trial
running while others wait, so that the runner can keep asking the searcher for trials; when it
can get none, the bracket being filled is closed with the trials it has. A paused trial that
loses is ended where it paused (``TrialSuggestion.stop``), and every rung is decided on the
result reported at it (see ``decision_points``); only a trial held on past its rung (run on
while the rung fills, when it is the only one running) is paused wherever it has got to once
another trial runs, to give its slot back early. With a single slot no trial ever waits, and
HyperBand runs trials to the end one after another.

Example:
    >>> import dtune
    >>> [n for n, _ in dtune.schedulers.HyperBand(max_t=81).plan()]
    [81, 34, 15, 8, 5]
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from dtune.tune.schedulers._base import Decision, Scheduler, TrialSuggestion
from dtune.tune.schedulers._common import SlotView, check_mode, check_number, iteration_points, score
from dtune.tune.trial import Trial, TrialStatus

__all__ = ["HyperBand"]


class _Fate(enum.Enum):
    PROMOTE = "promote"
    ELIMINATE = "eliminate"
    WAIT = "wait"  # reported at the rung, but the rung is not decided for it yet


@dataclass
class _Bracket:
    s: int
    capacity: int
    milestones: list[float]
    members: list[str] = field(default_factory=list)
    closed: bool = False


class HyperBand(Scheduler):
    """Synchronous HyperBand (see the module docstring).

    Example:
        >>> import dtune
        >>> dtune.run(train_with_checkpoints, param_space=space, metric="loss", mode="min",
        ...           num_samples=143, scheduler=dtune.schedulers.HyperBand(max_t=81),
        ...           search=dtune.search.BOHB(seed=0))  # doctest: +SKIP
    """

    def __init__(
        self,
        max_t: float = 81,
        reduction_factor: float = 3,
        time_attr: str = "training_iteration",
        *,
        metric: str | None = None,
        mode: str | None = None,
    ) -> None:
        check_number("max_t", max_t, low=1)
        check_number("reduction_factor", reduction_factor, low=2)
        check_mode(mode)
        self.max_t, self.reduction_factor, self.time_attr = max_t, reduction_factor, time_attr
        self.metric, self.mode = metric, mode
        self._s_max = 0
        while reduction_factor ** (self._s_max + 1) <= max_t * (1 + 1e-9):
            self._s_max += 1
        self._brackets: list[_Bracket] = []
        self._bracket_of: dict[str, int] = {}
        self._order: dict[str, int] = {}
        self._rung: dict[str, int] = {}  # the rung a trial heads for or waits at
        self._values: dict[str, dict[int, float]] = {}  # scores at the rungs it reached
        self._ended: set[str] = set()
        self._view = SlotView()

    # -- the plan ----------------------------------------------------------------------------------
    def _milestones(self, s: int) -> list[float]:
        out: list[float] = []
        for i in range(s + 1):
            m = self.max_t if i == s else max(1, round(self.max_t * self.reduction_factor ** (i - s)))
            out.append(m)
        return out

    def plan(self) -> list[tuple[int, list[float]]]:
        """``(trials, milestones)`` of every bracket of one HyperBand iteration, in order."""
        eta = self.reduction_factor
        return [
            (math.ceil((self._s_max + 1) / (s + 1) * eta**s - 1e-9), self._milestones(s))
            for s in range(self._s_max, -1, -1)
        ]

    def rung(self, trial_id: str) -> int:
        """How many rungs the trial has been promoted past, as far as is decided (0: none)."""
        promoted = 0
        for fates in self._fates(self._brackets[self._bracket_of[trial_id]]):
            if fates.get(trial_id) is not _Fate.PROMOTE:
                break
            promoted += 1
        return promoted

    def keep(self, n: int) -> int:
        """How many of ``n`` trials at a rung go on to the next."""
        return max(1, math.floor(n / self.reduction_factor + 1e-9)) if n > 0 else 0

    # -- rung bookkeeping --------------------------------------------------------------------------
    def _fates(self, b: _Bracket) -> list[dict[str, _Fate]]:
        """Per rung below the last: the fate of every member that reported there."""
        members, planned, out = b.members, (len(b.members) if b.closed else b.capacity), []
        for i in range(len(b.milestones) - 1):
            dead = sum(1 for u in members if u in self._ended and i not in self._values[u])
            size = planned - dead
            keep = self.keep(size)
            reported = sorted(
                (u for u in members if i in self._values[u]),
                key=lambda u: (-self._values[u][i], self._order[u]),
            )
            remaining = size - len(reported)
            fates = {}
            for rank, u in enumerate(reported):
                if rank >= keep:
                    fates[u] = _Fate.ELIMINATE
                elif rank + remaining < keep:
                    fates[u] = _Fate.PROMOTE
                else:
                    fates[u] = _Fate.WAIT
            out.append(fates)
            members = [u for u, fate in fates.items() if fate is _Fate.PROMOTE]
            planned = keep
        return out

    def _fate(self, trial_id: str, cache: dict[int, list[dict[str, _Fate]]] | None = None) -> _Fate | None:
        index, i = self._bracket_of[trial_id], self._rung[trial_id]
        cache = {} if cache is None else cache
        if index not in cache:
            cache[index] = self._fates(self._brackets[index])
        fates = cache[index]
        return fates[i].get(trial_id) if i < len(fates) else None

    def _close_if_exhausted(self) -> None:
        if self._view.exhausted and self._brackets and not self._brackets[-1].closed:
            self._brackets[-1].closed = True

    # -- the Scheduler contract ----------------------------------------------------------------------
    def on_trial_add(self, trial: Trial) -> None:
        self._view.added(trial)
        if not self._brackets or self._brackets[-1].closed:
            s = self._s_max - len(self._brackets) % (self._s_max + 1)
            n = self.plan()[self._s_max - s][0]
            self._brackets.append(_Bracket(s, n, self._milestones(s)))
        b = self._brackets[-1]
        b.members.append(trial.trial_id)
        b.closed = len(b.members) >= b.capacity
        self._bracket_of[trial.trial_id] = len(self._brackets) - 1
        self._order[trial.trial_id] = len(self._order)
        self._rung[trial.trial_id] = 0
        self._values[trial.trial_id] = {}

    def decision_points(self, trial: Trial) -> bool | frozenset[int]:
        if trial.trial_id not in self._bracket_of:
            return True  # added under another scheduler: decided on every result
        return iteration_points(self.time_attr, self._brackets[self._bracket_of[trial.trial_id]].milestones)

    def on_result(self, trial: Trial, result: dict[str, Any]) -> Decision:
        self._view.see([trial])
        self._close_if_exhausted()
        tid = trial.trial_id
        if tid not in self._bracket_of:
            self.on_trial_add(trial)
        t = result[self.time_attr]
        if t >= self.max_t:
            return Decision.STOP
        b = self._brackets[self._bracket_of[tid]]
        self._record(tid, result)
        while t >= b.milestones[self._rung[tid]]:
            fate = self._fate(tid)
            if fate is _Fate.PROMOTE:
                self._rung[tid] += 1
            elif fate is _Fate.ELIMINATE:
                return Decision.STOP
            elif self._view.active(but=tid):
                return Decision.PAUSE
            else:
                return Decision.CONTINUE  # hold: keep a slot busy while the rung fills
        return Decision.CONTINUE

    def _record(self, trial_id: str, result: dict[str, Any] | None) -> None:
        """Take ``result`` as the trial's value at every rung it reaches that has none yet."""
        if result is None or self.time_attr not in result:
            return
        b, values = self._brackets[self._bracket_of[trial_id]], self._values[trial_id]
        for i, milestone in enumerate(b.milestones):
            if milestone <= result[self.time_attr] and i not in values:
                values[i] = score(result, self.metric, self.mode)

    def _ended_trial(self, trial: Trial) -> None:
        self._view.see([trial])
        self._ended.add(trial.trial_id)

    def on_trial_complete(self, trial: Trial, result: dict[str, Any] | None) -> None:
        self._ended_trial(trial)

    def on_trial_error(self, trial: Trial) -> None:
        self._ended_trial(trial)

    def choose_next(self, trials: Any) -> TrialSuggestion | None:
        waiting = list(trials)
        self._view.see(waiting)
        self._close_if_exhausted()
        for trial in waiting:
            if trial.status is TrialStatus.PENDING:
                return TrialSuggestion.start(trial)
        promote, wait = [], []
        cache: dict[int, list[dict[str, _Fate]]] = {}
        for trial in waiting:
            tid = trial.trial_id
            if tid not in self._bracket_of:  # paused under another scheduler: just go on
                return TrialSuggestion.resume(trial)
            # a held trial's pause can land after its next rung (decided asynchronously there);
            # the result it landed on is then its value at that rung, which no call showed
            self._record(tid, trial.last_result)
            fate = self._fate(tid, cache)
            if fate is _Fate.ELIMINATE:
                return TrialSuggestion.stop(trial)  # ends where it paused; takes no slot
            elif fate is _Fate.PROMOTE:
                promote.append(trial)
            elif fate is _Fate.WAIT:
                wait.append(trial)
        if promote:
            trial = min(promote, key=lambda t: self._order[t.trial_id])
            self._rung[trial.trial_id] += 1
            return self._resume(trial)
        busy = bool(self._view.active())
        if busy and not self._view.exhausted:  # fill the bracket first; losers can wait
            self._view.decline()
            return None
        if wait and not busy:  # every slot idle: run the likeliest winner on
            best = max(wait, key=lambda t: self._values[t.trial_id][self._rung[t.trial_id]])
            return self._resume(best)
        self._view.decline()
        return None

    def _resume(self, trial: Trial) -> TrialSuggestion:
        if trial.checkpoint is None:
            raise RuntimeError(
                f"HyperBand paused trial {trial.trial_id} at {self.time_attr}={trial.iteration} "
                "and must now resume it, but it has no checkpoint to resume from. A function "
                "trainable must report one (dtune.report(metrics, checkpoint=dtune.Checkpoint."
                "from_dict(state))) and restore from dtune.get_checkpoint(); or use a "
                "dtune.Trainable class, which is checkpointed whenever it is paused."
            )
        return TrialSuggestion.resume(trial)
