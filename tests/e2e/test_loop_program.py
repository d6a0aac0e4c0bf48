"""The `loop` test program under GDB: target-side conditions and range stepping.

- `break vmigdb_loop_target if $rdi == N`: vmigdb evaluates GDB's bytecode at every call and reports
  only the Nth; GDB sees one stop.
- `next` over a source line that loops 100,000 times: GDB range-steps (vCont;r), vmigdb runs the loop
  at full speed behind exit breakpoints, and GDB lands on the next line with the loop's effect in
  memory.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.e2e.conftest import Vm, boot
from tests.e2e.mi import Gdb
from tests.e2e.test_gdb_session import wait_ticker_advances

pytestmark = pytest.mark.e2e


LOOP_STARTED = r"loop pid=(\d+) target=0x([0-9a-f]+) line=(\d+)"  # the loop program's first line


def loop_target(vm: Vm, timeout: float = 30) -> int:
    """The address of vmigdb_loop_target, as the loop program printed it when it started."""
    return int(vm.wait_console(LOOP_STARTED, timeout).group(2), 16)


@pytest.fixture(scope="module")
def vm(tmp_path_factory, guest_image):
    yield from boot(tmp_path_factory, guest_image, smp=2, append="vmigdb.programs=ticker,loop")


def test_next_over_a_long_loop_is_one_range_step(vm: Vm, guest_image) -> None:
    started = vm.wait_console(LOOP_STARTED)
    line = int(started.group(3))
    binary = guest_image.programs / "loop"
    out = vm.gdb(
        f"add-symbol-file {binary}",
        f"break loop.c:{line}",
        "continue",
        "delete",
        "info line *$pc",
        "print vmigdb_loop_sink",
        "print vmigdb_loop_count",
        "set debug remote 1",
        "next",
        "set debug remote 0",
        "info line *$pc",
        "print vmigdb_loop_sink",
        "detach",
        timeout=300,
    )
    assert re.search(rf"Breakpoint 1, vmigdb_loop_sum \(\) at .*loop\.c:{line}", out), out[-3000:]
    lines = [int(n) for n in re.findall(r'Line (\d+) of "[^"]*loop\.c"', out)]
    assert lines[0] == line and lines[-1] > line, out[-3000:]
    before, count, after = (int(v) for v in re.findall(r"^\$\d+ = (-?\d+)", out, re.M))
    assert count == 100000
    assert after - before == count * (count - 1) // 2, out[-3000:]  # the whole loop ran
    range_steps = len(re.findall(r"Sending packet: \$vCont;r", out))
    single_steps = len(re.findall(r"Sending packet: \$vCont;s", out))
    assert range_steps >= 1, out[-3000:]
    # One instruction at a time would be ~400,000 steps; a range step leaves only a few.
    assert single_steps < 50, single_steps


def test_conditional_breakpoint_stops_at_the_nth_call_only(vm: Vm, guest_image) -> None:
    """Stop once to learn the call counter, then `if $rdi == now + N`: exactly the Nth call."""
    target = loop_target(vm)
    n = 300
    out = vm.gdb(
        f"add-symbol-file {guest_image.programs / 'loop'}",
        f"break *{target:#x}",
        "continue",
        "print $rdi",
        "delete",
        f"set $want = $rdi + {n}",
        "set debug remote 1",
        # A literal in the condition: GDB cannot compile convenience variables to bytecode.
        f'eval "break *{target:#x} if $rdi == %d", $want',
        "continue",
        "set debug remote 0",
        "print $rdi - $want",
        "print $pc == vmigdb_loop_target",
        "detach",
        timeout=300,
    )
    conditional = re.search(rf"Sending packet: \$Z0,{target:x},1;X", out)
    assert conditional, out[-3000:]
    stops = re.findall(r"Packet received: T05", out[conditional.end() :])
    assert len(stops) == 1, out[-3000:]  # every false hit stayed inside vmigdb
    values = [int(v) for v in re.findall(r"^\$\d+ = (-?\d+)", out, re.M)]
    assert values[1:] == [0, 1], out[-3000:]


@pytest.fixture(scope="module")
def icount_vm(tmp_path_factory, guest_image):
    yield from boot(
        tmp_path_factory,
        guest_image,
        smp=2,
        append="vmigdb.programs=ticker,loop vmigdb.ksyms=jiffies",
        extra=("--time", "icount"),
    )


def test_conditions_are_decided_in_qemu_and_a_step_from_there_is_one_instruction(
    icount_vm: Vm,
) -> None:
    """Under icount vmigdb's TCG plugin decides the condition in QEMU and holds the stop itself,
    before the breakpoint's instruction, on the Nth call exactly; a stepi from that stop executes
    exactly that one instruction (loop's target is `lea 0x1(%rdi),%rax; ret`), with every
    register known after it, flags included."""
    vm = icount_vm
    target = loop_target(vm, 90)
    out = vm.gdb(
        "monitor info",
        f"break *{target:#x}",
        "continue",
        "delete",
        "set $want = $rdi + 500",
        f'eval "break *{target:#x} if $rdi == %d", $want',
        "continue",
        "print $rdi - $want",
        "p/x $pc",
        "x/2i $pc",
        "stepi",
        "p/x $pc",
        "print $rax - $rdi",
        "print $eflags",
        # a breakpoint set at a stop the plugin holds, on a page with no marker yet (ticker
        # calls getpid hot): the page is marked on the way out of that stop
        "delete",
        "break __x64_sys_getpid",
        "continue",
        "x/2i $pc",
        "stepi",
        "p/x $pc",
        "print $eflags",
        "delete",
        "detach",
        timeout=180,
    )
    assert "run control: vmigdb's TCG plugin" in out, out
    # The breakpoint's page runs one instruction per block (a marker beside it), so the step
    # ends at a block's start, where QEMU has written the lazily computed flags.
    assert "unavailable" not in out, out[-2000:]
    assert out.count("Breakpoint 3, ") == 1, out[-2000:]
    values = re.findall(r"^\$\d+ = (\S+)", out, re.M)
    listed = [int(v, 16) for v in re.findall(r"^(?:=> )?\s*(0x[0-9a-f]+)(?: <[^>]*>)?:", out, re.M)]
    assert values[0] == "0" and int(values[1], 16) == target, out[-2000:]
    assert listed[:1] == [target] and int(values[2], 16) == listed[1], out[-2000:]
    assert values[3] == "1", out[-2000:]  # lea 0x1(%rdi),%rax ran once
    assert int(values[5], 16) == listed[3], out[-2000:]  # the second stepi: one instruction too


def test_with_the_plugin_every_stop_stops_both_vcpus_and_detach_leaves_it_nothing(
    icount_vm: Vm,
) -> None:
    """A plain breakpoint is the plugin's too: its hit (held in QEMU) and a ^C (QEMU's gdbstub)
    each stop the whole 2-vCPU machine: the kernel's jiffies, which any vCPU's timer advances,
    stand still for a second, and both vCPUs' registers are there. Detaching with a breakpoint on
    the ticker's hot getpid leaves the plugin nothing that would hold the guest again."""
    vm = icount_vm
    getpid, jiffies = vm.ksyms["__x64_sys_getpid"], vm.ksyms["jiffies"]
    gdb = Gdb(vm.address)

    def machine_stands_still() -> None:
        before = gdb.value(f"*(unsigned long *){jiffies:#x}")
        time.sleep(1.0)
        assert gdb.value(f"*(unsigned long *){jiffies:#x}") == before
        for thread in (1, 2):
            gdb.console_cmd(f"thread {thread}")
            assert gdb.value("$rsp") != 0 and gdb.value("$cr3") != 0

    try:
        gdb.console_cmd("monitor plugin-breakpoints on")
        gdb.console_cmd(f"break *{getpid:#x}")
        gdb.cmd("-exec-continue")
        stop = gdb.wait_stopped()
        assert stop.get("reason") == "breakpoint-hit", stop
        assert gdb.value("$pc") == getpid
        assert "vmigdb's TCG plugin" in gdb.console_cmd("monitor info")
        machine_stands_still()
        gdb.cmd("-exec-continue")  # the breakpoint stays: a second hit is held as well
        assert gdb.wait_stopped().get("reason") == "breakpoint-hit"
        gdb.console_cmd("delete")
        gdb.cmd("-exec-continue")
        time.sleep(0.5)
        gdb.cmd("-exec-interrupt")
        stop = gdb.wait_stopped()
        assert stop.get("signal-name") == "SIGINT", stop
        machine_stands_still()
        gdb.console_cmd(f"break *{getpid:#x}")
        gdb.cmd("-exec-continue")  # detach below from a stop the plugin holds, breakpoint in it
        assert gdb.wait_stopped().get("reason") == "breakpoint-hit"
    finally:
        gdb.cmd("-target-detach")
        gdb.close()
    wait_ticker_advances(vm)
    out = vm.gdb("monitor info", "monitor plugin-breakpoints off", "detach")
    assert "breakpoints: 0 requested, 0 held by the hypervisor" in out, out


