"""A vmigdb server started for a script, with the CLI's own options.

`Server.start("qemu", kernel=K, initrd=I, smp=2)` runs `python -m vmigdb qemu --kernel K --initrd I
--smp 2 --listen 127.0.0.1:<free port>` and returns once it says `listening on`, exactly as a
user would start it; `stop()` sends SIGTERM, which removes QEMU and everything vmigdb created.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class ServerError(Exception):
    """The server did not start; the message carries what it said."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_arguments(options: dict[str, object]) -> list[str]:
    """`smp=2, kernel="K", qemu_args=["-s"]` -> `--smp 2 --kernel K -- -s`: option names as the
    CLI spells them (underscores become dashes); True is a bare flag, False and None are left out;
    a list repeats its option; `qemu_args` go after `--`."""
    argv: list[str] = []
    extra: list[str] = []
    for name, value in options.items():
        if name == "qemu_args":
            extra = [str(v) for v in value]  # type: ignore[union-attr]
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is None or value is False:
            continue
        elif isinstance(value, list | tuple):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv + (["--", *extra] if extra else [])


class Server:
    def __init__(
        self, proc: subprocess.Popen, address: str, log_dir: Path, console: Path | None = None
    ) -> None:
        self.proc = proc
        self.address = address
        self.log_dir = log_dir
        self.console_path = console  # the guest's serial console, when the server has one

    @classmethod
    def start(cls, command: str = "demo", *, timeout: float = 120, **options: object) -> Server:
        """Start `vmigdb COMMAND` with `options` (see `cli_arguments`) on a free loopback port
        unless `listen` is given. Its stdout and stderr go to files in a private directory."""
        if "listen" not in options:
            options["listen"] = f"127.0.0.1:{_free_port()}"
        address = str(options["listen"])
        log_dir = Path(tempfile.mkdtemp(prefix="vmigdb-script-"))
        if "serial" not in options and command in ("demo", "qemu"):
            options["serial"] = log_dir / "console"
        argv = [sys.executable, "-m", "vmigdb", command, *cli_arguments(options)]
        with open(log_dir / "stdout", "wb") as out, open(log_dir / "stderr", "wb") as err:
            proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        serial = options.get("serial")
        server = cls(proc, address, log_dir, Path(str(serial)) if serial else None)
        deadline = time.monotonic() + timeout
        while "listening on" not in server.stdout():
            if proc.poll() is not None:
                raise ServerError(f"vmigdb {command} exited ({proc.returncode}): {server.stderr()}")
            if time.monotonic() > deadline:
                server.stop()
                raise ServerError(f"vmigdb {command} was not listening after {timeout:g} s")
            time.sleep(0.1)
        return server

    def console(self) -> str:
        """What the guest printed on its serial console so far."""
        if self.console_path is None:
            return ""
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, text: str, timeout: float = 120) -> None:
        """Wait until the guest's console shows `text` (e.g. the demo's "vmigdb-guest: ready").

        :raises ServerError: if it does not in time, or the server ends.
        """
        deadline = time.monotonic() + timeout
        while text not in self.console():
            if self.proc.poll() is not None:
                raise ServerError(f"vmigdb exited ({self.proc.returncode}): {self.stderr()}")
            if time.monotonic() > deadline:
                raise ServerError(f"the guest console did not show {text!r} in {timeout:g} s")
            time.sleep(0.2)

    def stdout(self) -> str:
        return (self.log_dir / "stdout").read_text(errors="replace")

    def stderr(self) -> str:
        return (self.log_dir / "stderr").read_text(errors="replace")

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for name in ("stdout", "stderr", "console"):
            try:
                os.unlink(self.log_dir / name)
            except FileNotFoundError:
                pass
        try:
            self.log_dir.rmdir()
        except OSError:
            pass
