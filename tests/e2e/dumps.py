"""Helpers for the post-mortem end-to-end tests: GDB in batch mode with each command's output
apart, and `vmigdb dump` started as a user starts it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.conftest import ROOT, free_port


def gdb(
    address: str, *commands: str, timeout: float = 120, remote_timeout: int | None = None
) -> dict[str, str]:
    """Run GDB in batch mode; what each command printed, by its index (and "connect")."""
    argv = ["gdb", "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off"]
    if remote_timeout is not None:
        argv += ["-ex", f"set remotetimeout {remote_timeout}"]
    argv += ["-ex", f"target remote {address}", "-ex", "echo @@ 0\\n"]
    for i, command in enumerate(commands, 1):
        argv += ["-ex", command, "-ex", f"echo @@ {i}\\n"]
    # One stream, so that errors (stderr) stay in the section of the command that made them.
    out = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    text = out.stdout
    # [connect's output, "0", command 1's output, "1", command 2's output, ..., "N", the rest]
    parts = re.split(r"^@@ (\d+)\n", text, flags=re.M)
    found: dict = {0: parts[0], "connect": parts[0]}
    for marker, body in zip(parts[1::2], parts[2::2], strict=True):
        i = int(marker) + 1  # the output after marker i-1 is command i's
        if i <= len(commands):
            found[i] = body
            found.setdefault(commands[i - 1], body)  # a repeated command: its first output
    found["all"] = text
    return found


def registers(text: str) -> dict[str, str]:
    """`info registers` as name -> the rest of its line."""
    rows = (line.split(None, 1) for line in text.strip().splitlines())
    return {name: rest.strip() for name, rest in rows}


class Replay:
    """`vmigdb dump` serving a file, as a user starts it."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.stdout = tmp / f"replay-{self.port}.stdout"
        self.stderr_path = tmp / f"replay-{self.port}.stderr"
        argv = [sys.executable, "-m", "vmigdb", "dump", *args, "--listen", self.address]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdout=open(self.stdout, "wb"), stderr=open(self.stderr_path, "wb"), cwd=ROOT
        )
        deadline = time.monotonic() + 120
        while "listening on" not in self.stdout.read_text():
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, self.stderr()
            time.sleep(0.02)
        self.listening_after = time.monotonic() - self.started

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def first_prompt(address: str) -> tuple[float, str]:
    """Seconds from starting GDB to its first prompt after `target remote` (it has the stop,
    the registers and the kernel's symbol file by then), and what it printed."""
    start = time.monotonic()
    out = gdb(address)
    return time.monotonic() - start, out["connect"]
