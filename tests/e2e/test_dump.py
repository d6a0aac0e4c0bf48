"""Post-mortem end to end: `monitor dump` of the live demo guest (2 vCPUs, stopped inside ticker's
getpid), then `vmigdb dump` of that file, and of a raw image of the same RAM, with real GDB 13.

Ground truth is what GDB showed of the live guest at the stop: each vCPU's registers, the code at
each `$pc`, ticker's buffer under `monitor process ticker`, `monitor ps`. The replay must show
exactly that, except what a QEMU dump does not hold (cr8, efer: GDB says <unavailable>). Every
action that would run or change the machine fails with a message, and the server stays up.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Vm, boot
from tests.e2e.dumps import Replay, first_prompt, gdb, registers
from vmigdb.arch.x86_64.paging import Translation, Translator, paging_mode
from vmigdb.hv.libvmi import DumpDriver

pytestmark = pytest.mark.e2e

RAM = 512 << 20  # the `vm` fixture's guest
CHUNK = 8 << 20
NOT_IN_QEMU_DUMPS = {"cr8", "efer"}  # of what `info registers` shows

# What a user records at the stop, and compares after: one GDB command per section.
RECORD = (
    "thread 1",
    "info threads",
    "info registers",
    "x/8i $pc",
    "thread 2",
    "info registers",
    "x/8i $pc",
    "x/16xb {buf:#x}",
    "monitor ps",
)


def record(address: str, buf: int, before: tuple[str, ...] = ()) -> list[str]:
    commands = (*before, *(c.format(buf=buf) for c in RECORD))
    out = gdb(address, *commands)
    return [out[len(before) + i + 1] for i in range(len(RECORD))]


@dataclass
class Live:
    sections: list[str]
    dump: Path
    raw: Path
    buf: int
    dump_text: str


@pytest.fixture(scope="module")
def vm(tmp_path_factory, guest_image) -> Iterator[Vm]:
    """The shared fixture's guest under host time: QEMU writes a dump by stopping the VM, which
    it cannot do at a stop vmigdb's plugin holds (icount's scoped hits; test_loop_program checks
    that refusal), so the stop in ticker's getpid here is one QEMU's gdbstub holds."""
    yield from boot(tmp_path_factory, guest_image, smp=2, extra=("--time", "host"))


@pytest.fixture(scope="module")
def live(vm: Vm, tmp_path_factory) -> Live:
    tmp = tmp_path_factory.mktemp("dump")
    buf = int(vm.wait_console(r"ticker pid=\d+ buf=0x([0-9a-f]+)").group(1), 16)
    dump, raw = tmp / "guest.elf", tmp / "guest.raw"
    before = ("monitor process ticker", "break __x64_sys_getpid", "continue", "delete")
    after = (
        f"monitor dump {dump}",
        f"monitor dump {dump}",  # never over an existing file
        "monitor phys on",
        f"monitor dump-memory {raw} 0 {RAM:#x}",
        "monitor phys off",
        "info registers rip",
        "monitor process all",
        "detach",
    )
    commands = (*before, *(c.format(buf=buf) for c in RECORD), *after)
    out = gdb(vm.address, *commands, timeout=300)
    assert re.search(r"hit Breakpoint 1, 0x[0-9a-f]+ in __x64_sys_getpid \(\)", out["all"]), out
    sections = [out[len(before) + i + 1] for i in range(len(RECORD))]
    saved = out[f"monitor dump {dump}"]
    assert saved.startswith(f"saving the guest to {dump} "), saved
    assert "the guest is still stopped" in saved and "Ignoring packet error" not in saved, saved
    first, second = (out[len(before) + len(RECORD) + i] for i in (1, 2))
    assert f"raw copy for libvmi: {dump}.vmigdb-raw (made in" in first, first
    assert "exists: vmigdb never overwrites a file" in second, second
    assert f"wrote {RAM} bytes from 0x0 to {raw}" in out["all"], out["all"]
    wrote = next(line for line in first.splitlines() if line.startswith("wrote"))
    print(f"\nmonitor dump of the {RAM >> 20} MiB guest: {wrote}")
    return Live(sections, dump, raw, buf, first)


@pytest.fixture
def replay(tmp_path: Path) -> Iterator[Callable[..., Replay]]:
    started: list[Replay] = []

    def start(*args: str) -> Replay:
        started.append(Replay(tmp_path, *args))
        return started[-1]

    yield start
    for r in started:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


def assert_same_as_live(live: Live, shown: list[str], unavailable: set[str]) -> None:
    for command, was, now in zip(RECORD, live.sections, shown, strict=True):
        if command != "info registers":
            assert now == was, (command, was, now)
            continue
        was_regs, now_regs = registers(was), registers(now)
        assert now_regs.keys() == was_regs.keys()
        assert {n for n, v in now_regs.items() if v == "<unavailable>"} == unavailable, now
        for name, value in now_regs.items():
            if name not in unavailable:
                assert value == was_regs[name], (name, was_regs[name], value)


def test_the_dump_and_its_raw_copy_are_private(live: Live) -> None:
    assert os.stat(live.dump).st_mode & 0o777 == 0o600
    assert os.stat(f"{live.dump}.vmigdb-raw").st_mode & 0o777 == 0o600


def test_replay_of_the_dump_shows_what_gdb_showed_live(live: Live, replay) -> None:
    served = replay("--image", str(live.dump))
    assert f"reusing {live.dump}.vmigdb-raw" in served.stderr()  # made by monitor dump
    seconds, connect = first_prompt(served.address)
    frame = live.sections[0].splitlines()[1].split(None, 1)[1]  # vCPU 1's, e.g. "0x... in f ()"
    assert connect.splitlines()[-1] == frame, connect
    shown = record(served.address, live.buf, ("monitor process ticker",))
    assert_same_as_live(live, shown, NOT_IN_QEMU_DUMPS)

    out = gdb(
        served.address,
        "monitor process ticker",
        "continue",
        "stepi",
        "break do_sys_openat2",
        "continue",
        "delete",
        f"set {{char}}{live.buf:#x}=1",
        "set $rax=1",
        f"x/1xb {live.buf:#x}",
        "info registers rax",
        "monitor info",
        "monitor phys on",
        f"x/4xb {RAM - 4:#x}",
        f"x/4xb {RAM:#x}",  # past the end of RAM
    )
    cannot_run = "Remote failure reply: E.vmigdb: the libvmi-file driver cannot run the guest"
    assert out["continue"].count(cannot_run) == 1 and "stopped" in out["continue"], out["all"]
    assert cannot_run in out["stepi"], out["all"]
    assert "Cannot insert breakpoint 1" in out[5], out["all"]
    assert f"Cannot access memory at address {live.buf:#x}" in out[7], out["all"]
    assert "the libvmi-file driver cannot write registers" in out["set $rax=1"], out["all"]
    rax = registers(live.sections[2])["rax"]  # vCPU 1's, as GDB showed it live
    assert out[9].split()[1:] == ["0x54"], out["all"]  # the byte the write would have changed
    assert registers(out["info registers rax"])["rax"] == rax, out["all"]
    info = out["monitor info"]
    assert "driver: libvmi File driver (post-mortem, read-only)" in info, info
    assert f"image: {live.dump} (QEMU ELF dump, 2 vCPU(s), written 20" in info, info
    assert f"vmi_read_pa) on {live.dump}.vmigdb-raw" in info, info
    assert "state: stopped for good" in info and "guest: Linux 6.1" in info, info
    assert out[13].startswith(f"{RAM - 4:#x}:\t0x"), out["all"]
    assert out[14] == f"{RAM:#x}:\tCannot access memory at address {RAM:#x}\n", out["all"]

    again = gdb(served.address, "info registers rip")  # the server stayed up, on vCPU 1 again
    rip = registers(live.sections[2])["rip"]  # vCPU 1's (either vCPU may have hit the breakpoint)
    assert registers(again["info registers rip"])["rip"] == rip, again["all"]
    rss = served.peak_rss_mib()
    print(
        f"\nvmigdb dump of the {RAM >> 20} MiB guest: listening after "
        f"{served.listening_after:.2f} s, GDB's first prompt in {seconds:.2f} s, "
        f"peak RSS {rss:.0f} MiB"
    )
    assert served.stop() == 0
    assert rss < 150


def test_replay_of_a_raw_image_with_registers_file(live: Live, replay, tmp_path: Path) -> None:
    vcpus = []
    for section in (live.sections[2], live.sections[5]):  # each vCPU's `info registers`
        vcpus.append({n: v.split()[0] for n, v in registers(section).items()})
    regs = tmp_path / "regs.json"
    regs.write_text(json.dumps({"format": "vmigdb-registers/1", "vcpus": vcpus}))
    served = replay("--image", str(live.raw), "--regs", str(regs))
    shown = record(served.address, live.buf, ("monitor process ticker",))
    assert_same_as_live(live, shown, set())  # the file gave every register GDB showed
    assert served.stop() == 0


def test_replay_of_a_raw_image_alone_finds_the_kernel(live: Live, replay) -> None:
    served = replay("--image", str(live.raw))
    out = gdb(
        served.address,
        "monitor process ticker",
        f"x/16xb {live.buf:#x}",
        "monitor ps",
        "info registers rip cr3",
        "monitor info",
    )
    assert out[2] == live.sections[RECORD.index("x/16xb {buf:#x}")], out["all"]
    assert out["monitor ps"] == live.sections[RECORD.index("monitor ps")], out["all"]
    assert re.search(r"rip\s+0x0\s+0x0\ncr3\s+<unavailable>", out[4]), out["all"]
    assert "derived: cr0/cr3/cr4/efer: the kernel's page tables" in out["monitor info"]
    assert served.stop() == 0


def test_libvmi_reads_the_dump_as_guest_ram_and_walks_the_same_tables(live: Live) -> None:
    """Byte for byte against the raw image GDB wrote from live RAM in the same stop; libvmi's own
    page walk agrees with vmigdb's at each vCPU's PC."""
    driver = DumpDriver.open(live.dump)
    try:
        with open(live.raw, "rb") as raw:
            # Below 1 MiB QEMU dumps what the guest sees (ROM shadows, no VGA hole).
            assert driver.read_physical(0, 0xA0000) == raw.read(0xA0000)
            for pa in range(1 << 20, RAM, CHUNK):
                n = min(CHUNK, RAM - pa)
                raw.seek(pa)
                assert driver.read_physical(pa, n) == raw.read(n), hex(pa)
        walker = Translator(driver.read_physical)
        for cpu in driver.cpus():
            regs = driver.read_registers(cpu)
            mode = paging_mode(regs["cr0"], regs["cr4"], regs["efer"])
            t = walker.translate(regs["cr3"], regs["rip"], mode)
            assert isinstance(t, Translation)
            assert driver.image.memory.translate(regs["cr3"], regs["rip"]) == t.pa
    finally:
        driver.close()
