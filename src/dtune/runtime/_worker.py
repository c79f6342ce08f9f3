"""Entry point of a warm worker process: runs the driver's tasks one after another.

The worker talks to the driver over a socket inherited at start (no listener, no port). It
exits when the driver says so, when the socket closes, or when the driver process dies (the
kernel sends SIGKILL through ``PR_SET_PDEATHSIG``), so no worker outlives its driver.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from dtune.runtime._channel import Channel, ExitRequested

FD_ENV = "DTUNE_WORKER_FD"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closed socket still ends the worker
        pass
    if os.getppid() == 1:  # the driver died before we could ask
        os._exit(1)


def _loads(blob: bytes) -> Any:
    import cloudpickle

    return cloudpickle.loads(blob)


def serve(conn: Connection) -> None:
    """Run tasks until told to exit or the driver goes away."""
    functions: dict[str, Callable[..., Any]] = {}
    channel = Channel(conn)
    try:
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "exit":
                return
            if kind == "init":
                for entry in reversed(message[1]):
                    if entry not in sys.path:
                        sys.path.insert(0, entry)
            elif kind == "fn":
                functions[message[1]] = _loads(message[2])
            elif kind == "run":
                _, task_id, key, args_blob = message
                channel.begin(task_id)
                try:
                    value = functions[key](channel, *_loads(args_blob))
                except ExitRequested:
                    return
                except BaseException as exc:  # report everything, SystemExit included
                    text = "".join(traceback.format_exception(exc))
                    channel.send_message(("error", task_id, text))
                else:
                    channel.send_message(("done", task_id, value))
            # "ctl" for a task that already ended is stale: nothing to do
    finally:
        channel.close()


def main() -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    conn = Connection(int(os.environ[FD_ENV]))
    serve(conn)
    os._exit(0)  # skip interpreter teardown: nothing of ours needs it and it costs ~10 ms


if __name__ == "__main__":
    main()
