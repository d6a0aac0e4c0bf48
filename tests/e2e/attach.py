"""QEMUs started the way a user starts them (not by vmigdb), and `vmigdb attach` against them.

Each QEMU gets two QMP sockets: one for vmigdb, one for the test's own checks (QEMU serves one
client per QMP socket), so the test sees what QEMU says of itself while vmigdb is attached.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.conftest import ROOT, free_port


def qmp(socket_path: Path, command: str, args: dict | None = None) -> object:
    """One QMP command on the test's own socket."""
    from qemu.qmp import QMPClient

    async def run() -> object:
        client = QMPClient("test")
        await client.connect(str(socket_path))
        try:
            return await client.execute(command, args)
        finally:
            await client.disconnect()

    return asyncio.run(run())


def chardevs(socket_path: Path) -> set[str]:
    return {d["label"] for d in qmp(socket_path, "query-chardev")}  # type: ignore[union-attr]


def status(socket_path: Path) -> str:
    return qmp(socket_path, "query-status")["status"]  # type: ignore[index]


class PlainQemu:
    """qemu-system-x86_64 started directly, with a QMP socket for vmigdb and one for the test."""

    def __init__(
        self,
        tmp: Path,
        kernel: Path,
        initrd: Path,
        append: str,
        *,
        shared_ram: bool = False,
        disk: Path | None = None,
        memory: int = 512,
    ) -> None:
        self.vmigdb_qmp = tmp / "vmigdb-qmp.sock"
        self.test_qmp = tmp / "test-qmp.sock"
        self.console_path = tmp / "console.log"
        argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            str(memory),
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            f"console=ttyS0 {append}",
            "-serial",
            f"file:{self.console_path}",
            "-display",
            "none",
            "-monitor",
            "none",
            "-qmp",
            f"unix:{self.vmigdb_qmp},server=on,wait=off",
            "-qmp",
            f"unix:{self.test_qmp},server=on,wait=off",
            "-rtc",
            "clock=vm",
            "-icount",
            "shift=3,sleep=on,align=on",
        ]
        if shared_ram:
            self.ram_file = Path(f"/dev/shm/vmigdb-test-{tmp.name}")
            argv += [
                "-object",
                f"memory-backend-file,id=ram0,size={memory}M,mem-path={self.ram_file},share=on",
                "-machine",
                "pc,memory-backend=ram0",
            ]
        else:
            self.ram_file = None
        if disk is not None:
            argv += ["-drive", f"file={disk},format=qcow2,if=virtio"]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "qemu.stderr", "wb"),
        )
        deadline = time.monotonic() + 30
        while not (self.test_qmp.exists() and self.vmigdb_qmp.exists()):
            assert self.proc.poll() is None, (tmp / "qemu.stderr").read_text()
            assert time.monotonic() < deadline, "QEMU did not open its QMP sockets"
            time.sleep(0.1)

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.console())
            if match:
                return match
            assert self.proc.poll() is None, "QEMU exited"
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {pattern!r} on the console")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.ram_file is not None:
            self.ram_file.unlink(missing_ok=True)


class Attached:
    """A running `vmigdb attach`."""

    def __init__(self, tmp: Path, *how: str) -> None:
        self.port = free_port()
        self.stdout_path = tmp / f"attach-{self.port}.stdout"
        self.stderr_path = tmp / f"attach-{self.port}.stderr"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmigdb", "attach", *how, "--listen", f"127.0.0.1:{self.port}"],
            stdout=open(self.stdout_path, "wb"),
            stderr=open(self.stderr_path, "wb"),
            cwd=ROOT,
        )
        deadline = time.monotonic() + 60
        while "listening on" not in self.stdout_path.read_text():
            assert self.proc.poll() is None, f"vmigdb attach exited: {self.stderr()}"
            assert time.monotonic() < deadline, f"vmigdb attach did not listen: {self.stderr()}"
            time.sleep(0.05)
        self.listening = time.monotonic() - self.started

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def gdb(self, *commands: str, timeout: float = 180) -> str:
        argv = [
            "gdb",
            "-nx",
            "-batch",
            "-ex",
            "set pagination off",
            "-ex",
            "set remotetimeout 30",  # a loaded host: GDB's 2 s default is not the point here
            "-ex",
            f"target remote {self.address}",
        ]
        for command in commands:
            argv += ["-ex", command]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return result.stdout + result.stderr

    def wait_exit(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True)
