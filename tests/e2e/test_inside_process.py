"""Inside one process of the whole VM (issue 18), with real GDB and the demo guest's own output as
ground truth: `catch syscall`, `monitor catch exec`, library symbols, `monitor maps`,
`monitor catch module`, and the guest's anti-debugging battery in a caught process.

One guest (1 vCPU, vmigdb's default time mode, as `vmigdb demo`) runs:
- `launcher`, which starts `dynhello`, `antidebug` or `insmod nls_ascii.ko` when the test writes
  1, 2 or 3 into its variable (through GDB, scoped to it);
- `dynhello`, dynamically linked against the guest's Debian libc: it prints its own
  /proc/self/maps, then every second opens /etc/hostname and calls puts();
- `probe`, which opens /proc/self/status every 50 ms: the other process whose system calls must
  never stop GDB while dynhello is in scope.
"""

from __future__ import annotations

import re
import struct
import time
from dataclasses import dataclass

import pytest

from tests.e2e.conftest import Vm, boot
from tests.e2e.mi import Gdb

pytestmark = pytest.mark.e2e

PROGRAMS = "launcher:dynhello:antidebug:insmod+/lib/modules/nls_ascii.ko,dynhello,probe"
LAUNCH_DYNHELLO, LAUNCH_ANTIDEBUG, LAUNCH_INSMOD = 1, 2, 3
ROUND = re.compile(r"^antidebug round=(\d+) detections=(\d+)", re.M)


@dataclass(frozen=True)
class Guest:
    launcher: int
    launch: int  # the address of the launcher's variable
    dynhello: int
    probe: int
    maps: list[str]  # dynhello's /proc/self/maps, as it printed it


@pytest.fixture(scope="module")
def vm(tmp_path_factory, guest_image):
    yield from boot(tmp_path_factory, guest_image, append=f"vmigdb.programs={PROGRAMS}")


@pytest.fixture(scope="module")
def guest(vm: Vm) -> Guest:
    launcher = vm.wait_console(r"launcher pid=(\d+) launch=(0x[0-9a-f]+) commands=3", 60)
    dyn = vm.wait_console(
        r"(?s)dynhello pid=(\d+) maps-begin\r?\n(.*?)dynhello pid=\1 maps-end", 60
    )
    probe = vm.wait_console(r"probe pid=(\d+) period_ms", 60)
    maps = [line.rstrip("\r") for line in re.split(r"\n", dyn.group(2)) if line.strip()]
    return Guest(
        int(launcher.group(1)),
        int(launcher.group(2), 16),
        int(dyn.group(1)),
        int(probe.group(1)),
        maps,
    )


def launch(vm: Vm, guest: Guest, which: int, *then: str, timeout: float = 120) -> str:
    """A GDB session that makes the launcher start program `which`, then runs `then`."""
    return vm.gdb(
        f"monitor process {guest.launcher}",
        f"set {{int}}{guest.launch:#x} = {which}",
        *then,
        timeout=timeout,
    )


def test_monitor_maps_is_the_guests_own(vm: Vm, guest: Guest) -> None:
    out = vm.gdb(f"monitor maps {guest.dynhello}", "detach")
    lines = [line for line in out.splitlines() if re.match(r"^[0-9a-f]{8,}-[0-9a-f]{8,} ", line)]
    assert lines == guest.maps, out
    assert any(line.endswith("/lib/x86_64-linux-gnu/libc.so.6") for line in lines)
    assert any(line.endswith("[vdso]") for line in lines) and any("[heap]" in x for x in lines)


