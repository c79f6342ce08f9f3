"""Objectives of ``search_quality.py``, written once and run by every framework.

Each objective is a *trainable* written against dtune's narrow waist (``dtune.report``,
``dtune.get_checkpoint``, ``dtune.Checkpoint``). The Ray Tune and Optuna sides run the very same
functions through :func:`install_shim`, which puts a small ``dtune`` module in front of their
own APIs, so that all three frameworks train the same thing with the same code.

Every report carries ``true``: the noise-free value of what was reported (the synthetic
problems know it; for the MLP it is the measured validation accuracy itself). A search is scored
by the ``true`` value of its best *reported* result, so lucky noise does not count.

- ``curve``: ``loss_t = (x - 0.3)^2 + 1 / (t + 1) + N(0, 0.01^2)`` for ``t = 1..max_t``.
- ``hartmann``: the 6-D Hartmann function (minimum -3.32237) observed with noise of standard
  deviation ``0.5 / sqrt(t)``: a fidelity that lowers noise as training goes on.
- ``digits``: the MLP of ``examples/digits_search.py`` on scikit-learn's digits, one epoch per
  iteration; PBT's explored learning rate and weight decay override the restored optimizer's.

This module imports only the standard library at import time (the Ray environment shares it).
"""

from __future__ import annotations

import math
import random
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"

