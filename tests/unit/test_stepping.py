"""Which instructions may legitimately leave RIP in place after one single-step (may_stay_put)."""

from __future__ import annotations

import pytest

from vmigdb.debugger.stepping import may_stay_put

USER_RIP = 0x0000_0000_0040_1000
KERNEL_RIP = 0xFFFF_FFFF_8100_1000  # upper half: negative as a signed 64-bit number
RIPS = [pytest.param(USER_RIP, id="user"), pytest.param(KERNEL_RIP, id="kernel")]


def _case(name: str, hexbytes: str) -> object:
    return pytest.param(bytes.fromhex(hexbytes), id=name)


STAYS_PUT = [
    # rep string instructions: one iteration per step
    _case("rep movsb", "f3a4"),
    _case("rep movsq", "f348a5"),
    _case("rep stosb", "f3aa"),
    _case("rep stosq", "f348ab"),
    _case("rep lodsb", "f3ac"),
    _case("repe cmpsb", "f3a6"),
    _case("repne scasb", "f2ae"),
    _case("rep insb", "f36c"),
    _case("rep outsb", "f36e"),
    # indirect targets may be the instruction itself
    _case("jmp rax", "ffe0"),
    _case("jmp qword [rip]", "ff2500000000"),
    _case("jmp qword [rax]", "ff20"),
    _case("call rax", "ffd0"),
    _case("call qword [rbx+8]", "ff5308"),
    # waits
    _case("hlt", "f4"),
    _case("mwait", "0f01c9"),
    _case("mwaitx", "0f01fb"),
    _case("umwait", "f20faef1"),
    _case("tpause", "660faef1"),
    # nothing decodable: do not second-guess
    _case("empty", ""),
    _case("push es (invalid in 64-bit)", "06"),
    _case("truncated jmp rel32", "e900"),
    _case("lone rex prefix", "48"),
]

JUMPS_TO_SELF = [
    _case("jmp . (rel8)", "ebfe"),
    _case("jmp . (rel32)", "e9fbffffff"),
    _case("je . (rel8)", "74fe"),
    _case("jne . (rel8)", "75fe"),
    _case("je . (rel32)", "0f84faffffff"),
    _case("jrcxz .", "e3fe"),
    _case("call . (rel32)", "e8fbffffff"),
]

MOVES = [
    _case("mov rbx, rax", "4889c3"),
    _case("mov rbx, rax + trailing bytes", "4889c3f4ebfe"),
    _case("nop", "90"),
    _case("add rax, 1", "4883c001"),
    _case("push rbp", "55"),
    _case("syscall", "0f05"),
    _case("ret", "c3"),
    _case("movsb without rep", "a4"),
    _case("lodsb without rep", "ac"),
    _case("lock cmpxchg", "f00fb10b"),
    _case("pause (f3 is part of the opcode)", "f390"),
    _case("endbr64 (f3 is part of the opcode)", "f30f1efa"),
    _case("movss (mandatory f3 prefix)", "f30f10c1"),
    _case("movsd (mandatory f2 prefix)", "f20f10c1"),
    _case("jmp to the next instruction", "eb00"),
    _case("jmp backwards", "ebfc"),
    _case("je forward", "7410"),
    _case("je rel32 forward", "0f8410000000"),
    _case("call next instruction", "e800000000"),
    _case("monitor (not a wait)", "0f01c8"),
    _case("ud2", "0f0b"),
    _case("int3", "cc"),
]

LOOP_TO_SELF = [
    _case("loop .", "e2fe"),
    _case("loope .", "e1fe"),
    _case("loopne .", "e0fe"),
    _case("loop . (addr32)", "67e2fd"),
]


@pytest.mark.parametrize("rip", RIPS)
@pytest.mark.parametrize("code", STAYS_PUT)
def test_may_stay_put(code: bytes, rip: int) -> None:
    assert may_stay_put(code, rip) is True


@pytest.mark.parametrize("rip", RIPS)
@pytest.mark.parametrize("code", MOVES)
def test_always_moves(code: bytes, rip: int) -> None:
    assert may_stay_put(code, rip) is False


@pytest.mark.parametrize("code", JUMPS_TO_SELF)
def test_jump_to_self_in_the_lower_half(code: bytes) -> None:
    assert may_stay_put(code, USER_RIP) is True


@pytest.mark.parametrize("code", JUMPS_TO_SELF)
def test_jump_to_self_in_the_kernel_half(code: bytes) -> None:
    assert may_stay_put(code, KERNEL_RIP) is True


@pytest.mark.parametrize("code", LOOP_TO_SELF)
def test_loop_to_self_may_stay_put(code: bytes) -> None:
    assert may_stay_put(code, USER_RIP) is True


def test_loop_elsewhere_moves() -> None:
    assert may_stay_put(bytes.fromhex("e200"), USER_RIP) is False


def test_jump_target_is_compared_with_rip() -> None:
    code = bytes.fromhex("e9fbffffff")  # jmp rel32 -5: to itself wherever it is
    assert may_stay_put(code, USER_RIP) is True
    assert may_stay_put(code, 0) is True
    assert may_stay_put(bytes.fromhex("eb10"), USER_RIP) is False


def test_only_the_first_instruction_counts() -> None:
    assert may_stay_put(bytes.fromhex("90ebfe"), USER_RIP) is False  # nop; jmp .
    assert may_stay_put(bytes.fromhex("f490"), USER_RIP) is True  # hlt; nop


ASSEMBLED = [
    ("rep movsb", True),
    ("repne scasb", True),
    ("hlt", True),
    ("jmp {rip:#x}", True),
    ("jne {rip:#x}", True),
    ("loop {rip:#x}", True),
    ("call {rip:#x}", True),
    ("jmp qword ptr [rax]", True),
    ("mov rbx, rax", False),
    ("add rax, 1", False),
    ("jmp {next:#x}", False),
    ("syscall", False),
]


@pytest.mark.parametrize(("source", "stays"), ASSEMBLED)
@pytest.mark.parametrize("rip", [USER_RIP, KERNEL_RIP])
def test_assembled_with_keystone(source: str, stays: bool, rip: int) -> None:
    """The same cases written as assembly (keystone) at a user and a kernel address."""
    keystone = pytest.importorskip("keystone")
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)
    encoding, _ = ks.asm(source.format(rip=rip, next=rip + 0x100), rip)
    assert may_stay_put(bytes(encoding), rip) is stays
