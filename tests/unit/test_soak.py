"""The soak's own checks, offline: a fault, a detection, a server error or a corrupt register file
must each be caught (tests/e2e/test_soak.py runs the soak itself against a real guest)."""

from __future__ import annotations

import random
import struct
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from vmigdb.soak import console as console_mod
from vmigdb.soak.console import GuestConsole
from vmigdb.soak.plan import KINDS, Binary, Facts, Planner, Segment, read_only_segments
from vmigdb.soak.report import Tally, format_text, to_json
from vmigdb.soak.serverlog import ServerLog
from vmigdb.soak.session import GDBSIDE, SessionResult, SessionRunner

BOOT = """\
vmigdb-guest: init
vmigdb-guest: started antidebug pid=99
vmigdb-guest: started probe pid=100
vmigdb-guest: started spin:1111 pid=106
antidebug pid=99 checksum_start=0x498c00 checksum_end=0x49a68b canary=0x499a32
vmigdb-guest: ready
probe pid=100 round=1 opens=15
spin pid=106 value=1111 addr=0x401615 count=0
antidebug round=1 detections=0 rdtsc_outliers=0 rdtsc_max=11
"""
# Issue 12's panic, as the 6.12 guest printed it.
OOPS = """\
[  101.2] traps: PANIC: double fault, error_code: 0x0
[  101.2] Oops: double fault: 0000 [#1] PREEMPT SMP NOPTI
[  101.2] CPU: 1 UID: 0 PID: 136 Comm: probe Not tainted 6.12.107+deb12-amd64 #1
[  101.2] RIP: 0010:path_openat+0x4a0/0x1330
[  101.2] Kernel panic - not syncing: Fatal exception in interrupt
"""


