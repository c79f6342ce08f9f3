"""Class trainables, and the code that runs any trainable inside a worker process."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtune.tune import session as _session_module
from dtune.tune.checkpoint import Checkpoint
from dtune.tune.session import TrialInterrupted, _Session

__all__ = ["Trainable", "TrialSpec", "TrialTask", "run_trial"]


class Trainable:
    """A trainable as a class, for work that is naturally stepped, saved and restored.

    Subclass it and override :meth:`setup`, :meth:`step` (returns the metrics of one step; put
    ``"done": True`` in them to finish), :meth:`save` and :meth:`restore`. dtune saves a
    checkpoint every ``checkpoint_frequency`` steps (0: never on a schedule), at the end, and
    whenever the scheduler pauses or stops the trial, so PBT and HyperBand can resume it.

    Example:
        >>> class Counter(Trainable):
        ...     def setup(self, config):
        ...         self.n = 0
        ...     def step(self):
        ...         self.n += 1
        ...         return {"n": self.n, "done": self.n >= 3}
        ...     def save(self, checkpoint_dir):
        ...         Path(checkpoint_dir, "n").write_text(str(self.n))
        ...     def restore(self, checkpoint_dir):
        ...         self.n = int(Path(checkpoint_dir, "n").read_text())
    """

    checkpoint_frequency: int = 0

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.setup(config)

    def setup(self, config: dict[str, Any]) -> None:
        """Build models and data from ``config`` (called once per start or restore)."""

    def step(self) -> Mapping[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError("Trainable subclasses must implement step().")

    def save(self, checkpoint_dir: str) -> None:
        """Write everything needed to continue into ``checkpoint_dir``."""

    def restore(self, checkpoint_dir: str) -> None:
        """Load what :meth:`save` wrote."""

    def cleanup(self) -> None:
        """Release resources when the trial ends."""


@dataclass(frozen=True)
class TrialSpec:
    """What a worker needs to start or continue one trial."""

    trial_id: str
    config: dict[str, Any]
    experiment_dir: str
    checkpoint: str | None
    start_iteration: int
    time_offset: float
    decide_at: bool | frozenset[int] = False  # reports the scheduler answers before the trial goes on


def _run_class(cls: type[Trainable], session: _Session) -> None:
    instance = cls(session.config)
    try:
        if session.checkpoint is not None and session.checkpoint.path is not None:
            instance.restore(session.checkpoint.path)
        while True:
            result = dict(instance.step())
            done = bool(result.pop("done", False))
            due = cls.checkpoint_frequency and (session.iteration + 1) % cls.checkpoint_frequency == 0
            if done or due or session.channel.control() is not None:
                with _saved(instance) as checkpoint:
                    session.report(result, checkpoint)
            else:
                try:
                    session.report(result, None)
                except TrialInterrupted:  # decided on this very result: keep the state it came from
                    with _saved(instance) as checkpoint:
                        session.attach_checkpoint(checkpoint)
                    raise
            if done:
                return
    finally:
        instance.cleanup()


@contextlib.contextmanager
def _saved(instance: Trainable) -> Iterator[Checkpoint]:
    """A checkpoint of ``instance`` in a scratch directory, removed once it has been reported."""
    scratch = tempfile.mkdtemp(prefix="dtune-save-")
    try:
        instance.save(scratch)
        yield Checkpoint.from_directory(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_trial(channel: Any, trainable: Callable[..., Any] | type[Trainable], spec: TrialSpec) -> str:
    """Run one trial in this worker; returns how it ended ("returned", "stop" or "pause")."""
    Path(spec.experiment_dir, "trials").mkdir(parents=True, exist_ok=True)
    session = _Session(
        channel,
        spec.trial_id,
        spec.config,
        spec.experiment_dir,
        spec.checkpoint,
        spec.start_iteration,
        spec.time_offset,
        spec.decide_at,
    )
    _session_module._set_session(session)
    try:
        if isinstance(trainable, type) and issubclass(trainable, Trainable):
            _run_class(trainable, session)
        else:
            value = trainable(spec.config)  # type: ignore[call-arg]
            if isinstance(value, Mapping):
                session.report(value, None)
    except TrialInterrupted as interrupted:
        return interrupted.control
    finally:
        _session_module._set_session(None)
    return "returned"


@dataclass(frozen=True)
class TrialTask:
    """The function the worker pool runs for every trial: ``trainable`` bound once, shipped once."""

    trainable: Callable[..., Any] | type[Trainable]

    def __call__(self, channel: Any, spec: TrialSpec) -> str:
        return run_trial(channel, self.trainable, spec)
