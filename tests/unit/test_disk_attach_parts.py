"""The pure parts of disk images and attaching: --drive parsing and QEMU arguments, QEMU's memory
map read from `info mtree -f`, reads across RAM segments, what guest time attaching finds."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmigdb.arch.x86_64.paging import PhysicalMemoryError
from vmigdb.errors import SetupError
from vmigdb.hv.qemu.attach import time_findings
from vmigdb.hv.qemu.drives import VMSTATE_NODE, Drive, drive_args, vmstate_args
from vmigdb.hv.qemu.hostram import Segment, SegmentedMemory, parse_ram_map
from vmigdb.hv.qemu.process import QemuConfig, build_command_line

MTREE = """\
FlatView #0
 AS "cpu-smm-0", root: memory
 Root memory region: memory
  0000000000000000-000000000009ffff (prio 0, ram): ram0

FlatView #2
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): ram0
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000
  0000000000100000-00000000bfffffff (prio 0, ram): ram0 @0000000000100000
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
  0000000100000000-000000013fffffff (prio 0, ram): ram0 @00000000c0000000
"""


def test_drive_spec(tmp_path: Path):
    qcow = tmp_path / "a.img"
    qcow.write_bytes(b"QFI\xfb" + bytes(60))
    raw = tmp_path / "b.img"
    raw.write_bytes(bytes(64))
    assert Drive.parse(str(qcow)) == Drive(qcow, "qcow2")
    assert Drive.parse(f"{raw},format=raw,if=ide,readonly=on") == Drive(raw, "raw", "ide", True)
    with pytest.raises(SetupError, match="unknown option"):
        Drive.parse(f"{raw},cache=none")
    with pytest.raises(SetupError, match="does not exist"):
        Drive.parse(str(tmp_path / "missing.img"))


def test_drive_and_vmstate_arguments():
    args = drive_args((Drive(Path("/d/a,b.qcow2"), "qcow2"), Drive(Path("/d/r"), "raw", "ide")))
    assert args[:6] == [
        "-blockdev",
        "driver=file,node-name=disk0-file,filename=/d/a,,b.qcow2",
        "-blockdev",
        "driver=qcow2,node-name=disk0,file=disk0-file",
        "-device",
        "virtio-blk-pci,drive=disk0,bootindex=0",
    ]
    assert args[-1] == "ide-hd,drive=disk1,bootindex=1"
    assert vmstate_args(Path("/w/v.qcow2")) == [
        "-blockdev",
        f"driver=qcow2,node-name={VMSTATE_NODE},file.driver=file,file.filename=/w/v.qcow2",
    ]


def test_a_disk_boots_without_a_kernel():
    config = QemuConfig(drives=(Drive(Path("/d/a"), "qcow2"),), time_mode="host")
    cmd = build_command_line(
        config, "tcg", Path("/r"), Path("/g"), Path("/q"), Path("/c"), Path("/w/v.qcow2")
    )
    assert "-kernel" not in cmd and "-append" not in cmd
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in cmd
    assert any(VMSTATE_NODE in a for a in cmd)
    # The VM-state node has no device: only the disk has one.
    assert sum(a == "-device" for a in cmd) == 1


def test_ram_map_from_mtree():
    segments = parse_ram_map(MTREE)
    assert segments == [
        Segment(0, 0xA0000, "ram0", 0),
        Segment(0x100000, 0xC0000000, "ram0", 0x100000),
        Segment(0x1_0000_0000, 0x1_4000_0000, "ram0", 0xC0000000),
    ]
    with pytest.raises(SetupError):
        parse_ram_map('FlatView #0\n AS "I/O", root: io\n')


def test_segmented_reads_cross_segments_and_stop_outside_ram():
    segments = [Segment(0, 0x1000, "r", 0), Segment(0x1000, 0x2000, "r", 0x1000)]
    backing = bytes(range(256)) * 32
    memory = SegmentedMemory(
        segments, lambda i, off, n: backing[segments[i].offset + off :][:n], "test"
    )
    assert memory.read(0xFFE, 4) == backing[0xFFE:0x1002]
    assert memory.ranges() == [(0, 0x2000)]
    with pytest.raises(PhysicalMemoryError) as info:
        memory.read(0x1FFE, 4)
    assert info.value.address == 0x2000


def test_time_attaching_cannot_change():
    mode, extra, notes = time_findings("Host - Guest clock  0 ms\n", ["qemu", "-rtc", "clock=vm"])
    assert mode == "icount" and extra == []
    assert "RTC stops with the VM" in notes[0][1]
    mode, extra, notes = time_findings("TB count 3\n", ["qemu", "-m", "512"])
    assert mode == "host"
    assert [m.key for m in extra] == ["attached-rtc-host"] and extra[0].guest_visible
    assert extra[0].limit is None and "RTC keeps counting" in extra[0].why


class FakeQmp:
    """Answers the queries QemuSnapshots makes; records the jobs it is asked to run."""

    def __init__(self, disks: list[dict], own_node: bool) -> None:
        self.disks = disks
        self.own_node = own_node
        self.commands: list[tuple[str, dict | None]] = []

    async def execute(self, cmd: str, args: dict | None = None) -> object:
        self.commands.append((cmd, args))
        if cmd == "query-block":
            return [
                {"qdev": f"/machine/peripheral-anon/device[{i}]/virtio-backend", "inserted": d}
                for i, d in enumerate(self.disks)
            ]
        if cmd == "query-named-block-nodes":
            nodes = [{"node-name": d["node-name"], "image": {}} for d in self.disks]
            return nodes + ([{"node-name": VMSTATE_NODE, "image": {}}] if self.own_node else [])
        if cmd == "query-jobs":
            return [{"id": args_id, "status": "concluded"} for args_id in self._job_ids()]
        return {}

    def _job_ids(self) -> list[str]:
        return [a["job-id"] for c, a in self.commands if a and "job-id" in a]


def _disk(node: str, drv: str, ro: bool = False) -> dict:
    return {"node-name": node, "drv": drv, "ro": ro, "file": f"/d/{node}.img"}


def test_snapshot_plan_refuses_a_writable_raw_disk():
    import asyncio

    from vmigdb.hv.base import DriverError
    from vmigdb.hv.qemu.snapshots import QemuSnapshots

    store = QemuSnapshots(
        FakeQmp([_disk("disk0", "qcow2"), _disk("disk1", "raw")], True), icount=True
    )
    with pytest.raises(DriverError, match="convert it to qcow2"):
        asyncio.run(store.save("clean"))
    # Read-only raw disks do not matter; the VM state goes to vmigdb's own node.
    fake = FakeQmp([_disk("disk0", "qcow2"), _disk("cd", "raw", ro=True)], True)
    asyncio.run(QemuSnapshots(fake, icount=True).save("clean"))
    job = next(a for c, a in fake.commands if c == "snapshot-save")
    assert job["vmstate"] == VMSTATE_NODE and job["devices"] == [VMSTATE_NODE, "disk0"]
    # An attached VM without vmigdb's node keeps the state in its first qcow2 disk.
    fake = FakeQmp([_disk("drive-virtio-disk0", "qcow2")], False)
    asyncio.run(QemuSnapshots(fake, icount=True).save("clean"))
    job = next(a for c, a in fake.commands if c == "snapshot-save")
    assert job["vmstate"] == "drive-virtio-disk0"
    with pytest.raises(DriverError, match="no qcow2 disk"):
        asyncio.run(QemuSnapshots(FakeQmp([], False), icount=False).save("clean"))


def test_a_load_without_icount_says_the_tsc_jumps():
    from vmigdb.hv.qemu.snapshots import QemuSnapshots

    assert QemuSnapshots(FakeQmp([], True), icount=True).load_caveat() is None
    caveat = QemuSnapshots(FakeQmp([], True), icount=False).load_caveat()
    assert caveat is not None and "TSC" in caveat and "--time icount" in caveat
