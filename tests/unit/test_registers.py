"""Tests for the QEMU -> canonical register file conversion."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmigdb.arch.x86_64.registers import (
    G_PACKET_SIZE,
    QEMU_G_SIZE_LONG,
    QEMU_G_SIZE_SHORT,
    QEMU_REGISTERS,
    QEMU_SHORT_REGISTERS,
    REGISTER_INDEX,
    REGISTER_OFFSETS,
    REGISTERS,
    RegisterFile,
    split_g,
)

CANONICAL_ORDER = (
    ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"]
    + [f"r{i}" for i in range(8, 16)]
    + ["rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs"]
    + [f"st{i}" for i in range(8)]
    + ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
    + [f"xmm{i}" for i in range(16)]
    + ["mxcsr", "fs_base", "gs_base"]
    + ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "k_gs_base"]
)

QEMU_ORDER = (
    ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"]
    + [f"r{i}" for i in range(8, 16)]
    + ["rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs"]
    + ["fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"]
    + [f"st{i}" for i in range(8)]
    + ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
    + [f"xmm{i}" for i in range(16)]
    + ["mxcsr"]
)

SHORT = {"fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"}


def value_bytes(qemu_regnum: int, size: int) -> bytes:
    """Distinct bytes per register (first byte = QEMU regnum + 1), none zero."""
    return bytes([qemu_regnum + 1] + [0x80 | i for i in range(1, size)])


def qemu_payload(long_mode: bool) -> bytes:
    parts = []
    for regnum, (name, size) in enumerate(QEMU_REGISTERS):
        if not long_mode and name in SHORT:
            size = 4
        parts.append(value_bytes(regnum, size))
    return b"".join(parts)


def test_tables() -> None:
    assert [r.name for r in REGISTERS] == CANONICAL_ORDER
    assert [n for n, _ in QEMU_REGISTERS] == QEMU_ORDER
    assert len(REGISTERS) == 66
    assert G_PACKET_SIZE == 608
    assert QEMU_G_SIZE_LONG == 608
    assert QEMU_G_SIZE_SHORT == 572
    assert set(QEMU_SHORT_REGISTERS) == SHORT
    assert REGISTER_INDEX == {name: i for i, name in enumerate(CANONICAL_ORDER)}
    assert REGISTER_OFFSETS[REGISTER_INDEX["xmm0"]] == 276
    assert REGISTER_OFFSETS[REGISTER_INDEX["fs_base"]] == 536
    assert REGISTER_OFFSETS[REGISTER_INDEX["k_gs_base"]] == 600
    for reg in REGISTERS:
        assert QEMU_ORDER[reg.qemu_regnum] == reg.name
        assert QEMU_REGISTERS[reg.qemu_regnum][1] * 8 == reg.bitsize


def test_core_matches_gdb_numbering() -> None:
    # GDB's amd64 numbering fixes regnums 0..39 of the core feature and xmm0 = 40.
    assert REGISTER_INDEX["rip"] == 16
    assert REGISTER_INDEX["eflags"] == 17
    assert REGISTER_INDEX["st0"] == 24
    assert REGISTER_INDEX["fop"] == 39
    assert REGISTER_INDEX["xmm0"] == 40
    assert REGISTER_INDEX["mxcsr"] == 56


@pytest.mark.parametrize("long_mode", [True, False])
def test_from_qemu_g_every_register(long_mode: bool) -> None:
    regs = RegisterFile.from_qemu_g(qemu_payload(long_mode))
    assert regs.long_mode is long_mode
    g = regs.to_g()
    assert len(g) == G_PACKET_SIZE
    offset = 0
    for regnum, reg in enumerate(REGISTERS):
        size = reg.bitsize // 8
        assert REGISTER_OFFSETS[regnum] == offset
        if not long_mode and reg.name in SHORT:
            expected = value_bytes(reg.qemu_regnum, 4) + bytes(4)  # zero-extended
        else:
            expected = value_bytes(reg.qemu_regnum, size)
        assert regs.raw(regnum) == expected, reg.name
        assert g[offset : offset + size] == expected, reg.name
        assert regs[reg.name] == int.from_bytes(expected, "little")
        offset += size
    assert offset == G_PACKET_SIZE


def test_values_by_name() -> None:
    payload = bytearray(QEMU_G_SIZE_LONG)
    rip_off = 16 * 8
    payload[rip_off : rip_off + 8] = (0xFFFF_FFFF_8100_0000).to_bytes(8, "little")
    cr3_off = 16 * 8 + 8 + 4 + 6 * 4 + 3 * 8 + 2 * 8  # after fs/gs/k_gs_base, cr0, cr2
    payload[cr3_off : cr3_off + 8] = (0x1234_5000).to_bytes(8, "little")
    regs = RegisterFile.from_qemu_g(bytes(payload))
    assert regs["rip"] == 0xFFFF_FFFF_8100_0000
    assert regs["cr3"] == 0x1234_5000
    assert regs["rax"] == 0
    with pytest.raises(KeyError):
        regs["nosuch"]


@pytest.mark.parametrize("size", [0, 571, 573, 607, 609, 1216])
def test_wrong_qemu_length(size: int) -> None:
    with pytest.raises(ValueError):
        RegisterFile.from_qemu_g(bytes(size))


def test_qemu_write_long_mode() -> None:
    regs = RegisterFile.from_qemu_g(qemu_payload(True))
    for regnum, reg in enumerate(REGISTERS):
        value = bytes(range(1, reg.bitsize // 8 + 1))
        assert regs.qemu_write(regnum, value) == (reg.qemu_regnum, value)


def test_qemu_write_short_mode() -> None:
    regs = RegisterFile.from_qemu_g(qemu_payload(False))
    for regnum, reg in enumerate(REGISTERS):
        value = bytes(range(1, reg.bitsize // 8 + 1))
        qemu_regnum, sent = regs.qemu_write(regnum, value)
        assert qemu_regnum == reg.qemu_regnum
        if reg.name in SHORT:
            assert sent == value[:4]
        else:
            assert sent == value  # GPRs and rip stay 8 bytes


@pytest.mark.parametrize("long_mode", [True, False])
def test_qemu_write_rejects_bad_size_and_regnum(long_mode: bool) -> None:
    regs = RegisterFile.from_qemu_g(qemu_payload(long_mode))
    with pytest.raises(ValueError):
        regs.qemu_write(REGISTER_INDEX["rax"], bytes(4))
    with pytest.raises(ValueError):
        regs.qemu_write(REGISTER_INDEX["cr3"], bytes(4))  # canonical size is 8 in any mode
    with pytest.raises(ValueError):
        regs.qemu_write(REGISTER_INDEX["st0"], bytes(8))
    with pytest.raises(ValueError):
        regs.qemu_write(len(REGISTERS), bytes(8))
    with pytest.raises(ValueError):
        regs.qemu_write(-1, bytes(8))


def test_with_value() -> None:
    regs = RegisterFile.from_qemu_g(qemu_payload(False))
    n = REGISTER_INDEX["xmm3"]
    new = regs.with_value(n, bytes(range(16)))
    assert new.raw(n) == bytes(range(16))
    assert new.long_mode is False
    assert regs.raw(n) != bytes(range(16))  # the original is untouched
    for i in range(len(REGISTERS)):
        if i != n:
            assert new.raw(i) == regs.raw(i)
    with pytest.raises(ValueError):
        regs.with_value(n, bytes(15))


def test_split_g_round_trip() -> None:
    g = RegisterFile.from_qemu_g(qemu_payload(True)).to_g()
    parts = split_g(g)
    assert [len(p) * 8 for p in parts] == [r.bitsize for r in REGISTERS]
    assert b"".join(parts) == g
    assert RegisterFile(b"".join(parts)).to_g() == g
    for bad in (b"", g[:-1], g + b"\0"):
        with pytest.raises(ValueError):
            split_g(bad)
    with pytest.raises(ValueError):
        RegisterFile(g[:-1])


@given(st.binary(min_size=QEMU_G_SIZE_LONG, max_size=QEMU_G_SIZE_LONG))
def test_long_conversion_is_a_permutation(payload: bytes) -> None:
    g = RegisterFile.from_qemu_g(payload).to_g()
    offsets, pos = [], 0
    for _, size in QEMU_REGISTERS:
        offsets.append(pos)
        pos += size
    for reg, part in zip(REGISTERS, split_g(g), strict=True):
        start = offsets[reg.qemu_regnum]
        assert part == payload[start : start + len(part)]


def test_from_values_round_trip() -> None:
    regs = RegisterFile.from_qemu_g(qemu_payload(True))
    again = RegisterFile.from_values(regs.values(), long_mode=False)
    assert again.to_g() == regs.to_g()
    assert again.long_mode is False


def test_from_values_defaults_and_errors() -> None:
    regs = RegisterFile.from_values({"rip": 0xFFFFFFFF81000000, "cr3": 0x1000, "xmm3": 1 << 127})
    assert regs["rip"] == 0xFFFFFFFF81000000
    assert regs["cr3"] == 0x1000
    assert regs["xmm3"] == 1 << 127
    assert regs["rax"] == 0
    with pytest.raises(KeyError):
        RegisterFile.from_values({"rpc": 1})
    # Hypervisors hand over wider words (libvmi's 64-bit rflags): kept to the register's width.
    assert RegisterFile.from_values({"eflags": (1 << 32) | 0x246})["eflags"] == 0x246
