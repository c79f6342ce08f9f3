"""Population-based training: bad trials copy good ones and perturb their hyper-parameters.

Jaderberg, Dalibard, Osindero, Czarnecki, Donahue, Razavi, Vinyals, Green, Dunning, Simonyan,
Fernando, Kavukcuoglu, "Population Based Training of Neural Networks", arXiv:1711.09846, 2017.

Every ``perturbation_interval`` (in ``time_attr``) a trial is ranked by its latest score among
the live trials. If it is in the bottom ``quantile_fraction`` it is *exploited*: paused, then
continued from the newest checkpoint of a trial drawn from the top quantile (the runner copies
it and records the step in ``trial.extra["lineage"]``, so ``results.trials[i].lineage`` and
``dtune export --format json`` show every trial's ancestry), with the donor's config *explored*:
each key of ``hyperparam_mutations`` is resampled with ``resample_probability``, otherwise
multiplied by one of ``perturbation_factors`` (numbers, clipped to their domain) or moved to a
neighbouring value (lists and ``choice``). A trial with no durable checkpoint is never chosen as
a donor, and a top trial whose checkpoint is older than one interval is paused once so that it
saves one (class trainables save on pause; function trainables must report checkpoints).

With more trials than slots, trials take turns: at a perturbation point a trial yields its slot
to one that is behind, and to trials the search has yet to create. ``synch=True`` makes every
trial wait at each multiple of the interval until the whole population is there (paper,
appendix A.1), then exploits and explores the bottom quantile at once.

Example:
    >>> import dtune
    >>> pbt = dtune.schedulers.PBT(
    ...     perturbation_interval=4,
    ...     hyperparam_mutations={"lr": dtune.loguniform(1e-4, 1e-1), "batch": [16, 32, 64]},
    ...     seed=0,
    ... )
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from dtune.tune.schedulers._base import Decision, Scheduler, TrialSuggestion
from dtune.tune.schedulers._common import SlotView, check_mode, check_number, score
from dtune.tune.spaces import Choice, Domain, Grid, LogUniform, QUniform, RandInt, SampleFrom, Uniform
from dtune.tune.trial import Trial, TrialStatus

__all__ = ["PBT", "explore"]

Mutations = Mapping[str, Any]


def _check_mutations(mutations: Any, where: str = "hyperparam_mutations") -> None:
    if not isinstance(mutations, Mapping) or not mutations:
        raise TypeError(f"`{where}` must be a non-empty dict of key -> domain, list or function.")
    for key, spec in mutations.items():
        name = f"{where}[{key!r}]"
        if isinstance(spec, Mapping):
            _check_mutations(spec, name)
        elif isinstance(spec, (Grid, SampleFrom)):
            raise TypeError(f"{name} is a {type(spec).__name__}; use a sampling domain or a list.")
        elif isinstance(spec, (list, tuple)) and not spec:
            raise ValueError(f"{name} is an empty list; give at least one value.")
        elif not isinstance(spec, (Domain, list, tuple)) and not callable(spec):
            raise TypeError(f"{name} is {spec!r}; use a dtune domain, a list of values or a function.")


def _perturb_number(value: float, domain: Domain | None, factor: float) -> float:
    new: float = value * factor
    if isinstance(domain, (Uniform, LogUniform, QUniform)):
        if isinstance(domain, QUniform):
            new = round(new / domain.q) * domain.q
        return min(max(new, domain.low), domain.high)
    if isinstance(domain, RandInt):
        return min(max(round(new), domain.low), domain.high - 1)
    return round(new) if isinstance(value, int) else new


def explore(
    config: dict[str, Any],
    mutations: Mutations,
    rng: random.Random,
    resample_probability: float = 0.25,
    perturbation_factors: Sequence[float] = (1.2, 0.8),
) -> dict[str, Any]:
    """A copy of ``config`` with every key of ``mutations`` resampled or perturbed (PBT's explore)."""
    new = copy.deepcopy(config)
    for key, spec in mutations.items():
        if key not in config:
            raise KeyError(f"hyperparam_mutations names {key!r}, which the trial's config lacks.")
        value = config[key]
        if isinstance(spec, Mapping):
            new[key] = explore(value, spec, rng, resample_probability, perturbation_factors)
            continue
        values = list(spec.categories) if isinstance(spec, Choice) else spec
        resample = rng.random() < resample_probability
        if isinstance(values, (list, tuple)):
            if resample or value not in values:
                new[key] = values[rng.randrange(len(values))]
            else:
                index = values.index(value) + rng.choice((-1, 1))
                new[key] = values[min(max(index, 0), len(values) - 1)]
        elif resample or isinstance(value, bool) or not isinstance(value, (int, float)):
            new[key] = spec.sample(rng) if isinstance(spec, Domain) else spec()
        else:
            domain = spec if isinstance(spec, Domain) else None
            new[key] = _perturb_number(value, domain, rng.choice(tuple(perturbation_factors)))
    return new


class PBT(Scheduler):
    """Population-based training (see the module docstring).

    Example:
        >>> import dtune
        >>> pbt = dtune.schedulers.PBT(perturbation_interval=2,
        ...                            hyperparam_mutations={"lr": dtune.loguniform(1e-3, 1)}, seed=0)
        >>> dtune.run(train_with_checkpoints, param_space=space, metric="acc", mode="max",
        ...           num_samples=8, scheduler=pbt)  # doctest: +SKIP
    """

    def __init__(
        self,
        perturbation_interval: float = 10,
        hyperparam_mutations: Mutations | None = None,
        quantile_fraction: float = 0.25,
        resample_probability: float = 0.25,
        perturbation_factors: Sequence[float] = (1.2, 0.8),
        synch: bool = False,
        time_attr: str = "training_iteration",
        *,
        metric: str | None = None,
        mode: str | None = None,
        seed: int | None = None,
    ) -> None:
        check_number("perturbation_interval", perturbation_interval, low=0, strict=True)
        _check_mutations(hyperparam_mutations)
        check_number("quantile_fraction", quantile_fraction, low=0, strict=True, high=0.5)
        check_number("resample_probability", resample_probability, low=0, high=1)
        if not isinstance(perturbation_factors, Sequence) or not perturbation_factors:
            raise TypeError(f"`perturbation_factors` is {perturbation_factors!r}, but must be a sequence.")
        for factor in perturbation_factors:
            check_number("perturbation_factors[...]", factor, low=0, strict=True)
        check_mode(mode)
        self.perturbation_interval, self.hyperparam_mutations = perturbation_interval, hyperparam_mutations
        self.quantile_fraction, self.resample_probability = quantile_fraction, resample_probability
        self.perturbation_factors, self.synch = tuple(perturbation_factors), bool(synch)
        self.time_attr, self.metric, self.mode = time_attr, metric, mode
        self._rng = random.Random(seed)
        self._order: dict[str, int] = {}
        self._last: dict[str, float] = {}  # time of the last perturbation point
        self._score: dict[str, float] = {}  # score at that point
        self._ended: set[str] = set()
        self._exploit: dict[str, tuple[str, dict[str, Any]]] = {}  # trial -> (donor, new config)
        self._save_only: set[str] = set()  # paused so that it writes a checkpoint
        self._generation = 0  # synch: the barrier is at (generation + 1) * interval
        self._arrived: set[str] = set()  # synch: trials at the current barrier
        self._view = SlotView()

    # -- ranking -------------------------------------------------------------------------------------
    def quantiles(self, among: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
        """``(bottom, top)`` trial ids by their score at their last perturbation point."""
        ids = [u for u in (among or self._score) if u in self._score and u not in self._ended]
        ids.sort(key=lambda u: (self._score[u], -self._order[u]))
        if len(ids) <= 1:
            return [], []
        n = math.ceil(len(ids) * self.quantile_fraction)
        n = min(n, len(ids) // 2)
        return ids[:n], ids[-n:]

    def _plan_exploit(self, tid: str, top: list[str]) -> bool:
        donors = [u for u in top if (d := self._view.live.get(u)) is not None and d.checkpoint is not None]
        if not donors:
            return False
        donor = self._view.live[self._rng.choice(sorted(donors, key=self._order.__getitem__))]
        config = explore(
            donor.config, self.hyperparam_mutations or {}, self._rng,
            self.resample_probability, self.perturbation_factors,
        )  # fmt: skip
        self._exploit[tid] = (donor.trial_id, config)
        return True

    # -- the Scheduler contract ----------------------------------------------------------------------
    def on_trial_add(self, trial: Trial) -> None:
        self._view.added(trial)
        self._order.setdefault(trial.trial_id, len(self._order))
        self._last.setdefault(trial.trial_id, 0.0)

    def decision_points(self, trial: Trial) -> bool | frozenset[int]:
        return True  # may decide on any result

    def on_result(self, trial: Trial, result: dict[str, Any]) -> Decision:
        self._view.see([trial])
        tid = trial.trial_id
        if tid not in self._order:
            self.on_trial_add(trial)
        if tid in self._exploit:  # exploited while it ran on past a barrier
            return Decision.PAUSE
        t = result[self.time_attr]
        if self.synch:
            return self._synch_result(trial, t, result)
        if t - self._last[tid] < self.perturbation_interval:
            return Decision.CONTINUE
        self._last[tid], self._score[tid] = t, score(result, self.metric, self.mode)
        bottom, top = self.quantiles()
        if tid in bottom and self._plan_exploit(tid, top):
            return Decision.PAUSE
        if tid in top and self._stale(trial, t):
            self._save_only.add(tid)
            return Decision.PAUSE
        waiting = [u for u, other in self._view.live.items() if other.status is TrialStatus.PAUSED]
        behind = any(self._last.get(u, 0.0) <= t for u in waiting if u != tid)
        grow = not self._view.exhausted and bool(self._view.active(but=tid))
        return Decision.PAUSE if behind or grow else Decision.CONTINUE

    def _stale(self, trial: Trial, t: float) -> bool:
        """Whether the trial's newest checkpoint is too old to be copied by a bottom trial."""
        if trial.checkpoint is None:
            return True
        by_iteration = self.time_attr == "training_iteration"
        return by_iteration and t - trial.checkpoint_iteration >= self.perturbation_interval

    def _barrier(self) -> float:
        return (self._generation + 1) * self.perturbation_interval

    def _synch_result(self, trial: Trial, t: float, result: dict[str, Any]) -> Decision:
        tid = trial.trial_id
        if t < self._barrier():
            return Decision.CONTINUE
        if tid not in self._arrived:
            self._arrived.add(tid)
            self._last[tid], self._score[tid] = t, score(result, self.metric, self.mode)
        self._maybe_perturb()
        if tid in self._exploit:
            return Decision.PAUSE
        if tid not in self._arrived:  # the generation moved on
            return Decision.CONTINUE
        return Decision.PAUSE if self._view.active(but=tid) else Decision.CONTINUE  # else hold

    def _maybe_perturb(self) -> None:
        """Synch: once every live trial is at the barrier and no more can come, perturb them all."""
        live = [u for u in self._order if u not in self._ended]
        if not self._view.exhausted or not live or any(u not in self._arrived for u in live):
            return
        bottom, top = self.quantiles(live)
        for tid in bottom:
            self._plan_exploit(tid, top)
        self._generation += 1
        self._arrived.clear()

    def _ended_trial(self, trial: Trial) -> None:
        self._view.see([trial])
        self._ended.add(trial.trial_id)
        self._exploit.pop(trial.trial_id, None)

    def on_trial_complete(self, trial: Trial, result: dict[str, Any] | None) -> None:
        self._ended_trial(trial)

    def on_trial_error(self, trial: Trial) -> None:
        self._ended_trial(trial)

    def choose_next(self, trials: Any) -> TrialSuggestion | None:
        waiting = list(trials)
        self._view.see(waiting)
        if self.synch:
            self._maybe_perturb()
        for trial in waiting:
            if trial.status is TrialStatus.PENDING:
                return TrialSuggestion.start(trial)
        paused = [t for t in waiting if t.status is TrialStatus.PAUSED]
        for trial in paused:
            if trial.trial_id in self._exploit:
                donor_id, config = self._exploit.pop(trial.trial_id)
                donor = self._view.live.get(donor_id)
                if donor is not None and donor.checkpoint is not None:
                    by_iteration = self.time_attr == "training_iteration"
                    self._last[trial.trial_id] = (
                        donor.checkpoint_iteration if by_iteration else self._last[donor_id]
                    )
                    self._score[trial.trial_id] = self._score[donor_id]
                    return TrialSuggestion.resume(trial, config=config, donor=donor)
        for trial in paused:
            if trial.trial_id in self._save_only or (self.synch and trial.trial_id not in self._arrived):
                self._save_only.discard(trial.trial_id)
                return self._resume(trial)
        if self._view.active() and not self._view.exhausted:
            self._view.decline()  # let the search add to the population first
            return None
        if paused and (not self.synch or not self._view.active()):
            # take turns (least progress first); with every slot idle this also keeps one busy
            return self._resume(min(paused, key=lambda t: (self._last.get(t.trial_id, 0.0), t.trial_id)))
        self._view.decline()
        return None

    def _resume(self, trial: Trial) -> TrialSuggestion:
        if trial.checkpoint is None:
            raise RuntimeError(
                f"PBT paused trial {trial.trial_id} at {self.time_attr}={self._last.get(trial.trial_id)} "
                "and must now resume it, but it has no checkpoint to resume from. PBT needs "
                "checkpoints: a function trainable must report them (dtune.report(metrics, "
                "checkpoint=dtune.Checkpoint.from_dict(state))) and restore from "
                "dtune.get_checkpoint(); a dtune.Trainable class is checkpointed on every pause."
            )
        return TrialSuggestion.resume(trial)
