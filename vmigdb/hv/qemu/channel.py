"""The run-control channel to QEMU's gdbstub, kept in step with what QEMU owes.

Theory of operation. QEMU 7.2's gdbstub (gdbstub/gdbstub.c, gdb_read_byte) treats the first byte it
receives while the VM runs as an interrupt: it stops the VM, sends a stop reply (`T02...`) and drops
that byte, whatever it was (a `+` ack, or the `$` of a packet, whose remaining bytes are then ignored
as noise, or parsed as a packet if a `+` went first). So a request sent while QEMU runs is either lost
or answered after a stop reply: the reply stream is then one packet out of step, every later reply
answers an earlier request, and QEMU ends up stopped while vmigdb waits for a stop that never comes.

This channel makes that impossible from vmigdb's side and recoverable from QEMU's:
- it knows whether QEMU owes a stop reply (`running`): requests are refused while it does, and a
  resume is the only way to start owing one;
- a stop reply is never taken as the answer to a request: if one arrives instead of an answer, the
  channel resynchronises and sends the request again (every request vmigdb sends is idempotent);
- a reply that is not a stop reply while QEMU owes one answers the resume (QEMU refused it);
- resynchronising sends `+` (clears an unacknowledged packet of QEMU's, or stops a running VM) and
  a sentinel `qC`, and reads until the sentinel's answer: whatever QEMU's state was, it is then
  stopped with nothing owed on either side. It is logged on stderr as a warning.
"""

from __future__ import annotations

import logging
import time

from vmigdb.hv.base import DriverError, MachineGone
from vmigdb.hv.qemu.gdbstub import GdbstubClient

log = logging.getLogger("vmigdb.hv.qemu")

_SENTINEL = b"qC"  # answered "QC<thread>" by QEMU, never by anything else it sends
_RESYNC_ATTEMPTS = 3


def is_stop_reply(packet: bytes) -> bool:
    """`T`/`S` + two hex digits (a stop), `W`/`X` + hex (the VM is gone): never a request's answer."""
    if packet[:1] in (b"T", b"S"):
        return len(packet) >= 3 and all(c in b"0123456789abcdefABCDEF" for c in packet[1:3])
    if packet[:1] in (b"W", b"X"):
        return len(packet) >= 2 and all(c in b"0123456789abcdefABCDEF;" for c in packet[1:3])
    return False


class ResumeRefused(DriverError):
    """QEMU answered a resume with an error instead of running."""


