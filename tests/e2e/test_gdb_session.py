"""Unmodified GDB 13 debugs the live demo guest (KASLR on) through vmigdb.

Ground truth comes from outside vmigdb: the guest's own console (kallsyms addresses it printed at
boot, the ticker's output) and a second QMP monitor the test adds to QEMU, reading guest-physical
memory with QEMU's own `xp`.
"""

from __future__ import annotations

import itertools
import re
import time

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.e2e.conftest import Vm, boot
from tests.e2e.mi import Gdb

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def vm(tmp_path_factory, guest_image):
    qmp_path = tmp_path_factory.mktemp("qmp") / "test-qmp.sock"
    for machine in boot(
        tmp_path_factory,
        guest_image,
        smp=2,
        append="vmigdb.ksyms=jiffies",
        extra=("--", "-qmp", f"unix:{qmp_path},server=on,wait=off"),
    ):
        machine.qmp_path = qmp_path
        yield machine


def ticker_rounds(vm: Vm) -> int:
    rounds = re.findall(r"ticker pid=\d+ round=(\d+)", vm.console())
    return int(rounds[-1]) if rounds else -1


def wait_ticker_advances(vm: Vm, timeout: float = 30) -> None:
    start = ticker_rounds(vm)
    vm.wait_for(lambda: ticker_rounds(vm) > start, timeout, "the ticker to print again")


def test_connect_shows_two_vcpus_and_their_registers(vm: Vm) -> None:
    out = vm.gdb("info threads", "info registers rip cs eflags cr0 cr3 efer")
    assert re.search(r'Thread 1 "CPU#0"', out), out
    assert re.search(r'Thread 2 "CPU#1"', out), out
    rip = int(re.search(r"^rip\s+(0x[0-9a-f]+)", out, re.M).group(1), 16)
    cs = int(re.search(r"^cs\s+(0x[0-9a-f]+)\s", out, re.M).group(1), 16)
    # An idle guest mostly stops in the kernel; under icount (2 vCPUs' default on QEMU 10) init's
    # programs run longer after boot and the stop may land in one: either way, a Linux CS.
    if rip >= 0xFFFFFFFF80000000:
        assert cs == 0x10, out
    else:
        assert rip < 1 << 47 and cs == 0x33, out
    # IF may be clear: the stop can land in kernel code running with interrupts off.
    eflags = re.search(r"^eflags\s+(0x[0-9a-f]+)\s+\[", out, re.M)
    assert eflags and int(eflags.group(1), 16) & 0x2, out  # bit 1 always reads as 1
    assert re.search(r"^cr0\s+0x[0-9a-f]+\s+\[.*PG.*\]", out, re.M), out
    assert re.search(r"^efer\s+0x[0-9a-f]+\s+\[.*LMA.*\]", out, re.M), out


def test_kernel_memory_matches_qemus_own_physical_read(vm: Vm) -> None:
    banner = vm.ksyms["linux_banner"]
    out = vm.gdb(f"x/s {banner:#x}", f"monitor vtop {banner:#x}", f"x/32xb {banner:#x}")
    release = re.search(r"vmigdb-guest: release (\S+)", vm.console()).group(1)
    assert f"Linux version {release}" in out
    pa = int(re.search(r"-> (0x[0-9a-f]+)", out).group(1), 16)
    ours = [int(b, 16) for b in re.findall(r"\b0x([0-9a-f]{2})\b", out.split("\n", 2)[-1])[-32:]]

    qmp = QEMUMonitorProtocol(str(vm.qmp_path))
    qmp.connect()
    try:
        text = qmp.cmd_raw("human-monitor-command", {"command-line": f"xp /32xb {pa:#x}"})["return"]
    finally:
        qmp.close()
    theirs = [int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})\b", text.split(":", 1)[1])]
    assert ours == theirs
    assert bytes(ours).startswith(b"Linux version")


def test_large_read_in_one_packet_equals_page_by_page(vm: Vm, tmp_path) -> None:
    text = vm.ksyms["_stext"]
    whole, pages = tmp_path / "whole.bin", tmp_path / "pages.bin"
    vm.gdb(
        f"dump binary memory {whole} {text:#x} {text + 0x40000:#x}",
        "monitor phys on",
        "monitor phys off",
    )
    commands = [
        f"append binary memory {pages} {text + i:#x} {text + i + 0x1000:#x}"
        for i in range(0, 0x40000, 0x1000)
    ]
    vm.gdb(f"dump binary memory {pages} {text:#x} {text:#x}", *commands)
    data = whole.read_bytes()
    assert len(data) == 0x40000
    assert data == pages.read_bytes()
    assert data.count(0) < len(data) // 2, "kernel text, not a zero page"


def test_software_and_hardware_breakpoints_stop_where_the_guest_calls(vm: Vm) -> None:
    getpid = vm.ksyms["__x64_sys_getpid"]
    for kind in ("break", "hbreak"):
        out = vm.gdb(
            f"{kind} *{getpid:#x}",
            "continue",
            "info registers rip",
            "continue",
            "info registers rip",
            "delete",
            "detach",
        )
        rips = [int(x, 16) for x in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)]
        assert rips == [getpid, getpid], out
        assert out.count(f"reakpoint 1, {getpid:#018x}") == 2, out
    wait_ticker_advances(vm)


