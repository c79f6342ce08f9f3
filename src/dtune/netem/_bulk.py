"""Bulk TCP sender and receiver for link measurements and background flows (stdlib only).

Run as a script inside a namespace (``ip netns exec NS python _bulk.py ...``), so it starts in
tens of milliseconds without importing dtune:

    python _bulk.py recv --port 5201 [--bytes N]          # prints {"bytes", "first", "last"}
    python _bulk.py send --addr 10.250.0.2 --port 5201 [--bytes N] [--rate MBIT] [--seconds S]

A sender without ``--bytes`` or ``--seconds`` runs until it is stopped (background flows are
stopped by the network's teardown); ``--rate`` paces it, otherwise TCP takes what it can.
"""

from __future__ import annotations

import argparse
import json
import socket
import time

CHUNK = 64 * 1024


def receive(port: int, limit: int | None) -> dict[str, float]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", port))
        server.listen(1)
        print("listening", flush=True)
        conn, _ = server.accept()
        total, first, last = 0, 0.0, 0.0
        with conn:
            while limit is None or total < limit:
                data = conn.recv(CHUNK)
                if not data:
                    break
                last = time.perf_counter()
                if not total:
                    first = last
                total += len(data)
    return {"bytes": total, "first": first, "last": last}


def _connect(addr: str, port: int, wait_s: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return socket.create_connection((addr, port), timeout=wait_s)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def send(addr: str, port: int, limit: int | None, rate_mbit: float | None, seconds: float | None) -> int:
    payload = b"\0" * CHUNK
    sent = 0
    start = time.monotonic()
    with _connect(addr, port) as conn:
        conn.settimeout(None)
        while limit is None or sent < limit:
            elapsed = time.monotonic() - start
            if seconds is not None and elapsed >= seconds:
                break
            if rate_mbit is not None:  # pace: never ahead of rate * elapsed
                ahead = sent * 8 / (rate_mbit * 1e6) - elapsed
                if ahead > 0:
                    time.sleep(ahead)
            chunk = payload if limit is None else payload[: min(CHUNK, limit - sent)]
            try:
                conn.sendall(chunk)
            except OSError:  # the receiver went away (teardown): a background flow just ends
                break
            sent += len(chunk)
    return sent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=["recv", "send"])
    parser.add_argument("--addr", default="")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bytes", type=int, default=None)
    parser.add_argument("--rate", type=float, default=None, help="Mbit/s (send)")
    parser.add_argument("--seconds", type=float, default=None, help="stop after (send)")
    args = parser.parse_args(argv)
    if args.mode == "recv":
        print(json.dumps(receive(args.port, args.bytes)), flush=True)
    else:
        sent = send(args.addr, args.port, args.bytes, args.rate, args.seconds)
        print(json.dumps({"sent": sent}), flush=True)


if __name__ == "__main__":
    main()