def test_catch_syscall_openat_in_a_scoped_process(vm: Vm, guest: Guest) -> None:
    cycles = 4
    out = vm.gdb(
        f"monitor process {guest.dynhello}",
        "catch syscall openat",
        *["continue", "x/s $rsi", "p $orig_rax", "continue", "p $rax", "p $orig_rax"] * cycles,
        "delete",
        "monitor process all",
        "detach",
        timeout=240,
    )
    entries = re.findall(r"Catchpoint 1 \(call to syscall openat\)", out)
    returns = re.findall(r"Catchpoint 1 \(returned from syscall openat\)", out)
    assert len(entries) == len(returns) == cycles, out[-3000:]
    # At each entry the path is at $rsi, the number in orig_rax; the caller's registers, in user
    # code (libc's open64, named from its dynamic symbols once the libraries are loaded).
    paths = re.findall(r'^0x[0-9a-f]+:\s+"([^"]*)"$', out, re.M)
    assert paths == ["/etc/hostname"] * cycles, out[-3000:]  # never probe's /proc/self/status
    values = [int(v) for v in re.findall(r"^\$\d+ = (-?\d+)$", out, re.M)]
    # per cycle: orig_rax at entry, rax (the fd dynhello itself reports) and orig_rax at return
    fds = {int(f) for f in re.findall(r"dynhello pid=\d+ round=\d+ fd=(\d+)", vm.console())}
    assert fds == {3}
    assert values == [257, 3, 257] * cycles, out[-3000:]
    assert re.search(r"Catchpoint 1 \(call to syscall openat\), 0x00007f[0-9a-f]+ in ", out)


def test_catch_syscall_unscoped_says_which_process(vm: Vm, guest: Guest) -> None:
    out = vm.gdb("catch syscall openat", "continue", "x/s $rsi", "delete", "detach")
    m = re.search(r"vmigdb: system call by process (\d+) \((\w+)\)", out)
    assert m and int(m.group(1)) in (guest.dynhello, guest.probe), out[-2000:]
    path = {"probe": "/proc/self/status", "dynhello": "/etc/hostname"}[m.group(2)]
    assert f'"{path}"' in out, out[-2000:]


def test_break_puts_in_a_scoped_dynamic_program(vm: Vm, guest: Guest) -> None:
    out = vm.gdb(
        f"monitor process {guest.dynhello}",
        "sharedlibrary",
        "info sharedlibrary",
        "x/i puts",
        "break puts",
        "continue",
        "bt 3",
        "delete",
        "monitor process all",
        "detach",
    )
    for name in ("/bin/dynhello@", "/lib/x86_64-linux-gnu/libc.so.6@", "ld-linux-x86-64.so.2@"):
        assert re.search(rf"0x[0-9a-f]+\s+0x[0-9a-f]+\s+Yes \(\*\)\s+target:\S*{name}", out), out
    assert re.search(r"^\s+0x7f[0-9a-f]+ <puts>:", out, re.M), out
    assert re.search(
        r"Breakpoint 1, 0x00007f[0-9a-f]+ in puts \(\) from target:\S+libc\.so\.6@", out
    )
    assert re.search(r"^#1 +0x[0-9a-f]+ in greet \(\) from target:/bin/dynhello@", out, re.M), out
    assert re.search(r"^#2 +0x[0-9a-f]+ in main \(\) from target:/bin/dynhello@", out, re.M), out


def elf_entry(path) -> int:
    return struct.unpack_from("<Q", path.read_bytes(), 24)[0]


def test_catch_exec_stops_before_the_first_instruction(vm: Vm, guest: Guest, guest_image) -> None:
    started = re.compile(r"dynhello pid=(\d+) started")
    before = {int(p) for p in started.findall(vm.console())}
    gdb = Gdb(vm.address)
    try:
        gdb.console_cmd(f"monitor process {guest.launcher}")
        gdb.console_cmd(f"set {{int}}{guest.launch:#x} = {LAUNCH_DYNHELLO}")
        text = gdb.console_cmd("monitor catch exec dynhello")
        assert "the next process that executes 'dynhello'" in text, text
        gdb.cmd("-exec-continue")
        gdb.wait_stopped(60)
        said = "".join(gdb.console)
        m = re.search(
            r"process (\d+) \(dynhello\) executed /bin/dynhello: stopped before its first "
            r"instruction, (0x[0-9a-f]+) \(the dynamic loader's entry\)",
            said,
        )
        assert m, said[-3000:]
        pid, first = int(m.group(1)), int(m.group(2), 16)
        assert gdb.value("$pc") == first
        time.sleep(2)  # held: nothing of the new program has run, so it has printed nothing
        assert {int(p) for p in started.findall(vm.console())} == before
        where = re.search(r"program entry point (0x[0-9a-f]+), loaded at (0x[0-9a-f]+)", said)
        assert where, said[-3000:]
        entry, base = int(where.group(1), 16), int(where.group(2), 16)
        assert entry - base == elf_entry(guest_image.programs / "dynhello")  # a PIE's entry
        info = gdb.console_cmd("monitor info")
        assert f"scope: process {pid} (dynhello)" in info, info
        libraries = gdb.console_cmd("info sharedlibrary")
        assert "ld-linux-x86-64.so.2@" in libraries and "libc.so.6" not in libraries, libraries
        assert "mov" in gdb.console_cmd("x/i $pc")  # the loader's page, before it ever ran
        # libc is not there yet: the breakpoint waits for it, as with a native process (the
        # loader tells vmigdb, vmigdb tells GDB, GDB reads the new list and inserts it).
        gdb.cmd("-break-insert -f puts")
        gdb.cmd("-exec-continue")
        stop = gdb.wait_stopped(60)
        assert stop.get("reason") == "breakpoint-hit", stop
        assert f"dynhello pid={pid} started" in vm.console()  # its first output, then puts
        frames = gdb.console_cmd("bt 2")
        assert re.search(r"#0 .* in puts \(\) from target:\S+libc\.so\.6@", frames), frames
        assert re.search(r"#1 .* in greet \(\)", frames), frames
        gdb.console_cmd("delete")
        gdb.console_cmd("monitor process all")
        gdb.cmd("-target-detach")
    finally:
        gdb.close()


