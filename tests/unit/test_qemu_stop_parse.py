"""parse_stop: QEMU's stop replies turned into DriverStops (a pure function), and the capabilities."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmigdb.hv.base import BreakpointType, DriverStop
from vmigdb.hv.qemu.driver import kvm_capabilities, parse_stop, tcg_capabilities

WW, RW, AW = BreakpointType.WRITE_WATCH, BreakpointType.READ_WATCH, BreakpointType.ACCESS_WATCH

STOPS = [
    (b"T05thread:01;", DriverStop(cpu=1, signal=5)),
    (b"T05thread:1;", DriverStop(cpu=1, signal=5)),
    (b"T02thread:02;", DriverStop(cpu=2, signal=2)),
    (b"T05thread:0a;", DriverStop(cpu=10, signal=5)),
    (b"T05thread:p1.03;", DriverStop(cpu=3, signal=5)),
    (b"T05swbreak:;thread:01;", DriverStop(cpu=1, signal=5)),
    (b"T05thread:01;hwbreak:;", DriverStop(cpu=1, signal=5)),
    (b"T0Bthread:01;", DriverStop(cpu=1, signal=11)),
    (b"T05", DriverStop(cpu=None, signal=5)),
    (b"S05", DriverStop(cpu=None, signal=5)),
    (b"S02", DriverStop(cpu=None, signal=2)),
    # QEMU 7.2 puts the watch key after the thread
    (
        b"T05thread:01;watch:ffffffff81000040;",
        DriverStop(cpu=1, signal=5, watch=(WW, 0xFFFF_FFFF_8100_0040)),
    ),
    (b"T05thread:02;rwatch:1000;", DriverStop(cpu=2, signal=5, watch=(RW, 0x1000))),
    (b"T05thread:02;awatch:0;", DriverStop(cpu=2, signal=5, watch=(AW, 0))),
    (b"T05watch:10;thread:03;", DriverStop(cpu=3, signal=5, watch=(WW, 0x10))),
    (b"T05thread:01;06:0000000000000000;07:10;10:20;", DriverStop(cpu=1, signal=5)),
    (b"T05thread:01;core:0;", DriverStop(cpu=1, signal=5)),
    # exits
    (b"W00", DriverStop(cpu=None, signal=0, exited=0)),
    (b"W01", DriverStop(cpu=None, signal=0, exited=1)),
    (b"W00;process:1", DriverStop(cpu=None, signal=0, exited=0)),
    (b"X09", DriverStop(cpu=None, signal=9, exited=9)),
    (b"X0f", DriverStop(cpu=None, signal=15, exited=15)),
    (b"W", DriverStop(cpu=None, signal=0, exited=0)),  # no code: 0
    (b"Wzz", DriverStop(cpu=None, signal=0, exited=0)),
]


@pytest.mark.parametrize(("packet", "stop"), STOPS)
def test_parse_stop(packet: bytes, stop: DriverStop) -> None:
    assert parse_stop(packet) == stop


@pytest.mark.parametrize(
    "packet",
    [b"", b"OK", b"E01", b"O48656c6c6f0a", b"T", b"T5", b"Tzz", b"S", b"Sxx", b"QC1", b"l", b"m1"],
)
def test_not_a_stop_reply(packet: bytes) -> None:
    assert parse_stop(packet) is None


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    st.integers(0, 255),
    st.integers(1, 0xFFFF),
    st.sampled_from([(b"watch", WW), (b"rwatch", RW), (b"awatch", AW), None]),
    st.integers(0, (1 << 64) - 1),
    st.booleans(),
)
def test_parse_stop_round_trip(
    signal: int,
    cpu: int,
    watch: tuple[bytes, BreakpointType] | None,
    addr: int,
    watch_first: bool,
) -> None:
    fields = [b"thread:%02x;" % cpu]
    if watch is not None:
        fields.insert(0 if watch_first else 1, b"%s:%x;" % (watch[0], addr))
    stop = parse_stop(b"T%02x" % signal + b"".join(fields))
    assert stop == DriverStop(
        cpu=cpu, signal=signal, watch=None if watch is None else (watch[1], addr)
    )


def test_tcg_capabilities_are_invisible_and_unlimited() -> None:
    caps = tcg_capabilities("icount")
    for job, mechanism in caps.all():
        if job == "memory write":
            assert mechanism.guest_visible  # the guest sees what you write, as asked
        else:
            assert not mechanism.guest_visible, job
        assert mechanism.limit is None
    assert caps.sw_breakpoint is not None and caps.hw_breakpoint is not None
    assert caps.watchpoint is not None and caps.single_step is not None


def test_kvm_capabilities_share_four_debug_registers() -> None:
    caps = kvm_capabilities()
    assert caps.sw_breakpoint == caps.hw_breakpoint == caps.watchpoint
    assert caps.hw_breakpoint is not None and caps.hw_breakpoint.limit == 4
    assert not caps.hw_breakpoint.guest_visible
    assert caps.single_step is not None and caps.single_step.guest_visible
    jobs = dict(caps.all())
    assert set(jobs) == {
        "registers",
        "memory read",
        "memory write",
        "software breakpoint",
        "hardware breakpoint",
        "watchpoint",
        "single-step",
        "software breakpoint (fallback)",  # 0xCC in guest RAM: visible, policy-gated
        "kvm-tsc",  # the TSC runs on while the VM is stopped: visible
    }
    assert jobs["software breakpoint (fallback)"].guest_visible
    assert jobs["kvm-tsc"].guest_visible
