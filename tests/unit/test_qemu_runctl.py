"""The QEMU driver's side of the run-control plugin: its stop messages and QEMU's monitor text."""

from __future__ import annotations

import pytest

from vmigdb.arch.x86_64.registers import QEMU_REGISTERS, REGISTER_INDEX
from vmigdb.hv.base import BreakpointType, DriverError
from vmigdb.hv.qemu.runctl import parse_info_registers, parse_stop


def _stop_line(exact: int, rip: int = 0xFFFFFFFF810B0F45, kind: str = "step") -> str:
    values = {"rax": 0x27, "rip": rip, "eflags": 0x246, "cr3": 0x1234000}
    regs = "".join(values.get(name, 0).to_bytes(size, "little").hex() for name, size in QEMU_REGISTERS)
    return f"stop 1 {kind} {rip:x} {exact} {regs}"


def test_a_stop_at_a_block_start_carries_every_register() -> None:
    stop = parse_stop(_stop_line(1))
    assert (stop.cpu, stop.kind, stop.pc) == (2, "step", 0xFFFFFFFF810B0F45)
    assert stop.registers["rip"] == 0xFFFFFFFF810B0F45 and stop.registers["eflags"] == 0x246
    assert stop.registers["cr3"] == 0x1234000 and stop.registers["rax"] == 0x27


def test_inside_a_block_the_lagging_flags_are_unavailable_not_wrong() -> None:
    stop = parse_stop(_stop_line(0))
    assert stop.registers["rax"] == 0x27
    assert stop.registers.unavailable == {REGISTER_INDEX["eflags"]}


def test_a_stop_says_whether_the_plugin_can_write_its_general_registers() -> None:
    assert not parse_stop(_stop_line(1)).writable
    writable = parse_stop(_stop_line(3))
    assert writable.writable and writable.registers.unavailable == frozenset()
    inside = parse_stop(_stop_line(2))
    assert inside.writable and inside.registers.unavailable == {REGISTER_INDEX["eflags"]}


def test_a_watchpoint_stop_names_its_type_and_watched_address() -> None:
    stop = parse_stop(_stop_line(0, kind="watch:3:ffffffff82e079c0"))
    assert stop.kind == "watch" and stop.pc == 0xFFFFFFFF810B0F45
    assert stop.watch == (BreakpointType.READ_WATCH, 0xFFFFFFFF82E079C0)
    assert parse_stop(_stop_line(1)).watch is None


def test_a_malformed_stop_is_a_driver_error() -> None:
    with pytest.raises(DriverError):
        parse_stop("stop 0 bp ffff 1 00")  # a register QEMU did not have: the stop is short
    with pytest.raises(DriverError):
        parse_stop(_stop_line(1, kind="watch:0:1000"))  # type 0 is a breakpoint


HMP = """\r
CPU#0\r
RAX=0000000000000027 RBX=ffffc9000042bf58 RCX=0000000000000000 RDX=ffffffffffffffff\r
RSI=0000000000000001 RDI=ffffc9000042bf58 RBP=0000000000000000 RSP=ffffc9000042bf48\r
R8 =0000000000000000 R9 =0000000000000000 R10=0000000000000000 R11=0000000000000000\r
R12=0000000000000000 R13=0000000000000000 R14=0000000000000000 R15=0000000000000000\r
RIP=ffffffff810b0f40 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\r
ES =0000 0000000000000000 00000000 00000000\r
CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]\r
FS =0000 00007f1234567000 00000000 00000000\r
GS =0000 ffff88801fc00000 00000000 00000000\r
CR0=80050033 CR2=00007f0000001000 CR3=0000000002a0c000 CR4=00350ef0\r
EFER=0000000000000d01\r
CPU#1\r
RAX=0000000000000000 RBX=0000000000000001 RCX=0000000000000000 RDX=0000000000000000\r
RIP=ffffffff81c17a0b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r
CR0=80050033 CR2=0000000000000000 CR3=0000000002a0c000 CR4=00350ef0\r
EFER=0000000000000d01\r
"""


def test_info_registers_gives_each_vcpu_what_qemu_printed() -> None:
    regs = parse_info_registers(HMP)
    assert sorted(regs) == [1, 2]
    first = regs[1]
    assert first["rip"] == 0xFFFFFFFF810B0F40 and first["rdx"] == 0xFFFFFFFFFFFFFFFF
    assert first["r8"] == 0 and first["eflags"] == 0x246 and first["cs"] == 0x10
    assert first["fs_base"] == 0x7F1234567000 and first["gs_base"] == 0xFFFF88801FC00000
    assert first["cr3"] == 0x2A0C000 and first["efer"] == 0xD01
    assert {REGISTER_INDEX["k_gs_base"], REGISTER_INDEX["xmm0"]} <= first.unavailable
    assert REGISTER_INDEX["rax"] not in first.unavailable
    assert regs[2]["rip"] == 0xFFFFFFFF81C17A0B and regs[2]["rbx"] == 1
