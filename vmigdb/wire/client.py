"""One small blocking RSP client: vmigdb talking to another RSP server over a stream socket.

The QEMU driver speaks it to QEMU's gdbstub (`vmigdb.hv.qemu.gdbstub` adds QEMU's habits on top),
and `vmigdb symbols --from` to a running vmigdb. It only frames what the caller composed, with the
same sans-I/O codec the server uses (`vmigdb.wire.codec`).

Theory of operation:
- `send` writes one packet; `request` sends one and blocks for the next packet received (a peer
  that is stopped answers at once); `recv` blocks for one packet, `poll` takes one if it has
  arrived, without blocking. Packets received but not yet claimed wait in arrival order.
- Every packet received is acknowledged with '+' (the peer may be waiting for it); a corrupt one
  gets '-' so the peer sends it again. Subclasses may change when acks go out (`_received_packets`,
  `_acks_to_send`).
- A peer that closes the connection, or a socket error, raises `PeerGone` (subclasses may raise
  their own error instead, from `_gone`).
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections import deque
from typing import NoReturn

from vmigdb.wire import codec
from vmigdb.wire.awake import wait_awake

log = logging.getLogger("vmigdb.wire")


class PeerGone(ConnectionError):
    """The RSP peer closed the connection or the socket failed; the message says which."""


class RspClient:
    """A blocking RSP conversation over a connected stream socket. See the module docstring."""

    peer = "peer"  # how packet traces name the other side
    peer_name = "the RSP peer"  # how messages name it

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self._sock = sock
        self._sock.setblocking(True)
        self._decoder = codec.Decoder()
        self._timeout = timeout
        self._pending: deque[bytes] = deque()  # packets received but not yet claimed
        self.closed = False

    @classmethod
    def connect_unix(cls, path: str, timeout: float = 10.0) -> RspClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock, timeout)

    @classmethod
    def connect_tcp(cls, host: str, port: int, timeout: float = 10.0) -> RspClient:
        return cls(socket.create_connection((host, port), timeout=timeout), timeout)

    def fileno(self) -> int:
        return self._sock.fileno()

    # -- sending ----------------------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        """Send one packet; its reply (if any) is collected by `recv`/`poll`."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s <- %r", self.peer, payload[:200])
        self._sendall(self._acks_to_send() + codec.encode_packet(payload))

    def send_interrupt(self) -> None:
        self.send_raw(b"\x03")

    def send_raw(self, data: bytes) -> None:
        """Send bytes outside any packet (0x03, a lone '+'), after any acks owed."""
        self._sendall(self._acks_to_send() + data)

    def request(self, payload: bytes) -> bytes:
        """Send a packet and return the next packet received (the peer is expected to answer)."""
        self.send(payload)
        return self.recv(self._timeout)

    # -- receiving --------------------------------------------------------------------------------

    def recv(self, timeout: float | None) -> bytes:
        """Block until one packet arrives (or raise TimeoutError, or PeerGone)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            packet = self.poll()
            if packet is not None:
                return packet
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{self.peer_name} did not answer in time")
            # awake for a moment first: QEMU answers a step or a read within ~100 us, sooner
            # than a sleeping thread wakes on these hosts (vmigdb.wire.awake)
            if wait_awake(self._readable, remaining):
                self._read_some()

    def _readable(self, timeout: float | None) -> bool:
        return bool(select.select([self._sock], [], [], timeout)[0])

    def poll(self) -> bytes | None:
        """Return a complete packet if one has arrived, without blocking."""
        if not self._pending:
            self._read_some()
        return self._pending.popleft() if self._pending else None

    def _read_some(self) -> None:
        try:
            data = self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self._gone(f"connection to {self.peer_name} failed: {exc}")
        if not data:
            self._gone(f"{self.peer_name} closed the connection")
        self._decoder.feed(data)
        packets = 0
        for event in self._decoder.events():
            if isinstance(event, codec.Packet):
                packets += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s -> %r", self.peer, event.data[:200])
                self._pending.append(event.data)
            elif isinstance(event, codec.Corrupt):
                log.warning(
                    "corrupt packet from %s (%s); asking again", self.peer_name, event.reason
                )
                self._sendall(b"-")
        if packets:
            try:
                self._received_packets(packets)
            except PeerGone:
                # The peer closed right after its last reply (an `OK` to `k` or `D`): the reply
                # is here all the same; the next send says the peer is gone.
                pass

    # -- acknowledgements (hooks) -----------------------------------------------------------------

    def _received_packets(self, count: int) -> None:
        """`count` packets arrived intact: acknowledge them now."""
        self._sendall(b"+" * count)

    def _acks_to_send(self) -> bytes:
        """Acks to put in front of the next write (none: they went out on arrival)."""
        return b""

    # -- the connection ---------------------------------------------------------------------------

    def _sendall(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self._gone(f"connection to {self.peer_name} failed: {exc}")

    def _gone(self, why: str) -> NoReturn:
        self.closed = True
        raise PeerGone(why)

    def close(self) -> None:
        self.closed = True
        try:
            self._sock.close()
        except OSError:
            pass
