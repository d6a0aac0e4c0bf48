"""Giving the vCPU a ^C interrupted its turn back, on QEMU's one icount thread.

Under icount QEMU runs every vCPU on one thread, in turns (accel/tcg/tcg-accel-ops-rr.c). A
stop asked for with ^C (vm_stop) ends the running vCPU's turn at its next translation block,
and the loop moves on: when the machine runs again, the *next* vCPU runs first, for a whole
turn (up to the next timer deadline: hundreds of microseconds of guest time), while the
interrupted one waits wherever it was. Guest code timing itself with RDTSC on the interrupted
vCPU sees that turn when the other vCPU is busy: a trace of QEMU's vCPU switches caught it once,
an attach landing in antidebug's timed block and a 367x outlier after it (an attach rarely lands
in one: 0 in 40 attaches without this module). A breakpoint's or a step's stop
(EXCP_DEBUG) leaves the loop at the vCPU that stopped, so it costs nothing of the kind.

So after a ^C stop the driver points QEMU's loop back at the interrupted vCPU with two stops
that execute no instruction, before anyone sees the stop:
1. a gdbstub breakpoint at every running vCPU's pc, and the machine resumed: the first vCPU the
   loop runs stops at once, before its instruction. It is the one after the interrupted vCPU
   in QEMU's order (a vCPU resting in HLT returns at once and is passed over).
2. the interrupted vCPU, resumed alone, stops at once too, and the loop stays at it.
A vCPU may take a pending interrupt before its breakpoint; if one leaves its pc for good, it has
had its turn, the vCPU that stopped is the next in line, and the loop is left there. (A
breakpoint of the user's it runs into meanwhile is not reported as a hit: GDB sees the ^C's stop,
with that vCPU at the breakpoint. It takes an interrupt pending at that very resume.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from vmigdb.arch.x86_64.registers import RegisterFile

log = logging.getLogger(__name__)

ZERO_STOP_TIMEOUT_S = 1.0  # a vCPU at a breakpoint on its own pc stops within QEMU's round trip


@dataclass(frozen=True, slots=True)
class TurnView:
    """What the driver lets this module see and do at a stop QEMU's gdbstub holds."""

    cpus: Callable[[], list[int]]  # QEMU's vCPUs (thread ids), in QEMU's order
    registers: Callable[[int], RegisterFile]
    halted: Callable[[RegisterFile], bool]
    request: Callable[[bytes], bytes]  # one gdbstub request, answered
    held: Callable[[int], bool]  # does QEMU hold a software breakpoint of ours at this address?
    # Resume with a vCont packet and return the vCPU whose stop comes within `timeout` (None:
    # none came; the driver has stopped the machine and let go of anything the plugin held).
    zero_stop: Callable[[bytes, float], int | None]


def give_turn_back(view: TurnView) -> int | None:
    """Point QEMU's loop at the vCPU the ^C interrupted; returns it (None: nothing done)."""
    cpus = view.cpus()
    regs = {cpu: view.registers(cpu) for cpu in cpus}
    running = [cpu for cpu in cpus if not view.halted(regs[cpu])]
    if len(running) < 2:  # a vCPU resting in HLT loses nothing by waiting a turn
        return None
    pcs = {cpu: regs[cpu]["rip"] for cpu in running}
    placed: list[int] = []
    try:
        for pc in dict.fromkeys(pcs.values()):
            if view.held(pc):
                continue
            if view.request(b"Z0,%x,1" % pc) != b"OK":
                log.info("QEMU refused a breakpoint at %#x: the next vCPU keeps its turn", pc)
                return None
            placed.append(pc)
        first = view.zero_stop(b"vCont;c", ZERO_STOP_TIMEOUT_S)
        if first not in pcs:
            return None
        if any(view.registers(cpu)["rip"] != pcs[cpu] for cpu in running):
            return None  # one ran on (an interrupt): its turn is spent, the loop is at `first`
        interrupted = running[running.index(first) - 1]  # the one before it, cyclically
        if view.zero_stop(b"vCont;c:%x" % interrupted, ZERO_STOP_TIMEOUT_S) != interrupted:
            return None
        return interrupted
    finally:
        for pc in placed:
            view.request(b"z0,%x,1" % pc)
