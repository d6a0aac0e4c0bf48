"""vmigdb's own client for QEMU's gdbstub, the run-control channel of the QEMU driver.

It is the project's blocking RSP client (`vmigdb.wire.client`) with QEMU's habits, and it only ever
sends packets vmigdb composed itself: QEMU 7.2's gdbstub crashes (taking the guest with it) on some
malformed packets, so no client byte is ever passed through.

QEMU 7.2 does not offer QStartNoAckMode, so every packet it sends is acknowledged with '+', and its
'+' for ours are skipped. In system mode QEMU never waits for our '+' (its put_packet only waits in
user mode), so acks ride along with the next packet we send: one write per request instead of two.

Requests are synchronous (the machine is stopped and QEMU answers at once); while the machine runs,
`poll()` collects the stop reply without blocking.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import NoReturn

from vmigdb.hv.base import MachineGone
from vmigdb.wire.client import RspClient


class GdbstubClient(RspClient):
    """One RSP conversation with QEMU's gdbstub over a unix socket."""

    peer = "qemu"
    peer_name = "QEMU's gdbstub"

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        super().__init__(sock, timeout)
        self._acks_owed = 0  # '+' for QEMU's packets, sent with our next write

    @classmethod
    def connect(cls, path: Path, timeout: float = 10.0) -> GdbstubClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        return cls(sock, timeout)

    def _received_packets(self, count: int) -> None:
        self._acks_owed += count

    def _acks_to_send(self) -> bytes:
        acks, self._acks_owed = b"+" * self._acks_owed, 0
        return acks

    def _gone(self, why: str) -> NoReturn:
        self.closed = True
        raise MachineGone(why)