def test_watchpoint_stops_after_the_write_with_old_and_new_values(vm: Vm) -> None:
    jiffies = vm.ksyms["jiffies"]
    out = vm.gdb(
        f"watch *(long *){jiffies:#x}", "continue", "info registers rip", "delete", "detach"
    )
    match = re.search(r"Old value = (\d+)\s+New value = (\d+)", out)
    assert match, out
    assert int(match.group(2)) > int(match.group(1))
    assert re.search(r"[Ww]atchpoint 1: \*\(long \*\)", out), out


def test_stepi_advances_exactly_one_instruction(vm: Vm) -> None:
    """200 steps from the getpid syscall; each lands where decoding the previous one says."""
    getpid = vm.ksyms["__x64_sys_getpid"]
    steps = 200
    out = vm.gdb(
        f"break *{getpid:#x}",
        "continue",
        "delete",
        *[c for _ in range(steps) for c in ("x/2i $pc", "stepi")],
        "x/2i $pc",
        "detach",
        timeout=300,
    )
    # "=> PC <sym>:\tINSN" then "   FALLTHROUGH <sym>:\t...": the second address is PC + length.
    trace = re.findall(r"=> (0x[0-9a-f]+)[^:]*:\s*(.*)\n\s+(0x[0-9a-f]+)", out)
    assert len(trace) == steps + 1, out[-3000:]
    checked = 0
    for (pc_text, insn, fallthrough), (next_text, _, _) in itertools.pairwise(trace):
        pc, nxt, after = int(pc_text, 16), int(next_text, 16), int(fallthrough, 16)
        mnemonic = insn.split()[0] if insn.split() else ""
        if mnemonic.startswith("rep"):
            assert nxt in (pc, after), (pc_text, insn)
        elif mnemonic.startswith(("j", "call", "ret", "syscall", "sysret", "iret", "int", "loop")):
            assert nxt != pc, f"step did not move at {pc_text} {insn}"
        else:
            assert nxt == after, f"{pc_text} {insn} -> {next_text}, expected {fallthrough}"
            checked += 1
    assert checked > steps // 3


def test_interrupt_stops_a_running_guest_and_continue_resumes(vm: Vm) -> None:
    gdb = Gdb(vm.address)
    try:
        for _ in range(3):
            gdb.cmd("-exec-continue")
            time.sleep(0.5)
            gdb.cmd("-exec-interrupt")
            stop = gdb.wait_stopped()
            assert stop.get("reason") == "signal-received", stop
            assert stop.get("signal-name") == "SIGINT", stop
            assert gdb.value("$rip") != 0
    finally:
        gdb.cmd("-target-detach")
        gdb.close()
    wait_ticker_advances(vm)


def test_detach_leaves_guest_running_and_no_breakpoint_held(vm: Vm) -> None:
    getpid = vm.ksyms["__x64_sys_getpid"]
    vm.gdb(
        f"break *{getpid:#x}",
        f"hbreak *{getpid + 1:#x}",
        "watch *(long *)0xffffffff82000000",
        "detach",
    )
    wait_ticker_advances(vm)
    out = vm.gdb("monitor info", "detach")
    assert "breakpoints: 0 requested, 0 held by the hypervisor" in out, out
    wait_ticker_advances(vm)


def test_second_client_is_refused_and_first_is_undisturbed(vm: Vm) -> None:
    first = Gdb(vm.address)
    try:
        rip = first.value("$rip")
        out = vm.gdb("info registers rip", timeout=60)
        assert "the session is held by GDB at 127.0.0.1:" in out, out
        assert first.value("$rip") == rip
        first.console_cmd("stepi")
        assert first.value("$rip") != 0
    finally:
        first.cmd("-target-detach")
        first.close()


def test_gdb_killed_mid_session_leaves_guest_running_and_server_ready(vm: Vm) -> None:
    getpid = vm.ksyms["__x64_sys_getpid"]
    gdb = Gdb(vm.address)
    gdb.cmd(f"-break-insert *{getpid:#x}")
    gdb.cmd("-exec-continue")
    gdb.wait_stopped()
    gdb.cmd("-exec-continue")
    gdb.ctl.gdb_process.kill()  # SIGKILL: no detach, breakpoint still inserted, guest running
    gdb.ctl.gdb_process.wait()
    wait_ticker_advances(vm)
    wait_ticker_advances(vm)
    out = vm.gdb("monitor info", "detach")
    assert "breakpoints: 0 requested, 0 held by the hypervisor" in out, out


def test_dump_memory_writes_guest_memory_on_the_host_at_ram_speed(vm: Vm, tmp_path) -> None:
    text = vm.ksyms["_stext"]
    ours, gdbs = tmp_path / "monitor.bin", tmp_path / "gdb.bin"
    out = vm.gdb(
        f"monitor dump-memory {ours} {text:#x} 0x200000",
        f"dump binary memory {gdbs} {text:#x} {text + 0x200000:#x}",
        "monitor dump-memory /nonexistent-dir/x.bin 0 16",
        "detach",
    )
    assert re.search(rf"wrote 2097152 bytes from {text:#x} to {ours} in [\d.]+ s", out), out
    assert "cannot write /nonexistent-dir/x.bin" in out, out
    assert ours.read_bytes() == gdbs.read_bytes()
