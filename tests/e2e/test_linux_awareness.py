"""Zero-configuration Linux awareness with KASLR on: kernel symbols in GDB with no command typed,
the guest's processes, process-scoped memory and breakpoints.

Ground truth is what the guest itself prints: kallsyms addresses, the pids its programs report, the
bytes the ticker put in its buffer.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from tests.e2e.conftest import Vm, boot

pytestmark = pytest.mark.e2e

PROGRAMS = "ticker,spin:1111,spin:2222,spin:3333:15"


SECOND_KERNEL = "linux-image-6.12-cloud-amd64"  # a different kernel line than the demo guest's
slow_second_kernel = pytest.mark.skipif(
    not os.environ.get("VMIGDB_SLOW"), reason="second kernel: opt-in with VMIGDB_SLOW=1"
)


@pytest.fixture(
    scope="module",
    params=["demo", pytest.param(SECOND_KERNEL, marks=[pytest.mark.slow, slow_second_kernel])],
)
def vm(request, tmp_path_factory, guest_image):
    """The demo guest, and (opt-in) the same scenarios on a second kernel version."""
    image = guest_image
    if request.param != "demo":
        from vmigdb.images.build import build_guest

        image = build_guest(kernel_package=request.param)
    yield from boot(tmp_path_factory, image, smp=2, append=f"vmigdb.programs={PROGRAMS}")


def started(vm: Vm, spec: str) -> int:
    return int(vm.wait_console(rf"vmigdb-guest: started {re.escape(spec)} pid=(\d+)").group(1))


def spin_count(vm: Vm, pid: int) -> int:
    counts = re.findall(rf"spin pid={pid} value=\d+ addr=0x[0-9a-f]+ count=(\d+)", vm.console())
    return int(counts[-1]) if counts else -1


def test_scoped_process_exit_is_a_stop_with_a_message(vm: Vm) -> None:
    """Runs first: spin 3333 lives 15 s after it starts."""
    pid = started(vm, "spin:3333:15")
    out = vm.gdb(f"monitor process {pid}", "continue", "monitor ps", "detach", timeout=120)
    assert f"scope: process {pid} (spin)" in out, out
    assert f"vmigdb: process {pid} (spin) is exiting; the scope is the whole machine again" in out
    assert "*" not in out.split("COMM", 1)[1], out  # no process marked as the scope any more
    vm.wait_console(rf"spin pid={pid} exiting")


def test_kernel_symbols_with_no_command_typed(vm: Vm) -> None:
    started_at = time.monotonic()
    out = vm.gdb("info symbol $pc", f"info symbol {vm.ksyms['default_idle'] + 11:#x}")
    elapsed = time.monotonic() - started_at
    assert "Reading symbols from target:/vmigdb/vmlinux-" in out, out
    assert re.search(r"^\w+ \+ \d+ in section \.text$", out, re.M), out
    assert "default_idle + 11 in section .text" in out, out
    print(f"connect + symbols + two lookups: {elapsed:.2f} s")


def test_break_on_a_kernel_function_by_name(vm: Vm) -> None:
    out = vm.gdb(
        "break __x64_sys_getpid", "continue", "bt 3", "info registers rip", "delete", "detach"
    )
    assert f"Breakpoint 1 at {vm.ksyms['__x64_sys_getpid']:#x}" in out, out
    assert re.search(r"Breakpoint 1, 0x[0-9a-f]+ in __x64_sys_getpid \(\)", out), out
    assert re.search(r"#1\s+0x[0-9a-f]+ in do_syscall_64 \(\)", out), out


def test_monitor_ps_lists_init_and_the_programs_with_their_pids(vm: Vm) -> None:
    ticker, spin1, spin2 = started(vm, "ticker"), started(vm, "spin:1111"), started(vm, "spin:2222")
    out = vm.gdb("monitor ps", "detach")
    rows = {
        int(m.group(1)): (int(m.group(2)), m.group(3), m.group(4))
        for m in re.finditer(r"^\s*(\d+)\s+(\d+)\s+(\S+)\s+(0x[0-9a-f]+|-)\s", out, re.M)
    }
    assert re.search(r"^\s*PID\s+PPID\s+COMM\s+CR3", out, re.M), out
    assert rows[1][1] == "init" and rows[1][2].startswith("0x"), rows.get(1)
    assert rows[2][1] == "kthreadd" and rows[2][2] == "-"  # a kernel thread: no address space
    assert rows[ticker][:2] == (1, "ticker")
    assert rows[spin1][:2] == (1, "spin") and rows[spin2][:2] == (1, "spin")
    assert rows[spin1][2] != rows[spin2][2]  # two address spaces


def test_breakpoint_scoped_to_one_copy_stops_only_there(vm: Vm) -> None:
    spin1, spin2 = started(vm, "spin:1111"), started(vm, "spin:2222")
    addr = int(vm.wait_console(rf"spin pid={spin1} value=1111 addr=0x([0-9a-f]+)").group(1), 16)
    other_before = spin_count(vm, spin2)
    out = vm.gdb(
        f"monitor process {spin1}",
        f"break *{addr:#x}",
        *[c for _ in range(5) for c in ("continue", "print $rdi")],
        "delete",
        "monitor process all",
        "detach",
        timeout=180,
    )
    values = re.findall(r"^\$\d+ = (\d+)", out, re.M)
    assert values == ["1111"] * 5, out[-2000:]
    vm.wait_for(lambda: spin_count(vm, spin2) > other_before, 30, "the other copy to keep printing")


def test_process_scoped_read_of_a_user_buffer(vm: Vm) -> None:
    ticker = started(vm, "ticker")
    match = vm.wait_console(rf"ticker pid={ticker} buf=0x([0-9a-f]+) value=([0-9a-f]+)")
    buf, value = int(match.group(1), 16), match.group(2)
    out = vm.gdb("monitor process ticker", f"x/16xb {buf:#x}", "monitor process kernel", "detach")
    data = "".join(b[2:] for b in re.findall(r"0x[0-9a-f]{2}\b", out.split(f"{buf:#x}", 1)[1]))
    assert data[:32] == value, out


def test_unknown_process_and_symbol_are_named_in_the_error(vm: Vm) -> None:
    out = vm.gdb(
        "monitor process nosuchprocess",
        "monitor process 99999",
        "monitor sym no_such_sym",
        "monitor sym __x64_sys_getpid",
        "detach",
    )
    assert "no process named 'nosuchprocess'" in out, out
    assert "no process with pid 99999" in out, out
    assert "no kernel symbol named 'no_such_sym'" in out, out
    assert f"__x64_sys_getpid {vm.ksyms['__x64_sys_getpid']:#x}" in out, out
