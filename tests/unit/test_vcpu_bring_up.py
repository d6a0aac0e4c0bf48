"""Whether every vCPU came up, told from the guest's CR0 (driver.py's `bring_up_report`), and
where the QEMU driver says so: `monitor info` (its describe) and `monitor stealth` (warnings)."""

from __future__ import annotations

import pytest

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.hv.qemu.driver import BRING_UP_GRACE_S, QemuDriver, bring_up_report, unpaged_vcpus

PE, LONG = 0x60000010 | 1, 0x80050033  # protected mode without paging; the kernel's CR0
RESET = 0x60000010  # QEMU's reset state: real mode
PARKED = 0x60000011  # where SeaBIOS leaves a vCPU it does not boot from: protected mode, no paging


def test_unpaged_vcpus_beside_a_booted_one() -> None:
    assert unpaged_vcpus({1: RESET, 2: RESET}) == []  # nothing booted yet: nothing to tell
    assert unpaged_vcpus({1: PE, 2: RESET}) == []  # the firmware runs: nor yet
    assert unpaged_vcpus({1: LONG, 2: LONG}) == []
    assert unpaged_vcpus({1: LONG, 2: PARKED}) == [2]
    assert unpaged_vcpus({1: LONG, 2: RESET, 3: LONG, 4: PARKED}) == [2, 4]


def test_a_vcpu_without_paging_is_only_a_note_during_the_grace() -> None:
    note, warning = bring_up_report({1: LONG, 2: RESET}, BRING_UP_GRACE_S - 1, "icount")
    assert note == "CPU#1 with paging off (CR0.PG clear): not brought up yet" and warning is None
    assert bring_up_report({1: LONG, 2: LONG}, 1000.0, "icount") == (None, None)


def test_a_vcpu_never_brought_up_under_icount_names_time_host() -> None:
    note, warning = bring_up_report({1: LONG, 2: PARKED}, 75.0, "icount")
    assert "CPU#1 never turned paging on" in note
    assert warning is not None and "CPU#1 still with paging off" in warning
    assert "after 75 s" in warning and "--time host" in warning
    # under host time, icount is not the suspect: the note, no warning
    note, warning = bring_up_report({1: LONG, 2: RESET}, 75.0, "host")
    assert "never turned paging on" in note and warning is None


class _Channel:
    running = False
    resyncs = 0


class _Memory:
    size = 512 << 20
    how = "mapped"


def driver_with(cr0s: dict[int, int], ran: float, time_mode: str = "icount") -> QemuDriver:
    driver = QemuDriver(_Channel(), _Memory(), "tcg", time_mode, "auto: test")  # type: ignore[arg-type]
    driver._cpus = sorted(cr0s)
    driver._ran = ran
    driver.qemu_version = (10, 0, 2)
    driver.read_registers = lambda cpu: RegisterFile.from_values({"cr0": cr0s[cpu]})  # type: ignore[method-assign]
    return driver


@pytest.mark.parametrize("ran", [5.0, 100.0])
def test_describe_and_warnings(ran: float) -> None:
    driver = driver_with({1: LONG, 2: RESET}, ran)
    info = dict(driver.describe())
    if ran < BRING_UP_GRACE_S:
        assert info["vcpus"] == "2 (CPU#1 with paging off (CR0.PG clear): not brought up yet)"
        assert "warning" not in info and driver.warnings() == []
    else:
        assert info["vcpus"].startswith("2 (CPU#1 never turned paging on")
        assert "--time host" in info["warning"]
        assert driver.warnings() == [info["warning"]]


def test_nothing_to_tell_when_all_came_up_or_while_running() -> None:
    driver = driver_with({1: LONG, 2: LONG}, 100.0)
    assert dict(driver.describe())["vcpus"] == "2" and driver.warnings() == []
    driver = driver_with({1: LONG, 2: RESET}, 100.0)
    driver._channel.running = True  # type: ignore[attr-defined]
    assert driver.warnings() == []  # registers cannot be read while the VM runs