def test_at_a_plugin_stop_memory_writes_land_and_register_writes_say_what_to_do(
    icount_vm: Vm, guest_image
) -> None:
    """QEMU's gdbstub cannot be reached while the plugin holds a stop: a memory write goes to the
    guest's RAM file (the plugin flushes QEMU's code at release); a write of rip (which only
    QEMU's gdbstub could make) is refused with what to do (`monitor plugin-breakpoints off`:
    QEMU's gdbstub serves plain breakpoints set from then on)."""
    vm = icount_vm
    target = loop_target(vm, 90)
    out = vm.gdb(
        f"add-symbol-file {guest_image.programs / 'loop'}",
        "monitor plugin-breakpoints on",
        f"break *{target:#x}",
        "continue",
        "set $old = vmigdb_loop_sink",
        "set var vmigdb_loop_sink = 12345",
        "print vmigdb_loop_sink",
        "set var vmigdb_loop_sink = $old",
        "print vmigdb_loop_sink == $old",
        "set var $rip = $rip + 1",
        "monitor snapshot list",
        "monitor dump /nonexistent-dir/guest.elf",
        "delete",
        "monitor plugin-breakpoints off",
        "detach",
        timeout=180,
    )
    values = re.findall(r"^\$\d+ = (\S+)", out, re.M)
    assert values[:2] == ["12345", "1"], out[-3000:]
    assert "monitor plugin-breakpoints off" in out and "cannot write registers" in out, out[-3000:]
    assert "QEMU's gdbstub (conditional" in out, out[-3000:]
    assert "cannot stop the VM for a snapshot" in out, out[-3000:]
    assert "cannot stop the VM for a dump" in out, out[-3000:]


