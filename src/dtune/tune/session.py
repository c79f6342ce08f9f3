"""The trial's side of the narrow waist: ``report``, ``get_checkpoint`` and ``get_context``.

These functions work inside a trial, in the worker process that runs it; called anywhere else
they raise a :class:`RuntimeError` that says so, instead of silently doing nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtune.runtime import current_channel, distributed
from dtune.tune.checkpoint import Checkpoint

__all__ = ["TrialContext", "TrialInterrupted", "get_checkpoint", "get_context", "report"]

_PLAIN = (int, float, str, bool, type(None))
_CONTROLS = (None, "stop", "pause")


class TrialInterrupted(BaseException):
    """Raised out of ``report`` when the scheduler stopped or paused the trial.

    It derives from ``BaseException`` so that a trainable's ``except Exception`` does not
    swallow it; dtune catches it and ends the trial cleanly.
    """

    def __init__(self, control: str) -> None:
        super().__init__(control)
        self.control = control


@dataclass(frozen=True)
class TrialContext:
    """What a running trial may know about itself."""

    trial_id: str
    config: dict[str, Any]
    experiment_dir: str
    iteration: int

    @property
    def trial_dir(self) -> str:
        """This trial's own directory (created on first use) for files it wants to keep."""
        path = Path(self.experiment_dir, "trials", self.trial_id)
        path.mkdir(parents=True, exist_ok=True)
        return str(path)


def _plain(value: Any) -> Any:
    """Numbers from numpy or torch become Python numbers so results store as JSON."""
    if type(value) in _PLAIN:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            return value
    return value


class _Session:
    """State of the trial running in this process."""

    def __init__(
        self,
        channel: Any,
        trial_id: str,
        config: dict[str, Any],
        experiment_dir: str,
        checkpoint: str | None,
        start_iteration: int,
        time_offset: float,
        decide_at: bool | frozenset[int] = False,
    ) -> None:
        self.channel = channel
        self.trial_id = trial_id
        self.config = config
        self.experiment_dir = experiment_dir
        self.checkpoint = None if checkpoint is None else Checkpoint(checkpoint)
        self.iteration = start_iteration
        self.start = time.monotonic() - time_offset
        self.last = time.monotonic()
        self.decide_at = decide_at
        self.rank = distributed.rank()
        self.world_size = distributed.world_size()

    def report(self, metrics: Mapping[str, Any], checkpoint: Checkpoint | None) -> None:
        if not isinstance(metrics, Mapping):
            raise TypeError(f"dtune.report() needs a dict of metrics, got {type(metrics).__name__}.")
        if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
            raise TypeError(
                "dtune.report(checkpoint=...) needs a dtune.Checkpoint "
                f"(Checkpoint.from_dict or from_directory), got {type(checkpoint).__name__}."
            )
        self.iteration += 1
        now = time.monotonic()
        result = {key: _plain(value) for key, value in metrics.items()}
        result["training_iteration"] = self.iteration
        result["time_this_iter_s"] = now - self.last
        result["time_total_s"] = now - self.start
        self.last = now
        control = None
        if self.rank == 0:
            path = self._write(checkpoint)
            if self.waits_here():  # the scheduler decides on this result before the trial goes on
                control = self.channel.emit_and_wait((result, path, True))
            else:
                self.channel.emit((result, path, False), urgent=path is not None)
                control = self.channel.control()
        if self.world_size > 1:  # every rank stops or pauses at the same report
            control = _CONTROLS[distributed.broadcast_int(_CONTROLS.index(control))]
        if control is not None:
            raise TrialInterrupted(control)

    def waits_here(self) -> bool:
        """Whether the result of the current iteration is one the scheduler decides on in-band."""
        return self.decide_at is True or (
            isinstance(self.decide_at, frozenset) and self.iteration in self.decide_at
        )

    def attach_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Send a checkpoint of the state at the last reported result (rank 0; others ignore it)."""
        if self.rank == 0:
            self.channel.emit((None, self._write(checkpoint), False), urgent=True)

    def _write(self, checkpoint: Checkpoint | None) -> str | None:
        if checkpoint is None:
            return None
        target = Path(self.experiment_dir, "trials", self.trial_id, f"checkpoint_{self.iteration:06d}")
        self.checkpoint = checkpoint.write_to(target)
        return self.checkpoint.path

    def context(self) -> TrialContext:
        return TrialContext(self.trial_id, self.config, self.experiment_dir, self.iteration)


_current: _Session | None = None


def _session(name: str) -> _Session:
    if _current is None:
        raise RuntimeError(
            f"dtune.{name}() was called outside a trial. Call it from the trainable you pass to "
            "dtune.run() (it runs in a worker process, where dtune sets the trial up)."
        )
    return _current


def report(metrics: Mapping[str, Any], checkpoint: Checkpoint | None = None) -> None:
    """Send one result (and optionally a checkpoint) of the running trial to dtune.

    ``training_iteration``, ``time_this_iter_s`` and ``time_total_s`` are added. If the scheduler
    has decided to stop or pause the trial, this raises :class:`TrialInterrupted`, which dtune
    handles; do not catch it.

    In a trial of several workers every rank must call ``report`` at the same points: rank 0's
    metrics and checkpoint are kept, the other ranks' are ignored (average them into rank 0's
    metrics yourself if you want them), and a stop or pause reaches all ranks at the same call.
    Under ``dtune.train.launch`` (no search), rank 0's metrics are collected by ``launch``.
    """
    if _current is None:
        channel = current_channel()
        if channel is not None:  # dtune.train.launch: no trial, the launcher collects results
            if distributed.rank() == 0:
                channel.emit({key: _plain(value) for key, value in metrics.items()})
            return
    _session("report").report(metrics, checkpoint)


def get_checkpoint() -> Checkpoint | None:
    """The checkpoint to continue from: None on a first start, the newest one after a restore."""
    if _current is None and current_channel() is not None:
        return None  # dtune.train.launch starts from scratch
    return _session("get_checkpoint").checkpoint


def get_context() -> TrialContext:
    """The running trial's id, config, directory and iteration."""
    return _session("get_context").context()


def _set_session(session: _Session | None) -> None:
    global _current
    _current = session
