"""The two servers the benchmark compares, each booting the same demo guest.

- `QemuServer`: plain `qemu-system-x86_64 ... -gdb tcp:127.0.0.1:PORT` (QEMU's own gdbstub).
- `VmigdbServer`: `vmigdb qemu ... --listen 127.0.0.1:PORT --time MODE`.

Same kernel, initrd, kernel command line, RAM, vCPUs, accelerator (TCG) and guest time: QEMU's
gdbstub gets the very QEMU arguments `vmigdb qemu --time MODE` adds (`TIME_MODES`), so a ratio
compares like with like. Each runs in its own directory, is started with a parent-death signal (so
a killed benchmark takes it along), and is waited on until the guest prints `vmigdb-guest: ready`
and the loop program has started.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vmigdb.hv.qemu.process import TIME_MODES
from vmigdb.images.build import demo_append

PR_SET_PDEATHSIG = 1
BOOT_TIMEOUT = 180.0


class BenchError(Exception):
    """A measurement could not be made; the message goes in the table, detail on stderr."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def child_setup() -> None:
    """In the child before exec: die with the benchmark (SIGTERM when its parent goes)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # GDB is stopped with ^C; never inherit SIG_IGN
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KSYM_RE = re.compile(r"vmigdb-guest: ksym (\S+) ([0-9a-f]+)")
LOOP_START_RE = re.compile(r"loop pid=(\d+) target=0x([0-9a-f]+) line=(\d+)")


def parse_ksyms(console: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2), 16) for m in KSYM_RE.finditer(console)}


class Server:
    """A booted guest behind one GDB server; use as a context manager."""

    name = ""
    title = ""

    def __init__(
        self,
        workdir: Path,
        kernel: Path,
        initrd: Path,
        append: str,
        *,
        memory_mib: int,
        smp: int = 1,
        time_mode: str,
    ) -> None:
        if time_mode not in TIME_MODES:
            raise ValueError(f"unknown time mode {time_mode!r}")
        self.workdir = workdir
        self.kernel, self.initrd, self.append = kernel, initrd, demo_append(append)
        self.memory_mib, self.smp, self.time_mode = memory_mib, smp, time_mode
        self.port = free_port()
        self.console_path = workdir / "console.log"
        self.stdout_path = workdir / "server.stdout"
        self.stderr_path = workdir / "server.stderr"
        self.proc: subprocess.Popen | None = None
        self.ksyms: dict[str, int] = {}
        self.loop_target = 0
        self.loop_line = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def kernel_cmdline(self) -> str:
        return "console=ttyS0" + (f" {self.append}" if self.append else "")

    def argv(self) -> list[str]:
        raise NotImplementedError

    def listening(self) -> bool:
        return True

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=child_setup,
            )
        deadline = time.monotonic() + BOOT_TIMEOUT
        self._wait(self.listening, deadline, "the server to listen")
        self._wait(lambda: "vmigdb-guest: ready" in self.console(), deadline, "vmigdb-guest: ready")
        self._wait(lambda: LOOP_START_RE.search(self.console()), deadline, "the loop program")
        console = self.console()
        self.ksyms = parse_ksyms(console)
        m = LOOP_START_RE.search(console)
        assert m is not None
        self.loop_target, self.loop_line = int(m.group(2), 16), int(m.group(3))
        for line in console.splitlines():
            if line.startswith("vmigdb-guest: error"):
                raise BenchError(f"{self.title}: guest said {line!r}")

    def _wait(self, predicate, deadline: float, what: str) -> None:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.title} exited ({self.proc.returncode}) while waiting for {what}",
                    detail=self.stderr()[-3000:],
                )
            if predicate():
                return
            time.sleep(0.1)
        raise BenchError(
            f"{self.title}: timed out waiting for {what}", detail=self.stderr()[-3000:]
        )

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def server_pid(self) -> int | None:
        """The process whose private memory is vmigdb's footprint (None: not measured)."""
        return None


class QemuServer(Server):
    name = "qemu"
    title = "QEMU gdbstub"

    def argv(self) -> list[str]:
        return [
            "qemu-system-x86_64", "-accel", "tcg", "-m", str(self.memory_mib),
            "-smp", str(self.smp), "-kernel", str(self.kernel), "-initrd", str(self.initrd),
            "-append", self.kernel_cmdline, "-serial", f"file:{self.console_path}",
            "-display", "none", "-monitor", "none", "-no-reboot",
            "-gdb", f"tcp:{self.address}", *TIME_MODES[self.time_mode],
        ]  # fmt: skip


class VmigdbServer(Server):
    name = "vmigdb"
    title = "vmigdb"

    def argv(self) -> list[str]:
        exe = Path(sys.executable).parent / "vmigdb"
        head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "vmigdb"]
        return head + [
            "qemu", "--kernel", str(self.kernel), "--initrd", str(self.initrd),
            "--listen", self.address, "--serial", str(self.console_path),
            "--smp", str(self.smp), "--memory", str(self.memory_mib), "--accel", "tcg",
            "--append", self.append, "--time", self.time_mode,
        ]  # fmt: skip

    def listening(self) -> bool:
        try:
            return "listening on" in self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return False

    def server_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


def qemu_version() -> str:
    try:
        out = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "QEMU (not found)"
    m = re.search(r"version (\S+)", out)
    return f"QEMU {m.group(1)}" if m else "QEMU ?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def unpark_loop(gdb, loop_binary: Path, console: Callable[[], str]) -> None:
    """Let the guest's loop program start its rounds (it waits until a debugger says go): the
    load a workload wants on a vCPU, from the moment it wants it."""
    body = f"""
def main():
    quiet("add-symbol-file {loop_binary}")
    run("break vmigdb_loop_parked")
    run("continue")
    run("delete")
    run("set var vmigdb_loop_go = 1")
"""
    gdb.run("unpark", body, 60)
    deadline = time.monotonic() + 60
    while not re.search(r"loop pid=\d+ round=1 ", console()):
        if time.monotonic() > deadline:
            raise BenchError("the loop program did not start its rounds after unparking")
        time.sleep(0.1)
