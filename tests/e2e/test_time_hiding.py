"""Time hiding (issue 5, parts 2 and 3), shown by the guest's own clocks, in both time modes.

The guest runs `clockprobe` (vmigdb/images/programs/clockprobe.c): one line a second with every
clock it can read, through phases of guest time (idle 15 s, busy 15 s, hold 12 s, then rdtsc for
good). Each line is stamped with host time as it reaches the console file. One boot per mode of
`vmigdb qemu --time host|icount` (1 vCPU):
- rate: over 15 s idle, then 15 s busy, guest CLOCK_MONOTONIC and CLOCK_REALTIME advance within
  10% of host time; the RTC too, over 8 s of the hold phase (its update interrupts give its edges);
- stop: GDB holds the guest stopped 10 s; the TSC, CLOCK_MONOTONIC, CLOCK_REALTIME,
  CLOCK_MONOTONIC_RAW and the RTC each move less than 50 ms across the stop;
- rdtsc: 50 breakpoint hits on the probe's RDTSC-timed block and 200 stepi through it leave no
  sample over 100x its median. Plain TCG cannot (the TSC follows host time and QEMU retranslates
  after every breakpoint change and step): xfail in host mode, with the figure measured here;
- antidebug (icount): the battery's own RDTSC check stays quiet through 50 hits on its timed
  blocks and 200 stepi through them.
About 2 minutes; host mode's boot (same checks, the RDTSC one an xfail with its figure) is added
by VMIGDB_SLOW=1 (about 1.5 minutes more; `python -m vmigdb.bench.timemodes` measures it too).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass

import pytest

from tests.e2e.conftest import Vm
from tests.e2e.test_antidebug import ROUND, START
from vmigdb.bench.timemodes import (
    ConsoleTail,
    Sample,
    phase_runs,
    probe_spec,
    rates,
    stop_jump,
)

pytestmark = pytest.mark.e2e

MODES = ("host", "icount") if os.environ.get("VMIGDB_SLOW") == "1" else ("icount",)
MAX_JUMP_MS = 50.0
RATE_BAND = (0.9, 1.1)
HITS, STEPS, STEPS_PER_STOP = 50, 200, 20
# Measured on this 2-core machine (python -m vmigdb.bench.timemodes, host loaded 1.2-6).
HOST_RDTSC = (
    "plain TCG: 61 of 436 and 62 of 362 RDTSC samples over 100x their median during 50 hits + "
    "200 steps (the TSC follows host time and QEMU retranslates after each breakpoint change "
    "and step); --time icount: 0"
)


@dataclass
class Probe:
    mode: str
    vm: Vm
    tail: ConsoleTail
    pid: int
    block: int

    def samples(self) -> list[Sample]:
        return self.tail.snapshot()

    def wait(self, predicate, timeout: float, what: str) -> None:
        self.vm.wait_for(predicate, timeout, what)

    def wait_phase_lines(self, phase: str, lines: int, timeout: float) -> None:
        """Until the probe has printed `lines` lines of its (first) `phase` phase."""

        def enough() -> bool:
            runs = [r for p, r in phase_runs(self.samples()) if p == phase]
            return bool(runs) and len(runs[0]) >= lines

        self.wait(enough, timeout, f"{lines} clockprobe lines in phase {phase}")

    def wait_more(self, lines: int, timeout: float = 60) -> None:
        n = len(self.samples())
        self.wait(lambda: len(self.samples()) >= n + lines, timeout, f"{lines} more lines")


@pytest.fixture(scope="module", params=MODES)
def probe(request, tmp_path_factory, guest_image):
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"time-{mode}")
    tail = ConsoleTail(tmp / "console.log")  # stamps lines from the first one on
    programs = f"clockprobe:{probe_spec(15, 15)}" + (",antidebug" if mode == "icount" else "")
    vm = Vm(
        tmp,
        guest_image.kernel,
        guest_image.initrd,
        smp=1,
        append=f"vmigdb.programs={programs}",
        extra=("--time", mode),
    )
    try:
        m = vm.wait_console(r"clockprobe start pid=(\d+) period_ms=\d+ block=0x([0-9a-f]+)", 60)
        yield Probe(mode, vm, tail, int(m.group(1)), int(m.group(2), 16))
    finally:
        vm.stop()
        tail.close()


def test_clocks_follow_host_time_idle_then_busy(probe: Probe) -> None:
    # Phases are guest seconds: 15 idle + 15 busy + 8 hold, ~40 s at the right rate.
    probe.wait_phase_lines("hold", 9, 150)
    runs = phase_runs(probe.samples())
    assert [p for p, _ in runs[:3]] == ["idle", "busy", "hold"], [p for p, _ in runs]
    idle = rates(runs[0][1][1:])  # the first line comes with the probe's own start-up
    busy = rates(runs[1][1])
    hold = rates(runs[2][1][1:])
    print(
        f"\n--time {probe.mode}: guest seconds per host second: "
        f"idle monotonic {idle['mono']:.3f} realtime {idle['real']:.3f}; "
        f"busy monotonic {busy['mono']:.3f} realtime {busy['real']:.3f} "
        f"(loop {busy['loop']:.0f} chunks/s); "
        f"hold monotonic {hold['mono']:.3f} RTC {hold.get('rtc', float('nan')):.3f}"
    )
    low, high = RATE_BAND
    for phase, r in (("idle", idle), ("busy", busy), ("hold", hold)):
        for clock in ("mono", "real"):
            assert low <= r[clock] <= high, (phase, clock, r)
    assert "rtc" in hold, "no RTC update interrupts in the hold phase"
    assert low <= hold["rtc"] <= high, hold


def test_a_10s_stop_moves_no_guest_clock(probe: Probe) -> None:
    probe.wait_phase_lines("hold", 9, 150)  # stop in the hold phase: the RTC's edges are known
    started = time.monotonic()
    out = probe.vm.gdb("info registers rip", "shell sleep 10", "detach")
    ended = time.monotonic()
    assert "rip" in out and "detached]" in out, out
    probe.wait_more(3)
    jump = stop_jump(probe.samples(), started, ended)
    print(
        f"\n--time {probe.mode}: GDB held the guest {jump['host_gap'] / 1000:.1f} s (host); guest "
        "clocks jumped " + ", ".join(f"{k} {v:+.1f} ms" for k, v in jump.items() if k != "host_gap")
    )
    assert jump["host_gap"] >= 10_000, jump
    assert "rtc" in jump, "the RTC's edges around the stop were not seen"
    for clock in ("tsc", "mono", "real", "raw", "rtc"):
        assert abs(jump[clock]) < MAX_JUMP_MS, (clock, jump)


def rdtsc_session_commands(pid: int, blocks: list[int], hits: int, steps: int, per_stop: int):
    """GDB commands: `hits` breakpoint hits on the blocks, then stepi `steps` times from the first
    block's entry, `per_stop` at a time; everything scoped to process `pid`."""
    cmds = [f"monitor process {pid}", *(f"break *{b:#x}" for b in blocks)]
    cmds += ["continue"] * hits + ["delete"]
    for _ in range(steps // per_stop):
        cmds += [f"break *{blocks[0]:#x}", "continue", "delete", *["stepi"] * per_stop]
    return cmds + ["monitor process all", "detach"]


def test_breakpoints_and_steps_leave_no_rdtsc_outlier(probe: Probe, request) -> None:
    if probe.mode == "host":
        request.applymarker(pytest.mark.xfail(reason=HOST_RDTSC, strict=False))
    probe.wait_phase_lines("rdtsc", 2, 150)
    before = probe.samples()[-1]
    cmds = rdtsc_session_commands(probe.pid, [probe.block], HITS, STEPS, STEPS_PER_STOP)
    started = time.monotonic()
    out = probe.vm.gdb(*cmds, timeout=300)
    elapsed = time.monotonic() - started
    hits = re.findall(rf"Breakpoint \d+, {probe.block:#018x} in \?\? \(\)", out)
    assert len(hits) == HITS + STEPS // STEPS_PER_STOP, out[-3000:]
    probe.wait_more(2)
    after = probe.samples()[-1]
    outliers, samples = after.outliers - before.outliers, after.samples - before.samples
    print(
        f"\n--time {probe.mode}: {outliers} of {samples} RDTSC samples over 100x their median "
        f"during {HITS} hits + {STEPS} stepi ({elapsed:.1f} s) and 2 s after"
    )
    assert samples > HITS
    assert outliers == 0


def block_addresses(binary) -> list[int]:
    """antidebug's rdtsc_block0..2 (local symbols of its unstripped host copy)."""
    out = subprocess.run(["nm", str(binary)], capture_output=True, text=True, check=True).stdout
    found = {
        m.group(2): int(m.group(1), 16)
        for m in re.finditer(r"^([0-9a-f]+) \w (rdtsc_block\d)$", out, re.M)
    }
    assert sorted(found) == ["rdtsc_block0", "rdtsc_block1", "rdtsc_block2"], out[-2000:]
    return [found[k] for k in sorted(found)]


def antidebug_rounds(text: str) -> list[tuple[int, int, str, int]]:
    """(round, detections, names, rdtsc_outliers) of each round line."""
    return [
        (int(m.group(1)), int(m.group(2)), m.group(3) or "", int(m.group(4)))
        for m in ROUND.finditer(text)
    ]


def test_antidebug_rdtsc_check_stays_quiet_under_a_session(probe: Probe, guest_image) -> None:
    if probe.mode != "icount":
        pytest.skip("the rdtsc check is meant to stay quiet in --time icount (host: see above)")
    assert guest_image.programs is not None
    blocks = block_addresses(guest_image.programs / "antidebug")
    m = probe.vm.wait_console(START.pattern, 60)
    probe.wait(lambda: len(antidebug_rounds(probe.vm.console())) >= 2, 60, "antidebug rounds")
    mark = len(probe.vm.console())
    started = time.monotonic()
    cmds = rdtsc_session_commands(int(m.group(1)), blocks, HITS, STEPS, STEPS)
    out = probe.vm.gdb(*cmds, timeout=300)
    elapsed = time.monotonic() - started
    assert len(re.findall(r"Breakpoint \d+, 0x[0-9a-f]+ in ", out)) == HITS + 1, out[-3000:]
    during = antidebug_rounds(probe.vm.console()[mark:])
    probe.wait(
        lambda: len(antidebug_rounds(probe.vm.console()[mark:])) >= len(during) + 3,
        30,
        "3 antidebug rounds after the session",
    )
    seen = antidebug_rounds(probe.vm.console()[mark:])
    print(
        f"\n--time {probe.mode}: antidebug, {HITS} hits on its 3 timed blocks + {STEPS} stepi "
        f"({elapsed:.1f} s): {len(seen)} rounds, rdtsc outliers "
        f"{sum(r[3] for r in seen)}, detections "
        f"{[f'round {r[0]}: {r[2]}' for r in seen if r[1]] or 'none'}"
    )
    assert len(seen) >= 10, seen
    assert all(r[3] == 0 and "rdtsc" not in r[2] for r in seen), seen
