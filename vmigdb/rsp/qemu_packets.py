"""The QEMU-specific packets of QEMU's system gdbstub, answered the way QEMU answers them.

GEF and pwndbg tell a QEMU system target by sending `Qqemu.sstepbits` and finding `ENABLE=` in
the reply (and an empty `qOffsets`); they then read the VM's layout through QEMU's monitor, which
vmigdb serves (`vmigdb.rsp.qemu_monitor`). So vmigdb answers QEMU's packets too:
- `qqemu.sstepbits` / `Qqemu.sstepbits`: the single-step flags QEMU supports;
- `qqemu.sstep`: the flags in use; vmigdb steps with interrupts and timers masked (see the
  README's single-step), which is QEMU's 0x7; `Qqemu.sstep=` accepts only that. (Under icount
  with several vCPUs a step from `hlt` runs with QEMU's 0x3, timers on: hv/qemu/driver.py's
  ICOUNT_SMP_SSTEP; this answer does not say so.)
- `qqemu.PhyMemMode` / `Qqemu.PhyMemMode:0|1`: physical addressing, the same switch as
  `monitor phys on|off`.
None of them reaches QEMU: vmigdb never forwards a client's packet.
"""

from __future__ import annotations

from vmigdb.debugger.engine import Debugger
from vmigdb.rsp.errors import PacketError, text_reply
from vmigdb.rsp.parse import hex_number

SSTEP_BITS = b"ENABLE=1,NOIRQ=2,NOTIMER=4"
SSTEP_FLAGS = 0x7  # ENABLE | NOIRQ | NOTIMER: how vmigdb always steps


class QemuPackets:
    def __init__(self, debugger: Debugger) -> None:
        self._debugger = debugger

    def entries(self) -> list[tuple[bytes, object]]:
        """(prefix, handler) pairs for the session's table; longer prefixes first."""
        return [
            (b"qqemu.sstepbits", lambda _: SSTEP_BITS),
            (b"Qqemu.sstepbits", lambda _: SSTEP_BITS),
            (b"qqemu.sstep", self._sstep_query),
            (b"Qqemu.sstep=", self._sstep_set),
            (b"qqemu.PhyMemMode", self._phys_query),
            (b"Qqemu.PhyMemMode:", self._phys_set),
        ]

    def _sstep_query(self, args: bytes) -> bytes:
        if args:
            return b""  # not one of QEMU's packets
        return b"0x%x" % SSTEP_FLAGS

    def _sstep_set(self, args: bytes) -> bytes:
        if hex_number(args) != SSTEP_FLAGS:
            return text_reply(
                "vmigdb always single-steps with interrupts and timers masked "
                f"(qemu.sstep={SSTEP_FLAGS:#x}); other step flags are not offered"
            )
        return b"OK"

    def _phys_query(self, args: bytes) -> bytes:
        if args:
            return b""
        return b"1" if self._debugger.physical_addresses else b"0"

    def _phys_set(self, args: bytes) -> bytes:
        if args not in (b"0", b"1"):
            raise PacketError("PhyMemMode takes 0 or 1")
        self._debugger.physical_addresses = args == b"1"
        return b"OK"
