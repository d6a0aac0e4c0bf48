"""vmigdb's stderr, read as it grows: what a soak of valid GDB use must never make it say.

vmigdb logs `vmigdb: MESSAGE` with no level, so errors are known by their words (every
log.warning/error/exception call in vmigdb/rsp, debugger and hv says one of these). Lines that are
neither an error nor one of the expected session messages are kept and reported, not failed on.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ERROR = re.compile(
    r"Traceback|internal error|out of step|resynchronis|ERROR|[Ee]rror|exception|could not|"
    r"refus|failed|corrupt|malformed|did not wait|cannot|ignored SIGTERM|QEMU exited|"
    r"QEMU died|gone"
)
EXPECTED = re.compile(
    r"GDB connected from|GDB at \S+ (detached|went away)|guest time:|starting QEMU|QEMU pid \d+ up|"
    r"QEMU \d+ up|KERNELOFFSET|kallsyms:|KASLR offset|listening on|shutting down"
)
TRACE = re.compile(r"vmigdb: (gdb|qemu) (<-|->) ")  # vmigdb -v packet traces


@dataclass
class ServerLog:
    path: Path
    offset: int = 0
    tag: str = "boot"
    errors: list[tuple[str, str]] = field(default_factory=list)  # (tag, line)
    other: Counter = field(default_factory=Counter)
    lines: int = 0
    traces: int = 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        for raw in data[: end + 1].splitlines():
            line = raw.decode(errors="replace")
            self.lines += 1
            if TRACE.match(line):
                self.traces += 1  # -v: a packet's bytes, whatever words they hold
            elif ERROR.search(line):
                self.errors.append((self.tag, line))
            elif not EXPECTED.search(line):
                self.other[re.sub(r"\d+", "N", line)[:160]] += 1
        self.offset += end + 1
