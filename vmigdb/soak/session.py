"""One soak session: a batch GDB running workloads, watched from outside while it runs.

While GDB runs, the guest console and vmigdb's stderr are read as they grow (a guest fault cuts the
session short, with the GDB transcript kept), ^C is delivered when the script asks for it (SIGINT
to GDB while it is in `continue`, as a user's terminal does), and a session that overstays its
timeout is killed. Afterwards every memory dump GDB wrote is compared with the program's file.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vmigdb.bench.gdbrun import Gdb, parse_records, stop, tail
from vmigdb.soak.console import GuestConsole
from vmigdb.soak.plan import Facts
from vmigdb.soak.serverlog import ServerLog

GDBSIDE = (Path(__file__).parent / "gdbside.py").read_text()
FAULT_GRACE = 5.0  # seconds a session may go on after a guest fault shows, for the transcript
# What GDB prints when the remote side misbehaves, even where no command failed.
GDB_TROUBLE = re.compile(
    r"Remote communication error|Remote replied unexpectedly|Ignoring packet error|"
    r"Remote connection closed|Timed out|Bogus|internal-error|Couldn't|Cannot insert|"
    r"Cannot remove|Cannot access memory|Unexpected|unexpected|Quit$"
)
GDB_WARNING = re.compile(r"^warning: (.*)$", re.M)
GDB_EXPECTED_WARNINGS = ("File transfers from remote targets can be slow",)


@dataclass
class Failure:
    what: str  # guest fault, detection, stuck, server error, gdb, dump, vmigdb exited
    message: str
    session: int
    detail: str = ""


@dataclass
class SessionResult:
    number: int
    kinds: list[str]
    seconds: float
    ops: Counter = field(default_factory=Counter)
    extra: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    transcript: Path | None = None
    infos: dict[str, str] = field(default_factory=dict)
    warnings: Counter = field(default_factory=Counter)


class SessionRunner:
    def __init__(
        self,
        gdb: Gdb,
        console: GuestConsole,
        server_log: ServerLog,
        facts: Facts,
        rng: random.Random,
        alive,
    ) -> None:
        self.gdb = gdb
        self.console = console
        self.server_log = server_log
        self.facts = facts
        self.rng = rng
        self.alive = alive  # () -> bool: vmigdb still running

    def poll(self) -> None:
        self.console.poll()
        self.server_log.poll()

    def run(self, number: int, kinds: list[str], main_body: str, timeout: float) -> SessionResult:
        body = GDBSIDE + "\n\n" + main_body
        result = SessionResult(number, kinds, 0.0)
        tag = f"session {number} ({'+'.join(kinds)})"
        self.console.tag = self.server_log.tag = tag
        started = time.monotonic()
        proc, out = self.gdb.start(f"s{number}-{'+'.join(kinds)}", body)
        result.transcript = out
        faults_before = len(self.console.faults)
        interrupted: set[int] = set()
        pending: list[tuple[float, int]] = []  # (when, n) SIGINTs to deliver
        fault_seen = 0.0
        try:
            while proc.poll() is None:
                time.sleep(0.1)
                self.poll()
                now = time.monotonic()
                for record in parse_records(_read(out)):
                    if record.get("kind") == "interrupt-me" and record["n"] not in interrupted:
                        interrupted.add(record["n"])
                        pending.append((now + self.rng.uniform(0.3, 3.0), record["n"]))
                for when, n in list(pending):
                    if now >= when:
                        pending.remove((when, n))
                        os.kill(proc.pid, signal.SIGINT)
                if len(self.console.faults) > faults_before and not fault_seen:
                    fault_seen = now
                if fault_seen and now - fault_seen > FAULT_GRACE:
                    stop(proc)
                    result.failures.append(
                        Failure("gdb", "session cut short: the guest faulted", number)
                    )
                    break
                if not self.alive():
                    stop(proc)
                    break
                if now - started > timeout:
                    stop(proc)
                    result.failures.append(
                        Failure(
                            "gdb",
                            f"GDB session still running after {timeout:.0f} s (guest or server "
                            f"hung?): {'+'.join(kinds)}",
                            number,
                            tail(_read(out), 40),
                        )
                    )
                    self.gdb.recover()
                    break
        finally:
            stop(proc)
        result.seconds = time.monotonic() - started
        self.poll()
        self._collect(result, _read(out))
        return result

    def _collect(self, result: SessionResult, output: str) -> None:
        records = parse_records(output)
        for record in records:
            kind = record.get("kind")
            if kind == "op":
                result.ops[record["op"]] += record["count"]
                for key, val in record.items():
                    if key not in ("kind", "op", "count") and isinstance(val, int):
                        result.extra[f"{record['op']}: {key}"] += val
            elif kind == "dump":
                self._check_dump(result, record)
            elif kind == "info":
                result.infos[record["what"]] = record["text"]
            elif kind == "error":
                last_op = next(
                    (r.get("op") for r in reversed(records) if r.get("kind") == "op"), None
                )
                result.failures.append(
                    Failure(
                        "gdb",
                        f"{record['error']} (workloads {'+'.join(result.kinds)}; "
                        f"last finished op: {last_op})",
                        result.number,
                        tail(output, 40),
                    )
                )
        if not any(r.get("kind") in ("done", "error") for r in records) and not result.failures:
            result.failures.append(
                Failure("gdb", "GDB exited before its script ended", result.number, tail(output))
            )
        for line in output.splitlines():
            if GDB_TROUBLE.search(line) and not line.startswith("@@ "):
                result.failures.append(Failure("gdb", f"GDB said: {line.strip()}", result.number))
        for m in GDB_WARNING.finditer(output):
            if not m.group(1).startswith(GDB_EXPECTED_WARNINGS):
                result.warnings[m.group(1)[:160]] += 1

    def _check_dump(self, result: SessionResult, record: dict) -> None:
        path = Path(record["path"])
        try:
            data = path.read_bytes()
        except OSError as exc:
            result.failures.append(Failure("dump", f"{path}: {exc}", result.number))
            return
        finally:
            path.unlink(missing_ok=True)
        addr, length = record["addr"], record["length"]
        want = self.facts.binary_of(record["pid"]).expected(addr, length)
        if data != want:
            diff = next((i for i in range(min(len(data), len(want))) if data[i] != want[i]), None)
            where = f"first difference at {addr + diff:#x}" if diff is not None else "sizes differ"
            result.failures.append(
                Failure(
                    "dump",
                    f"pid {record['pid']}: {length} bytes at {addr:#x} read back {len(data)} bytes "
                    f"unlike the program's file ({where})",
                    result.number,
                )
            )
        else:
            result.extra["bulk dump: bytes checked"] += length


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
