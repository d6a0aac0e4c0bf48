"""Host-side observations: the guest ticker's loop rate (from its console) and vmigdb's private memory.

`ticker_rate` and `private_kib` are pure (text in, number out) and unit-tested; `FootprintSampler`
polls /proc while a workload runs.
"""

from __future__ import annotations

import math
import re
import threading
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