def test_catch_module_before_its_init(vm: Vm, guest: Guest) -> None:
    out = launch(
        vm,
        guest,
        LAUNCH_INSMOD,
        "monitor catch module nls_ascii",
        "continue",
        "info sharedlibrary",
        "info symbol init_nls_ascii",
        "break init_nls_ascii",
        "continue",
        "monitor lsmod",
        "monitor catch module off",
        "delete",
        "detach",
    )
    m = re.search(
        r"module nls_ascii loaded at (0x[0-9a-f]+) \(\d+ bytes\); its init function, at "
        r"(0x[0-9a-f]+), has not run yet",
        out,
    )
    assert m, out[-3000:]
    assert re.search(r"target:/vmigdb/modules/nls_ascii\.ko@" + m.group(1), out), out[-3000:]
    assert "init_nls_ascii in section .init.text" in out, out[-3000:]
    assert re.search(rf"Breakpoint 1, {m.group(2)} in init_nls_ascii \(\)", out), out[-3000:]
    assert re.search(r"^nls_ascii\s+" + m.group(1), out, re.M), out[-3000:]


def antidebug_rounds(vm: Vm, after: int) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in ROUND.findall(vm.console()[after:])]


def test_antidebug_caught_at_exec_stays_clean(vm: Vm, guest: Guest) -> None:
    mark = len(vm.console())
    gdb = Gdb(vm.address)
    try:
        gdb.console_cmd(f"monitor process {guest.launcher}")
        gdb.console_cmd(f"set {{int}}{guest.launch:#x} = {LAUNCH_ANTIDEBUG}")
        gdb.console_cmd("monitor catch exec antidebug")
        gdb.cmd("-exec-continue")
        gdb.wait_stopped(60)
        said = "".join(gdb.console)
        assert "(the program's entry)" in said, said[-2000:]  # static: no loader
        gdb.cmd("-exec-continue")
        vm.wait_for(lambda: len(antidebug_rounds(vm, mark)) >= 3, 90, "3 antidebug rounds")
        gdb.cmd("-exec-interrupt")
        gdb.wait_stopped(30)
        gdb.console_cmd("catch syscall getppid")  # its timed system call
        for _ in range(10):
            gdb.cmd("-exec-continue")
            gdb.wait_stopped(60)
        said = "".join(gdb.console)
        assert said.count("call to syscall getppid") == 5, said[-2000:]
        assert said.count("returned from syscall getppid") == 5, said[-2000:]
        gdb.console_cmd("delete")
        gdb.console_cmd("monitor process all")
        gdb.cmd("-target-detach")
    finally:
        gdb.close()
    after = len(antidebug_rounds(vm, mark))
    vm.wait_for(lambda: len(antidebug_rounds(vm, mark)) >= after + 3, 60, "3 more rounds")
    seen = antidebug_rounds(vm, mark)
    assert seen and all(detections == 0 for _, detections in seen), seen
