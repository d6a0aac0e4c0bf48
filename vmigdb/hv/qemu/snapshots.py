"""Whole-VM snapshots through QMP (`snapshot-save`, `snapshot-load`, `snapshot-delete` jobs).

A snapshot is QEMU's internal snapshot: the VM state (RAM, vCPUs, devices, clocks) goes into one
qcow2 node, and every disk gets an internal snapshot of its own with the same tag, so disks and
memory roll back together. The VM-state node is vmigdb's own when vmigdb booted the guest (a qcow2
-blockdev with no device: drives.py), else the first writable qcow2 disk (an attached VM's own
image, as libvirt's internal snapshots do).

A writable raw disk cannot take an internal snapshot: its contents would not roll back with the
memory, and the guest's page cache would then disagree with its disk. Saving is refused then, with
the fix (qcow2, or the disk read-only).

Guest time across a load: under -icount every guest clock (TSC, HPET, ACPI PM timer, the RTC with
-rtc clock=vm) is part of the VM state and continues from the snapshot. Without -icount, QEMU's
TCG TSC is host ticks plus an offset that QEMU keeps monotonic (cpu_get_ticks_locked compares with
cpu_ticks_prev, which is not part of the VM state): after a load it resumes from the last value
before the load, i.e. it jumps ahead by the guest time since the save, while the other clocks go
back to the snapshot's. The guest's clocksource watchdog sees the mismatch ("Long readout
interval"). QEMU 7.2 and 10 alike; `load_caveat` says so.

The jobs run while the VM is stopped (vmigdb holds it stopped whenever GDB can type a command):
QEMU 7.2 then changes neither the run state nor the gdbstub's view of it (vm_stop on a stopped VM
does nothing, and the jobs restart the VM only if it ran before). Checked on QEMU 7.2; the QMP
commands are the same on QEMU 10.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from vmigdb.hv.base import DriverError, SnapshotInfo, SnapshotStore
from vmigdb.hv.qemu.drives import VMSTATE_NODE
from vmigdb.hv.qemu.qmp import QmpError

log = logging.getLogger("vmigdb.hv.qemu")

JOB_TIMEOUT = 600.0
_job_ids = itertools.count(1)


class QmpLike(Protocol):
    """What the store needs of a QMP connection (qmp.Qmp, or libvirt's pass-through)."""

    async def execute(self, cmd: str, args: dict[str, object] | None = None) -> object: ...


@dataclass(frozen=True)
class _Disk:
    node: str  # the format node QEMU's block layer knows it by
    format: str
    readonly: bool
    file: str


class QemuSnapshots(SnapshotStore):
    """Snapshots of one QEMU over its QMP connection: a QMP socket, or libvirt's monitor
    pass-through, alike."""

    def __init__(self, qmp: QmpLike, icount: bool) -> None:
        self._qmp = qmp
        self._icount = icount  # guest time counts instructions (-icount): see the docstring

    def load_caveat(self) -> str | None:
        if self._icount:
            return None
        return (
            "guest time is not instruction-counted (no -icount): QEMU keeps the TSC monotonic "
            "across a load, so it jumps ahead by the time since the save, while the HPET and the "
            "RTC continue from the snapshot; --time icount keeps every clock at the snapshot's"
        )

    # -- what is there -----------------------------------------------------------------------------

    async def _disks(self) -> list[_Disk]:
        """The guest's disks, from `query-block` (devices with a medium)."""
        disks = []
        for block in await self._qmp.execute("query-block") or []:  # type: ignore[union-attr]
            inserted = block.get("inserted")
            if not inserted:
                continue
            disks.append(
                _Disk(
                    node=inserted.get("node-name", ""),
                    format=inserted.get("drv", "?"),
                    readonly=bool(inserted.get("ro")),
                    file=inserted.get("file", "?"),
                )
            )
        return disks

    async def _has_own_node(self) -> bool:
        nodes = await self._qmp.execute("query-named-block-nodes", {"flat": True})
        return any(n.get("node-name") == VMSTATE_NODE for n in nodes or [])  # type: ignore[union-attr]

    async def _plan(self) -> tuple[str, list[str]]:
        """(VM-state node, every node that takes the snapshot). :raises DriverError: why not."""
        disks = await self._disks()
        raw = [d for d in disks if not d.readonly and d.format != "qcow2"]
        if raw:
            names = ", ".join(f"{d.file} ({d.format})" for d in raw)
            raise DriverError(
                f"cannot snapshot: the writable disk {names} cannot hold an internal snapshot, so "
                "its contents would not roll back with memory; convert it to qcow2 (qemu-img "
                "convert -O qcow2) or attach it read-only"
            )
        writable = [d.node for d in disks if not d.readonly and d.node]
        if await self._has_own_node():
            return VMSTATE_NODE, [VMSTATE_NODE, *writable]
        if not writable:
            raise DriverError(
                "cannot snapshot: no qcow2 disk to hold the VM state (vmigdb adds a node of its "
                "own only to guests it boots)"
            )
        return writable[0], writable

    def where(self) -> str:
        return "QEMU internal snapshots (qcow2)"

    # -- jobs --------------------------------------------------------------------------------------

    async def _job(self, command: str, args: dict[str, object]) -> float:
        """Run one snapshot job to its end; its duration. :raises DriverError: QEMU's reason."""
        job_id = f"vmigdb-{command}-{next(_job_ids)}"
        start = time.monotonic()
        try:
            await self._qmp.execute(command, {"job-id": job_id, **args})
        except QmpError as exc:
            raise DriverError(str(exc)) from None
        deadline = start + JOB_TIMEOUT
        while True:
            jobs = await self._qmp.execute("query-jobs") or []
            job = next((j for j in jobs if j.get("id") == job_id), None)  # type: ignore[union-attr]
            if job is None:
                raise DriverError(f"QEMU lost the {command} job")
            if job.get("status") == "concluded":
                break
            if time.monotonic() > deadline:
                raise DriverError(f"{command} did not finish in {JOB_TIMEOUT:.0f} s")
            await asyncio.sleep(0.05)
        seconds = time.monotonic() - start
        try:
            await self._qmp.execute("job-dismiss", {"id": job_id})
        except QmpError as exc:
            log.warning("could not dismiss QEMU job %s: %s", job_id, exc)
        if job.get("error"):
            raise DriverError(f"QEMU: {job['error']}")
        return seconds

    # -- the store ---------------------------------------------------------------------------------

    async def list(self) -> list[SnapshotInfo]:
        vmstate, _ = await self._plan_for_listing()
        nodes = await self._qmp.execute("query-named-block-nodes", {"flat": True}) or []
        for node in nodes:  # type: ignore[union-attr]
            if node.get("node-name") != vmstate:
                continue
            out = []
            for snap in node.get("image", {}).get("snapshots", []):
                if not snap.get("vm-state-size"):
                    continue  # a disk-only snapshot, not one of a whole VM
                out.append(
                    SnapshotInfo(
                        name=snap["name"],
                        vm_state_size=int(snap["vm-state-size"]),
                        date=snap["date-sec"] + snap["date-nsec"] / 1e9,
                        vm_clock=snap["vm-clock-sec"] + snap["vm-clock-nsec"] / 1e9,
                    )
                )
            return out
        return []

    async def _plan_for_listing(self) -> tuple[str, list[str]]:
        if await self._has_own_node():
            return VMSTATE_NODE, [VMSTATE_NODE]
        return await self._plan()

    async def _exists(self, name: str) -> bool:
        return any(s.name == name for s in await self.list())

    async def save(self, name: str) -> float:
        vmstate, devices = await self._plan()
        if await self._exists(name):
            raise DriverError(f"a snapshot named {name!r} exists: delete it first, or pick a name")
        return await self._job(
            "snapshot-save", {"tag": name, "vmstate": vmstate, "devices": devices}
        )

    async def load(self, name: str) -> float:
        vmstate, devices = await self._plan()
        if not await self._exists(name):
            raise DriverError(f"no snapshot named {name!r} (monitor snapshot list)")
        return await self._job(
            "snapshot-load", {"tag": name, "vmstate": vmstate, "devices": devices}
        )

    async def delete(self, name: str) -> float:
        _, devices = await self._plan()
        if not await self._exists(name):
            raise DriverError(f"no snapshot named {name!r} (monitor snapshot list)")
        return await self._job("snapshot-delete", {"tag": name, "devices": devices})
