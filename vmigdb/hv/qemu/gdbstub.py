"""vmigdb's own client for QEMU's gdbstub, the run-control channel of the QEMU driver.

It speaks RSP with the same codec vmigdb serves GDB with (`vmigdb.rsp.codec`), and it only ever sends
packets vmigdb composed itself: QEMU 7.2's gdbstub crashes (taking the guest with it) on some malformed
packets, so no client byte is ever passed through.

QEMU 7.2 does not offer QStartNoAckMode, so every packet it sends is acknowledged with '+', and its
'+' for ours are skipped. In system mode QEMU never waits for our '+' (its put_packet only waits in
user mode), so acks ride along with the next packet we send: one write per request instead of two.

Requests are synchronous (the machine is stopped and QEMU answers at once); while the machine runs,
`poll()` collects the stop reply without blocking.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from pathlib import Path

from vmigdb.hv.base import MachineGone
from vmigdb.rsp import codec

log = logging.getLogger("vmigdb.hv.qemu")


class GdbstubClient:
    """One RSP conversation with QEMU's gdbstub over a unix socket."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self._sock = sock
        self._sock.setblocking(True)
        self._decoder = codec.Decoder()
        self._timeout = timeout
        self._pending: list[bytes] = []  # packets received but not yet claimed
        self._acks_owed = 0  # '+' for QEMU's packets, sent with our next write
        self.closed = False

    @classmethod
    def connect(cls, path: Path, timeout: float = 10.0) -> GdbstubClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        return cls(sock, timeout)

    def fileno(self) -> int:
        return self._sock.fileno()

    # -- sending ----------------------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        """Send one packet; its reply (if any) is collected by `recv`/`poll`."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("qemu <- %r", payload[:200])
        self._sendall(self._take_acks() + codec.encode_packet(payload))

    def send_interrupt(self) -> None:
        self.send_raw(b"\x03")

    def send_raw(self, data: bytes) -> None:
        """Send bytes outside any packet (0x03, a lone '+'), after the acks we owe."""
        self._sendall(self._take_acks() + data)

    def _take_acks(self) -> bytes:
        acks, self._acks_owed = b"+" * self._acks_owed, 0
        return acks

    def request(self, payload: bytes) -> bytes:
        """Send a packet and return QEMU's reply. Stop replies cannot arrive while stopped."""
        self.send(payload)
        return self.recv(self._timeout)

    # -- receiving --------------------------------------------------------------------------------

    def recv(self, timeout: float | None) -> bytes:
        """Block until one packet arrives (or raise TimeoutError / MachineGone)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            packet = self.poll()
            if packet is not None:
                return packet
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("QEMU's gdbstub did not answer in time")
            ready, _, _ = select.select([self._sock], [], [], remaining)
            if ready:
                self._read_some(block=False)

    def poll(self) -> bytes | None:
        """Return a complete packet if one has arrived, without blocking."""
        if not self._pending:
            self._read_some(block=False)
        return self._pending.pop(0) if self._pending else None

    def _read_some(self, block: bool) -> None:
        try:
            data = self._sock.recv(1 << 16, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self._gone(f"gdbstub connection error: {exc}")
        if not data:
            self._gone("QEMU closed its gdbstub connection")
        self._decoder.feed(data)
        acks = 0
        for event in self._decoder.events():
            if isinstance(event, codec.Packet):
                acks += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("qemu -> %r", event.data[:200])
                self._pending.append(event.data)
            elif isinstance(event, codec.Corrupt):
                log.warning("corrupt packet from QEMU (%s); asking again", event.reason)
                self._sendall(b"-")
        self._acks_owed += acks

    def _sendall(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self._gone(f"gdbstub connection error: {exc}")

    def _gone(self, why: str) -> None:
        self.closed = True
        raise MachineGone(why)

    def close(self) -> None:
        self.closed = True
        try:
            self._sock.close()
        except OSError:
            pass
