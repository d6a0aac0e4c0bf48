"""x86-64 machine code both ways: capstone decodes, keystone-engine assembles."""

from __future__ import annotations

from functools import lru_cache

import capstone
import keystone

from vmigdb.script.types import Instruction


class AssemblyError(ValueError):
    """keystone could not assemble the code; the message is keystone's."""


@lru_cache(maxsize=1)
def _decoder() -> capstone.Cs:
    return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


@lru_cache(maxsize=1)
def _encoder() -> keystone.Ks:
    return keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)


def disassemble(code: bytes, addr: int, count: int) -> list[Instruction]:
    """Up to `count` instructions of `code` placed at `addr` (Intel syntax); decoding stops at
    the first byte sequence that is no instruction."""
    return [
        Instruction(insn.address, bytes(insn.bytes), insn.mnemonic, insn.op_str)
        for insn in _decoder().disasm(code, addr, count)
    ]


def assemble(code: str, addr: int = 0) -> bytes:
    """Machine code for `code` (Intel syntax, `;` or newlines between instructions), with
    relative branches resolved for address `addr`."""
    try:
        encoding, _ = _encoder().asm(code, addr)
    except keystone.KsError as exc:
        raise AssemblyError(f"cannot assemble {code!r}: {exc}") from None
    if not encoding:
        raise AssemblyError(f"cannot assemble {code!r}: no instruction")
    return bytes(encoding)
