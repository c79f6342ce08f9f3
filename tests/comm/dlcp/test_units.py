"""DLCP's parts in one process: packets, priorities, the bounded-loss rule, transport, node."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import torch

from dtune.comm import dlcp
from dtune.comm.dlcp import HEADER_BYTES, Kind, LayerRule, Outcome, Packetizer, PriorityPolicy, Reduction
from dtune.comm.dlcp._packet import wire_lengths


def test_packetizer_round_trip_headers_and_partial_last_packet():
    packer = Packetizer(packet_bytes=64)  # 16 floats per packet
    flat = torch.arange(100, dtype=torch.float32)
    rows = packer.pack(flat, kind=Kind.DATA, step=7, bucket=2, round=1, sender=3, session=99)
    header = packer.headers(rows)
    assert rows.shape == (7, HEADER_BYTES + 64)
    assert header["index"].tolist() == list(range(7))
    assert header["offset"].tolist() == [16 * i for i in range(7)]
    assert header["length"].tolist() == [16] * 6 + [4]
    assert set(header["total"]) == {7} and set(header["step"]) == {7} and set(header["sender"]) == {3}
    values = packer.values(rows, torch.float32)
    assert torch.equal(values.reshape(-1)[:100], flat)
    assert torch.equal(values[6, 4:], torch.zeros(12))  # padding
    packer.set_field(rows, "mask", np.arange(7, dtype=np.uint64) << np.uint64(40))
    assert packer.headers(rows)["mask"][3] == 3 << 40
    half = packer.pack(torch.ones(3, dtype=torch.bfloat16), kind=Kind.DATA)
    assert packer.values(half, torch.bfloat16).reshape(-1)[:3].tolist() == [1.0, 1.0, 1.0]


def test_packetizer_packs_tens_of_thousands_of_packets_with_exact_offsets():
    packer = Packetizer(packet_bytes=8)
    rows = packer.pack(torch.zeros(80_000), kind=Kind.DATA)
    assert rows.shape[0] == 40_000 and packer.headers(rows)["offset"][-1] == 79_998


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bound": 1.5}, "The value of `bound` is 1.5, but must be in [0.0, 1.0)."),
        ({"bound": 1.0}, "The value of `bound` is 1.0, but must be in [0.0, 1.0)."),
        ({"packet_bytes": 12}, "The value of `packet_bytes` is 12, but must be a multiple of 8"),
        ({"bound": 0.1, "pull_bound": 0.2, "mode": dlcp.Mode.PS}, "The value of `pull_bound` is 0.2"),
        ({"servers": 0}, "The value of `servers` is 0, but must be >= 1."),
        ({"bound": 0.05, "mode": dlcp.Mode.DIRECT}, "Mode.DIRECT is reliable"),
        ({"bound": 0.1, "pull_bound": 0.05}, "`pull_bound` applies to Mode.PS only"),
        ({"paths": 2, "addresses": (("127.0.0.1",),)}, "one address per path"),
    ],
)
def test_config_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        dlcp.DLCP(**kwargs)


def test_config_type_errors():
    with pytest.raises(TypeError, match="`mode` must be a Mode"):
        dlcp.DLCP(mode="ps")
    with pytest.raises(TypeError, match="`bound` must be a number"):
        dlcp.DLCP(bound="0.1")
    with pytest.raises(ValueError, match="The value of `classes` is 1, but must be in"):
        PriorityPolicy(classes=1)


def test_priority_protects_the_largest_and_follows_the_layer_rule_both_ways():
    values = torch.ones(8, 4)
    values[5] *= 100.0  # the largest packet
    position = np.linspace(0, 1, 8)
    lengths = np.full(8, 4)
    front = PriorityPolicy(classes=4, protected=1 / 8, layer_rule=LayerRule.FRONT_FIRST, layer_weight=1.0)
    back = PriorityPolicy(classes=4, protected=1 / 8, layer_rule=LayerRule.BACK_FIRST, layer_weight=1.0)
    got_front = front.classify(values, lengths, position)
    got_back = back.classify(values, lengths, position)
    assert got_front[5] == 0 and got_back[5] == 0
    others = [i for i in range(8) if i != 5]
    assert list(got_front[others]) == sorted(got_front[others])  # front layers in better classes
    assert list(got_back[others]) == sorted(got_back[others], reverse=True)
    # promotion: one class per consecutive drop, down to protected
    aged = front.classify(values, lengths, position, age=np.full(8, 1))
    assert (aged == np.maximum(got_front.astype(int) - 1, 0)).all()
    assert (front.classify(values, lengths, position, age=np.full(8, 9)) == 0).all()
    # no priority: everything in one unprotected class
    assert set(PriorityPolicy(classes=2, protected=0.0).classify(values, lengths, position)) == {1}


def _reduction(bound: float) -> Reduction:
    return Reduction(total=10, per=2, owned=np.arange(0, 10, 2), senders=[0, 1], bound=bound, now=0.0)


def _add(red: Reduction, sender: int, index: list[int], classes: list[int], protected: int) -> None:
    values = torch.full((len(index), 2), float(sender + 1))
    red.add(sender, np.array(index), values, np.array(classes, np.uint8), protected, now=0.0)


def test_reduction_completes_bounded_only_after_the_deadline_with_protected_packets():
    red = _reduction(bound=0.2)  # 10 (sender, packet) pairs: at most 2 may be missing
    _add(red, 0, [0, 2, 4, 6, 8], [0, 1, 1, 1, 1], protected=1)
    _add(red, 1, [2, 4, 6], [1, 1, 1], protected=1)  # its protected packet 0 is missing
    assert red.decide(deadline_passed=False) is Outcome.WAIT
    assert red.decide(deadline_passed=True) is Outcome.NACK
    absent, protected_only = red.missing(1)
    assert absent.tolist() == [0, 8] and protected_only
    _add(red, 1, [0], [0], protected=1)
    assert red.decide(deadline_passed=True) is Outcome.BOUNDED
    values, mask = red.result(torch.float32)
    # packet 8 came from sender 0 only: averaged over the one contributor (1 * 2 / 1)
    assert mask.tolist() == [3, 3, 3, 3, 1]
    assert values[:, 0].tolist() == [3.0, 3.0, 3.0, 3.0, 2.0]
    _add(red, 1, [8], [1], protected=1)
    assert red.decide(deadline_passed=False) is Outcome.FULL


def test_reduction_below_bound_nacks_and_zero_fills_packets_nobody_sent():
    red = _reduction(bound=0.1)
    _add(red, 0, [0, 2, 4], [1, 1, 1], protected=0)
    _add(red, 1, [0, 2, 4], [1, 1, 1], protected=0)
    assert red.decide(deadline_passed=True) is Outcome.NACK
    assert red.missing(0)[0].tolist() == [6, 8] and not red.missing(0)[1]
    values, mask = red.result(torch.float32)
    assert values[3:].abs().sum() == 0 and mask[3:].tolist() == [0, 0]
    # duplicates (a retransmission crossing its original) count once
    _add(red, 0, [6, 6], [1, 1], protected=0)
    assert red.got[0] == 4


def test_ordered_reduction_sums_in_sender_order_whatever_the_arrival_order():
    # 1 + 1e8 - 1e8 is 0 in float32 when summed left to right, 1 in another order
    shares = {0: 1.0, 1: 1e8, 2: -1e8}
    arrivals = [(0, 1, 2), (2, 1, 0), (1, 2, 0)]
    sums = {}
    for arrival in arrivals:
        for ordered in (True, False):
            red = Reduction(
                total=1, per=1, owned=np.arange(1), senders=[0, 1, 2], bound=0.0, now=0.0, ordered=ordered
            )
            for sender in arrival:
                value = torch.tensor([[shares[sender]]])
                red.add(sender, np.array([0]), value, np.zeros(1, np.uint8), 0, now=0.0)
            sums[arrival, ordered] = red.result(torch.float32)[0].item()
    assert {sums[a, True] for a in arrivals} == {0.0}  # (1 + 1e8) - 1e8, always
    assert sums[(2, 1, 0), False] == 1.0  # arrival order: (-1e8 + 1e8) + 1


def test_adaptive_deadline_follows_recent_completions():
    deadline = dlcp.AdaptiveDeadline(initial_s=0.5, factor=2.0, floor_s=0.01, ceil_s=1.0, window=3)
    assert deadline.seconds() == 0.5
    for t in (0.1, 0.1, 0.1):
        deadline.record(t)
    assert deadline.seconds() == pytest.approx(0.2)
    for t in (0.001, 0.001, 0.001):
        deadline.record(t)
    assert deadline.seconds() == 0.01  # floor
    for t in (5, 5, 5):
        deadline.record(t)
    assert deadline.seconds() == 1.0  # ceiling


def _recv_all(transport: dlcp.Transport, want: int, timeout: float = 5.0) -> np.ndarray:
    got: list[np.ndarray] = []
    end = time.monotonic() + timeout
    while sum(len(g) for g in got) < want and time.monotonic() < end:
        rows, _ = transport.receive(transport.sockets[0])
        if len(rows):
            got.append(rows.copy())
        else:
            time.sleep(0.001)
    return np.concatenate(got) if got else np.zeros((0, transport.row_bytes), np.uint8)


def test_transport_sprays_over_paths_and_injects_seeded_loss_deterministically():
    packer = Packetizer(packet_bytes=16)
    rows = packer.pack(torch.arange(400, dtype=torch.float32), kind=Kind.DATA)
    classes = np.zeros(len(rows), np.uint8)
    loss = dlcp.LossInjection(rate=0.3, seed=5)
    keeps = []
    for _ in range(2):
        with dlcp.Transport(["127.0.0.1"], row_bytes=packer.row_bytes, loss=loss, node_id=1) as t:
            keeps.append(t.keep(rows))
            assert t.injected_drops == int((~keeps[-1]).sum())
    assert np.array_equal(keeps[0], keeps[1]) and 0.15 < (~keeps[0]).mean() < 0.45
    spared = dlcp.LossInjection(rate=1.0, classes=frozenset({3}), seed=5)
    with dlcp.Transport(["127.0.0.1"], row_bytes=packer.row_bytes, loss=spared) as t:
        assert t.keep(rows).all()  # class 0 is spared
    with (
        dlcp.Transport(["127.0.0.1", "127.0.0.1"], row_bytes=packer.row_bytes) as a,
        dlcp.Transport(["127.0.0.1", "127.0.0.1"], row_bytes=packer.row_bytes, dscp=True) as b,
    ):
        a.set_peer(1, b.endpoints)
        b.set_peer(0, a.endpoints)
        assert a.send(1, rows[:10], classes[:10]) == 10
        first = _recv_all(b, 5)
        second: list[np.ndarray] = []
        end = time.monotonic() + 5
        while sum(len(s) for s in second) < 5 and time.monotonic() < end:
            got, _ = b.receive(b.sockets[1])
            second.append(got.copy())
        assert len(first) == 5 and sum(len(s) for s in second) == 5  # round-robin over the 2 paths
        assert b.send(0, rows[:4], np.array([0, 1, 2, 3], np.uint8)) == 4  # DSCP marks per packet


def test_transport_sends_rows_without_padding_and_reads_them_back_padded():
    packer = Packetizer(packet_bytes=64)
    full = packer.pack(torch.arange(32, dtype=torch.float32) + 1, kind=Kind.DATA)  # 16 per packet
    short = packer.pack(torch.arange(3, dtype=torch.float16) + 1, kind=Kind.DATA)  # 6 of 64 bytes
    end = packer.message(Kind.END, np.zeros(0, np.uint8))
    nack = packer.message(Kind.NACK, np.array([7, 9], np.uint32))
    rows = np.concatenate([full, short, end, nack])
    assert wire_lengths(rows).tolist() == [112, 112, 54, 48, 56]
    with (
        dlcp.Transport(["127.0.0.1"], row_bytes=packer.row_bytes) as a,
        dlcp.Transport(["127.0.0.1"], row_bytes=packer.row_bytes) as b,
    ):
        a.set_peer(1, b.endpoints)
        b.recv_buffer[:] = 0xFF  # a reused buffer: what a short datagram does not cover must be zeroed
        assert a.send(1, rows, np.zeros(len(rows), np.uint8)) == len(rows)
        assert a.bytes_sent == 112 + 112 + 54 + 48 + 56
        got = _recv_all(b, len(rows))
    assert np.array_equal(got, rows) and b.malformed == 0


def test_transport_close_releases_its_ports():
    transport = dlcp.Transport(["127.0.0.1", "127.0.0.1"], row_bytes=64)
    endpoints = transport.endpoints
    transport.close()
    transport.close()  # idempotent
    for host, port in endpoints:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((host, port))


class _Exploding:
    kinds = (Kind.DATA,)

    def __init__(self) -> None:
        self.failed: BaseException | None = None

    def on_packets(self, kind, rows, header, sources, path) -> None:
        raise RuntimeError("boom")

    def on_timer(self, now: float) -> float:
        return float("inf")

    def fail(self, error: BaseException) -> None:
        self.failed = error


def test_node_stops_and_closes_sockets_when_a_role_fails_and_on_close():
    packer = Packetizer(packet_bytes=16)
    before = threading.active_count()
    node = dlcp.Node(0, dlcp.Transport(["127.0.0.1"], row_bytes=packer.row_bytes), packer, session=1)
    role = _Exploding()
    node.add_role(role)
    node.start()
    endpoints = node.transport.endpoints
    with dlcp.Transport(["127.0.0.1"], row_bytes=packer.row_bytes) as peer:
        peer.set_peer(0, endpoints)
        peer.send(0, packer.pack(torch.ones(4), kind=Kind.DATA, session=1), np.zeros(1, np.uint8))
        end = time.monotonic() + 10
        while node.alive and time.monotonic() < end:
            time.sleep(0.01)
    assert not node.alive and isinstance(node.error, RuntimeError)
    assert isinstance(role.failed, RuntimeError) and not node.transport.sockets
    with pytest.raises(RuntimeError, match="closed"):
        node.call(lambda: None)
    node.close()
    quiet = dlcp.Node(1, dlcp.Transport(["127.0.0.1"], row_bytes=packer.row_bytes), packer, session=1)
    quiet.start()
    quiet.close()
    assert not quiet.alive and not quiet.transport.sockets
    assert threading.active_count() == before
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(endpoints[0])


def test_single_process_state_is_the_identity_and_closes():
    state, hook = dlcp.DLCP(bound=0.1).ddp_hook()
    with state:
        grads = [torch.arange(5.0), torch.ones(2, 2)]
        state.all_reduce(grads)
        assert grads[0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert state.stats()["comm_steps"] == 1
    assert callable(hook)
