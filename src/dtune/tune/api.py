"""``dtune.run``: one call from a trainable and a param space to a finished, durable search."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cloudpickle

from dtune.runtime import GroupTask, WorkerPool
from dtune.runtime.pool import dumps_for_worker
from dtune.tune.progress import Progress
from dtune.tune.resources import Resources
from dtune.tune.results import Results
from dtune.tune.runner import TASK_KEY, RunnerConfig, StopCriterion, TrialRunner
from dtune.tune.schedulers import FIFO, Scheduler
from dtune.tune.search import Grid, Random, Searcher
from dtune.tune.spaces import SampleFrom, grid_keys, iter_leaves, validate_space
from dtune.tune.store import ExperimentStore
from dtune.tune.trainable import Trainable, TrialTask
from dtune.tune.trial import TrialStatus

__all__ = ["resume", "run"]

DEFAULT_STORAGE = "~/dtune_results"


def _trainable_name(trainable: Any) -> str:
    return str(getattr(trainable, "__name__", type(trainable).__name__))


def _fingerprint(trainable: Any, param_space: Mapping[str, Any], metric: str, mode: str) -> dict[str, Any]:
    """What identifies an experiment, so that a directory is not reused for a different one."""

    def describe(leaf: Any) -> str:
        if isinstance(leaf, SampleFrom):
            return f"sample_from({getattr(leaf.fn, '__qualname__', '?')})"
        return repr(leaf)

    space = {"/".join(path): describe(leaf) for path, leaf in iter_leaves(param_space)}
    return {"trainable": _trainable_name(trainable), "metric": metric, "mode": mode, "param_space": space}


def _validate(trainable: Any, metric: Any, mode: Any, num_samples: Any, max_failures: Any, stop: Any) -> None:
    if not callable(trainable):
        raise TypeError(
            "The trainable must be a function taking a config dict or a dtune.Trainable subclass, "
            f"got {trainable!r}."
        )
    if not isinstance(metric, str) or not metric:
        raise TypeError(f"The value of `metric` is {metric!r}, but must be a non-empty string.")
    if mode not in ("min", "max"):
        raise ValueError(f"The value of `mode` is {mode!r}, but must be 'min' or 'max'.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"The value of `num_samples` is {num_samples!r}, but must be an integer >= 1.")
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise ValueError(f"The value of `max_failures` is {max_failures!r}, but must be an integer >= 0.")
    if stop is not None and not callable(stop) and not isinstance(stop, Mapping):
        raise TypeError(f"`stop` must be a dict of metric thresholds or a function, got {stop!r}.")


def _experiment_dir(storage: str | Path | None, name: str | None, trainable: Any) -> Path:
    if storage is not None and name is None:
        return Path(storage).expanduser().resolve()
    base = Path(storage or DEFAULT_STORAGE).expanduser().resolve()
    return base / (name or f"{_trainable_name(trainable)}_{time.strftime('%Y%m%d-%H%M%S')}")


@contextmanager
def _graceful_sigint() -> Any:
    """First Ctrl-C asks the loop to stop cleanly; a second one interrupts at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        print("\ndtune: stopping cleanly (Ctrl-C again to abort at once)...", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def run(
    trainable: Callable[[dict[str, Any]], Any] | type[Trainable],
    *,
    param_space: Mapping[str, Any],
    metric: str,
    mode: str,
    num_samples: int = 1,
    search: Searcher | None = None,
    scheduler: Scheduler | None = None,
    resources: Resources | None = None,
    stop: StopCriterion = None,
    storage: str | Path | None = None,
    name: str | None = None,
    max_concurrent: int | None = None,
    max_failures: int = 0,
    resume: bool = False,
    seed: int | None = None,
    keep_checkpoints_num: int | None = None,
    verbose: int = 2,
) -> Results:
    """Search ``param_space`` by running ``trainable`` on sampled configs; return the results.

    ``trainable`` is a function ``f(config)`` that calls :func:`dtune.report`, or a
    :class:`dtune.Trainable` subclass. ``metric``/``mode`` reach both searcher and scheduler.
    Each trial runs in a warm worker process on this machine, ``resources.cpus`` CPUs each (so
    at most ``available CPUs / cpus`` at once, and at most ``max_concurrent``). Everything is
    recorded in ``storage`` (the experiment directory; with ``name``, ``storage/name``), so a
    crashed or interrupted search continues with ``resume=True`` or ``dtune resume DIR``.
    A trial that raises, or whose worker dies, is retried ``max_failures`` times from its last
    checkpoint. ``stop`` ends a trial once any ``result[key] >= value`` (or ``stop(trial_id,
    result)`` is true). ``verbose``: 0 silent, 1 status lines, 2 live table.

    Example:
        >>> def train(config):
        ...     dtune.report({"loss": (config["x"] - 0.3) ** 2})
        >>> results = dtune.run(train, param_space={"x": dtune.uniform(0, 1)},
        ...                     metric="loss", mode="min", num_samples=20)  # doctest: +SKIP
    """
    _validate(trainable, metric, mode, num_samples, max_failures, stop)
    validate_space(param_space)
    resources = resources or Resources()
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise ValueError(f"The value of `max_concurrent` is {max_concurrent!r}, but must be an integer >= 1.")
    if search is None:
        search = Grid(seed=seed) if grid_keys(param_space) else Random(seed=seed)
    if grid_keys(param_space) and not search.supports_grid:
        raise ValueError(
            f"param_space holds grid() values but {type(search).__name__} cannot enumerate a grid; "
            "use dtune.search.Grid() (or leave search=None), or replace grid() with choice()."
        )
    scheduler = scheduler or FIFO()
    search.set_search_properties(
        metric=metric, mode=mode, param_space=param_space, num_samples=num_samples, seed=seed
    )
    scheduler.set_properties(metric, mode)
    task = GroupTask(TrialTask(trainable))
    task_blob = dumps_for_worker(task, f"The trainable {_trainable_name(trainable)!r}")

    experiment_dir = _experiment_dir(storage, name, trainable)
    store = ExperimentStore(experiment_dir)
    fingerprint = _fingerprint(trainable, param_space, metric, mode)
    trials = []
    if store.has_experiment():
        if not resume:
            store.close()
            raise ValueError(
                f"{experiment_dir} already holds a dtune experiment. Pass resume=True (or run "
                f"`dtune resume {experiment_dir}`) to continue it, or choose another storage directory."
            )
        stored = json.loads(store.get_meta("fingerprint") or b"{}")
        if stored != fingerprint:
            store.close()
            changed = sorted(k for k in fingerprint if stored.get(k) != fingerprint[k])
            raise ValueError(
                f"{experiment_dir} holds a different experiment (it differs in: {', '.join(changed)}); "
                "resume it with the same trainable, param_space, metric and mode, "
                "or choose another directory."
            )
        trials = store.load_trials()
        search.set_state(store.get_meta("searcher_state") or b"")
        scheduler.set_state(store.get_meta("scheduler_state") or b"")
    else:
        spec = dict(
            trainable=trainable, param_space=param_space, metric=metric, mode=mode,
            num_samples=num_samples, search=search, scheduler=scheduler, resources=resources,
            stop=stop, max_concurrent=max_concurrent, max_failures=max_failures, seed=seed,
            keep_checkpoints_num=keep_checkpoints_num,
        )  # fmt: skip
        store.put_meta("spec", dumps_for_worker(spec, "The experiment's arguments"))
        store.put_meta("fingerprint", json.dumps(fingerprint).encode())
        store.flush()

    max_trials = int(getattr(search, "total", num_samples))
    unfinished = sum(1 for t in trials if not t.status.is_finished)
    slots = min(resources.slots(), max(1, max_trials - len(trials) + unfinished))
    if max_concurrent is not None:
        slots = min(slots, max_concurrent)

    progress = Progress(verbose, metric, mode, str(experiment_dir))
    pool = WorkerPool(slots * resources.workers, env=resources.worker_env())
    pool.register_pickled(TASK_KEY, task_blob)
    runner = TrialRunner(
        config=RunnerConfig(
            metric=metric, mode=mode, num_samples=max_trials, experiment_dir=str(experiment_dir),
            stop=stop, max_failures=max_failures, keep_checkpoints_num=keep_checkpoints_num,
            workers_per_trial=resources.workers, collective_timeout_s=resources.collective_timeout_s,
        ),
        pool=pool, store=store, searcher=search, scheduler=scheduler, trials=trials,
        on_progress=progress.update,
    )  # fmt: skip
    for trial in trials:
        if trial.status in (TrialStatus.RUNNING, TrialStatus.PENDING):
            runner.restart_from_checkpoint(trial)
    interrupted = False
    try:
        with _graceful_sigint() as stop_flag:
            runner.should_stop = stop_flag.is_set
            runner.run()
            interrupted = stop_flag.is_set()
    except BaseException:
        interrupted = True
        raise
    finally:
        if interrupted:
            runner.interrupt()
        pool.shutdown(timeout=2.0 if interrupted else 5.0)
        progress.close()
        store.close()
    if interrupted:
        counts = runner.counts()
        print(
            f"dtune: interrupted with {counts[TrialStatus.TERMINATED]} trials finished; the rest "
            f"continue from their last checkpoint with: dtune resume {experiment_dir}",
            file=sys.stderr,
        )
        raise KeyboardInterrupt
    return Results(str(experiment_dir), metric, mode, trials=runner.trials)


def resume(experiment_dir: str | Path, *, verbose: int = 2) -> Results:
    """Continue the experiment stored in ``experiment_dir`` with the arguments it was started with."""
    store = ExperimentStore(experiment_dir, readonly=True)
    blob = store.get_meta("spec")
    if blob is None:
        raise FileNotFoundError(f"{experiment_dir} holds no dtune experiment to resume.")
    spec = cloudpickle.loads(blob)
    return run(spec.pop("trainable"), **spec, storage=experiment_dir, resume=True, verbose=verbose)
