from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from dtune.runtime import EventKind, WorkerPool


def _collect(pool: WorkerPool, want: int, timeout: float = 20.0) -> list:
    events: list = []
    deadline = time.monotonic() + timeout
    while sum(e.kind is not EventKind.ITEMS for e in events) < want:
        assert time.monotonic() < deadline, f"timed out; got {events}"
        events.extend(pool.wait(0.5))
    return events


def _emit_n(channel, n):
    for i in range(n):
        channel.emit(i)
    return "ok"


def test_task_returns_value_and_items_in_order():
    pool = WorkerPool(1)
    try:
        pool.register("emit", _emit_n)
        pool.submit(pool.idle()[0], "t1", "emit", (2000,))
        events = _collect(pool, 1)
        items = [i for e in events for i in e.items]
        assert items == list(range(2000))
        assert events[-1].kind is EventKind.DONE and events[-1].value == "ok"
        assert pool.idle(), "worker is idle again after its task"
    finally:
        pool.shutdown()


def _boom(channel):
    raise ValueError("boom from the task")


def test_task_error_carries_traceback():
    pool = WorkerPool(1)
    try:
        pool.register("boom", _boom)
        pool.submit(pool.idle()[0], 7, "boom", ())
        (event,) = _collect(pool, 1)
        assert event.kind is EventKind.ERROR and event.task_id == 7
        assert "ValueError: boom from the task" in event.value
    finally:
        pool.shutdown()


def _suicide(channel):
    channel.emit("before")
    channel.send_message(("items", channel.task_id))  # make sure "before" left the worker
    os.kill(os.getpid(), signal.SIGKILL)


def test_killed_worker_is_reported_and_replaced():
    pool = WorkerPool(1)
    try:
        pool.register("suicide", _suicide)
        pool.register("emit", _emit_n)
        old_pid = pool.workers[0].pid
        pool.submit(pool.idle()[0], "a", "suicide", ())
        events = _collect(pool, 1)
        died = events[-1]
        assert died.kind is EventKind.DIED and died.task_id == "a"
        assert "SIGKILL" in died.value
        assert [i for e in events for i in e.items] == ["before"]
        assert pool.workers[0].pid != old_pid
        pool.submit(pool.idle()[0], "b", "emit", (3,))  # the replacement knows every function
        assert _collect(pool, 1)[-1].value == "ok"
    finally:
        pool.shutdown()


def _wait_for_control(channel):
    while channel.control() is None:
        time.sleep(0.001)
    return channel.control()


def test_control_reaches_running_task():
    pool = WorkerPool(1)
    try:
        pool.register("wait", _wait_for_control)
        worker = pool.idle()[0]
        pool.submit(worker, "x", "wait", ())
        pool.control(worker, "stop")
        assert _collect(pool, 1)[-1].value == "stop"
    finally:
        pool.shutdown()


def _slow_then_emit(channel):
    channel.emit("early")
    channel.emit("buffered")  # within the batching window: held back, then flushed late
    time.sleep(1.0)
    return None


def test_buffered_item_is_flushed_without_further_emits():
    pool = WorkerPool(1)
    try:
        pool.register("slow", _slow_then_emit)
        pool.submit(pool.idle()[0], "s", "slow", ())
        deadline = time.monotonic() + 0.8
        items: list = []
        while time.monotonic() < deadline and len(items) < 2:
            items += [i for e in pool.wait(0.1) for i in e.items]
        assert items == ["early", "buffered"]
        _collect(pool, 1)
    finally:
        pool.shutdown()


def _forever(channel):
    while True:
        time.sleep(0.05)


def test_shutdown_kills_stuck_workers():
    pool = WorkerPool(2)
    pool.register("forever", _forever)
    for i, worker in enumerate(pool.idle()):
        pool.submit(worker, i, "forever", ())
    time.sleep(0.3)
    start = time.monotonic()
    pool.shutdown(timeout=0.5)
    assert time.monotonic() - start < 3
    assert all(w.process.poll() is not None for w in pool.workers)


def test_unpicklable_function_error_says_what():
    pool = WorkerPool(1)
    try:
        lock = threading.Lock()
        with pytest.raises(TypeError, match="could not be pickled.*lock"):
            pool.register("bad", lambda channel: lock)
    finally:
        pool.shutdown()


def test_size_must_be_positive():
    with pytest.raises(ValueError, match="`size` is 0"):
        WorkerPool(0)


def test_killed_worker_is_never_handed_out_again():
    pool = WorkerPool(1)
    try:
        pool.register("emit", _emit_n)
        victim = pool.workers[0]
        pool.kill(victim)  # idle, yet dying: must not receive the next task
        assert pool.idle() == []
        events = _collect(pool, 1)
        assert events[-1].kind is EventKind.DIED and events[-1].task_id is None
        pool.submit(pool.idle()[0], "after", "emit", (2,))
        assert _collect(pool, 1)[-1].value == "ok"
    finally:
        pool.shutdown()
