"""Exact accounting of what a compressor hands to collectives, and what compressing costs.

Bytes are counted where they are handed to a collective: the input tensor of an all-reduce,
this rank's contribution to an all-gather (and, for variable-length gathers, the length message
and the padding). What reaches the wire adds TCP/IP headers and the collective's algorithm
(a ring all-reduce sends about twice its input over N ranks); :mod:`dtune.netem` counts that.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

__all__ = ["Accounting"]


class Accounting:
    """Thread-safe counters: DDP runs hooks on its autograd thread and callbacks on gloo's.

    Example:
        >>> acc = Accounting()
        >>> acc.add(bucket=0, dense=400, sent=8)
        >>> acc.end_step()
        >>> acc.as_dict()["comm_compression_ratio"]
        50.0
    """

    __slots__ = (
        "_lock",
        "_step",
        "buckets",
        "collectives",
        "compress_s",
        "dense_bytes",
        "last_step_sent",
        "sent_bytes",
        "steps",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.steps = 0
        self.dense_bytes = 0
        self.sent_bytes = 0
        self.collectives = 0
        self.compress_s = 0.0
        self.last_step_sent = 0
        self._step = 0
        self.buckets: dict[int, list[int]] = {}  # index -> [dense bytes, sent bytes] in total

    def add(self, *, bucket: int, dense: int = 0, sent: int = 0, collectives: int = 0) -> None:
        with self._lock:
            self.dense_bytes += dense
            self.sent_bytes += sent
            self.collectives += collectives
            self._step += sent
            totals = self.buckets.setdefault(bucket, [0, 0])
            totals[0] += dense
            totals[1] += sent

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Count the wall time of the block as compression work."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.compress_s += elapsed

    def end_step(self) -> None:
        with self._lock:
            self.steps += 1
            self.last_step_sent = self._step
            self._step = 0

    def as_dict(self) -> dict[str, float]:
        """Flat numbers, ready for ``dtune.report``: totals, per-step means, per-bucket bytes."""
        with self._lock:
            steps = max(self.steps, 1)
            out = {
                "comm_steps": float(self.steps),
                "comm_bytes_dense_per_step": self.dense_bytes / steps,
                "comm_bytes_sent_per_step": self.sent_bytes / steps,
                "comm_bytes_sent_last_step": float(self.last_step_sent),
                "comm_bytes_sent_total": float(self.sent_bytes),
                "comm_compression_ratio": self.dense_bytes / self.sent_bytes if self.sent_bytes else 0.0,
                "comm_collectives_per_step": self.collectives / steps,
                "comm_compress_ms_per_step": 1000.0 * self.compress_s / steps,
            }
            for index, (_, sent) in sorted(self.buckets.items()):
                out[f"comm_bucket{index}_bytes_sent_per_step"] = sent / steps
            return out