def test_watchpoints_are_the_plugins_and_stop_right_after_the_access(icount_vm: Vm) -> None:
    """Under icount QEMU's own watchpoints can abort QEMU with 2 vCPUs; vmigdb's plugin serves
    them. Set at a stop QEMU's gdbstub holds (attach) and at one the plugin holds (a breakpoint
    hit), each stops right after the instruction that wrote jiffies: one tick later, in the
    kernel's jiffies update."""
    vm = icount_vm
    getpid = vm.ksyms["__x64_sys_getpid"]
    out = vm.gdb(
        "monitor stealth",
        "watch *(unsigned long *)&jiffies",
        "continue",
        "continue",
        "delete",
        "monitor plugin-breakpoints on",
        f"break *{getpid:#x}",
        "continue",
        "watch *(unsigned long *)&jiffies",
        "delete 2",
        "continue",
        "info symbol $pc",
        "delete",
        "monitor plugin-breakpoints off",
        "detach",
        timeout=180,
    )
    assert "watchpoint: vmigdb's TCG plugin" in out, out[-3000:]
    assert out.count("Breakpoint 2, ") == 1, out[-3000:]
    olds = [int(v) for v in re.findall(r"^Old value = (\d+)", out, re.M)]
    news = [int(v) for v in re.findall(r"^New value = (\d+)", out, re.M)]
    assert len(olds) == len(news) == 3, out[-3000:]
    assert all(new == old + 1 for old, new in zip(olds, news, strict=True)), out[-3000:]
    assert re.search(r"tick_do_update_jiffies64 \+ \d+ in section", out), out[-3000:]


def test_at_a_plugin_stop_general_registers_are_written_and_the_instruction_uses_them(
    icount_vm: Vm,
) -> None:
    """A conditional breakpoint's stop is the plugin's: there vmigdb writes the stopped vCPU's
    general registers into QEMU's own state of it (checked against what QEMU reports first), and
    the held instruction runs with them: loop's target is `lea 0x1(%rdi),%rax; ret`, so after
    `set $rdi = 41` one stepi leaves rax at 42. A value written at a step's stop stays through
    the next instruction. rip and eflags are refused there, with what to do; writing a value a
    register already has is accepted (GDB's `G` writes every register)."""
    vm = icount_vm
    target = loop_target(vm, 90)
    out = vm.gdb(
        f"break *{target:#x} if $rdi == 123456",
        "continue",
        "print $rdi",
        "set $rdi = 41",
        "set $rip = $rip",
        "print $rdi",
        "stepi",
        "print $rax",
        "set $rax = 0x5eed",
        "set $r15 = $r15",
        "set $eflags = $eflags ^ 1",
        "set $rip = $rip + 1",
        "print/x $rax",
        "stepi",
        "print/x $rax",
        "delete",
        "detach",
        timeout=180,
    )
    values = re.findall(r"^\$\d+ = (\S+)", out, re.M)
    assert values == ["123456", "41", "42", "0x5eed", "0x5eed"], out[-3000:]
    refused = re.findall(r"writing (\w+) is not possible at this stop", out)
    assert refused == ["eflags", "rip"], out[-3000:]
    assert "general registers" in out, out[-3000:]
