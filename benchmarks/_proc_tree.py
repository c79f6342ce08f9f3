"""Peak resident-memory sampling over a whole process tree.

Frameworks such as Ray (and dtune's own workers) spread one tuning run over many processes:
the driver, helper daemons and worker processes. Their memory cost is only visible when the
RSS of the root process and all its recursive children is summed, which is what this module
does, from a background thread so the measured code runs unchanged.

The sum counts pages shared between processes (e.g. shared libraries, copy-on-write pages
after fork) once per process, so it over-states physical use; it is the same upper bound for
every framework measured, which is what a comparison needs, and it is cheap to sample.

Only depends on psutil, so both dtune's and the Ray anchor's environments can import it.
"""

from __future__ import annotations

import threading
from types import TracebackType

import psutil


def tree_rss(root: psutil.Process) -> tuple[int, int]:
    """Return (summed RSS in bytes, process count) of ``root`` and all its descendants.

    Processes that exit or become unreadable between listing and reading are skipped.
    """
    try:
        procs = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, 0
    total = 0
    count = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        count += 1
    return total, count


class PeakRSSSampler:
    """Context manager that records the peak summed RSS of a process tree.

    On enter it takes one sample and starts a daemon thread that samples every ``interval``
    seconds; on exit it stops the thread and takes a last sample. Short spikes between two
    samples can be missed, so pick ``interval`` well below the duration being measured.

    Attributes:
        peak_bytes: highest summed RSS of the tree seen so far.
        peak_processes: highest number of live processes in the tree seen so far.
        samples: number of samples taken.
    """

    def __init__(self, root_pid: int, interval: float = 0.1) -> None:
        """Prepare to sample the tree rooted at ``root_pid`` every ``interval`` seconds."""
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self._root = psutil.Process(root_pid)
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_bytes = 0
        self.peak_processes = 0
        self.samples = 0

    def _sample(self) -> None:
        rss, count = tree_rss(self._root)
        self.peak_bytes = max(self.peak_bytes, rss)
        self.peak_processes = max(self.peak_processes, count)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> PeakRSSSampler:
        """Take a first sample and start the background sampling thread."""
        if self._thread is not None:
            raise RuntimeError("PeakRSSSampler is not re-entrant")
        self._sample()
        self._thread = threading.Thread(target=self._run, name="peak-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the sampling thread and take a final sample."""
        assert self._thread is not None
        self._stop.set()
        self._thread.join()
        self._sample()
