"""A model of QEMU 7.2's gdbstub, as far as run control and framing go, on one end of a socketpair.

It follows gdbstub/gdbstub.c (gdb_read_byte, gdb_vm_state_change, gdb_continue_partial) where they
decide what vmigdb's channel sees:
- while a packet of ours is unacknowledged, only `+` and `$` clear it (a `-` resends it), and any
  other byte is dropped;
- while the VM runs, the first byte received stops it (`T02thread:<c_cpu>;`) and is consumed;
- a stop reply names one vCPU, and only that vCPU's single-step is disarmed;
- `vCont` answers nothing while it runs the VM; a vCPU still armed for single-step stops after one
  instruction even when told to continue.
Tests drive "the guest" with `hit(cpu)` (a breakpoint on that vCPU) and `silently_stop()`.
"""

from __future__ import annotations

import socket
import threading

from vmigdb.wire import codec


class QemuStubModel:
    def __init__(self, cpus: int = 2) -> None:
        self.ours, theirs = socket.socketpair()
        self._sock = theirs
        self.cpus = cpus
        self.running = False
        self.c_cpu = 1
        self.armed: set[int] = set()
        self.last_packet: bytes | None = None
        self.received: list[bytes] = []  # every packet QEMU parsed, in order
        self.vcont_reply: bytes | None = None  # e.g. b"E22": refuse the next vCont
        self._state = "idle"
        self._line = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    # -- what the guest does ----------------------------------------------------------------------

    def hit(self, cpu: int) -> None:
        """A vCPU stops on a breakpoint (cpu_handle_guest_debug then vm_stop)."""
        with self._lock:
            assert self.running
            self._stop(cpu, 5)

    def silently_stop(self) -> None:
        """The VM stops without a stop reply reaching vmigdb (what a lost reply looks like)."""
        with self._lock:
            self.running = False

    # -- QEMU's side ------------------------------------------------------------------------------

    def _put(self, payload: bytes) -> None:
        frame = codec.encode_packet(payload)
        self.last_packet = frame
        self._sock.sendall(frame)

    def _stop(self, cpu: int, signal: int) -> None:
        self.running = False
        self.c_cpu = cpu
        self.armed.discard(cpu)  # gdb_vm_state_change: cpu_single_step(cpu, 0)
        self._put(b"T%02xthread:%02x;" % (signal, cpu))

    def _serve(self) -> None:
        while True:
            try:
                data = self._sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                for byte in data:
                    self._byte(byte)

    def _byte(self, ch: int) -> None:
        if self.last_packet is not None:
            if ch == ord("-"):
                self._sock.sendall(self.last_packet)
            if ch in (ord("+"), ord("$")):
                self.last_packet = None
            if ch != ord("$"):
                return
        if self.running:
            self._stop(self.c_cpu, 2)  # vm_stop(RUN_STATE_PAUSED); the byte is consumed
            return
        if self._state == "idle":
            if ch == ord("$"):
                self._line.clear()
                self._state = "line"
        elif self._state == "line":
            if ch == ord("#"):
                self._state = "sum1"
            else:
                self._line.append(ch)
        elif self._state == "sum1":
            self._state = "sum2"
        else:
            self._state = "idle"
            self._sock.sendall(b"+")
            self._packet(bytes(self._line))

    def _packet(self, payload: bytes) -> None:
        self.received.append(payload)
        if payload.startswith(b"vCont;"):
            if self.vcont_reply is not None:
                reply, self.vcont_reply = self.vcont_reply, None
                self._put(reply)
                return
            actions = {}
            for item in payload[6:].split(b";"):
                verb, _, tid = item.partition(b":")
                for cpu in [int(tid, 16)] if tid else range(1, self.cpus + 1):
                    actions.setdefault(cpu, verb)
            self.armed |= {cpu for cpu, verb in actions.items() if verb == b"s"}
            self.running = True
            leftover = [cpu for cpu, verb in actions.items() if verb == b"c" and cpu in self.armed]
            if leftover:
                self._stop(leftover[0], 5)  # a stale single-step: one instruction, then a stop
        elif payload == b"qC":
            self._put(b"QC%02x" % self.c_cpu)
        elif payload == b"?":
            self._put(b"T05thread:%02x;" % self.c_cpu)
        elif payload.startswith((b"Hg", b"Z", b"z", b"Qqemu.PhyMemMode:", b"Qqemu.sstep=")):
            self._put(b"OK")
        elif payload.startswith(b"qSupported"):
            self._put(b"PacketSize=1000;qXfer:features:read+;vContSupported+")
        elif payload.startswith(b"qXfer:features:read:target.xml:"):
            self._put(b"l<target/>")
        elif payload == b"qfThreadInfo":
            self._put(b"m" + b",".join(b"%02x" % cpu for cpu in range(1, self.cpus + 1)))
        elif payload == b"qsThreadInfo":
            self._put(b"l")
        elif payload == b"D":  # handle_detach: breakpoints removed, gdb_continue
            self._put(b"OK")
            self.running = True
        elif payload == b"g":
            self._put(b"00" * 608)
        else:
            self._put(b"")

    def close(self) -> None:
        self._sock.close()
        self.ours.close()
