"""`--stealth strict` on a machine whose guest time can betray the debugger (`--time host`).

Under plain TCG, QEMU retranslates guest code after every breakpoint change and step, which
RDTSC-timed guest code sees. Strict refuses breakpoints and steps there. GDB prints the reason
for a refused step; for a refused breakpoint it only says "Cannot insert breakpoint" (it drops
the text of a Z packet's error), so `monitor stealth` lists what was refused and why. Reads,
which the guest cannot see, still work.
"""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import Vm, boot

pytestmark = pytest.mark.e2e

REASON = "host-paced guest time (--time host), which the guest can see"


@pytest.fixture(scope="module")
def vm(tmp_path_factory, guest_image):
    yield from boot(
        tmp_path_factory,
        guest_image,
        append="vmigdb.programs=ticker",
        extra=("--stealth", "strict", "--time", "host"),
    )


def test_strict_refuses_a_breakpoint_with_the_reason(vm: Vm) -> None:
    out = vm.gdb(
        f"break *{vm.ksyms['__x64_sys_getpid']:#x}",
        "continue",
        "monitor stealth",
        "delete",
        "detach",
    )
    assert "Cannot insert breakpoint 1" in out, out
    assert not re.search(r"Breakpoint 1, 0x[0-9a-f]+ in", out), out
    refused = out.split("refused (newest last):")[1]
    assert f"software breakpoint would need {REASON}" in refused, out
    assert "refused by --stealth strict" in refused and "--time icount" in refused, out


def test_strict_refuses_a_step_with_the_reason(vm: Vm) -> None:
    out = vm.gdb("stepi", "info registers rip", "detach")
    assert REASON in out and "refused by --stealth strict" in out, out
    assert re.search(r"^rip\s+0x[0-9a-f]+", out, re.M), out  # still stopped, still readable


def test_monitor_stealth_explains_and_reads_still_work(vm: Vm) -> None:
    banner = vm.ksyms["linux_banner"]
    out = vm.gdb("monitor stealth", f"x/s {banner:#x}", "monitor info", "detach")
    assert "stealth: strict" in out, out
    line = next(ln for ln in out.splitlines() if ln.startswith("  guest time:"))
    assert "host-paced guest time" in line and "VISIBLE to the guest" in line, line
    assert "RDTSC-timed guest code sees as 100-1000x slow" in out, out
    assert "Linux version" in out, out
    assert re.search(r"guest time\s*:?\s+host-paced guest time", out), out
