"""The Debian 12 test disk image for end-to-end tests: a private qcow2 overlay of the cached image
(the image itself is never written), and `vmigdb qemu --drive` booting it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, Vm, free_port

LOGIN = r"vmigdb-disk login:"


def disk_image():
    """The built test disk, or a skip saying how to build it (scripts/test builds it)."""
    from vmigdb.images.disk import build_disk

    if os.geteuid() != 0:
        pytest.skip("the test disk image is built as root (mmdebstrap --mode=root)")
    return build_disk()


def overlay(base: Path, directory: Path) -> Path:
    """A qcow2 overlay of `base` in `directory`: the guest writes there, snapshots live there."""
    path = directory / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(path)],
        check=True,
    )
    return path


def program_symbols(program: Path) -> dict[str, int]:
    """Symbol addresses of a test program's host copy (static, non-PIE: as in the guest)."""
    out = subprocess.run(["nm", str(program)], capture_output=True, text=True, check=True).stdout
    return {m[2]: int(m[1], 16) for m in re.finditer(r"^([0-9a-f]+) \w (\S+)$", out, re.M)}


class DiskVm(Vm):
    """`vmigdb qemu --drive OVERLAY`: the guest boots with its own GRUB, kernel and systemd."""

    def __init__(self, tmp: Path, drive: Path, *, memory: int = 1024, extra: tuple[str, ...] = ()):
        self.port = free_port()
        self.console_path = tmp / "console.log"
        self.stderr_path = tmp / "vmigdb.stderr"
        self.stdout_path = tmp / "vmigdb.stdout"
        argv = [
            sys.executable,
            "-m",
            "vmigdb",
            "qemu",
            "--drive",
            str(drive),
            "--memory",
            str(memory),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--serial",
            str(self.console_path),
            *extra,
        ]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdout=open(self.stdout_path, "wb"),
            stderr=open(self.stderr_path, "wb"),
            cwd=ROOT,
        )
        self.wait_for(lambda: "listening on" in self.stdout_path.read_text(), 60, "listening on")
        self.wait_console(LOGIN, 900)
        self.boot_seconds = time.monotonic() - self.started
        self.ksyms = {}

    def gdb(self, *commands: str, timeout: float = 300) -> str:
        # GDB's first requests make vmigdb analyse the guest (1-2 s, longer on a loaded host):
        # wait longer than GDB's default 2 s for them.
        argv = ["gdb", "-nx", "-batch", "-ex", "set pagination off", "-ex", "set remotetimeout 30"]
        argv += ["-ex", f"target remote {self.address}"]
        for command in commands:
            argv += ["-ex", command]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return result.stdout + result.stderr
