"""The guest's own anti-debugging battery (`antidebug`, vmigdb/images/programs/antidebug.c).

The guest boots the way `vmigdb demo` boots it: 1 vCPU, vmigdb's default time mode (auto, which is
icount there: guest time counts instructions, so the debugger's work cannot be timed).
- With vmigdb serving and no debugger connected, every round reports `detections=0`.
- The control: GDB patches one byte the program checksums but never executes (`set {char}CANARY =
  0xcc`, scoped to its process): the next rounds report `checksum`; the original byte written back
  the same way, the rounds are clean again. The battery really detects.
- A machine-wide session (20 hits on a kernel function) leaves every round clean.
- Issue 5's whole session, with antidebug's symbols loaded in GDB: a breakpoint scoped to its
  process inside its battery loop (`check`, called 13 times a round) hit 50 times; 200 `stepi`
  through the battery, 50 from each probe a debugger most easily betrays (pushf: TF in the flags;
  int3: the guest's own breakpoint must reach its SIGTRAP handler once; popf setting TF: the guest's
  own single-step trap must fire once, after one instruction; an RDTSC-timed block); the guest held
  stopped 10 s; its memory and registers read; detach. Every round during and after: clean.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Vm, boot

pytestmark = pytest.mark.e2e

START = re.compile(
    r"antidebug pid=(\d+) checksum_start=0x([0-9a-f]+) checksum_end=0x([0-9a-f]+) "
    r"canary=0x([0-9a-f]+)"
)
ROUND = re.compile(
    r"^antidebug round=(\d+) detections=(\d+)(?: ([a-z0-9_,]+))? rdtsc_outliers=(\d+) "
    r"rdtsc_max=(\d+)\r?$",
    re.M,
)
BYTE = re.compile(r"^0x[0-9a-f]+(?: <[^>]*>)?:\s+0x([0-9a-f]{2})\s*$", re.M)


@dataclass(frozen=True)
class Round:
    number: int
    detections: int
    names: tuple[str, ...]
    rdtsc_outliers: int
    rdtsc_max: int  # the round's slowest RDTSC sample, in multiples of the calibrated median
    line: str


@dataclass(frozen=True)
class Antidebug:
    pid: int
    checksum_start: int
    checksum_end: int
    canary: int


@pytest.fixture(scope="module")
def vm(tmp_path_factory, guest_image):
    yield from boot(tmp_path_factory, guest_image, append="vmigdb.programs=ticker,antidebug")


@pytest.fixture(scope="module")
def antidebug(vm: Vm) -> Antidebug:
    m = vm.wait_console(START.pattern, 60)
    vm.wait_console(r"antidebug calibrated ", 60)
    return Antidebug(int(m.group(1)), *(int(g, 16) for g in m.groups()[1:]))


def rounds(vm: Vm, after: int = 0) -> list[Round]:
    """Every round line printed after console offset `after`."""
    out = []
    for m in ROUND.finditer(vm.console()[after:]):
        names = tuple(m.group(3).split(",")) if m.group(3) else ()
        number, detections, outliers, worst = (int(m.group(i)) for i in (1, 2, 4, 5))
        out.append(Round(number, detections, names, outliers, worst, m.group(0).strip()))
        assert len(names) == out[-1].detections, m.group(0)
    return out


def wait_rounds(vm: Vm, count: int, after: int) -> list[Round]:
    """The first `count` rounds printed after console offset `after` (about one a second)."""
    vm.wait_for(lambda: len(rounds(vm, after)) >= count, 3 * count + 15, f"{count} rounds")
    return rounds(vm, after)[:count]


def read_byte(vm: Vm, pid: int, addr: int) -> int:
    out = vm.gdb(f"monitor process {pid}", f"x/bx {addr:#x}", "monitor process all", "detach")
    m = BYTE.search(out)
    assert m, out
    return int(m.group(1), 16)


def write_byte(vm: Vm, pid: int, addr: int, value: int) -> None:
    out = vm.gdb(
        f"monitor process {pid}",
        f"set {{char}}{addr:#x} = {value:#x}",
        "monitor process all",  # a scope outlives the session, with its exit-watch breakpoint
        "detach",
    )
    assert f"scope: process {pid} (antidebug)" in out, out
    assert "Cannot access memory" not in out, out


def summary(seen: list[Round]) -> str:
    fired = Counter(name for r in seen for name in r.names)
    dirty = sum(1 for r in seen if r.detections)
    return (
        f"{len(seen)} rounds, {dirty} with detections {dict(fired) or '{}'}, "
        f"rdtsc outliers {sum(r.rdtsc_outliers for r in seen)}, "
        f"slowest rdtsc {max((r.rdtsc_max for r in seen), default=0)}x median"
    )


def test_no_debugger_no_detections(vm: Vm, antidebug: Antidebug) -> None:
    """Runs first: vmigdb serves the guest, nobody has connected yet."""
    assert antidebug.checksum_start <= antidebug.canary < antidebug.checksum_end
    seen = wait_rounds(vm, 10, 0)
    print(f"\nno debugger: {summary(seen)}")
    assert [r.number for r in seen] == list(range(1, 11)), seen
    assert all(r.detections == 0 for r in seen), seen


def test_control_a_patched_byte_is_detected_then_forgiven(vm: Vm, antidebug: Antidebug) -> None:
    pid, canary = antidebug.pid, antidebug.canary
    original = read_byte(vm, pid, canary)
    assert original != 0xCC
    write_byte(vm, pid, canary, 0xCC)
    try:
        mark = len(vm.console())
        assert read_byte(vm, pid, canary) == 0xCC
        # The round under way may have checksummed before the write; the next one cannot have.
        patched = wait_rounds(vm, 3, mark)
        print(f"\npatched 0xcc at {canary:#x}: {summary(patched)}")
        assert "checksum" in patched[1].names and "checksum" in patched[2].names, patched
        print(f"control detection line: {patched[1].line}")
    finally:
        write_byte(vm, pid, canary, original)
    mark = len(vm.console())
    assert read_byte(vm, pid, canary) == original
    restored = wait_rounds(vm, 6, mark)
    print(f"restored {original:#04x}: {summary(restored)}")
    assert all("checksum" not in r.names for r in restored[1:]), restored
    # A GDB session may leave a timing detection in the round after it (issue 5); then all is quiet.
    assert all(r.detections == 0 for r in restored[-3:]), restored


def clean_session(vm: Vm, *commands: str, timeout: float = 300) -> tuple[str, list[Round]]:
    """Run a GDB session; returns its output and every round printed during it and the 5 after,
    having asserted that none of them reports a detection."""
    wait_rounds(vm, 2, len(vm.console()))  # the previous test's sessions are behind us
    mark = len(vm.console())
    started = time.monotonic()
    out = vm.gdb(*commands, timeout=timeout)
    elapsed = time.monotonic() - started
    seen = wait_rounds(vm, len(rounds(vm, mark)) + 5, mark)
    print(f"\nGDB session of {elapsed:.1f} s: {summary(seen)}")
    for r in seen:
        print(f"  {r.line}")
    assert "detached]" in out, out[-3000:]
    assert [r for r in seen if r.detections] == [], summary(seen)
    return out, seen


def test_kernel_breakpoint_session_leaves_every_round_clean(vm: Vm, antidebug: Antidebug) -> None:
    out, _ = clean_session(vm, "break __x64_sys_getpid", *["continue"] * 20, "delete", "detach")
    assert len(re.findall(r"Breakpoint 1, 0x[0-9a-f]+ in __x64_sys_getpid", out)) == 20, out


HITS = 50
STEP_FROM = ("pushf_flags", "int3_probe", "popf_probe", "rdtsc_block0")
STEPS_EACH = 50
HOLD_S = 10


def session_commands(binary: Path, pid: int) -> list[str]:
    cmds = [
        f"file {binary}",
        f"monitor process {pid}",
        "monitor stealth",
        "monitor info",
        "display/i $pc",  # one "=> ADDR: INSN" line at every stop
        "break check",
        *["continue"] * HITS,
        "delete",
    ]
    for probe in STEP_FROM:
        cmds += [f"break *{probe}", "continue", "delete", *["stepi"] * STEPS_EACH]
    cmds += [
        f"shell sleep {HOLD_S}",
        "x/4xg $sp",
        "x/2i $pc",
        "info registers rip rsp eflags cr3",
        "monitor process all",
        "detach",
    ]
    return cmds


def test_whole_process_session_leaves_every_round_clean(
    vm: Vm, antidebug: Antidebug, guest_image
) -> None:
    binary = guest_image.programs / "antidebug"
    cmds = session_commands(binary, antidebug.pid)
    print("\nGDB commands:", "; ".join(f"{cmd} x{n}" if n > 1 else cmd for cmd, n in runs(cmds)))
    out, seen = clean_session(vm, *cmds, timeout=600)
    hits = re.findall(r"Breakpoint \d+, (?:0x[0-9a-f]+ in )?(\w+) \(", out)
    # pushf_flags opens the checksummed section: GDB may name it after the section's start symbol.
    hits = ["pushf_flags" if h == "__start_adcode" else h for h in hits]
    assert hits == ["check"] * HITS + list(STEP_FROM), hits
    stops = re.findall(r"^=> 0x[0-9a-f]+", out, re.M)
    assert len(stops) == 1 + HITS + len(STEP_FROM) * (1 + STEPS_EACH), out[-3000:]
    assert "instruction-counted guest time" in out and "invisible, in use" in out, out[:3000]
    assert "(auto: TCG with 1 vCPU)" in out, out[:3000]  # the default, on the demo's machine
    assert re.search(r"^rip\s+0x[0-9a-f]+", out, re.M) and re.search(r"^cr3\s+0x", out, re.M)
    assert re.search(r"^0x[0-9a-f]+:\s+0x[0-9a-f]{16}\s+0x[0-9a-f]{16}$", out, re.M), out[-2000:]
    assert len(seen) >= 5 + 3  # rounds went on through the session, not only after it
    # Not even one slow RDTSC sample: the battery's timed blocks were hit and stepped through.
    assert [r for r in seen if r.rdtsc_outliers] == [], summary(seen)


def runs(items: list[str]) -> list[tuple[str, int]]:
    """Consecutive repeats folded: [(item, count)]."""
    out: list[tuple[str, int]] = []
    for item in items:
        if out and out[-1][0] == item:
            out[-1] = (item, out[-1][1] + 1)
        else:
            out.append((item, 1))
    return out
