"""The guest comes first: GDB stops the moment the guest kernel starts dying (monitor catch panic),
and a register value no vCPU could hold is refused with the reason, never written."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Vm, boot

pytestmark = pytest.mark.e2e

CRASH_AFTER = 20  # seconds after the guest starts its programs: time for GDB to attach and continue


@pytest.fixture(scope="module")
def dying_vm(tmp_path_factory, guest_image) -> Iterator[Vm]:
    yield from boot(
        tmp_path_factory,
        guest_image,
        smp=2,
        append=f"vmigdb.programs=ticker,crash:{CRASH_AFTER}",
    )


def test_impossible_register_values_are_refused_and_possible_ones_written(dying_vm: Vm) -> None:
    out = dying_vm.gdb(
        "p/x $eflags",
        "set $eflags = 0x56da2246",
        "p/x $eflags",
        "set $cs = 0",
        "p/x $cs",
        "set $saved_rax = $rax",
        "set $rax = 0x1122334455667788",
        "p/x $rax",
        # put it back: the stop may be where the kernel is using rax (once, in the timer
        # interrupt's entry, as its stack pointer: the guest died before the next test could
        # catch its panic)
        "set $rax = $saved_rax",
        "detach",
    )
    assert "refused: eflags 0x56da2246 sets reserved bits (0x56c00000)" in out, out
    assert "refused: cs cannot be the null selector" in out, out
    values = re.findall(r"^\$\d+ = (0x[0-9a-f]+)", out, re.M)
    assert values[0] == values[1], out  # eflags unchanged by the refused write
    assert values[2] != "0x0", out
    assert values[3] == "0x1122334455667788", out  # an ordinary write goes through


def test_gdb_stops_as_the_guest_panics_then_lets_it_go_when_asked(dying_vm: Vm) -> None:
    start = dying_vm.wait_console(r"crash pid=\d+ in=\d+", 120)
    # While GDB holds the stop, the guest has not printed its panic: ask the console from GDB.
    look = (
        f"shell echo panics-printed=$(grep -c 'Kernel panic - not syncing' {dying_vm.console_path})"
    )
    out = dying_vm.gdb("monitor catch", "continue", "p $pc", "bt 1", look, timeout=240)
    assert "panic: on" in out, out
    assert "vmigdb: the guest kernel panics: sysrq triggered crash on CPU#" in out, out
    assert "pid" in out and "(crash)" in out, out
    assert re.search(r"\$1 = \(void \(\*\)\(\)\) 0x[0-9a-f]+ <v?panic", out), out
    assert "panics-printed=0" in out, out
    assert "crash pid" in dying_vm.console()[start.start() :]
    # The user lets it die: the catch is off, and the guest runs on into its own panic.
    out = dying_vm.gdb("monitor catch panic off", "monitor catch", "detach")
    assert "panic: off" in out, out
    dying_vm.wait_console(r"Kernel panic - not syncing: sysrq triggered crash", 60)
    assert dying_vm.proc.poll() is None, "vmigdb must outlive its guest's panic"
