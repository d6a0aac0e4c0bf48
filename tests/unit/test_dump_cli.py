"""`vmigdb dump` on bad input: one line on stderr, exit status 2, nothing on stdout (libvmi prints
its own errors there), and the listening socket given back. Real libvmi on real files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.unit.qemu_dump import kernel_cpu, write_core
from vmigdb import cli


def truncated_dump(tmp: Path) -> Path:
    path = write_core(tmp / "guest.elf", [(0, bytes(1 << 20))], [kernel_cpu(0)])
    os.truncate(path, path.stat().st_size - 4096)
    return path


def text_file(tmp: Path) -> Path:
    path = tmp / "notes.txt"
    path.write_text("not memory\n")
    return path


def zeros(tmp: Path) -> Path:
    path = tmp / "zeros.raw"
    path.write_bytes(bytes(1 << 20))  # a whole number of pages, but no kernel in it
    return path


def gzipped(tmp: Path) -> Path:
    path = tmp / "guest.elf.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(4092))
    return path


def bad_regs(tmp: Path) -> list[str]:
    (tmp / "regs.json").write_text('{"vcpus": [{"rip": "zero"}]}')
    return ["--regs", str(tmp / "regs.json")]


@pytest.mark.parametrize(
    ("image", "extra", "message"),
    [
        (lambda t: t / "missing.elf", lambda t: [], r"cannot open .*missing\.elf: No such file"),
        (lambda t: t, lambda t: [], r"is not a regular file"),
        (text_file, lambda t: [], r"is not a memory dump: not an ELF core, and its size"),
        (truncated_dump, lambda t: [], r"guest\.elf is truncated"),
        (gzipped, lambda t: [], r"\.gz is gzip-compressed \(decompress it first\): vmigdb reads"),
        (zeros, lambda t: [], r"has no registers and no Linux kernel was found in it \(.*\): give"),
        (zeros, bad_regs, r"regs\.json: vcpus\[0\]\.rip: 'zero' is not a number"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capfd, image, extra, message) -> None:
    sock = tmp_path / "gdb.sock"
    argv = ["dump", "--image", str(image(tmp_path)), *extra(tmp_path), "--listen", f"unix:{sock}"]
    assert cli.main(argv) == 2
    out, err = capfd.readouterr()
    assert out == ""
    lines = [line for line in err.splitlines() if not line.startswith("vmigdb: libvmi File")]
    assert len(lines) == 1 and lines[0].startswith("vmigdb: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not sock.exists()
