"""BreakpointTable: eager insertion, lazy removal, the change counter, slot limits, at()."""

from __future__ import annotations

import dataclasses

import pytest

from tests.unit.fakes import HW_SLOTS, KERNEL_VA, FakeDriver, bp_key
from vmigdb.debugger.breakpoints import (
    Breakpoint,
    BreakpointLimitError,
    BreakpointTable,
    UnsupportedBreakpoint,
)
from vmigdb.debugger.policy import StealthMode, StealthPolicy, StealthRefused
from vmigdb.hv.base import BreakpointType, DriverError
from vmigdb.hv.qemu.driver import kvm_capabilities, tcg_capabilities

SW, HW = BreakpointType.SOFTWARE, BreakpointType.HARDWARE
WW, RW, AW = BreakpointType.WRITE_WATCH, BreakpointType.READ_WATCH, BreakpointType.ACCESS_WATCH


def bp(type: BreakpointType, offset: int = 0, kind: int = 1) -> Breakpoint:
    return Breakpoint(type, KERNEL_VA + offset, kind)


def table(*, kvm: bool = False, strict: bool = False) -> tuple[FakeDriver, BreakpointTable]:
    fake = FakeDriver(2, kvm=kvm, ram_size=4 << 20)
    mode = StealthMode.STRICT if strict else StealthMode.DEFAULT
    return fake, BreakpointTable(fake, StealthPolicy(mode, fake.capabilities))


def test_breakpoint_key() -> None:
    assert bp(HW, 0x10, 1).key == (1, KERNEL_VA + 0x10, 1)
    assert bp(SW).key != bp(HW).key  # same address, different type: two entries
    assert bp(SW, kind=1).key != bp(SW, kind=2).key


def test_insert_is_eager() -> None:
    fake, bps = table()
    bps.add(bp(SW))
    assert fake.bp_calls == [("insert", SW, KERNEL_VA, 1)]
    assert bp(SW).key in bps.desired and bp(SW).key in bps.installed
    assert fake.installed == {bp_key(SW, KERNEL_VA, 1)}
    assert bps.changes == 1


@pytest.mark.parametrize("type_", list(BreakpointType))
def test_every_type_reaches_the_driver(type_: BreakpointType) -> None:
    fake, bps = table()
    bps.add(Breakpoint(type_, KERNEL_VA, 8))
    assert fake.bp_calls == [("insert", type_, KERNEL_VA, 8)]


def test_add_is_idempotent() -> None:
    fake, bps = table()
    bps.add(bp(SW))
    bps.add(bp(SW))
    assert len(fake.bp_calls) == 1
    assert bps.changes == 1


def test_removal_is_lazy() -> None:
    fake, bps = table()
    bps.add(bp(SW))
    bps.remove(bp(SW))
    assert fake.bp_calls == [("insert", SW, KERNEL_VA, 1)]  # nothing yet
    assert bp(SW).key not in bps.desired
    assert bp(SW).key in bps.installed
    assert bps.changes == 1
    assert bps.sync() is True
    assert fake.bp_calls[-1] == ("remove", SW, KERNEL_VA, 1)
    assert bps.installed == {} and fake.installed == set()
    assert bps.changes == 2
    assert bps.sync() is False
    assert len(fake.bp_calls) == 2 and bps.changes == 2


def test_remove_then_add_again_costs_nothing() -> None:
    fake, bps = table()
    bps.add(bp(SW))
    bps.add(bp(HW, 0x40))
    for _ in range(5):  # GDB's churn at every stop
        bps.remove(bp(SW))
        bps.remove(bp(HW, 0x40))
        bps.add(bp(SW))
        bps.add(bp(HW, 0x40))
        assert bps.sync() is False
    assert len(fake.bp_calls) == 2
    assert bps.changes == 2


def test_remove_unknown_is_a_no_op() -> None:
    fake, bps = table()
    bps.remove(bp(SW))
    bps.remove(bp(WW, kind=4))
    assert bps.sync() is False
    assert fake.bp_calls == [] and bps.changes == 0


def test_sync_removes_only_what_is_no_longer_wanted() -> None:
    fake, bps = table()
    for i in range(4):
        bps.add(bp(SW, i))
    bps.remove(bp(SW, 1))
    bps.remove(bp(SW, 3))
    bps.sync()
    removed = [call for call in fake.bp_calls if call[0] == "remove"]
    assert sorted(c[2] - KERNEL_VA for c in removed) == [1, 3]
    assert fake.installed == {bp_key(SW, KERNEL_VA + i, 1) for i in (0, 2)}
    assert set(bps.installed) == set(bps.desired)


def test_clear_forgets_everything_and_sync_removes_it() -> None:
    fake, bps = table()
    bps.add(bp(SW))
    bps.add(bp(WW, 0x100, 8))
    bps.clear()
    assert bps.desired == {}
    assert len(fake.installed) == 2  # still held until the guest is about to run
    bps.sync()
    assert fake.installed == set() and bps.installed == {}


def test_at_lists_execution_breakpoints_only() -> None:
    _, bps = table()
    bps.add(bp(SW))
    bps.add(bp(HW))
    bps.add(bp(WW, 0, 8))
    bps.add(bp(AW, 0, 1))
    bps.add(bp(SW, 0x10))
    assert {b.type for b in bps.at(KERNEL_VA)} == {SW, HW}
    assert [b.addr for b in bps.at(KERNEL_VA + 0x10)] == [KERNEL_VA + 0x10]
    assert bps.at(KERNEL_VA + 1) == []


