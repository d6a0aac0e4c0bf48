"""The parts of vmigdb.script that need no guest: CLI options, machine code both ways."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmigdb.script import AssemblyError
from vmigdb.script.asm import assemble, disassemble
from vmigdb.script.server import cli_arguments


def test_options_become_the_clis_arguments() -> None:
    argv = cli_arguments(
        {
            "kernel": Path("/k"),
            "smp": 2,
            "allow_remote": True,
            "initrd": None,
            "verbose": False,
            "append": "a=b c=d",
            "qemu_args": ["-cpu", "max"],
        }
    )
    assert argv == [
        "--kernel", "/k", "--smp", "2", "--allow-remote", "--append", "a=b c=d", "--", "-cpu", "max",
    ]  # fmt: skip


def test_assemble_and_disassemble_agree() -> None:
    code = assemble("push rbp; mov rbp, rsp; call 0x1100; ret", 0x1000)
    insns = disassemble(code, 0x1000, 10)
    assert [str(i) for i in insns] == [
        "0x1000: push rbp",
        "0x1001: mov rbp, rsp",
        "0x1004: call 0x1100",
        "0x1009: ret",
    ]
    assert b"".join(i.bytes for i in insns) == code


def test_disassemble_stops_at_the_count_and_at_garbage() -> None:
    assert len(disassemble(assemble("nop; nop; nop"), 0, 2)) == 2
    assert disassemble(b"\x0f\x0b\xff\xff", 0, 5)[0].mnemonic == "ud2"
    assert disassemble(b"\x06", 0, 1) == []  # push es does not exist in 64-bit mode


def test_bad_assembly_is_a_clear_error() -> None:
    with pytest.raises(AssemblyError, match="cannot assemble 'mov rax,'"):
        assemble("mov rax,")
