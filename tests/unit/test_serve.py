"""The serve path takes any driver: a subcommand is its arguments plus a factory for its machine.

A `toy-dump` subcommand for the in-memory dump driver, added beside `qemu`, `demo` and `dump` the
way `vmigdb dump` was and `vmigdb xen` will be, is served through `vmigdb.cli.main` with real sockets and
nothing of the protocol layer touched.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import pytest

from tests.unit.fake_dump import DumpDriver
from vmigdb import cli
from vmigdb.errors import SetupError
from vmigdb.serve import ServeCommand, Target
from vmigdb.wire.client import RspClient


def dump_command(opened: list[DumpDriver], closed: list[bool], fail: bool = False) -> ServeCommand:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--cpus", type=int, default=1)

    async def open_dump(args: argparse.Namespace) -> Target:
        if fail:
            raise SetupError("not a dump: no ELF header (pass a QEMU ELF dump)")
        driver = DumpDriver(args.cpus)
        opened.append(driver)

        async def close() -> None:
            closed.append(True)

        return Target(driver, close)

    return ServeCommand("toy-dump", "serve an in-memory dump", add_arguments, open_dump)


def client_session(path: Path, replies: list[bytes]) -> threading.Thread:
    """GDB's part, on a thread: a few packets, then `k` (ends the serving)."""

    def run() -> None:
        deadline = time.monotonic() + 20
        while True:  # the socket file appears at bind, a moment before listen
            try:
                client = RspClient.connect_unix(str(path), timeout=20)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        try:
            for payload in (b"qSupported", b"qfThreadInfo", b"c", b"k"):
                replies.append(client.request(payload))
        finally:
            client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_new_subcommand_serves_its_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    opened: list[DumpDriver] = []
    closed: list[bool] = []
    monkeypatch.setattr(cli, "SERVE_COMMANDS", (*cli.SERVE_COMMANDS, dump_command(opened, closed)))
    path = tmp_path / "gdb.sock"
    replies: list[bytes] = []
    thread = client_session(path, replies)
    status = cli.main(["toy-dump", "--cpus", "3", "--listen", f"unix:{path}"])
    thread.join(20)
    assert status == 0
    assert f"listening on unix:{path}" in capsys.readouterr().out
    assert b"vContSupported" not in replies[0] and replies[1] == b"m1,2,3"
    assert replies[2].startswith(b"E.vmigdb: the dump driver cannot run the guest")
    assert replies[3] == b"OK"  # kill: nothing to power off, the serving ends
    assert len(opened) == 1 and closed == [True]
    assert not path.exists()


def test_a_machine_that_cannot_be_opened_gives_the_port_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(cli, "SERVE_COMMANDS", (dump_command([], [], fail=True),))
    path = tmp_path / "gdb.sock"
    assert cli.main(["toy-dump", "--listen", f"unix:{path}"]) == 2
    assert capsys.readouterr().err == "vmigdb: not a dump: no ELF header (pass a QEMU ELF dump)\n"
    assert not os.path.exists(path)


def test_the_shared_serve_options_are_on_every_serving_subcommand() -> None:
    parser = cli.build_parser()
    for name in ("qemu", "demo"):
        extra = ["--kernel", "k"] if name == "qemu" else []
        args = parser.parse_args([name, *extra, "--listen", "unix:/x", "--stealth", "strict"])
        assert (args.listen, args.allow_remote, args.stealth) == ("unix:/x", False, "strict")
        assert args.time == "auto" and args.smp == 1