def test_at_ignores_removed_but_still_installed() -> None:
    _, bps = table()
    bps.add(bp(SW))
    bps.remove(bp(SW))
    assert bps.at(KERNEL_VA) == []  # GDB no longer wants it: not a breakpoint stop


def test_mechanisms_under_tcg_and_kvm() -> None:
    _, tcg = table()
    caps = tcg_capabilities("icount")
    assert tcg.mechanism(SW) == caps.sw_breakpoint
    assert tcg.mechanism(HW) == caps.hw_breakpoint
    assert tcg.mechanism(WW) == tcg.mechanism(RW) == tcg.mechanism(AW) == caps.watchpoint
    _, kvm = table(kvm=True)
    slots = kvm_capabilities().hw_breakpoint
    assert slots is not None and slots.limit == HW_SLOTS
    assert {kvm.mechanism(t) for t in BreakpointType} == {slots}


def test_tcg_has_no_limit() -> None:
    fake, bps = table()
    for i in range(100):
        bps.add(bp(HW, i))
        bps.add(bp(WW, 0x1000 + i * 8, 8))
    assert len(fake.installed) == 200


@pytest.mark.parametrize(
    "first_four",
    [
        [bp(HW, i) for i in range(4)],
        [bp(SW, 0), bp(HW, 1), bp(WW, 8, 8), bp(RW, 16, 4)],  # one pool of debug registers
    ],
    ids=["hardware", "mixed"],
)
@pytest.mark.parametrize("fifth", [bp(HW, 0x80), bp(AW, 0x80, 8)], ids=str)
def test_kvm_slot_limit(first_four: list[Breakpoint], fifth: Breakpoint) -> None:
    """Hardware breakpoints and watchpoints have nowhere else to go: the fifth is refused."""
    fake, bps = table(kvm=True)
    for b in first_four:
        bps.add(b)
    calls = len(fake.bp_calls)
    with pytest.raises(BreakpointLimitError, match="4 slots"):
        bps.add(fifth)
    assert len(fake.bp_calls) == calls  # refused before the hypervisor is asked
    assert fifth.key not in bps.desired and fifth.key not in bps.installed
    assert bps.changes == 4
    bps.add(first_four[0])  # re-adding one already held is still fine
    assert len(fake.bp_calls) == calls


def test_kvm_fifth_software_breakpoint_falls_back_to_a_visible_patch_with_a_warning() -> None:
    fake, bps = table(kvm=True)
    for i in range(4):
        bps.add(bp(SW, i))
    bps.add(bp(SW, 0x80))
    key = bp_key(SW, KERNEL_VA + 0x80, 1)
    assert key in fake.patched and len(fake.installed) == 5
    warning = bps._policy.take_warnings()
    assert warning and "0xCC written into guest RAM" in warning and "--stealth strict" in warning
    bps.add(bp(SW, 0x90))
    assert bps._policy.take_warnings() is None  # warned once per mechanism


def test_kvm_fifth_software_breakpoint_is_refused_in_strict_mode() -> None:
    fake, bps = table(kvm=True, strict=True)
    for i in range(4):
        bps.add(bp(SW, i))
    with pytest.raises(StealthRefused, match="guest can see .*refused by --stealth strict"):
        bps.add(bp(SW, 0x80))
    assert not fake.patched and len(fake.installed) == 4


def test_kvm_slot_freed_after_removal_and_sync() -> None:
    fake, bps = table(kvm=True)
    for i in range(4):
        bps.add(bp(HW, i))
    bps.remove(bp(HW, 0))
    bps.sync()
    bps.add(bp(HW, 0x80))
    assert len(fake.installed) == 4
    assert bp_key(HW, KERNEL_VA + 0x80, 1) in fake.installed


def test_kvm_remove_then_readd_within_the_limit() -> None:
    """GDB's churn at a stop with all four slots used: z z z z Z Z Z Z costs nothing."""
    fake, bps = table(kvm=True)
    four = [bp(HW, i) for i in range(4)]
    for b in four:
        bps.add(b)
    for b in four:
        bps.remove(b)
    for b in four:
        bps.add(b)
    assert len(fake.bp_calls) == 4 and bps.sync() is False


def test_kvm_replace_one_of_four_before_resuming() -> None:
    """GDB at a stop: removes all four, the user deleted one and added another, GDB inserts."""
    fake, bps = table(kvm=True)
    four = [bp(HW, i) for i in range(4)]
    for b in four:
        bps.add(b)
    for b in four:
        bps.remove(b)
    for b in [*four[1:], bp(HW, 0x80)]:
        bps.add(b)  # raises DriverError("no free hardware debug register") today
    bps.sync()
    assert set(bps.desired) == set(bps.installed)
    assert fake.installed == {b.key for b in [*four[1:], bp(HW, 0x80)]}


def test_unsupported_type() -> None:
    fake = FakeDriver(1, ram_size=4 << 20)
    fake.capabilities = dataclasses.replace(tcg_capabilities("icount"), watchpoint=None)
    bps = BreakpointTable(fake)
    with pytest.raises(UnsupportedBreakpoint):
        bps.add(bp(WW, 0, 8))
    assert fake.bp_calls == [] and bps.desired == {}
    bps.add(bp(SW))  # other types still work
    assert len(fake.bp_calls) == 1


def test_driver_refusal_leaves_the_table_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, bps = table()

    def refuse(*_: object) -> None:
        raise DriverError("no")

    monkeypatch.setattr(fake, "insert_breakpoint", refuse)
    with pytest.raises(DriverError):
        bps.add(bp(SW))
    assert bps.desired == {} and bps.installed == {} and bps.changes == 0
