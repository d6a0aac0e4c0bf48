"""Register writes no vCPU could hold are refused with the reason; everything else goes through."""

from __future__ import annotations

import pytest

from tests.unit.test_session import machine
from vmigdb.arch.x86_64.registers import G_PACKET_SIZE, REGISTER_INDEX, RegisterFile, split_g
from vmigdb.arch.x86_64.validate import check_register_write
from vmigdb.wire import codec


def long_mode_regs(**values: int) -> RegisterFile:
    base = {
        "cr0": 0x8005_0033,
        "cr4": 0x6F0,
        "efer": 0xD01,
        "cs": 0x10,
        "ss": 0x18,
        "eflags": 0x246,
        "rip": 0xFFFF_FFFF_8100_0000,
    }
    regs = RegisterFile(bytes(G_PACKET_SIZE))
    for name, value in {**base, **values}.items():
        regnum = REGISTER_INDEX[name]
        regs = regs.with_value(regnum, value.to_bytes(_regs()[regnum].bitsize // 8, "little"))
    return regs


def _regs():
    from vmigdb.arch.x86_64.registers import REGISTERS

    return REGISTERS


def check(name: str, value: int, **current: int) -> str | None:
    regnum = REGISTER_INDEX[name]
    size = _regs()[regnum].bitsize // 8
    return check_register_write(regnum, value.to_bytes(size, "little"), long_mode_regs(**current))


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("eflags", 0x56DA2246, "reserved bits"),  # the value the 2-vCPU guest died with
        ("eflags", 0x81928242, "reserved bits"),
        ("eflags", 0x244, "bit 1"),
        ("eflags", 0x246 | 0x8, "reserved bits"),
        ("eflags", 0x20246, "virtual-8086"),
        ("cs", 0x10010, "16 bits"),
        ("cs", 0x0, "null"),
        ("cs", 0x33, "RPL 3"),
        ("ss", 0x2B, "RPL 3"),
        ("rip", 0x0000_8000_0000_0000, "canonical"),
        ("fs_base", 0x1234_0000_0000_0000, "canonical"),
        ("cr0", 0x1_8005_0033, "reserved bits 32-63"),
        ("cr0", 0x8000_0000, "PG set needs PE"),
        ("cr4", 1 << 40, "reserved"),
        ("efer", 0xD01 | (1 << 30), "reserved"),
        ("cr3", 1 << 55, "reserved bits 52-62"),
        ("cr8", 0x10, "4 bits"),
    ],
)
def test_impossible_values_are_refused_with_the_reason(name: str, value: int, why: str) -> None:
    reason = check(name, value)
    assert reason is not None and why in reason, reason


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("eflags", 0x46),  # IF cleared: unusual, allowed
        ("eflags", 0x346),  # TF set: the user asked for it
        ("eflags", 0x200046 | 0x40000),  # ID and AC
        ("cs", 0x10),
        ("ss", 0x18),
        ("ds", 0x0),
        ("rip", 0xFFFF_8000_0000_0000),
        ("rip", 0x7FFF_FFFF_F000),
        ("rax", 0xFFFF_FFFF_FFFF_FFFF),
        ("cr3", 0x1234000 | (1 << 63)),  # bit 63 is CR3's no-flush flag, not reserved
        ("cr8", 0xF),
        ("efer", 0x501),
    ],
)
def test_values_a_cpu_can_hold_go_through(name: str, value: int) -> None:
    assert check(name, value) is None


def test_a_refused_p_writes_nothing_and_says_why() -> None:
    m = machine()
    regnum = REGISTER_INDEX["eflags"]
    reply = m.session.handle(
        b"P%x=%s" % (regnum, codec.encode_hex((0x56DA2246).to_bytes(4, "little")))
    )
    assert reply.replies[0].startswith(b"E.refused: eflags 0x56da2246 sets reserved bits")
    assert m.fake.register_writes == []
    ok = m.session.handle(b"P%x=%s" % (regnum, codec.encode_hex((0x202).to_bytes(4, "little"))))
    assert ok.replies == [b"OK"]
    assert m.fake.register_writes[-1][1:] == (regnum, (0x202).to_bytes(4, "little"))


def test_a_g_packet_with_one_impossible_register_writes_none() -> None:
    m = machine()
    g = bytearray(codec.decode_hex(m.session.handle(b"g").replies[0]))
    parts = split_g(bytes(g))
    parts[REGISTER_INDEX["rax"]] = (0x1234).to_bytes(8, "little")  # fine on its own
    parts[REGISTER_INDEX["eflags"]] = (0xFFFF_0246).to_bytes(4, "little")  # impossible
    reply = m.session.handle(b"G" + codec.encode_hex(b"".join(parts)))
    assert reply.replies[0].startswith(b"E.refused: eflags")
    assert m.fake.register_writes == []