HARTMANN_MIN = -3.32237
_A = [
    [10, 3, 17, 3.5, 1.7, 8],
    [0.05, 10, 17, 0.1, 8, 14],
    [3, 3.5, 1.7, 10, 17, 8],
    [17, 8, 0.05, 10, 0.1, 14],
]
_P = [
    [0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886],
    [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
    [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650],
    [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381],
]
_ALPHA = [1.0, 1.2, 3.0, 3.2]


def hartmann6(x: list[float]) -> float:
    """The 6-D Hartmann function on [0, 1]^6 (Dixon and Szegö, 1978)."""
    return -sum(
        alpha * math.exp(-sum(a * (xi - p) ** 2 for a, xi, p in zip(row, x, prow, strict=True)))
        for alpha, row, prow in zip(_ALPHA, _A, _P, strict=True)
    )


def _noise(config: dict[str, Any], t: int) -> random.Random:
    """A generator fixed by the searched values and the step: every framework sees the same noise."""
    searched = sorted((k, v) for k, v in config.items() if k not in ("ckpt", "step_s", "max_t"))
    return random.Random(repr(searched) + f"/{t}")


def _start_step() -> tuple[Any, int]:
    import dtune

    checkpoint = dtune.get_checkpoint()
    return dtune, (checkpoint.to_dict()["t"] if checkpoint is not None else 0)


def _synthetic(
    config: dict[str, Any], true_at: Callable[[int], float], sigma_at: Callable[[int], float]
) -> None:
    """Report ``true_at(t) + N(0, sigma_at(t)^2)`` for t = 1..max_t, one ``step_s`` of work each."""
    dtune, start = _start_step()
    for t in range(start + 1, config["max_t"] + 1):
        time.sleep(config["step_s"])  # the work of one step; identical for every framework
        true = true_at(t)
        metrics = {"loss": true + _noise(config, t).gauss(0, sigma_at(t)), "true": true}
        dtune.report(metrics, checkpoint=dtune.Checkpoint.from_dict({"t": t}) if config["ckpt"] else None)


def curve(config: dict[str, Any]) -> None:
    _synthetic(config, lambda t: (config["x"] - 0.3) ** 2 + 1 / (t + 1), lambda t: 0.01)


def hartmann(config: dict[str, Any]) -> None:
    value = hartmann6([config[f"x{i}"] for i in range(6)])
    _synthetic(config, lambda t: value, lambda t: 0.5 / math.sqrt(t))


def digits(config: dict[str, Any]) -> None:
    """``train_digits`` from the example, reporting ``true`` (= acc) as well."""
    import torch

    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import digits_search
    import dtune

    report = dtune.report

    def report_true(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        report({**metrics, "true": metrics["acc"]}, checkpoint=checkpoint)

    torch.set_num_threads(1)
    digits_search.dtune = types.SimpleNamespace(
        report=report_true, get_checkpoint=dtune.get_checkpoint, Checkpoint=dtune.Checkpoint
    )
    try:
        digits_search.train_digits(config)
    finally:
        digits_search.dtune = dtune


TRAINABLES: dict[str, Callable[[dict[str, Any]], None]] = {
    "curve": curve,
    "hartmann": hartmann,
    "digits": digits,
}

#: The search spaces, framework-neutral: name -> (kind, arguments).
SPACES: dict[str, dict[str, tuple[str, tuple[Any, ...]]]] = {
    "curve": {"x": ("uniform", (0.0, 1.0))},
    "hartmann": {f"x{i}": ("uniform", (0.0, 1.0)) for i in range(6)},
    "digits": {
        "lr": ("loguniform", (1e-3, 0.5)),
        "width": ("choice", ([16, 32, 64, 128],)),
        "weight_decay": ("loguniform", (1e-6, 1e-2)),
        "batch_size": ("choice", ([16, 32, 64],)),
    },
}


def sample_configs(problem: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` configs drawn from the problem's space: the same list is given to both sides of a pair."""
    rng = random.Random(f"configs/{problem}/{seed}")
    draw = {
        "uniform": lambda lo, hi: rng.uniform(lo, hi),
        "loguniform": lambda lo, hi: math.exp(rng.uniform(math.log(lo), math.log(hi))),
        "choice": lambda options: rng.choice(options),
    }
    return [{name: draw[kind](*args) for name, (kind, args) in SPACES[problem].items()} for _ in range(n)]


def space_for(problem: str, module: Any) -> dict[str, Any]:
    """The problem's space in a framework whose module has uniform/loguniform/choice (dtune, ray.tune)."""
    return {name: getattr(module, kind)(*args) for name, (kind, args) in SPACES[problem].items()}


# -- running the same trainables under another framework ------------------------------------------------
class _DictCheckpoint:
    """``dtune.Checkpoint`` for the shims: a dict, saved as ``data.pt`` when a directory is needed."""

    def __init__(self, data: dict[str, Any] | None = None, path: str | None = None) -> None:
        self._data, self.path = data, path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _DictCheckpoint:
        return cls(dict(data))

    def to_dict(self) -> dict[str, Any]:
        if self._data is not None:
            return dict(self._data)
        import torch

        return dict(torch.load(Path(str(self.path), "data.pt"), weights_only=True))

    def to_directory(self) -> str:
        import torch

        path = tempfile.mkdtemp(prefix="shim-ckpt-")
        torch.save(self._data, Path(path, "data.pt"))
        return path


def install_shim(
    report: Callable[[dict[str, Any], Any], None], get_checkpoint: Callable[[], Any] = lambda: None
) -> None:
    """Make ``import dtune`` give these functions (for the Ray Tune and Optuna sides)."""
    shim = types.ModuleType("dtune")
    shim.report = report  # type: ignore[attr-defined]
    shim.get_checkpoint = get_checkpoint  # type: ignore[attr-defined]
    shim.Checkpoint = _DictCheckpoint  # type: ignore[attr-defined]
    # dtune.train on one process (what dtune itself does with one worker, minus the hooks)
    shim.train = types.SimpleNamespace(  # type: ignore[attr-defined]
        AllReduce=lambda: None,
        prepare=lambda model, optimizer, strategy=None: (model, optimizer),
        shard=iter,
        context=lambda: types.SimpleNamespace(is_main=True, rank=0, world_size=1),
        unwrap=lambda model: model,
    )
    sys.modules["dtune"] = shim


def ray_shim() -> None:
    """The ``dtune`` shim on Ray Tune: reports and checkpoints go through ``ray.tune``."""
    from ray import tune

    def report(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        if checkpoint is None:
            tune.report(metrics)
            return
        path = checkpoint.to_directory()
        try:  # Ray persists the checkpoint before report() returns
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(path))
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def get_checkpoint() -> Any:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as path:
            return _DictCheckpoint(_DictCheckpoint(path=path).to_dict())

    install_shim(report, get_checkpoint)
