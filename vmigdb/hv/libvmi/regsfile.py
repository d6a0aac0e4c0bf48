"""Registers for a raw physical image (``vmigdb dump --image RAW --regs FILE``): a small JSON file.

A raw image is RAM and nothing else (offset = guest-physical address). Its vCPUs' registers, when
known, come in a file like this (every field but ``vcpus`` optional)::

    {
      "format": "vmigdb-registers/1",
      "vcpus": [
        {"rip": "0xffffffff81e0a7ce", "rsp": "0xffffffff82a03e80", "cr0": "0x80050033",
         "cr3": "0x10a000", "cr4": "0x6b0", "efer": "0xd01", "cs": 16, "gs_base": "0x..."},
        {"rip": "0xffffffff81e0a7ce", "cr3": "0x10a000"}
      ],
      "ram": [["0x0", "0x80000000"]]
    }

- ``vcpus``: one object per vCPU, in order (the first is vCPU 1). Keys are GDB's register names
  for x86-64 (``rax``..``r15``, ``rip``, ``eflags``, ``cs``..``gs``, ``fs_base``, ``gs_base``,
  ``k_gs_base``, ``cr0``..``cr4``, ``cr8``, ``efer``, ``st0``.., ``xmm0``.., ``mxcsr``; ``rflags``
  and ``kernel_gs_base`` are accepted too). Values are integers or strings Python's ``int(s, 0)``
  reads ("0x10", "16"). A register not given is reported absent (GDB shows <unavailable>);
  without ``efer``, vmigdb's page walk takes LME|LMA when ``cr0`` has PG and ``cr4`` PAE.
- ``ram``: guest-physical RAM as ``[start, end)`` pairs; default: the whole file.

`write_registers_file` writes one from live registers (owner-only), every register in hex.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmigdb.arch.x86_64.registers import REGISTER_INDEX, REGISTERS, RegisterFile
from vmigdb.errors import SetupError
from vmigdb.hv.libvmi.cpustate import VcpuState, derive_efer

__all__ = ["FORMAT", "RegistersFile", "read_registers_file", "write_registers_file"]

FORMAT = "vmigdb-registers/1"
_ALIASES = {"rflags": "eflags", "kernel_gs_base": "k_gs_base"}
_MAX_BYTES = 16 << 20


@dataclass(frozen=True)
class RegistersFile:
    """What a registers file says: each vCPU's registers, and RAM's ranges if it gives them."""

    path: Path
    vcpus: tuple[VcpuState, ...]
    ram: tuple[tuple[int, int], ...] | None


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{where}: {value!r} is not a number")
    try:
        n = value if isinstance(value, int) else int(value, 0)
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not a number") from None
    if n < 0:
        raise ValueError(f"{where}: {value!r} is negative")
    return n


def _vcpu(number: int, entry: Any, path: Path) -> VcpuState:
    if not isinstance(entry, dict):
        raise ValueError(f"vcpus[{number - 1}] is not an object")
    values: dict[str, int] = {}
    for key, raw in entry.items():
        name = _ALIASES.get(key, key)
        if name not in REGISTER_INDEX:
            raise ValueError(f"vcpus[{number - 1}]: no register named {key!r}")
        value = _int(raw, f"vcpus[{number - 1}].{key}")
        bits = REGISTERS[REGISTER_INDEX[name]].bitsize
        if value >> bits:
            raise ValueError(
                f"vcpus[{number - 1}]: register {name} is {bits} bits wide: {value:#x} does not fit"
            )
        values[name] = value
    derived: tuple[str, ...] = ()
    if "efer" not in values:
        values["efer"] = derive_efer(values.get("cr0", 0), values.get("cr4", 0), False, True)
        derived = ("efer: LME/LMA from cr0.PG and cr4.PAE (not in the registers file)",)
    given = set(values) - ({"efer"} if derived else set())
    absent = tuple(n for n in REGISTER_INDEX if n not in values)
    registers = RegisterFile.from_values(values, True, set(REGISTER_INDEX) - given)
    return VcpuState(number, registers, f"registers file {path}", absent, derived)


def read_registers_file(path: str | os.PathLike[str]) -> RegistersFile:
    """Read and check a registers file.

    :raises SetupError: if it cannot be read, is not JSON, or says something that is not
        registers (the message names the field).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_BYTES + 1)
    except OSError as e:
        raise SetupError(f"cannot read the registers file {path}: {e.strerror or e}") from None
    if len(data) > _MAX_BYTES:
        raise SetupError(f"{path} is too large for a registers file")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SetupError(f"{path} is not a JSON registers file: {e}") from None
    try:
        if not isinstance(doc, dict) or not isinstance(doc.get("vcpus"), list):
            raise ValueError('no "vcpus" list')
        fmt = doc.get("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"format {fmt!r}, vmigdb reads {FORMAT!r}")
        if not doc["vcpus"]:
            raise ValueError('"vcpus" is empty')
        vcpus = tuple(_vcpu(i + 1, e, path) for i, e in enumerate(doc["vcpus"]))
        ram = None
        if "ram" in doc:
            if not isinstance(doc["ram"], list) or not doc["ram"]:
                raise ValueError('"ram" must be a list of [start, end] pairs')
            pairs = []
            for i, pair in enumerate(doc["ram"]):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise ValueError(f"ram[{i}] is not a [start, end] pair")
                start, end = _int(pair[0], f"ram[{i}]"), _int(pair[1], f"ram[{i}]")
                if end <= start:
                    raise ValueError(f"ram[{i}] ends before it starts")
                pairs.append((start, end))
            ram = tuple(pairs)
    except ValueError as e:
        raise SetupError(f"{path}: {e}") from None
    return RegistersFile(path, vcpus, ram)


def write_registers_file(
    path: str | os.PathLike[str],
    registers: Sequence[RegisterFile],
    ram: Sequence[tuple[int, int]] | None = None,
) -> None:
    """Write *registers* (vCPU 1 first) as a registers file, owner-only (0600), replacing none.

    :raises FileExistsError: if *path* exists.
    """
    doc: dict[str, Any] = {
        "format": FORMAT,
        "vcpus": [{n: f"{v:#x}" for n, v in r.values().items()} for r in registers],
    }
    if ram is not None:
        doc["ram"] = [[f"{a:#x}", f"{b:#x}"] for a, b in ram]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
