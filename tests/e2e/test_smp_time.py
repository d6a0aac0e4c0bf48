"""Hidden guest time on a 2-vCPU guest (issue 16): `vmigdb qemu --smp 2 --time icount` on QEMU 10
(what `auto` picks there), and the guest cannot tell a debugger from its clocks.

One boot of the demo guest with 2 vCPUs, running `clockprobe` (short idle and busy phases) and the
`antidebug` battery side by side:
- the guest's CLOCK_MONOTONIC and CLOCK_REALTIME advance within 10% of host time, idle and busy
  (measured first: no debugger has stopped the guest yet);
- vmigdb runs icount as asked; `monitor info` counts 2 vCPUs, both brought up
  (paging on in both), and neither it nor `monitor stealth` warns;
- 20 breakpoint hits on antidebug's RDTSC-timed blocks and 20 stepi through them (scoped to its
  process) leave every battery round clean: 0 detections, 0 RDTSC outliers, with the other vCPU
  busy (the `loop` program, parked until then, runs its rounds). Under icount the vCPUs take
  turns on one QEMU thread: anything vmigdb did that ended the stopped vCPU's turn early would
  hand the other vCPU's whole turn to the timed block it interrupts.
About a minute (QEMU 10 boots the 2-vCPU guest under icount in ~15 s here).

With VMIGDB_SLOW=1 (90 s more): a 2-vCPU guest booted with `maxcpus=1`, whose CPU#1 the kernel
never starts, is noted in `monitor info` at once (paging off: not brought up yet), and after 60 s
of running warned about in `monitor info` and `monitor stealth`, naming `--time host`.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest

from tests.e2e.conftest import Vm, boot, unpark_loop
from tests.e2e.test_antidebug import START, clean_session, summary
from tests.e2e.test_time_hiding import RATE_BAND, block_addresses, rdtsc_session_commands
from vmigdb.bench.timemodes import ConsoleTail, phase_runs, probe_spec, rates
from vmigdb.hv.qemu.driver import BRING_UP_GRACE_S
from vmigdb.hv.qemu.version import icount_boots_smp, qemu_version

pytestmark = pytest.mark.e2e

IDLE_S, BUSY_S = 6, 6  # guest seconds of clockprobe's phases
HITS, STEPS = 20, 20

if not icount_boots_smp(qemu_version(shutil.which("qemu-system-x86_64") or "")):
    pytest.skip("icount boots SMP guests on QEMU 10 only", allow_module_level=True)


@pytest.fixture(scope="module")
def machine(tmp_path_factory, guest_image):
    tmp = tmp_path_factory.mktemp("smp-time")
    tail = ConsoleTail(tmp / "console.log")  # stamps lines from the first one on
    programs = f"clockprobe:{probe_spec(IDLE_S, BUSY_S)},antidebug,loop:park"
    vm = Vm(
        tmp,
        guest_image.kernel,
        guest_image.initrd,
        smp=2,
        append=f"vmigdb.programs={programs}",
        extra=("--time", "icount"),
    )
    try:
        yield vm, tail
    finally:
        vm.stop()
        tail.close()


def test_guest_clocks_follow_host_time(machine) -> None:
    vm, tail = machine

    def busy_done() -> bool:
        return [p for p, _ in phase_runs(tail.snapshot())][:3] == ["idle", "busy", "hold"]

    vm.wait_for(busy_done, 60 + 3 * (IDLE_S + BUSY_S), "clockprobe's idle and busy phases")
    runs = phase_runs(tail.snapshot())
    idle, busy = rates(runs[0][1][1:]), rates(runs[1][1])  # idle's first line: start-up
    print(
        f"\n2 vCPUs, --time icount: guest seconds per host second: idle monotonic "
        f"{idle['mono']:.3f} realtime {idle['real']:.3f}; busy monotonic {busy['mono']:.3f} "
        f"realtime {busy['real']:.3f} (loop {busy['loop']:.0f} chunks/s)"
    )
    low, high = RATE_BAND
    for phase, r in (("idle", idle), ("busy", busy)):
        for clock in ("mono", "real"):
            assert low <= r[clock] <= high, (phase, clock, r)


def test_icount_on_two_vcpus_and_both_came_up(machine) -> None:
    vm, _ = machine
    assert "guest time: icount (as asked)" in vm.stderr(), vm.stderr()[-2000:]
    out = vm.gdb("monitor info", "monitor stealth", "detach")
    assert re.search(r"^vcpus: 2$", out, re.M), out  # no vCPU left with paging off
    assert "guest time: instruction-counted guest time" in out, out
    gdbs_own = "warning: File transfers from remote targets can be slow"
    warnings = [w for w in re.findall(r"^warning: .*", out, re.M) if not w.startswith(gdbs_own)]
    assert warnings == [] and "paging off" not in out, out


def test_breakpoints_and_steps_leave_antidebug_clean(machine, guest_image) -> None:
    vm, _ = machine
    pid = int(vm.wait_console(START.pattern, 60).group(1))
    vm.wait_console(r"antidebug calibrated ", 60)
    blocks = block_addresses(guest_image.programs / "antidebug")
    unpark_loop(vm, guest_image.programs)
    out, seen = clean_session(vm, *rdtsc_session_commands(pid, blocks, HITS, STEPS, STEPS))
    assert len(re.findall(r"Breakpoint \d+, 0x[0-9a-f]+ in ", out)) == HITS + 1, out[-3000:]
    assert len(seen) >= 6, summary(seen)
    assert [r for r in seen if r.rdtsc_outliers] == [], summary(seen)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VMIGDB_SLOW") != "1", reason="set VMIGDB_SLOW=1")
def test_a_vcpu_the_guest_never_started_is_told_then_warned_about(
    tmp_path_factory, guest_image
) -> None:
    for vm in boot(
        tmp_path_factory, guest_image, smp=2, append="maxcpus=1", extra=("--time", "icount")
    ):
        started = time.monotonic()
        out = vm.gdb("monitor info", "detach")
        assert "vcpus: 2 (CPU#1 with paging off (CR0.PG clear): not brought up yet)" in out, out
        time.sleep(max(0.0, BRING_UP_GRACE_S + 5 - (time.monotonic() - started)))
        out = vm.gdb("monitor info", "monitor stealth", "detach")
        warning = r"^warning: CPU#1 still with paging off \(CR0.PG clear\) after \d+ s of running"
        assert len(re.findall(warning, out, re.M)) == 2, out  # monitor info and monitor stealth
        assert "restart with --time host" in out, out
        assert "vcpus: 2 (CPU#1 never turned paging on (CR0.PG clear)" in out, out


def test_stepi_returns_on_each_vcpu_even_from_hlt(machine) -> None:
    """Under icount with 2 vCPUs a step of a vCPU sleeping in HLT once never returned (QEMU's clock
    stood still during a step with timers masked): such a step now runs with timers on."""
    vm, _ = machine
    where = "info symbol $pc"
    out = vm.gdb("thread 1", where, "stepi", where, "thread 2", where, "stepi", where, timeout=90)
    assert out.count("Switching to thread") == 2, out
    assert "Remote connection closed" not in out and "Cannot" not in out, out
    print("\nstepi from: " + ", ".join(re.findall(r"^(\w+) \+ \d+ in section", out, re.M)))
