"""Host-side observations: the guest ticker's rate (from its console), vmigdb's private memory, and
how busy other processes kept the host.

`ticker_rate`, `host_rate`, `private_kib` and `cpu_busy_seconds` are pure (text in, number out)
and unit-tested;
`FootprintSampler` and `OtherLoad` read /proc while a workload runs.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from pathlib import Path

# ticker prints "ticker pid=N round=R calls=C" once per guest second; only whole lines count.
TICKER_RE = re.compile(r"^ticker pid=(\d+) round=(\d+) calls=(\d+)\r?$", re.MULTILINE)
MAPPING_RE = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")


def ticker_rate(console: str) -> float | None:
    """Calls per guest second between the first and the last complete ticker line of `console`.

    The ticker counts seconds with CLOCK_MONOTONIC, which stands still while the VM is stopped, so the
    figure is the guest's own speed whatever the debugger did. None: fewer than two lines.
    """
    lines = [m for m in TICKER_RE.finditer(console) if m.end() < len(console)]  # newline-terminated
    if len(lines) < 2:
        return None
    first, last = lines[0], lines[-1]
    if first.group(1) != last.group(1):
        return None  # a different process: the ticker restarted
    rounds = int(last.group(2)) - int(first.group(2))
    if rounds <= 0:
        return None
    return (int(last.group(3)) - int(first.group(3))) / rounds


def ticker_lines(text: str) -> list[tuple[int, int]]:
    """(pid, calls) of each complete ticker line of `text`."""
    return [
        (int(m.group(1)), int(m.group(3))) for m in TICKER_RE.finditer(text) if m.end() < len(text)
    ]


def host_rate(arrivals: list[tuple[float, int, int]]) -> float | None:
    """Calls per host second from ticker lines stamped with when they appeared on the console
    (host seconds, pid, calls): the guest's real throughput. Guest time can hide what a debugger
    costs: under icount a guest second is a count of instructions, however long the host took,
    and a VM stop freezes the guest's CLOCK_MONOTONIC. None: fewer than two lines."""
    if len(arrivals) < 2:
        return None
    (t0, pid0, c0), (t1, pid1, c1) = arrivals[0], arrivals[-1]
    if pid0 != pid1 or t1 <= t0:
        return None
    return (c1 - c0) / (t1 - t0)


def private_kib(smaps: str, exclude_kib: int) -> int:
    """Private_Clean + Private_Dirty over the mappings of /proc/PID/smaps, in KiB.

    File-backed mappings of at least `exclude_kib` KiB are left out: that is the shared guest RAM
    file (unlinked, so its path ends in "(deleted)"), which belongs to the guest, not to vmigdb.
    """
    total = 0
    skip = False
    size = 0
    path = ""
    for line in smaps.splitlines():
        header = MAPPING_RE.match(line)
        if header:
            path = header.group(1).strip()
            skip = False
            continue
        key, _, rest = line.partition(":")
        if key == "Size":
            size = _kib(rest)
            skip = bool(path) and not path.startswith("[") and size >= exclude_kib
        elif key in ("Private_Clean", "Private_Dirty") and not skip:
            total += _kib(rest)
    return total


def _kib(text: str) -> int:
    parts = text.split()
    return int(parts[0]) if parts and parts[0].isdigit() else 0


def cpu_busy_seconds(proc_stat: str) -> float:
    """CPU seconds all cores spent busy (user, nice, system, irq, softirq) from /proc/stat's text."""
    for line in proc_stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[1:8])
            return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    raise ValueError("no 'cpu' line in /proc/stat")


class OtherLoad:
    """How many cores other processes kept busy while in a `with` block (the host's noise).

    All CPU time the machine spent, less this process's and its waited-for children's (servers,
    QEMU, GDB), over the wall time. None when /proc/stat cannot be read.
    """

    def __init__(self) -> None:
        self.cores: float | None = None

    @staticmethod
    def _now() -> tuple[float, float, float] | None:
        try:
            busy = cpu_busy_seconds(open("/proc/stat").read())
        except (OSError, ValueError):
            return None
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return time.monotonic(), busy, own

    def __enter__(self) -> OtherLoad:
        self._start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._now()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return
        wall = end[0] - self._start[0]
        others = (end[1] - self._start[1]) - (end[2] - self._start[2])
        self.cores = max(0.0, others / wall)


def nice_floor(x: float) -> int:
    """The largest of 1, 2, 5 x 10^k not above x (at least 1): a round loop count."""
    if x < 1:
        return 1
    exp = 10 ** int(math.floor(math.log10(x)))
    for step in (5, 2, 1):
        if step * exp <= x:
            return step * exp
    return exp


class FootprintSampler:
    """Samples a process's private memory every `interval` s while in a `with` block; keeps the max."""

    def __init__(self, pid: int, exclude_kib: int, interval: float = 0.1) -> None:
        self.path = Path(f"/proc/{pid}/smaps")
        self.exclude_kib = exclude_kib
        self.interval = interval
        self.max_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        try:
            text = self.path.read_text(errors="replace")
        except OSError:
            return
        self.max_kib = max(self.max_kib, private_kib(text, self.exclude_kib))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> FootprintSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
