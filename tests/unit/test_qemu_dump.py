"""`dump_guest_memory`: QEMU writes into a file vmigdb created owner-only and passes by descriptor;
a running guest, an existing file, a QEMU failure or a cancelled save leave nothing behind."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from vmigdb.hv.qemu.dump import DumpRefused, dump_guest_memory
from vmigdb.hv.qemu.qmp import QmpError


class FakeQmp:
    def __init__(self, status: str = "debug", fail: str | None = None, hang: bool = False) -> None:
        self._status = status
        self.fail = fail
        self.hang = hang
        self.fds: dict[str, int] = {}
        self.commands: list[tuple[str, dict | None]] = []

    async def status(self) -> str:
        return self._status

    async def getfd(self, name: str, fd: int) -> None:
        self.fds[name] = os.dup(fd)  # QEMU keeps its own copy

    async def execute(self, cmd: str, args: dict | None = None) -> object:
        self.commands.append((cmd, args))
        if cmd == "dump-guest-memory":
            if self.hang:
                await asyncio.sleep(3600)
            if self.fail:
                raise QmpError(self.fail, "GenericError")
            name = args["protocol"].removeprefix("fd:")
            os.write(self.fds.pop(name), b"\x7fELF" + bytes(4092))
        elif cmd == "closefd":
            os.close(self.fds.pop(args["fdname"]))
        return {}


def test_a_stopped_guest_is_written_to_a_new_private_file(tmp_path: Path) -> None:
    qmp = FakeQmp("debug")
    written = asyncio.run(dump_guest_memory(qmp, tmp_path / "guest.elf"))
    assert written.path == tmp_path / "guest.elf" and written.size == 4096
    assert os.stat(written.path).st_mode & 0o777 == 0o600
    (cmd, args) = qmp.commands[0]
    assert cmd == "dump-guest-memory" and args["paging"] is False
    assert args["protocol"].startswith("fd:vmigdb-dump-")  # QEMU opens no path of ours


@pytest.mark.parametrize("status", ["running", "suspended"])
def test_a_running_guest_is_refused(tmp_path: Path, status: str) -> None:
    with pytest.raises(DumpRefused, match=f"the guest is {status}: stop it first"):
        asyncio.run(dump_guest_memory(FakeQmp(status), tmp_path / "guest.elf"))
    assert not (tmp_path / "guest.elf").exists()


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "guest.elf").write_bytes(b"keep")
    with pytest.raises(DumpRefused, match="cannot create .*guest.elf: File exists"):
        asyncio.run(dump_guest_memory(FakeQmp(), tmp_path / "guest.elf"))
    assert (tmp_path / "guest.elf").read_bytes() == b"keep"


def test_a_qemu_failure_leaves_no_file(tmp_path: Path) -> None:
    qmp = FakeQmp(fail="dump: failed to save memory: No space left on device")
    with pytest.raises(DumpRefused, match="QEMU could not dump the guest: .*No space left"):
        asyncio.run(dump_guest_memory(qmp, tmp_path / "guest.elf"))
    assert not (tmp_path / "guest.elf").exists()
    assert not qmp.fds  # the descriptor QEMU held was closed with closefd


def test_a_cancelled_save_leaves_no_file(tmp_path: Path) -> None:
    async def scenario() -> None:
        task = asyncio.create_task(dump_guest_memory(FakeQmp(hang=True), tmp_path / "guest.elf"))
        await asyncio.sleep(0.05)
        assert (tmp_path / "guest.elf").exists()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert not (tmp_path / "guest.elf").exists()
