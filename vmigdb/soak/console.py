"""The guest's console, read as it grows: kernel faults, antidebug's verdicts, programs' progress.

The demo guest's programs each print a line about once a second of guest time (vmigdb/images/
programs/*.c); a program whose lines stop while the guest is meant to run is stuck, and so is the
vCPU it needs. Kernel messages are matched anywhere in a line: a program's line and a kernel
message may share one when both write at once, and a fault must never be missed for that.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# A guest fault: any of these in the console fails the soak.
FAULT = re.compile(
    r"Oops|Kernel panic|BUG:|kernel BUG|double fault|general protection|invalid opcode|"
    r"Call Trace|WARNING: |soft lockup|hard LOCKUP|rcu: INFO|self-detected stall|detected stalls|"
    r"blocked for more than|segfault at|traps: |Unable to handle|stack-protector|"
    r"unchecked MSR|Bad RIP|end trace|Kernel Offset:|reboot: |Restarting system|"
    r"Power down|vmigdb-guest: error"
)
BOOTED = "vmigdb-guest: init"  # printed once per boot: a second one is a reboot
# Worth reporting, not a fault by itself: the host's own load can cause these.
NOTICE = re.compile(r"clocksource|Marking clocksource|hrtimer: interrupt took|TSC|tsc: ")
STARTED = re.compile(r"vmigdb-guest: started (\S+) pid=(\d+)")
READY = "vmigdb-guest: ready"
ROUND = re.compile(
    r"antidebug round=(\d+) detections=(\d+)(?: ([a-z0-9_,]+))? rdtsc_outliers=(\d+) "
    r"rdtsc_max=(\d+)"
)
DETECTIONS = re.compile(r"detections=(\d+)")
ANTIDEBUG_START = re.compile(r"antidebug pid=(\d+) checksum_start=")
PROGRESS = re.compile(r"\b(probe|loop|ticker|spin) pid=(\d+) (?:round=|value=\d+ addr=)")


@dataclass(frozen=True)
class Round:
    number: int
    detections: int
    names: tuple[str, ...]
    rdtsc_outliers: int
    rdtsc_max: int
    tag: str  # the soak session under way (or just over) when the line was read
    line: str


@dataclass
class Program:
    spec: str
    pid: int
    lines: int = 0  # progress lines seen
    last_offset: int = -1  # console offset of the newest one
    last_seen: float = 0.0  # host time it was read

    @property
    def name(self) -> str:
        return self.spec.split(":", 1)[0]


@dataclass
class GuestConsole:
    path: Path
    offset: int = 0  # bytes of the console consumed, in whole lines
    tag: str = "boot"
    programs: dict[int, Program] = field(default_factory=dict)
    rounds: list[Round] = field(default_factory=list)
    faults: list[tuple[str, str]] = field(default_factory=list)  # (tag, line)
    garbled_detections: list[tuple[str, str]] = field(default_factory=list)
    notices: Counter = field(default_factory=Counter)
    antidebug_pid: int = 0
    ready: bool = False
    boots: int = 0
    last_round: int = 0

    def poll(self) -> None:
        """Read whatever the guest printed since the last poll (whole lines only)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        now = time.monotonic()
        offset = self.offset
        for raw in data[: end + 1].splitlines(keepends=True):
            self._line(raw.decode(errors="replace").rstrip("\r\n"), offset, now)
            offset += len(raw)
        self.offset = offset

    def _line(self, line: str, offset: int, now: float) -> None:
        if FAULT.search(line):
            self.faults.append((self.tag, line))
        if BOOTED in line:
            self.boots += 1
            if self.boots > 1:
                self.faults.append((self.tag, f"the guest rebooted: {line}"))
        if self.ready and NOTICE.search(line):
            self.notices[re.sub(r"^\[[ 0-9.]+\] ", "", line)[:120]] += 1
        if READY in line:
            self.ready = True
        if m := STARTED.search(line):
            self.programs[int(m.group(2))] = Program(m.group(1), int(m.group(2)))
        if m := ANTIDEBUG_START.search(line):
            self.antidebug_pid = int(m.group(1))
        if m := ROUND.search(line):
            names = tuple(m.group(3).split(",")) if m.group(3) else ()
            number, detections, outliers, worst = (int(m.group(i)) for i in (1, 2, 4, 5))
            self.rounds.append(Round(number, detections, names, outliers, worst, self.tag, line))
            if self.last_round and number != self.last_round + 1:
                # A verdict we could not read (a kernel message cut through it): not clean.
                missing = f"rounds {self.last_round + 1}..{number - 1}"
                self.garbled_detections.append((self.tag, f"antidebug {missing} unreadable"))
            self.last_round = number
            self._progress(self.antidebug_pid, offset, now)
        elif (m := DETECTIONS.search(line)) and int(m.group(1)):
            self.garbled_detections.append((self.tag, line))  # a verdict we could not parse
        if m := PROGRESS.search(line):
            self._progress(int(m.group(2)), offset, now)

    def _progress(self, pid: int, offset: int, now: float) -> None:
        program = self.programs.get(pid)
        if program is not None:
            program.lines += 1
            program.last_offset, program.last_seen = offset, now

    def silent_since(self, mark: int) -> list[Program]:
        """Programs that printed no progress line after console offset `mark`."""
        return [p for p in self.programs.values() if p.last_offset < mark]

    def detections(self) -> list[Round]:
        return [r for r in self.rounds if r.detections]
