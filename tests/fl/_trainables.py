"""Trainables for the dtune.run integration test (importable by worker processes)."""

from __future__ import annotations

from typing import Any

from dtune.fl import tune_trainable


def small_federation(config: dict[str, Any]) -> None:
    """A few rounds of a 20-client federation; the search varies the deadline."""
    tune_trainable({"num_clients": 20, "num_select": 4, "duration_s": 3600.0, "history_s": 600.0, **config})
