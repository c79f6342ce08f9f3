"""Shared fixtures: every test must leave no dtune worker process behind."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest

SESSION_TAG = uuid.uuid4().hex
os.environ["DTUNE_TEST_SESSION"] = SESSION_TAG  # inherited by every process the tests start


def _our_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["pid"]):
        if process.pid == os.getpid():
            continue
        try:
            if process.environ().get("DTUNE_TEST_SESSION") == SESSION_TAG:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 5.0
    alive = _our_processes()
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for process in alive:
        process.kill()
    assert not alive, f"processes left behind: {[(p.pid, p.cmdline()) for p in alive]}"