def write(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_console_follows_programs_rounds_and_faults(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    write(log, BOOT + "probe pid=100 round=2 op")  # a line still being written
    c = GuestConsole(log)
    c.poll()
    assert c.ready and sorted(c.programs) == [99, 100, 106]
    assert not c.silent_since(0) and c.faults == [] and len(c.rounds) == 1
    mark = c.offset
    assert {p.pid for p in c.silent_since(mark)} == {99, 100, 106}
    write(log, "ens=30\nantidebug round=2 detections=1 rdtsc rdtsc_outliers=3 rdtsc_max=728\n")
    c.tag = "session 3 (plain)"
    c.poll()
    assert {p.pid for p in c.silent_since(mark)} == {106}  # the spin printed nothing new
    assert c.programs[100].lines == 2
    [r] = c.detections()
    assert (r.number, r.names, r.tag) == (2, ("rdtsc",), "session 3 (plain)")
    write(log, OOPS)
    c.poll()
    assert [line.split("] ")[1][:12] for _, line in c.faults] == [
        "traps: PANIC",
        "Oops: double",
        "Kernel panic",
    ]
    assert all(tag == "session 3 (plain)" for tag, _ in c.faults)


def test_console_catches_reboots_and_garbled_verdicts(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    write(log, BOOT + "antidebug round=2 detec[  5.1] random: crng\ntions=2 checksum,int3 rd\n")
    write(log, "antidebug round=3 detections=0 rdtsc_outliers=0 rdtsc_max=11\n")
    write(log, "vmigdb-guest: init\n")
    c = GuestConsole(log)
    c.poll()
    assert c.faults and "rebooted" in c.faults[0][1]
    # round 2's verdict is unreadable: it cannot count as clean
    assert [line for _, line in c.garbled_detections] == ["antidebug rounds 2..2 unreadable"]
    assert console_mod.FAULT.search("segfault at 0 ip 0000000000401615 sp 00007ffd error 4")


def test_server_log_sorts_errors_from_session_chatter(tmp_path: Path) -> None:
    log = tmp_path / "stderr"
    write(
        log,
        "vmigdb: GDB connected from 127.0.0.1:4000\n"
        "vmigdb: GDB at 127.0.0.1:4000 detached\n"
        "vmigdb: QEMU lost a single-step at 0x401615 on CPU#0; stepping again\n"
        "vmigdb: the channel to QEMU's gdbstub fell out of step (T02); resynchronising\n"
        "vmigdb: internal error on b'g'\n"
        "vmigdb: gdb <- b'F10000;deferred_error_apic_exit'\n"
        "Traceback (most recent call last):\n",
    )
    s = ServerLog(log)
    s.poll()
    assert [line[:20] for _, line in s.errors] == [
        "vmigdb: the channel ",
        "vmigdb: internal err",
        "Traceback (most rece",
    ]
    assert s.traces == 1
    assert list(s.other) == ["vmigdb: QEMU lost a single-step at NxN on CPU#N; stepping again"]


def elf64(segments: list[tuple[int, int, int, int]], size: int = 0x3000) -> bytes:
    """A minimal ELF64 with these program headers: (type, flags, offset, vaddr/filesz)."""
    header = bytearray(0x40)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x20, 0x40)
    struct.pack_into("<HH", header, 0x36, 56, len(segments))
    table = b"".join(
        struct.pack("<IIQQQQQQ", t, flags, off, vaddr, vaddr, filesz, filesz, 0x1000)
        for t, flags, off, (vaddr, filesz) in ((t, f, o, v) for t, f, o, v in segments)
    )
    data = bytes(header) + table
    return data + bytes(range(256)) * ((size - len(data)) // 256 + 1)


def test_read_only_segments_and_expected_bytes(tmp_path: Path) -> None:
    path = tmp_path / "prog"
    path.write_bytes(
        elf64(
            [
                (1, 4, 0, (0x400000, 0x200)),  # R
                (1, 5, 0x1000, (0x401000, 0x800)),  # R E
                (1, 6, 0x2000, (0x403000, 0x100)),  # R W: not compared, the program writes it
                (4, 4, 0x100, (0x400100, 0x20)),  # a note, not PT_LOAD
            ]
        )
    )
    assert read_only_segments(path) == [
        Segment(0x400000, 0, 0x200),
        Segment(0x401000, 0x1000, 0x800),
    ]
    binary = Binary("prog", path, read_only_segments(path), {})
    assert binary.expected(0x401010, 4) == path.read_bytes()[0x1010:0x1014]
    with pytest.raises(ValueError):
        binary.expected(0x403000, 4)


def facts(tmp_path: Path) -> Facts:
    path = tmp_path / "prog"
    path.write_bytes(elf64([(1, 5, 0x1000, (0x401000, 0x800))]))
    syms = {
        n: 0x401000 + i * 16
        for i, n in enumerate(
            ["__libc_open64", "__close", "vmigdb_spin_target", "vmigdb_loop_sum",
             "vmigdb_loop_target", "vmigdb_loop_parked", "vmigdb_loop_sink"]
        )
    }  # fmt: skip
    binary = Binary("prog", path, read_only_segments(path), syms)
    names = ("probe", "loop", "ticker", "spin")
    return Facts(
        "127.0.0.1:1",
        2,
        512,
        {"probe": [100], "loop": [101], "ticker": [102], "spin": [106, 110]},
        dict.fromkeys(names, binary),
        {106: 1111, 110: 2222},
        46,
        48,
    )


def test_planner_deals_every_kind_equally_and_writes_valid_python(tmp_path: Path) -> None:
    planner = Planner(facts(tmp_path), random.Random(3), tmp_path)
    dealt: Counter = Counter()
    for number in range(1, 60):
        kinds, body, timeout = planner.session(number)
        assert 1 <= len(kinds) <= 4 and timeout > 120
        compile(GDBSIDE + "\n" + body, f"session {number}", "exec")
        for kind in kinds:
            assert f"w_{kind}(" in body or (kind == "conditional" and "w_conditional(" in body)
        dealt.update(kinds)
    assert set(dealt) == set(KINDS)
    assert max(dealt.values()) - min(dealt.values()) <= 1  # a deck: each kind in turn


@pytest.fixture()
def gdbside(monkeypatch):
    """gdbside.py's functions, with GDB's module faked and registers served from a dict."""
    fake = types.ModuleType("gdb")
    fake.events = types.SimpleNamespace(stop=types.SimpleNamespace(connect=lambda f: None))
    fake.BP_WATCHPOINT, fake.BP_HARDWARE_WATCHPOINT = 6, 7
    fake.selected_thread = lambda: types.SimpleNamespace(num=2)
    monkeypatch.setitem(sys.modules, "gdb", fake)
    regs = {"$eflags": 0x246, "$cs": 0x10, "$ss": 0x18, "$rip": 0xFFFFFFFF81000000,
            "$cr0": 0x80050033, "$efer": 0xD01, "$cr3": 0x1234000}  # fmt: skip
    space = {"value": lambda e: regs[e], "emit": lambda **r: None}
    exec(compile(GDBSIDE, "gdbside.py", "exec"), space)
    return space, regs


def test_sane_registers_pass(gdbside) -> None:
    space, _ = gdbside
    assert space["sane"]("a stop") == 0xFFFFFFFF81000000


@pytest.mark.parametrize(
    ("register", "value", "says"),
    [
        ("$eflags", 0x56DA2246, "RFLAGS 0x56da2246"),  # issue 12's
        ("$eflags", 0x244, "RFLAGS"),  # bit 1 clear
        ("$cs", 0x8, "CS 0x8"),
        ("$ss", 0x1234, "SS"),
        ("$rip", 0x0000800000000000, "not canonical"),
        ("$rip", 0x401000, "with CS 0x10"),
        ("$cr0", 0x11, "paging off"),
        ("$efer", 0x1, "EFER"),
    ],
)
def test_impossible_registers_fail_the_session(gdbside, register, value, says) -> None:
    space, regs = gdbside
    regs[register] = value
    with pytest.raises(space["Check"], match=says):
        space["sane"]("a stop")


def test_a_dump_unlike_the_file_fails(tmp_path: Path) -> None:
    f = facts(tmp_path)
    runner = SessionRunner(None, None, None, f, random.Random(0), lambda: True)
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    want = f.binaries["probe"].expected(0x401000, 0x100)
    good.write_bytes(want)
    bad.write_bytes(want[:0x80] + b"\xcc" + want[0x81:])  # a breakpoint byte left behind
    result = SessionResult(1, ["bulk"], 0.0)
    for path in (good, bad):
        runner._check_dump(
            result, {"path": str(path), "addr": 0x401000, "length": 0x100, "pid": 100}
        )
    [failure] = result.failures
    assert failure.what == "dump" and "first difference at 0x401080" in failure.message
    assert result.extra["bulk dump: bytes checked"] == 0x100
    assert not good.exists() and not bad.exists()


def test_report_shows_rates_and_failures(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    write(log, BOOT)
    c = GuestConsole(log)
    c.poll()
    tally = Tally()
    result = SessionResult(1, ["stepi"], 2.0, ops=Counter({"stepi": 300}))
    tally.add(result)
    report = to_json(tally, c, ServerLog(tmp_path / "none"), {"seed": 1}, minutes=2.0)
    assert report["clean"] and report["operations_per_minute"]["stepi"] == 150.0
    assert report["operations"]["gdb connect"] == 1
    text = format_text(report)
    assert "stepi" in text and "CLEAN" in text
