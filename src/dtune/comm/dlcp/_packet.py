"""Packets: a gradient payload cut into fixed-size, self-describing packets, vectorised.

DLCP (Wang et al., "Domain-specific Communication Optimization for Distributed DNN Training",
arXiv 2008.08445; published as MLT, NSDI 2024) relies on packets that each carry whole gradient
values and say where they belong (tensor, offset), so a receiver can write them in any order:
packets may be sprayed over several paths and dropped individually. Here every packet is one
row of a ``uint8`` matrix: a 48-byte header (:data:`HEADER`) followed by ``packet_bytes`` of
payload; a datagram carries the header and the valid payload only (:func:`wire_lengths`), so
a bucket's last packet and the control messages are short on the wire. A whole bucket is
packed with a handful of numpy operations (no Python loop over values or packets); the
transport sends rows as datagrams.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "FIELDS", "HEADER", "HEADER_BYTES", "Flag", "Kind", "Packetizer", "dtype_code", "torch_dtype",
    "wire_lengths",
]  # fmt: skip


class Kind(enum.IntEnum):
    """What a packet carries."""

    DATA = 1
    """A sender's contribution to a reduction (push to an aggregator)."""
    AGG = 2
    """An aggregated packet (the reduce result of one owner, or a parameter-server pull)."""
    NACK = 3
    """A request to send again: the payload lists the missing packet indices (uint32)."""
    HELLO = 4
    """A worker announcing its address to a parameter-server shard."""
    HELLO_ACK = 5
    BYE = 6
    """A worker leaving; a shard that heard BYE from every worker stops."""
    END = 7
    """After a sender's last packet of a reduction (``cls``: the kind it ends, DATA or AGG).

    Marked with the protected class, so it is not what a congested switch drops: the receiver
    then knows the sender is done, and that what is still missing was lost or is stuck behind
    more important traffic (what a bound lets it give up)."""


class Flag(enum.IntFlag):
    NONE = 0
    RETX = 1
    """The packet is a retransmission (test loss injection may spare these)."""
    PROTECTED_ONLY = 2
    """On a NACK: resend only the protected-class packets among those listed."""
    TAIL = 4
    """One of the last packets a sender sends an owner for a reduction: the sender is done."""


HEADER = np.dtype(
    [
        ("kind", "u1"),
        ("cls", "u1"),  # priority class, 0 = protected (highest)
        ("dtype", "u1"),  # payload element type, see dtype_code
        ("flags", "u1"),
        ("sender", "<u2"),  # node id: ranks 0..W-1, parameter-server shards W..W+S-1
        ("bucket", "<u2"),
        ("layer", "<u2"),  # index of the first tensor the packet covers
        ("round", "<u2"),  # which reduction of the bucket in this step (PowerSGD has two)
        ("step", "<u4"),
        ("index", "<u4"),  # packet index within the payload
        ("total", "<u4"),  # packets in the payload
        ("offset", "<u4"),  # element offset of the first value
        ("length", "<u4"),  # valid elements in this packet (the last one may be short)
        ("protected", "<u4"),  # DATA: how many protected packets this sender sends the receiver
        ("session", "<u4"),  # random per run: packets of another run on a reused port are ignored
        ("mask", "<u8"),  # AGG: bit w set when sender w's packet is in the aggregate
    ]
)
HEADER_BYTES = HEADER.itemsize  # 48
FIELDS: dict[str, tuple[np.dtype[Any], int]] = {
    name: (spec[0], int(spec[1])) for name, spec in (HEADER.fields or {}).items()
}  # name -> (type, byte offset)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.float64, torch.int32)


def dtype_code(dtype: torch.dtype) -> int:
    """The header code of a payload element type."""
    try:
        return _DTYPES.index(dtype)
    except ValueError:
        raise TypeError(f"DLCP cannot carry tensors of dtype {dtype}.") from None


def torch_dtype(code: int) -> torch.dtype:
    return _DTYPES[code]


_ITEMSIZE = np.array([torch.empty((), dtype=d).element_size() for d in _DTYPES], dtype=np.int64)


def wire_lengths(rows: np.ndarray) -> np.ndarray:
    """How many bytes of each row travel: the header and the valid payload, not the padding.

    A value packet's ``length`` counts elements, a message's (NACK, END, ...) bytes; the
    receiver zero-fills the rest of its row, so a short datagram reads as the padded row.
    """
    header = Packetizer.headers(rows)
    length = header["length"].astype(np.int64)
    values = (header["kind"] == Kind.DATA) | (header["kind"] == Kind.AGG)
    size = _ITEMSIZE[np.minimum(header["dtype"], len(_DTYPES) - 1)]
    payload = np.where(values, length * size, length)
    out: np.ndarray = HEADER_BYTES + np.minimum(payload, rows.shape[1] - HEADER_BYTES)
    return out


