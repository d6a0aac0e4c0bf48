"""Flattening an ELF dump into the raw image libvmi reads: made once, sparse, private, reused only
while the dump is unchanged."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.unit.qemu_dump import kernel_cpu, write_core
from vmigdb.errors import SetupError
from vmigdb.hv.libvmi.elfcore import read_elf_core
from vmigdb.hv.libvmi.flatten import PAGE, TRAILER_MAGIC, flatten, raw_size

MiB = 1 << 20


def ram_blocks() -> list[tuple[int, bytes]]:
    low = bytearray(0xA0000)
    low[0x1000:0x1010] = b"low memory bytes"
    high = bytearray(8 * MiB)  # at 1 MiB: mostly zeros, like an idle guest
    high[3 * MiB : 3 * MiB + 5] = b"hello"
    high[-4:] = b"end!"
    rom = b"\xea\x5b\xe0\x00\xf0" + bytes(0x40000 - 5)  # a BIOS at the top of 4 GiB
    return [(0, bytes(low)), (0x100000, bytes(high)), (0xFFFC0000, rom)]


def open_core(path: Path):
    fd = os.open(path, os.O_RDONLY)
    return fd, read_elf_core(fd, path)


def test_flatten_places_ram_at_its_physical_address(tmp_path) -> None:
    path = write_core(tmp_path / "d.elf", ram_blocks(), [kernel_cpu(0)])
    fd, core = open_core(path)
    try:
        flat = flatten(core, fd)
    finally:
        os.close(fd)
    assert flat.path == tmp_path / "d.elf.vmigdb-raw" and not flat.reused
    st = flat.path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == raw_size(core) == 0x1_0000_0000 + PAGE
    # Sparse: a 4 GiB file holding a few 64 KiB runs of data.
    assert st.st_blocks * 512 < 2 * MiB
    assert flat.written <= 4 * (64 << 10)
    with open(flat.path, "rb") as f:
        for paddr, data in ram_blocks():
            f.seek(paddr)
            assert f.read(len(data)) == data
        f.seek(st.st_size - PAGE)
        assert f.read(PAGE).startswith(TRAILER_MAGIC)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_flattened_image_is_reused_until_the_dump_changes(tmp_path) -> None:
    path = write_core(tmp_path / "d.elf", ram_blocks(), [kernel_cpu(0)])
    fd, core = open_core(path)
    try:
        first = flatten(core, fd)
        again = flatten(core, fd)
    finally:
        os.close(fd)
    assert again.reused and again.path == first.path and again.written == 0

    blocks = ram_blocks()
    blocks[1] = (0x100000, b"\x55" * len(blocks[1][1]))
    write_core(path, blocks, [kernel_cpu(0)])  # same name, same size, new contents
    os.utime(path, ns=(1, path.stat().st_mtime_ns + 10**9))
    fd, core = open_core(path)
    try:
        remade = flatten(core, fd)
    finally:
        os.close(fd)
    assert not remade.reused
    with open(remade.path, "rb") as f:
        f.seek(0x100000)
        assert f.read(4) == b"\x55" * 4


def test_an_unsafe_raw_file_is_not_trusted(tmp_path) -> None:
    path = write_core(tmp_path / "d.elf", ram_blocks(), [kernel_cpu(0)])
    fd, core = open_core(path)
    try:
        flat = flatten(core, fd)
        os.chmod(flat.path, 0o644)  # readable by others: not ours to trust any more
        again = flatten(core, fd)
    finally:
        os.close(fd)
    assert not again.reused
    assert stat.S_IMODE(again.path.stat().st_mode) == 0o600


def test_read_only_directory_uses_the_cache(tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    path = write_core(dumps / "d.elf", ram_blocks(), [kernel_cpu(0)])
    fd, core = open_core(path)
    real_mkstemp = __import__("tempfile").mkstemp

    def no_room_beside(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own name
        if Path(dir) == dumps:
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr("tempfile.mkstemp", no_room_beside)
    try:
        flat = flatten(core, fd)
    finally:
        os.close(fd)
    assert flat.path.parent == cache / "vmigdb" / "raw"
    assert stat.S_IMODE(flat.path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(flat.path.stat().st_mode) == 0o600


def test_nowhere_to_write(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = write_core(tmp_path / "d.elf", ram_blocks(), [kernel_cpu(0)])
    fd, core = open_core(path)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tempfile.mkstemp", full)
    try:
        with pytest.raises(SetupError, match=r"needs up to \d+ MiB.*No space left on device"):
            flatten(core, fd)
    finally:
        os.close(fd)
