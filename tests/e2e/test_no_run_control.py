"""Real GDB 13 against a driver with no run control and no writes (the in-memory dump of the unit
tests, served by the real server): reads work, and every action is a clear error, never a hang."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.fake_dump import DumpDriver
from tests.unit.fakes import KERNEL_VA
from vmigdb.debugger.engine import Debugger
from vmigdb.rsp.server import ListenAddress, RspServer, bind_listener

pytestmark = pytest.mark.e2e

CANNOT_RUN = "Remote failure reply: E.vmigdb: the dump driver cannot run the guest"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, DumpDriver]]:
    """The dump served on a unix socket by a server on its own event loop thread."""
    driver = DumpDriver(2)
    path = tmp_path / "gdb.sock"
    loop = asyncio.new_event_loop()
    server = RspServer(Debugger(driver))
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start(bind_listener(ListenAddress.parse(f"unix:{path}"))))
        ready.set()
        loop.run_forever()
        loop.run_until_complete(server.close())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield str(path), driver
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def gdb(path: str, *commands: str) -> str:
    argv = ["gdb", "-nx", "-batch", "-ex", "set pagination off", "-ex", f"target remote {path}"]
    for command in commands:
        argv += ["-ex", command]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def test_gdb_reads_a_machine_that_cannot_run(served) -> None:
    path, driver = served
    out = gdb(path, "info threads", "info registers rip", f"x/2gx {KERNEL_VA:#x}", "detach")
    assert 'Thread 2 "CPU#1"' in out
    assert f"rip            {driver.regs[1]['rip']:#x}" in out
    first = int.from_bytes(driver.ram[0x10_0000:0x10_0008], "little")
    assert f"{KERNEL_VA:#x}:\t{first:#018x}" in out
    assert "detached" in out


def test_every_action_is_a_clear_error_and_nothing_changes(served) -> None:
    path, driver = served
    ram, rip = bytes(driver.ram), driver.regs[1]["rip"]
    out = gdb(
        path,
        "continue",
        "stepi",
        f"set {{char}}{KERNEL_VA:#x} = 1",
        "set $rax = 1",
        f"break *{KERNEL_VA + 0x10:#x}",
        "continue",
        "delete",
        f"watch *(int *){KERNEL_VA:#x}",
        "continue",
        "delete",
        "info registers rip",
        "detach",
    )
    assert out.count(CANNOT_RUN) == 2, out  # continue and stepi; the stop shows where it stands
    assert f"Cannot access memory at address {KERNEL_VA:#x}" in out
    refused = "'E.vmigdb: the dump driver cannot write registers'"
    assert f'Could not write register "rax"; remote failure reply {refused}' in out
    assert "Cannot insert breakpoint 1." in out  # GDB drops a Z packet's error text
    assert "Could not insert hardware watchpoint 2." in out
    assert f"rip            {rip:#x}" in out and "detached" in out
    assert bytes(driver.ram) == ram and driver.regs[1]["rip"] == rip