@dataclass(frozen=True, slots=True)
class Packetizer:
    """Cuts flat tensors into rows of ``HEADER_BYTES + packet_bytes`` bytes and parses them back.

    Example:
        >>> import torch
        >>> from dtune.comm.dlcp import Packetizer
        >>> packer = Packetizer(packet_bytes=16)
        >>> rows = packer.pack(torch.arange(10, dtype=torch.float32), kind=Kind.DATA, step=3)
        >>> rows.shape, packer.headers(rows)["length"].tolist()
        ((3, 64), [4, 4, 2])
        >>> packer.values(rows, torch.float32)[2, :2].tolist()
        [8.0, 9.0]
    """

    packet_bytes: int

    def __post_init__(self) -> None:
        if isinstance(self.packet_bytes, bool) or not isinstance(self.packet_bytes, int):
            raise TypeError(f"`packet_bytes` must be an integer, got {type(self.packet_bytes).__name__}.")
        if self.packet_bytes < 8 or self.packet_bytes % 8 or self.packet_bytes > 65_000:
            raise ValueError(
                f"The value of `packet_bytes` is {self.packet_bytes!r}, "
                "but must be a multiple of 8 in [8, 65000]."
            )

    @property
    def row_bytes(self) -> int:
        return HEADER_BYTES + self.packet_bytes

    def per_packet(self, dtype: torch.dtype) -> int:
        """Elements of ``dtype`` per packet."""
        return self.packet_bytes // torch.empty((), dtype=dtype).element_size()

    def count(self, numel: int, dtype: torch.dtype) -> int:
        """Packets for ``numel`` elements of ``dtype`` (at least one, so empty payloads still travel)."""
        return max(1, -(-numel // self.per_packet(dtype)))

    def pack(self, flat: torch.Tensor, **fields: Any) -> np.ndarray:
        """Rows for the 1-D tensor ``flat``; ``fields`` fill header fields (scalars or per-packet arrays).

        ``index``, ``total``, ``offset``, ``length`` and ``dtype`` are set here.
        """
        if flat.dim() != 1:
            raise ValueError(f"pack takes a 1-D tensor, got shape {tuple(flat.shape)}.")
        per = self.per_packet(flat.dtype)
        numel = flat.numel()
        n = self.count(numel, flat.dtype)
        rows = np.zeros((n, self.row_bytes), dtype=np.uint8)
        data = flat.detach().contiguous().view(torch.uint8).numpy()
        full = numel // per
        width = per * flat.element_size()
        if full:
            rows[:full, HEADER_BYTES : HEADER_BYTES + width] = data[: full * width].reshape(full, width)
        tail = data[full * width :]
        if tail.size:
            rows[full, HEADER_BYTES : HEADER_BYTES + tail.size] = tail
        header = np.zeros(n, dtype=HEADER)
        index = np.arange(n, dtype=np.uint32)
        header["index"] = index
        header["total"] = n
        header["offset"] = index * per
        header["length"] = np.minimum(per, numel - index.astype(np.int64) * per).clip(0)
        header["dtype"] = dtype_code(flat.dtype)
        for name, value in fields.items():
            header[name] = value
        rows[:, :HEADER_BYTES] = header.view(np.uint8).reshape(n, HEADER_BYTES)
        return rows

    def message(self, kind: Kind, payload: np.ndarray, **fields: Any) -> np.ndarray:
        """One row carrying ``payload`` (raw bytes; at most ``packet_bytes``), e.g. a NACK's indices."""
        raw = np.ascontiguousarray(payload).view(np.uint8).reshape(-1)
        if raw.size > self.packet_bytes:
            raise ValueError(f"A message holds at most {self.packet_bytes} bytes, got {raw.size}.")
        row = np.zeros((1, self.row_bytes), dtype=np.uint8)
        row[0, HEADER_BYTES : HEADER_BYTES + raw.size] = raw
        header = np.zeros(1, dtype=HEADER)
        header["kind"] = kind
        header["length"] = raw.size
        header["total"] = 1
        for name, value in fields.items():
            header[name] = value
        row[0, :HEADER_BYTES] = header.view(np.uint8)
        return row

    @staticmethod
    def headers(rows: np.ndarray) -> np.ndarray:
        """The headers of ``rows`` as a structured array (a copy: rows are reused by the receiver)."""
        return np.ascontiguousarray(rows[:, :HEADER_BYTES]).view(HEADER).reshape(-1)

    @staticmethod
    def set_field(rows: np.ndarray, name: str, value: Any) -> None:
        """Overwrite one header field of ``rows`` in place."""
        kind, start = FIELDS[name]
        width = kind.itemsize
        field = np.asarray(value, dtype=kind).view(np.uint8).reshape(-1, width)
        rows[:, start : start + width] = field

    def values(self, rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """The payloads of ``rows`` as an ``(n, per_packet)`` tensor of ``dtype`` (a view of ``rows``)."""
        payload = torch.from_numpy(rows[:, HEADER_BYTES:])
        return payload.view(dtype)
