"""The blocking RSP client (`vmigdb.wire.client`) and QEMU's flavour of it, over a socket pair."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from vmigdb.hv.base import MachineGone
from vmigdb.hv.qemu.gdbstub import GdbstubClient
from vmigdb.wire import codec
from vmigdb.wire.client import PeerGone, RspClient


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    yield ours, theirs
    ours.close()
    theirs.close()


def read_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, out
        out += chunk
    return out


def test_request_frames_the_payload_and_acks_the_reply_at_once(pair) -> None:
    ours, theirs = pair
    client = RspClient(ours, timeout=5)
    theirs.sendall(codec.encode_packet(b"QC1"))  # the reply may already be waiting
    assert client.request(b"qC") == b"QC1"
    sent = codec.encode_packet(b"qC")
    assert read_exactly(theirs, len(sent) + 1) == sent + b"+"


def test_a_corrupt_packet_is_nacked_and_the_good_one_delivered(pair) -> None:
    ours, theirs = pair
    client = RspClient(ours, timeout=5)
    theirs.sendall(b"$OK#00" + codec.encode_packet(b"OK"))
    assert client.recv(5) == b"OK"
    assert read_exactly(theirs, 2) == b"-+"


def test_poll_does_not_block_and_keeps_packets_in_order(pair) -> None:
    ours, theirs = pair
    client = RspClient(ours, timeout=5)
    assert client.poll() is None
    theirs.sendall(codec.encode_packet(b"one") + codec.encode_packet(b"two"))
    assert client.recv(5) == b"one"
    assert client.poll() == b"two"
    assert client.poll() is None


def test_recv_times_out(pair) -> None:
    client = RspClient(pair[0], timeout=5)
    with pytest.raises(TimeoutError, match="did not answer"):
        client.recv(0.05)


def test_a_closed_peer_is_peer_gone(pair) -> None:
    ours, theirs = pair
    client = RspClient(ours, timeout=5)
    theirs.close()
    with pytest.raises(PeerGone, match="closed the connection"):
        client.recv(5)
    assert client.closed


def test_qemu_acks_ride_with_the_next_packet(pair) -> None:
    """QEMU never waits for our '+' in system mode: one write per request, acks in front."""
    ours, theirs = pair
    client = GdbstubClient(ours, timeout=5)
    theirs.sendall(codec.encode_packet(b"T05thread:01;"))
    assert client.recv(5) == b"T05thread:01;"
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(16)  # no ack yet
    theirs.setblocking(True)
    client.send(b"g")
    sent = codec.encode_packet(b"g")
    assert read_exactly(theirs, len(sent) + 1) == b"+" + sent


def test_qemu_gone_is_machine_gone(pair) -> None:
    ours, theirs = pair
    client = GdbstubClient(ours, timeout=5)
    theirs.close()
    with pytest.raises(MachineGone, match="QEMU's gdbstub closed the connection"):
        client.recv(5)


def test_connect_unix(tmp_path) -> None:
    path = tmp_path / "s"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    try:
        client = RspClient.connect_unix(str(path), timeout=5)
        peer, _ = server.accept()
        peer.sendall(codec.encode_packet(b"OK"))
        assert client.request(b"?") == b"OK"
        client.close()
        peer.close()
    finally:
        server.close()
    with pytest.raises(OSError):
        RspClient.connect_unix(str(path))
