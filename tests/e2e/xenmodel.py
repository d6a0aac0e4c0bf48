"""`vmigdb xen` serving a domain of the Xen model, and real GDB 13 against it.

The real CLI runs (`python -m vmigdb xen --domain guest`), with the binding hook pointing at the
model (tests/support/xenmodel/launch.py): the same serve loop, server, session, debugger and Xen
driver as on a Xen host; only libvmi's compiled library underneath is the model. The test builds
the same demo guest image to know its symbols (the build is deterministic), reads the guest's own
counters through GDB, and the model's state (views, events, frames) through `state()`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.xenmodel.guest import GuestImage, build_demo_image
from tests.support.xenmodel.launch import CONFIG_ENV
from vmigdb.hv.xen.binding import BINDING_ENV

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class XenModelVm:
    def __init__(self, tmp: Path, *, vcpus: int = 2, instructions_per_ms: int = 200,
                 **switches: int) -> None:
        self.image: GuestImage = build_demo_image(vcpus, **switches)
        self.vcpus = vcpus
        self.port = free_port()
        self.state_path = tmp / "state.json"
        self.stderr_path = tmp / "vmigdb.stderr"
        self.stdout_path = tmp / "vmigdb.stdout"
        config = {"name": "guest", "vcpus": vcpus, "switches": switches,
                  "instructions_per_ms": instructions_per_ms, "state": str(self.state_path)}
        env = dict(os.environ)
        env[BINDING_ENV] = "tests.support.xenmodel.launch:binding"
        env[CONFIG_ENV] = json.dumps(config)
        verbose = ["-v"] if os.environ.get("VMIGDB_XENMODEL_VERBOSE") else []  # packet traces
        argv = [sys.executable, "-m", "vmigdb", *verbose, "xen", "--domain", "guest",
                "--listen", f"127.0.0.1:{self.port}"]
        self.proc = subprocess.Popen(argv, stdout=open(self.stdout_path, "wb"),
                                     stderr=open(self.stderr_path, "wb"), cwd=ROOT, env=env)
        deadline = time.monotonic() + 60
        while "listening on" not in self.stdout_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"vmigdb xen did not start: {self.stderr()}")
            time.sleep(0.1)

    def sym(self, name: str) -> int:
        return self.image.sym(name).va

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def gdb(self, *commands: str, timeout: float = 240) -> str:
        """GDB in batch mode: connect, run `commands`, quit (GDB detaches); stdout+stderr."""
        argv = ["gdb", "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off",
                "-ex", f"target remote 127.0.0.1:{self.port}"]
        for command in commands:
            argv += ["-ex", command]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return result.stdout + result.stderr

    def state(self, timeout: float = 30) -> dict:
        """The model's state, written by vmigdb's event thread at its next listen."""
        before = self._read_state().get("sequence", 0)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self._read_state()
            if state.get("sequence", 0) > before:
                return state
            time.sleep(0.05)
        raise AssertionError(f"no model state from vmigdb: {self.stderr()[-2000:]}")

    def _read_state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def stop(self) -> dict:
        """End vmigdb (SIGTERM); the model's state as it left it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self._read_state()


def printed(out: str, tag: str) -> list[dict[str, int]]:
    """The `printf "TAG k=%lx ..."` lines GDB printed, as dicts of ints (hex)."""
    found = []
    for line in out.splitlines():
        if line.startswith(tag + " "):
            found.append({k: int(v, 16) for k, v in re.findall(r"(\w+)=([0-9a-fA-F]+)", line)})
    return found
