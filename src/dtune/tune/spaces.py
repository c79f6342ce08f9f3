"""Search-space primitives and their resolution into concrete configs.

A *param space* is a (possibly nested) dict whose leaves are either constants or
:class:`Domain` objects. Names follow Ray Tune (``uniform``, ``loguniform``, ``choice``,
``grid``...), so a Ray user's space reads the same here.

Example:
    >>> import random
    >>> space = {"lr": loguniform(1e-4, 1e-1), "width": choice([32, 64]), "seed": 0}
    >>> config = resolve(space, random.Random(0))
    >>> sorted(config)
    ['lr', 'seed', 'width']
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Choice",
    "Domain",
    "Grid",
    "LogUniform",
    "QUniform",
    "RandInt",
    "SampleFrom",
    "Uniform",
    "choice",
    "grid",
    "grid_keys",
    "loguniform",
    "quniform",
    "randint",
    "resolve",
    "sample_from",
    "uniform",
    "validate_space",
]

Path = tuple[str, ...]


class Domain:
    """A distribution over the values of one hyper-parameter."""

    def sample(self, rng: random.Random) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, where: str) -> None:
        """Raise ``ValueError`` naming ``where`` if the domain's arguments are inconsistent."""


def _check_bounds(where: str, low: float, high: float) -> None:
    for name, value in (("low", low), ("high", high)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: the value of `{name}` is {value!r}, but must be a finite number.")
    if not low < high:
        raise ValueError(f"{where}: `low` is {low!r} and `high` is {high!r}, but `low` must be < `high`.")


@dataclass(frozen=True)
class Uniform(Domain):
    """Floats drawn uniformly from ``[low, high)``."""

    low: float
    high: float

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)

    def validate(self, where: str) -> None:
        _check_bounds(where, self.low, self.high)


@dataclass(frozen=True)
class LogUniform(Domain):
    """Floats whose logarithm is uniform on ``[log(low), log(high))``; both bounds > 0."""

    low: float
    high: float

    def sample(self, rng: random.Random) -> float:
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))

    def validate(self, where: str) -> None:
        _check_bounds(where, self.low, self.high)
        if self.low <= 0:
            raise ValueError(f"{where}: the value of `low` is {self.low!r}, but must be > 0 for loguniform.")


@dataclass(frozen=True)
class QUniform(Domain):
    """Uniform floats rounded to a multiple of ``q`` (and kept inside the bounds)."""

    low: float
    high: float
    q: float

    def sample(self, rng: random.Random) -> float:
        value = round(rng.uniform(self.low, self.high) / self.q) * self.q
        return min(max(value, self.low), self.high)

    def validate(self, where: str) -> None:
        _check_bounds(where, self.low, self.high)
        if not isinstance(self.q, (int, float)) or not self.q > 0:
            raise ValueError(f"{where}: the value of `q` is {self.q!r}, but must be > 0.")


@dataclass(frozen=True)
class RandInt(Domain):
    """Integers drawn uniformly from ``[low, high)`` (``high`` excluded, as in Ray Tune)."""

    low: int
    high: int

    def sample(self, rng: random.Random) -> int:
        return rng.randrange(self.low, self.high)

    def validate(self, where: str) -> None:
        if not isinstance(self.low, int) or not isinstance(self.high, int):
            raise ValueError(f"{where}: randint bounds must be integers, got {self.low!r} and {self.high!r}.")
        _check_bounds(where, self.low, self.high)


@dataclass(frozen=True)
class Choice(Domain):
    """One of ``categories``, each equally likely."""

    categories: tuple[Any, ...]

    def sample(self, rng: random.Random) -> Any:
        return self.categories[rng.randrange(len(self.categories))]

    def validate(self, where: str) -> None:
        if not self.categories:
            raise ValueError(f"{where}: choice() needs at least one category, got none.")


