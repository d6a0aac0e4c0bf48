"""Tests for the target description, including validation by GDB itself."""

from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmigdb.arch.x86_64.registers import G_PACKET_SIZE, REGISTER_OFFSETS, REGISTERS
from vmigdb.rsp.target_xml import target_xml, xfer_slice

GDB = "/usr/bin/gdb"
needs_gdb = pytest.mark.skipif(not os.access(GDB, os.X_OK), reason="needs /usr/bin/gdb")


def test_well_formed_and_consistent() -> None:
    root = ET.fromstring(target_xml())
    assert root.tag == "target"
    assert root.findtext("architecture") == "i386:x86-64"
    assert "xi:include" not in target_xml()
    features = [f.get("name") for f in root.findall("feature")]
    assert features == [
        "org.gnu.gdb.i386.core",
        "org.gnu.gdb.i386.sse",
        "org.gnu.gdb.i386.segments",
        "org.vmigdb.x86_64.system",
    ]
    regnum = -1
    names, bits = [], 0
    for feature in root.findall("feature"):
        for reg in feature.findall("reg"):
            regnum = int(reg.get("regnum", regnum + 1))
            assert regnum == len(names)
            names.append(reg.get("name"))
            bits += int(reg.get("bitsize"))
            expected = REGISTERS[regnum]
            assert feature.get("name") == expected.feature
            assert int(reg.get("bitsize")) == expected.bitsize
            assert reg.get("type") == expected.type
            assert reg.get("group") == expected.group
    assert names == [r.name for r in REGISTERS]
    assert bits == G_PACKET_SIZE * 8


def test_types_defined() -> None:
    root = ET.fromstring(target_xml())
    defined = {e.get("id") for e in root.iter() if e.tag in ("flags", "union", "vector", "struct")}
    builtin = {"int", "int32", "int64", "uint64", "code_ptr", "data_ptr", "i387_ext"}
    for reg in root.iter("reg"):
        assert reg.get("type") in defined | builtin, reg.get("name")
    eflags = root.find(".//flags[@id='i386_eflags']")
    assert {f.get("name") for f in eflags} >= {"CF", "ZF", "IF", "ID"}


def test_xfer_slice() -> None:
    doc = b"0123456789"
    assert xfer_slice(doc, 0, 4) == b"m0123"
    assert xfer_slice(doc, 4, 4) == b"m4567"
    assert xfer_slice(doc, 8, 4) == b"l89"
    assert xfer_slice(doc, 6, 4) == b"l6789"  # exactly reaches the end
    assert xfer_slice(doc, 10, 4) == b"l"
    assert xfer_slice(doc, 50, 4) == b"l"
    assert xfer_slice(doc, 0, 4096) == b"l" + doc
    with pytest.raises(ValueError):
        xfer_slice(doc, -1, 4)
    # Reassembling GDB-style reproduces the document.
    full = target_xml().encode()
    out, offset = b"", 0
    while True:
        reply = xfer_slice(full, offset, 1000)
        out += reply[1:]
        offset += len(reply) - 1
        if reply[:1] == b"l":
            break
    assert out == full


def run_gdb(tmp_path: Path, *commands: str) -> str:
    path = tmp_path / "target.xml"
    path.write_text(target_xml())
    args = [GDB, "-nx", "-batch", "-ex", "set architecture i386:x86-64"]
    args += ["-ex", f"set tdesc filename {path}"]
    for command in commands:
        args += ["-ex", command]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "warning" not in out.lower(), out
    assert "rejected" not in out.lower(), out
    assert "error" not in out.lower(), out
    return out


@needs_gdb
def test_gdb_accepts_layout(tmp_path: Path) -> None:
    """GDB's own remote layout ("Rmt Nr", "g/G Offset") must equal our canonical g layout."""
    out = run_gdb(tmp_path, "maint print remote-registers")
    rows = {}
    # Name Nr Rel Offset Size Type Rmt-Nr g/G-Offset; pseudo and unnamed registers lack the
    # last two columns.
    pattern = re.compile(r"^ (\S+)\s+\d+\s+\d+\s+\d+\s+(\d+)\s+\S+\s+(\d+)\s+(\d+)\s*$")
    for line in out.splitlines():
        m = pattern.match(line)
        if m:
            name, size, rmt, offset = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
            rows[name] = (rmt, offset, size)
    assert len(rows) == len(REGISTERS), out
    by_remote = sorted(rows.items(), key=lambda kv: kv[1][0])
    assert [name for name, _ in by_remote] == [r.name for r in REGISTERS]
    for regnum, reg in enumerate(REGISTERS):
        assert rows[reg.name] == (regnum, REGISTER_OFFSETS[regnum], reg.bitsize // 8), reg.name


@needs_gdb
def test_gdb_types(tmp_path: Path) -> None:
    out = run_gdb(
        tmp_path,
        "ptype $eflags",
        "ptype $mxcsr",
        "ptype $xmm0",
        "ptype $cr0",
        "ptype $efer",
        "ptype $rip",
        "ptype $st0",
    )
    assert "type = flag i386_eflags" in out
    assert "bool ZF @6;" in out
    assert "type = flag i386_mxcsr" in out
    assert "type = union vec128" in out
    assert "v4_float" in out
    assert "type = flag x86_cr0" in out
    assert "bool PG @31;" in out
    assert "type = flag x86_efer" in out
    assert "bool LMA @10;" in out
    assert "type = void (*)()" in out
    assert re.search(r"type = \S*i387_ext", out)
