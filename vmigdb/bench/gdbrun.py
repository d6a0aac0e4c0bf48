"""Driving GDB 13 for the benchmark: one batch-mode GDB per measurement, scripted in GDB's Python.

A workload is a Python body (a `main()` function) run inside GDB after `target remote`; it times GDB
commands with `timed(...)` around `gdb.execute` and reports with `emit(...)`: one line
`@@ {json}` on GDB's stdout. Whatever happens, the script ends with `delete` and `detach`, so the
server is left running with no breakpoint (QEMU's gdbstub only resumes the guest on a detach).
Every run has a timeout; a GDB that overstays it is killed and the server is reattached once and
detached to get the guest running again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vmigdb.bench.guest import BenchError, child_setup

GDB = "gdb"
GDB_ARGS = (
    "-nx",
    "-batch",
    "-ex",
    "set pagination off",
    "-ex",
    "set confirm off",
    "-ex",
    "set height 0",
    "-ex",
    "set width 0",
)

PRELUDE = """\
import gdb, json, time

def emit(**record):
    print("@@ " + json.dumps(record))
    gdb.flush()

def run(command):
    gdb.execute(command)

def quiet(command):
    return gdb.execute(command, to_string=True)

def timed(command, to_string=False):
    start = time.monotonic()
    gdb.execute(command, to_string=to_string)
    return time.monotonic() - start

def value(expression):
    return int(gdb.parse_and_eval(expression))

"""

EPILOGUE = """
gdb.execute("target remote {address}")
try:
    main()
    emit(kind="done")
except BaseException as exc:  # a gdb.error or an interrupt: say so, then clean up
    emit(kind="error", error=f"{{type(exc).__name__}}: {{exc}}")
finally:
    for command in ("delete", "detach"):
        try:
            gdb.execute(command, to_string=True)
        except BaseException:
            pass
"""


@dataclass
class GdbRun:
    records: list[dict]
    output: str

    def passes(self, kind: str = "pass") -> list[dict]:
        return [r for r in self.records if r.get("kind") == kind]

    def one(self, kind: str) -> dict:
        found = self.passes(kind)
        if not found:
            raise BenchError(
                f"GDB reported no {kind!r}; its output ends with:\n{tail(self.output)}"
            )
        return found[0]


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def parse_records(output: str) -> list[dict]:
    """The `@@ {json}` lines a script emitted, in order; other output is GDB's own."""
    records = []
    for line in output.splitlines():
        if line.startswith("@@ "):
            try:
                records.append(json.loads(line[3:]))
            except json.JSONDecodeError:
                continue
    return records


def script_text(body: str, address: str) -> str:
    return PRELUDE + body.strip() + "\n" + EPILOGUE.format(address=address)


class Gdb:
    """GDB runs against one server address, their scripts and outputs kept in workdir."""

    def __init__(self, address: str, workdir: Path) -> None:
        self.address = address
        self.workdir = workdir
        self.count = 0

    def _paths(self, name: str) -> tuple[Path, Path]:
        self.count += 1
        stem = f"{self.count:03d}-{name}"
        return self.workdir / f"{stem}.py", self.workdir / f"{stem}.out"

    def start(self, name: str, body: str) -> tuple[subprocess.Popen, Path]:
        script, out = self._paths(name)
        script.write_text(script_text(body, self.address))
        with open(out, "wb") as f:
            proc = subprocess.Popen(
                [GDB, *GDB_ARGS, "-x", str(script)],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                preexec_fn=child_setup,
            )
        return proc, out

    def run(self, name: str, body: str, timeout: float) -> GdbRun:
        """Run a script to its end; raise BenchError on a timeout or an error inside GDB."""
        proc, out = self.start(name, body)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            self.recover()
            raise BenchError(
                f"timeout after {timeout:.0f} s", detail=tail(out.read_text(errors="replace"))
            ) from None
        output = out.read_text(errors="replace")
        result = GdbRun(parse_records(output), output)
        for record in result.records:
            if record.get("kind") == "error":
                raise BenchError(f"GDB: {record['error']}", detail=tail(output))
        if not result.passes("done"):
            raise BenchError(
                f"GDB exited ({proc.returncode}) before the script ended", detail=tail(output)
            )
        return result

    def recover(self) -> None:
        """After a killed GDB: reattach and detach, which resumes the guest with no breakpoints."""
        proc, _ = self.start("recover", "def main():\n    pass\n")
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            stop(proc)


def wait_record(out: Path, kind: str, proc: subprocess.Popen, timeout: float) -> dict:
    """Wait until a background GDB has emitted a record of this kind."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = out.read_text(errors="replace") if out.exists() else ""
        for record in parse_records(text):
            if record.get("kind") == kind:
                return record
            if record.get("kind") == "error":
                raise BenchError(f"GDB: {record['error']}", detail=tail(text))
        if proc.poll() is not None:
            raise BenchError(f"GDB exited ({proc.returncode}) early", detail=tail(text))
        time.sleep(0.05)
    raise BenchError(f"GDB did not report {kind!r} within {timeout:.0f} s")


def interrupt(proc: subprocess.Popen, timeout: float = 30) -> None:
    """^C a GDB that is in `continue`: it stops the target, the script detaches and GDB exits."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise BenchError(f"GDB did not stop and detach within {timeout:.0f} s of ^C") from None


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def gdb_version() -> str:
    try:
        out = subprocess.run([GDB, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "GDB (not found)"
    first = out.splitlines()[0] if out else "GDB"
    return "GDB " + first.split()[-1] if first.startswith("GNU gdb") else first