@dataclass(frozen=True)
class Grid(Domain):
    """Every value in ``values`` is tried: the searcher expands grids into a cartesian product."""

    values: tuple[Any, ...]

    def sample(self, rng: random.Random) -> Any:
        raise TypeError("grid() values are enumerated by a grid-capable searcher, not sampled.")

    def validate(self, where: str) -> None:
        if not self.values:
            raise ValueError(f"{where}: grid() needs at least one value, got none.")


@dataclass(frozen=True)
class SampleFrom(Domain):
    """A value computed by ``fn(config)`` from the other, already resolved, values."""

    fn: Callable[[dict[str, Any]], Any]

    def sample(self, rng: random.Random) -> Any:
        raise TypeError("sample_from() values are computed by resolve(), which passes the config.")

    def validate(self, where: str) -> None:
        if not callable(self.fn):
            raise ValueError(f"{where}: sample_from() needs a callable, got {self.fn!r}.")


def uniform(low: float, high: float) -> Uniform:
    return Uniform(low, high)


def loguniform(low: float, high: float) -> LogUniform:
    return LogUniform(low, high)


def quniform(low: float, high: float, q: float) -> QUniform:
    return QUniform(low, high, q)


def randint(low: int, high: int) -> RandInt:
    return RandInt(low, high)


def choice(categories: Sequence[Any]) -> Choice:
    return Choice(tuple(categories))


def grid(values: Sequence[Any]) -> Grid:
    return Grid(tuple(values))


def sample_from(fn: Callable[[dict[str, Any]], Any]) -> SampleFrom:
    return SampleFrom(fn)


def _where(path: Path) -> str:
    return "param_space" + "".join(f"[{key!r}]" for key in path)


def iter_leaves(space: Mapping[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Yield ``(path, leaf)`` for every non-dict value of a nested space, in insertion order."""
    for key, value in space.items():
        path = (*prefix, key)
        if isinstance(value, Mapping):
            yield from iter_leaves(value, path)
        else:
            yield path, value


def validate_space(space: Any) -> None:
    """Check a param space up front so that a typo fails at ``run()``, naming the key."""
    if not isinstance(space, Mapping):
        raise TypeError(f"`param_space` must be a dict, got {type(space).__name__}.")
    for path, leaf in iter_leaves(space):
        if not all(isinstance(key, str) for key in path):
            raise TypeError(f"{_where(path)}: keys of a param space must be strings.")
        if isinstance(leaf, Domain):
            leaf.validate(_where(path))


def grid_keys(space: Mapping[str, Any]) -> list[tuple[Path, Grid]]:
    """The grid leaves of a space, in order."""
    return [(path, leaf) for path, leaf in iter_leaves(space) if isinstance(leaf, Grid)]


def _set(config: dict[str, Any], path: Path, value: Any) -> None:
    for key in path[:-1]:
        config = config[key]
    config[path[-1]] = value


def resolve(
    space: Mapping[str, Any], rng: random.Random, fixed: Mapping[Path, Any] | None = None
) -> dict[str, Any]:
    """Turn a space into one concrete config.

    Domains are sampled with ``rng``; paths in ``fixed`` (e.g. a grid point) take the given
    value; ``sample_from`` leaves are computed last, in order, from the resolved config.
    """

    def copy(node: Mapping[str, Any]) -> dict[str, Any]:
        return {k: copy(v) if isinstance(v, Mapping) else v for k, v in node.items()}

    config = copy(space)
    deferred: list[tuple[Path, SampleFrom]] = []
    for path, leaf in iter_leaves(space):
        if fixed is not None and path in fixed:
            _set(config, path, fixed[path])
        elif isinstance(leaf, SampleFrom):
            deferred.append((path, leaf))
        elif isinstance(leaf, Grid):
            raise ValueError(
                f"{_where(path)} is a grid() but the searcher did not expand it; "
                "use dtune.search.Grid() (the default when a space holds grids)."
            )
        elif isinstance(leaf, Domain):
            _set(config, path, leaf.sample(rng))
    for path, leaf in deferred:
        try:
            _set(config, path, leaf.fn(config))
        except Exception as exc:
            raise ValueError(f"{_where(path)}: sample_from() function raised {exc!r}.") from exc
    return config
