"""The worker side of the link to the driver: batched, ordered items out; control in.

A task calls :meth:`Channel.emit` for every item it produces (a trial's results, say). Items
are coalesced for a couple of milliseconds so that a task reporting thousands of times a
second costs the driver one message per batch, while a task that reports rarely has each item
sent at once. A background thread bounds how long an item may wait (``max_delay_s``).
"""

from __future__ import annotations

import pickle
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["GO", "Channel", "ExitRequested", "current_channel"]

GO = "go"  # the driver's answer to an item it was waiting on: no control, go on

_BATCH_WINDOW_S = 0.002
_MAX_BATCH = 512
_CONTROL_POLL_S = 0.001


_current: Channel | None = None


def current_channel() -> Channel | None:
    """The channel of the task running in this worker process, if any."""
    return _current


class ExitRequested(BaseException):
    """The driver asked the worker process to exit while a task was running."""


class Channel:
    """Sends a task's items to the driver and receives the driver's control messages."""

    def __init__(self, conn: Connection, max_delay_s: float = 0.05) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._buffer: list[Any] = []
        self._last_send = 0.0
        self._last_poll = 0.0
        self._max_delay_s = max_delay_s
        self._task_id: Any = None
        self._control: Any = None
        self._closed = False
        threading.Thread(target=self._flush_late_items, name="dtune-channel", daemon=True).start()

    # -- used by the worker loop -------------------------------------------------------------
    def begin(self, task_id: Any) -> None:
        global _current
        _current = self
        self._task_id = task_id
        self._control = None
        self._last_send = 0.0

    def send_message(self, message: tuple[Any, ...]) -> None:
        """Send the task's last message now, after everything buffered (which it carries along)."""
        global _current
        _current = None
        with self._lock:
            items, self._buffer = self._buffer, []
            self._conn.send_bytes(pickle.dumps((*message[:2], items, *message[2:]), protocol=5))
            self._last_send = time.monotonic()

    def close(self) -> None:
        self._closed = True

    # -- used by the task ----------------------------------------------------------------------
    @property
    def task_id(self) -> Any:
        return self._task_id

    def emit(self, item: Any, urgent: bool = False) -> None:
        """Queue ``item`` for the driver; it is sent within a few milliseconds, or now if ``urgent``.

        A worker killed outright loses what it had not sent yet, so items that must not be lost
        (e.g. ones announcing a checkpoint) are sent urgently.
        """
        with self._lock:
            self._buffer.append(item)
            now = time.monotonic()
            if urgent or len(self._buffer) >= _MAX_BATCH or now - self._last_send >= _BATCH_WINDOW_S:
                self._send_buffer_locked(now)

    def control(self) -> Any:
        """The latest control value the driver sent for this task, or None."""
        now = time.monotonic()
        if now - self._last_poll >= _CONTROL_POLL_S:
            self._last_poll = now
            while self._conn.poll():
                self._receive()
        return self._control

    def emit_and_wait(self, item: Any) -> Any:
        """Send ``item`` (and everything queued) now, then block until the driver answers it.

        The answer is a control value (None: go on). A control the driver sent earlier (a stop,
        say) answers at once: the driver does not answer items that arrive after it.
        """
        with self._lock:
            self._buffer.append(item)
            self._send_buffer_locked(time.monotonic())
        answered = False
        while not answered and self._control is None:
            answered = self._receive()
        return self._control

    # -- internals -----------------------------------------------------------------------------
    def _receive(self) -> bool:
        """Take one message from the driver; True if it was a control for this task."""
        message = pickle.loads(self._conn.recv_bytes())
        if message[0] == "exit":
            raise ExitRequested()
        if message[0] != "ctl" or message[1] != self._task_id:
            return False
        if message[2] != GO:
            self._control = message[2]
        return True

    def _send_buffer_locked(self, now: float) -> None:
        items, self._buffer = self._buffer, []
        self._conn.send_bytes(pickle.dumps(("items", self._task_id, items), protocol=5))
        self._last_send = now

    def _flush_late_items(self) -> None:
        while not self._closed:
            time.sleep(self._max_delay_s)
            with self._lock:
                if self._buffer and time.monotonic() - self._last_send >= self._max_delay_s:
                    try:
                        self._send_buffer_locked(time.monotonic())
                    except OSError:
                        return
