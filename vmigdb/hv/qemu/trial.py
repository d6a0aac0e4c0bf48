"""`--time auto` with several vCPUs on a QEMU before 10: try icount, and keep it only if the
guest brings up every vCPU under it.

QEMU 7.2 with icount hangs Debian's 6.1 kernel as it starts its second vCPU (in some boots: both
vCPUs then spin with paging on, each waiting on the other), while the same QEMU boots a 2-vCPU
6.12 guest under icount and serves a whole session with no RDTSC outlier. So the guest decides,
not the vCPU count. The trial runs it before vmigdb listens, stopping it twice a second through
QEMU's gdbstub (under icount a stop costs the guest no time), and looks for each vCPU resting in
HLT, the guest's idle loop: a vCPU the guest brought up and has nothing to run on rests there
within moments. In the hang neither vCPU ever rests, so paging alone cannot tell. If not every
vCPU is seen resting within `WINDOW_S` of the first one turning paging on, QEMU is started again
with host time, which boots every guest (a guest busy on every vCPU throughout is taken for a
hung one: it loses icount's stealth, never its boot). QEMU 10 boots SMP guests under icount and
needs no trial (`resolve_time_mode`). Measured: the demo's 6.1 guest hung in 4 of 4 boots with
`--time icount` given, and came up under the trial in 5 of 5: its stops seem to let the stuck
bring-up go on (a version that stopped polling once paging was on let it hang).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from vmigdb.errors import SetupError
from vmigdb.hv.qemu.driver import QemuDriver

log = logging.getLogger("vmigdb.hv.qemu")

POLL_S = 0.5
# Debian's 6.1 starts its second vCPU ~1.5 s of guest time after its first turns paging on (~3 s
# under icount here), and both rest in HLT within seconds; 30 s leaves a slow boot room.
WINDOW_S = 30.0
# No vCPU with paging on by then (firmware, or a boot menu waiting for a key): nothing to judge,
# icount stays (`monitor info` still warns if a vCPU is later seen never brought up).
UNDECIDED_AFTER_S = 120.0

_CR0_PG = 1 << 31


@dataclass(frozen=True)
class Verdict:
    """What the trial saw: `keep` icount or not, and why (for the log and `monitor info`)."""

    keep: bool
    why: str


def judge(
    cpus: list[int], rested: set[int], paged_for_s: float | None, ran_s: float
) -> Verdict | None:
    """The verdict once `rested` (1-based vCPUs seen in HLT so far, of `cpus`) is known,
    `paged_for_s` host seconds after a vCPU was first seen with paging on (None: not yet) and
    `ran_s` after the trial began; None while it cannot be told yet."""
    if paged_for_s is None:
        if ran_s >= UNDECIDED_AFTER_S:
            return Verdict(True, f"no vCPU turned paging on in {ran_s:.0f} s: nothing to judge")
        return None
    if rested >= set(cpus):
        return Verdict(True, f"every vCPU came up and rested in HLT under icount ({ran_s:.0f} s)")
    if paged_for_s < WINDOW_S:
        return None
    names = ", ".join(f"CPU#{cpu - 1}" for cpu in cpus if cpu not in rested)
    return Verdict(
        False,
        f"{names} never rested in HLT in the {paged_for_s:.0f} s after the guest turned paging "
        "on, as when a guest hangs bringing up its vCPUs under icount on this QEMU (Debian's 6.1 "
        "kernel does in some boots on QEMU 7.2)",
    )


async def try_icount(driver: QemuDriver) -> Verdict:
    """Run the guest (stopped on entry, stopped on return) until `judge` decides."""
    started = time.monotonic()
    first_paged: float | None = None
    rested: set[int] = set()
    cpus = driver.cpus()
    while True:
        driver.resume({cpu: "c" for cpu in cpus})
        await asyncio.sleep(POLL_S)
        driver.interrupt()
        stop = driver.wait_stop(10.0)
        if stop.exited is not None:
            raise SetupError(f"the guest ended (status {stop.exited}) while icount was tried")
        now = time.monotonic()
        regs = {cpu: driver.read_registers(cpu) for cpu in cpus}
        paged = {cpu for cpu in cpus if regs[cpu]["cr0"] & _CR0_PG}
        if first_paged is None and paged:
            first_paged = now
        # Firmware and a vCPU waiting to be started halt too: only a rest with paging on counts.
        rested |= {cpu for cpu in paged - rested if driver.halted(regs[cpu])}
        paged_for = None if first_paged is None else now - first_paged
        verdict = judge(cpus, rested, paged_for, now - started)
        if verdict is not None:
            return verdict