class QemuChannel:
    """Requests, resumes and stops over one gdbstub connection, never out of step. Not thread-safe:
    one owner (the driver) calls it."""

    def __init__(self, client: GdbstubClient, timeout: float = 10.0) -> None:
        self._client = client
        self._timeout = timeout
        self.running = False  # QEMU owes a stop reply
        self.resyncs = 0  # times the channel had to resynchronise (monitor info shows it)

    def fileno(self) -> int:
        return self._client.fileno()

    @property
    def closed(self) -> bool:
        return self._client.closed

    # -- stopped ---------------------------------------------------------------------------------

    def request(self, payload: bytes) -> bytes:
        """Send one request to a stopped QEMU and return its answer."""
        if self.running:
            raise DriverError(
                f"internal: {payload[:20]!r} asked of QEMU while the guest runs (not sent)"
            )
        for _attempt in range(2):
            self._client.send(payload)
            reply = self._client.recv(self._timeout)
            if not is_stop_reply(reply):
                return reply
            if reply[:1] in (b"W", b"X"):
                raise MachineGone(f"QEMU reported the VM gone ({reply!r})")
            self.resync(f"QEMU answered {payload[:40]!r} with the stop reply {reply!r}")
        raise DriverError(f"QEMU's gdbstub keeps answering {payload[:40]!r} with stop replies")

    # -- running ---------------------------------------------------------------------------------

    def resume(self, payload: bytes) -> None:
        """Send a resume (vCont...); QEMU owes a stop reply from now on."""
        if self.running:
            raise DriverError("internal: resume while the guest already runs (not sent)")
        self._client.send(payload)
        self.running = True

    def interrupt(self) -> None:
        """Ask a running QEMU to stop (0x03); nothing is sent to a stopped one."""
        if self.running:
            self._client.send_interrupt()

    def poll_stop(self) -> bytes | None:
        """The stop reply, if it has arrived (non-blocking). Raises ResumeRefused if QEMU answered
        the resume with anything else."""
        while self.running:
            packet = self._client.poll()
            if packet is None:
                return None
            self._check_owed(packet)
            if is_stop_reply(packet):
                return packet
        return None

    def wait_stop(self, timeout: float) -> bytes:
        """Block for the stop reply. If none comes in time after an interrupt, QEMU is stopped
        without having said so: resynchronise and return QEMU's own account of the stop (`?`)."""
        deadline = time.monotonic() + timeout
        while self.running:
            remaining = deadline - time.monotonic()
            try:
                packet = self._client.recv(max(remaining, 0.0))
            except TimeoutError:
                self.resync("no stop reply after an interrupt")
                return self._ask_stop()
            self._check_owed(packet)
            if is_stop_reply(packet):
                return packet
        raise DriverError("internal: waiting for a stop while the guest is stopped")

    def _ask_stop(self) -> bytes:
        """QEMU's account of why the stopped VM is stopped (`?`), as a stop reply."""
        self._client.send(b"?")
        reply = self._client.recv(self._timeout)
        return reply if is_stop_reply(reply) else b"T02"

    def _check_owed(self, packet: bytes) -> None:
        if is_stop_reply(packet):
            self.running = False
            return
        # QEMU answers a resume only when it refuses it (E22, or empty for an unsupported vCont).
        self.running = False
        raise ResumeRefused(f"QEMU did not resume: {packet!r}")

    # -- connecting ------------------------------------------------------------------------------

    def attach(self, timeout: float = 10.0) -> bytes:
        """Just connected: QEMU stopped the VM for us (sending a stop reply if it was running, none
        if it was already paused). Sync on a sentinel so either way nothing is owed, and return
        the stop: the one QEMU sent, or its answer to `?`."""
        self._client.send(_SENTINEL)
        stop = None
        deadline = time.monotonic() + timeout
        while True:
            packet = self._client.recv(max(deadline - time.monotonic(), 0.0))
            if packet.startswith(b"QC"):
                break
            if is_stop_reply(packet):
                stop = packet
            else:
                log.info("discarding %r from QEMU while attaching", packet[:60])
        self.running = False
        return stop if stop is not None else self._ask_stop()

    # -- recovery --------------------------------------------------------------------------------

    def resync(self, why: str) -> None:
        """Bring the channel back in step; QEMU is stopped and owes nothing afterwards."""
        self.resyncs += 1
        log.warning("the channel to QEMU's gdbstub fell out of step (%s); resynchronising", why)
        for attempt in range(_RESYNC_ATTEMPTS):
            # '+' acknowledges a packet QEMU is waiting to have acknowledged, or (if the VM runs)
            # stops it; either way the sentinel that follows is parsed as a packet.
            self._client.send_raw(b"+")
            self._client.send(_SENTINEL)
            deadline = time.monotonic() + 2.0
            try:
                while True:
                    packet = self._client.recv(max(deadline - time.monotonic(), 0.0))
                    if packet.startswith(b"QC"):
                        self.running = False
                        log.warning("resynchronised with QEMU's gdbstub; the guest is stopped")
                        return
                    if packet[:1] in (b"W", b"X") and is_stop_reply(packet):
                        raise MachineGone(f"QEMU reported the VM gone ({packet!r})")
                    log.info("discarding %r from QEMU while resynchronising", packet[:60])
            except TimeoutError:
                log.info("no answer to the sentinel (attempt %d)", attempt + 1)
        raise DriverError("QEMU's gdbstub does not answer: cannot resynchronise")

    def close(self) -> None:
        self._client.close()
