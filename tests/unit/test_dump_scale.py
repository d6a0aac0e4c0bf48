"""Scale: a 4 GiB dump (the pc machine's layout, RAM above 4 GiB too) is served with a small RSS.

The dump is synthetic and sparse (its zeros are holes, so it costs no disk), laid out as QEMU
writes a 4 GiB guest's. A child process opens it through libvmi, reads RAM on both sides of the
PCI hole, walks page tables, scans what holds data, and reports its peak RSS and timings.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

from tests.unit.qemu_dump import kernel_cpu, write_sparse_core

GiB = 1 << 30
LAYOUT = [(0, 0xA0000), (0xC0000, 3 * GiB - 0xC0000), (0xFD000000, 16 << 20), (4 * GiB, GiB)]
HIGH_PA = 4 * GiB + 0x123000  # a page above the PCI hole
KERNEL_VA = 0xFFFF_FFFF_8100_0000


def pieces() -> dict[int, bytes]:
    tables = bytearray(0x5000)
    for table, index, value in (
        (0x1000, 511, 0x2000 | 3),
        (0x2000, 510, 0x3000 | 3),
        (0x3000, 8, 0x4000 | 3),
        (0x4000, 0, HIGH_PA | 3),
    ):
        struct.pack_into("<Q", tables, table + 8 * index, value)
    return {
        0: bytes(tables),
        HIGH_PA: b"above the hole",
        3 * GiB - 16: b"end of low RAM!!",
        5 * GiB - 16: b"end of high RAM!",
    }


CHILD = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    from vmigdb.arch.x86_64.paging import PagingMode, translate
    from vmigdb.hv.libvmi import DumpDriver
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) << 10
    t = time.perf_counter()
    d = DumpDriver.open(sys.argv[1])
    opened = time.perf_counter() - t
    reads = {hex(pa): d.read_physical(pa, n).decode() for pa, n in json.loads(sys.argv[2])}
    regs = d.read_registers(1)
    walk = translate(d.read_physical, regs["cr3"], int(sys.argv[3]), PagingMode.LONG4)
    scanned = 0
    for a, b in d.physical_ranges():
        for pa in range(a, b, 2 << 20):
            scanned += len(d.read_physical(pa, min(2 << 20, b - pa)))
    print(json.dumps({
        "opened": opened, "total": time.perf_counter() - t0, "reads": reads,
        "walk": walk.pa, "scanned": scanned, "hwm": hwm(), "cpus": d.cpus(),
        "ram": d.image.ranges(),
    }))
    """
)


def test_4gib_dump_small_rss(tmp_path) -> None:
    cpus = [kernel_cpu(0, cr3=0x1000), kernel_cpu(1, cr3=0x1000)]
    dump = write_sparse_core(tmp_path / "big.elf", LAYOUT, pieces(), cpus)
    assert dump.stat().st_size > 4 * GiB and dump.stat().st_blocks * 512 < 1 << 20
    want = [(HIGH_PA, 14), (3 * GiB - 16, 16), (5 * GiB - 16, 16)]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(dump), json.dumps(want), str(KERNEL_VA)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["reads"] == {
        hex(HIGH_PA): "above the hole",
        hex(3 * GiB - 16): "end of low RAM!!",
        hex(5 * GiB - 16): "end of high RAM!",
    }
    assert report["walk"] == HIGH_PA
    assert report["cpus"] == [1, 2]
    assert report["ram"] == [[0, 0xA0000], [0xC0000, 3 * GiB], [0xFD000000, 0xFE000000],
                             [4 * GiB, 5 * GiB]]  # fmt: skip
    assert report["scanned"] < 1 << 20  # the data, not 4 GiB of zeros
    assert report["hwm"] < 150 << 20, report["hwm"]
    print(
        f"4 GiB dump: raw copy made and opened in {report['opened']:.2f} s, "
        f"peak RSS {report['hwm'] >> 20} MiB"
    )
