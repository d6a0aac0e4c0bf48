"""End-to-end fixtures: the demo guest booted under vmigdb, and real GDB 13 driving it.

Each test module that needs a machine asks for `vm` (one boot per module); tests read the guest's own
console lines (`vmigdb-guest: ksym NAME ADDR`, program output) as ground truth.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmigdb.images.build import demo_append

ROOT = Path(__file__).resolve().parents[2]

if shutil.which("qemu-system-x86_64") is None or shutil.which("gdb") is None:
    pytest.skip("end-to-end tests need qemu-system-x86 and gdb", allow_module_level=True)


# Modules that boot the Debian test disk run last: scripts/test builds the disk image in the
# background meanwhile (the first build takes minutes), and they wait for it on the cache's lock.
DISK_MODULES = ("test_disk_guest.py", "test_attach_libvirt.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name in DISK_MODULES)  # stable: order kept otherwise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Vm:
    """A running `vmigdb qemu` serving the demo guest, with its console log."""

    def __init__(
        self,
        tmp: Path,
        kernel: Path,
        initrd: Path,
        *,
        smp: int = 1,
        append: str = "",
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        listen_timeout: float = 60,
    ) -> None:
        self.port = free_port()
        self.console_path = tmp / "console.log"
        self.stderr_path = tmp / "vmigdb.stderr"
        self.stdout_path = tmp / "vmigdb.stdout"
        argv = [
            sys.executable,
            "-m",
            "vmigdb",
            "qemu",
            "--kernel",
            str(kernel),
            "--initrd",
            str(initrd),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--serial",
            str(self.console_path),
            "--smp",
            str(smp),
            "--memory",
            "512",
        ]
        argv += ["--append", demo_append(append)]
        argv += list(extra)
        self.proc = subprocess.Popen(
            argv,
            stdout=open(self.stdout_path, "wb"),
            stderr=open(self.stderr_path, "wb"),
            cwd=ROOT,
            env=env,
        )
        try:
            self.wait_for(
                lambda: "listening on" in self.stdout_path.read_text(),
                listen_timeout,
                "listening on",
            )
            self.wait_console(r"vmigdb-guest: ready", 120)
        except BaseException:
            self.stop()  # a guest that did not come up must not run on beside the next tests
            raise
        self.ksyms = {
            m.group(1): int(m.group(2), 16)
            for m in re.finditer(r"vmigdb-guest: ksym (\S+) ([0-9a-f]+)", self.console())
        }

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vmigdb exited ({self.proc.returncode}): {self.stderr()}")
            try:
                if predicate():
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; vmigdb said: {self.stderr()[-2000:]}")

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def wait_console(self, pattern: str, timeout: float = 30, *, after: int = 0) -> re.Match:
        found: list[re.Match] = []

        def check() -> bool:
            m = re.search(pattern, self.console()[after:])
            if m:
                found.append(m)
            return m is not None

        self.wait_for(check, timeout, f"console {pattern!r}")
        return found[0]

    def gdb_argv(self, *commands: str) -> list[str]:
        """The command line of a batch GDB connected to the server that runs `commands`."""
        argv = [
            "gdb",
            "-nx",
            "-batch",
            "-ex",
            "set pagination off",
            "-ex",
            "set confirm off",
            "-ex",
            f"target remote {self.address}",
        ]
        for command in commands:
            argv += ["-ex", command]
        return argv

    def gdb(self, *commands: str, timeout: float = 120) -> str:
        """Run GDB in batch mode against the server; returns stdout+stderr."""
        argv = self.gdb_argv(*commands)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return result.stdout + result.stderr

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def guest_image():
    from vmigdb.images.build import build_guest

    return build_guest()


def boot(tmp_path_factory, guest_image, **kwargs) -> Iterator[Vm]:
    vm = Vm(tmp_path_factory.mktemp("vm"), guest_image.kernel, guest_image.initrd, **kwargs)
    try:
        yield vm
    finally:
        vm.stop()
        if os.environ.get("VMIGDB_KEEP_LOGS"):
            print(vm.stderr())


def unpark_loop(vm: Vm, programs: Path) -> None:
    """Let the guest's `loop:park` program start its rounds: a busy process from now on."""
    vm.gdb(
        f"add-symbol-file {programs / 'loop'}",
        "break vmigdb_loop_parked",
        "continue",
        "delete",
        "set var vmigdb_loop_go = 1",
        "detach",
    )
    vm.wait_console(r"loop pid=\d+ round=1 ", 60)


@pytest.fixture(scope="module")
def vm(tmp_path_factory, guest_image) -> Iterator[Vm]:
    yield from boot(tmp_path_factory, guest_image, smp=2)
