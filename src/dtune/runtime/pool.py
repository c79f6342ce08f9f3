"""A pool of warm worker processes on this machine.

Processes are started once and reused for task after task, so running a task costs a couple of
socket messages rather than an interpreter start. The pool knows nothing of trials: it ships
functions once, runs ``fn(channel, *args)`` on an idle worker, and streams back what the task
emits, its return value or its traceback, and the death of a worker (e.g. SIGKILL).

Example:
    >>> pool = WorkerPool(2)
    >>> pool.register("echo", lambda channel, x: x)
    >>> worker = pool.idle()[0]
    >>> pool.submit(worker, 1, "echo", (42,))
    >>> [e.value for e in pool.wait(5.0) if e.kind is EventKind.DONE]
    [42]
    >>> pool.shutdown()
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from dtune.runtime._worker import FD_ENV

__all__ = ["Event", "EventKind", "WorkerHandle", "WorkerPool", "dumps_for_worker"]

log = logging.getLogger(__name__)


def dumps_for_worker(obj: Any, what: str) -> bytes:
    """Pickle ``obj`` for a worker, by value where needed; fail with what could not be pickled."""
    import cloudpickle

    try:
        return bytes(cloudpickle.dumps(obj, protocol=5))
    except Exception as exc:
        raise TypeError(
            f"{what} must be sent to worker processes but could not be pickled: {exc}. "
            "Everything it references (globals captured by a closure, default arguments) must be "
            "picklable; create locks, open files, sockets and models inside it instead."
        ) from exc


class EventKind(enum.Enum):
    ITEMS = "items"  # a batch of items a running task emitted
    DONE = "done"  # the task returned (``value``); ``items`` are its last emitted items
    ERROR = "error"  # the task raised (``value`` is the traceback text)
    DIED = "died"  # the worker process died (``value`` is a description); it was replaced


@dataclass
class Event:
    kind: EventKind
    worker: WorkerHandle
    task_id: Any
    items: list[Any]
    value: Any = None


@dataclass(eq=False)
class WorkerHandle:
    """One worker process and the task it is running (None when idle)."""

    process: subprocess.Popen[bytes]
    conn: Connection
    index: int
    task_id: Any = None
    killed: bool = False  # kill() was called: never idle again; a replacement takes its place

    @property
    def pid(self) -> int:
        return self.process.pid


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "closed its connection"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class WorkerPool:
    """``size`` worker processes, each running one task at a time."""

    def __init__(self, size: int, *, env: Mapping[str, str] | None = None) -> None:
        if size < 1:
            raise ValueError(f"The value of `size` is {size}, but must be >= 1.")
        self._env = {**os.environ, **(env or {})}
        self._functions: dict[str, bytes] = {}
        self.workers: list[WorkerHandle] = [self._spawn(i) for i in range(size)]
        self._closed = False

    # -- life cycle ------------------------------------------------------------------------------
    def _spawn(self, index: int) -> WorkerHandle:
        parent_sock, child_sock = socket.socketpair()
        env = {**self._env, FD_ENV: str(child_sock.fileno())}
        process = subprocess.Popen(
            [sys.executable, "-c", "from dtune.runtime._worker import main; main()"],
            env=env,
            pass_fds=(child_sock.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        child_sock.close()
        conn = Connection(parent_sock.detach())
        handle = WorkerHandle(process, conn, index)
        self._send(handle, ("init", list(sys.path)))
        for key, blob in self._functions.items():
            self._send(handle, ("fn", key, blob))
        return handle

    def register(self, key: str, fn: Callable[..., Any], what: str = "The function") -> None:
        """Make ``fn`` callable by ``key`` on every worker, present and future (pickled once)."""
        self.register_pickled(key, dumps_for_worker(fn, what))

    def register_pickled(self, key: str, blob: bytes) -> None:
        """Like :meth:`register`, for a function the caller already pickled with cloudpickle."""
        self._functions[key] = blob
        for handle in self.workers:
            self._send(handle, ("fn", key, blob))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask every worker to exit, then kill what is left after ``timeout``; idempotent."""
        if self._closed:
            return
        self._closed = True
        for handle in self.workers:
            with contextlib.suppress(OSError):
                self._send(handle, ("exit",))
        deadline = time.monotonic() + timeout
        for handle in self.workers:
            try:
                handle.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                handle.process.kill()
                handle.process.wait()
            handle.conn.close()

    def kill(self, handle: WorkerHandle) -> None:
        """Kill a worker (e.g. stuck in a task); a DIED event follows and it is replaced."""
        handle.killed = True
        if handle.process.poll() is None:
            handle.process.kill()

    # -- tasks -----------------------------------------------------------------------------------
    @property
    def replacing(self) -> bool:
        """Whether a killed worker is still to be replaced (the next wait() does it)."""
        return any(h.killed for h in self.workers)

    def idle(self) -> list[WorkerHandle]:
        return [h for h in self.workers if h.task_id is None and not h.killed]

    def submit(self, handle: WorkerHandle, task_id: Any, key: str, args: tuple[Any, ...]) -> None:
        if handle.task_id is not None:
            raise RuntimeError(f"worker {handle.index} is busy with task {handle.task_id!r}")
        if key not in self._functions:
            raise KeyError(f"no function registered as {key!r}")
        try:
            blob = pickle.dumps(args, protocol=5)
        except Exception:
            blob = dumps_for_worker(args, "The task's arguments")
        handle.task_id = task_id
        self._send(handle, ("run", task_id, key, blob))

    def control(self, handle: WorkerHandle, value: Any) -> None:
        """Deliver ``value`` to the worker's running task (read through ``Channel.control``)."""
        if handle.task_id is not None:
            with contextlib.suppress(OSError):  # the worker is dying: wait() reports it
                self._send(handle, ("ctl", handle.task_id, value))

    def wait(self, timeout: float | None) -> list[Event]:
        """Block up to ``timeout`` seconds for messages; return what arrived, in order."""
        by_conn = {h.conn: h for h in self.workers}
        events: list[Event] = []
        for conn in wait(list(by_conn), timeout):
            handle = by_conn[conn]  # type: ignore[index]
            try:
                while True:
                    events.append(self._event(handle, pickle.loads(handle.conn.recv_bytes())))
                    if not handle.conn.poll():
                        break
            except (EOFError, OSError):
                events.append(self._replace(handle))
        return events

    # -- internals -------------------------------------------------------------------------------
    def _event(self, handle: WorkerHandle, message: tuple[Any, ...]) -> Event:
        kind = EventKind(message[0])
        task_id, items = message[1], message[2]
        value = message[3] if len(message) > 3 else None
        if kind is not EventKind.ITEMS:
            handle.task_id = None
        return Event(kind, handle, task_id, items, value)

    def _replace(self, handle: WorkerHandle) -> Event:
        task_id = handle.task_id
        handle.conn.close()
        try:
            code = handle.process.wait(5.0)
        except subprocess.TimeoutExpired:
            handle.process.kill()
            code = handle.process.wait()
        description = f"worker process {handle.pid} {_describe_exit(code)}"
        log.warning("%s; starting a replacement", description)
        self.workers[self.workers.index(handle)] = self._spawn(handle.index)
        return Event(EventKind.DIED, handle, task_id, [], description)

    @staticmethod
    def _send(handle: WorkerHandle, message: tuple[Any, ...]) -> None:
        handle.conn.send_bytes(pickle.dumps(message, protocol=5))
