"""scripts/bench's `inside` step: what debugging inside one process costs, under vmigdb alone.

QEMU's gdbstub has nothing to compare with (no catch syscall, no process, no libraries), so this
step has its own guest (`vmigdb qemu --time MODE`, TCG, 1 vCPU) and its own table:

- the system-call rate of a process that is *not* debugged (`sysloop`, getppid as fast as it can)
  with no catchpoint, then while GDB catches `openat` in another process (`dynhello`, one openat a
  second: a hook on the openat handler only), then while GDB catches *every* system call of that
  other process (a hook on the kernel's dispatcher, which sysloop's calls hit too, each rejected
  inside vmigdb after a VM stop: what a hypervisor-side filter such as issue 16's plugin removes).
  The rate is counted against the host's clock: the guest's own clocks stand still while vmigdb
  holds the VM stopped, so they cannot show what the stops cost;
- catch-exec latency: from the moment the launcher is told to start a program (it polls every
  10 ms, then forks and execs) to GDB's prompt at the program's first instruction, with its
  libraries' symbols loaded; and for comparison, from the same trigger to the program's first
  output with no catchpoint;
- the time `sharedlibrary` takes in a freshly started process: listing its objects and loading
  their symbols, rebuilt from guest memory (nothing cached yet for that process).
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vmigdb.bench.gdbrun import Gdb, interrupt, parse_records, wait_record
from vmigdb.bench.guest import BenchError, VmigdbServer
from vmigdb.bench.stats import Cell, fmt_num, fmt_summary, summarize
from vmigdb.bench.workloads import Config

MEMORY_MIB = 512
LAUNCH_DYNHELLO_BRIEF, LAUNCH_DYNHELLO_LONG = 1, 2
# launcher's commands: a dynhello that exits after 3 rounds, one that stays 30 s
APPEND = "vmigdb.programs=loop:park,launcher:dynhello+1000+3:dynhello+1000+30,dynhello,sysloop"
SYSLOOP_RE = re.compile(r"sysloop pid=\d+ calls=(\d+) rate=\d+")
LAUNCHER_RE = re.compile(r"launcher pid=(\d+) launch=(0x[0-9a-f]+) commands=2")
DYNHELLO_RE = re.compile(r"dynhello pid=(\d+) started")
STARTED_RE = re.compile(r"launcher started=(\d+) pid=(\d+)")

HEADER = ["workload", "vmigdb", "x no catchpoint"]


@dataclass(frozen=True)
class InsideConfig:
    window: float  # host seconds each system-call rate is counted over
    reps: int


def inside_config(config: Config) -> InsideConfig:
    return InsideConfig(window=8.0, reps=3) if config.quick else InsideConfig(window=25.0, reps=5)


class InsideServer(VmigdbServer):
    """The step's guest: the launcher, a long-lived dynhello, sysloop (and loop, parked)."""

    def start(self) -> None:
        super().start()
        deadline = time.monotonic() + 60
        self._wait(lambda: LAUNCHER_RE.search(self.console()), deadline, "the launcher")
        self._wait(lambda: DYNHELLO_RE.search(self.console()), deadline, "dynhello")
        self._wait(lambda: SYSLOOP_RE.search(self.console()), deadline, "sysloop")


class Inside:
    def __init__(self, server: InsideServer, config: InsideConfig, workdir: Path, log) -> None:
        self.server = server
        self.config = config
        self.gdb = Gdb(server.address, workdir)
        self.log = log
        console = server.console()
        launcher = LAUNCHER_RE.search(console)
        dynhello = DYNHELLO_RE.search(console)
        assert launcher is not None and dynhello is not None
        self.launcher, self.launch = int(launcher.group(1)), int(launcher.group(2), 16)
        self.dynhello = int(dynhello.group(1))

    # -- system-call rate -------------------------------------------------------------------------

    def _calls(self) -> int:
        found = SYSLOOP_RE.findall(self.server.console())
        if not found:
            raise BenchError("sysloop reported nothing")
        return int(found[-1])

    def _rate(self, seconds: float) -> float:
        """sysloop's calls per host second over at least `seconds`, between two of its reports
        (the count is exact there), timed as they appear."""

        def next_report(after: int, limit: float) -> tuple[int, float]:
            deadline = time.monotonic() + limit
            while (calls := self._calls()) == after:
                if time.monotonic() > deadline:
                    raise BenchError(f"sysloop made no progress in {limit:.0f} s")
                time.sleep(0.01)
            return calls, time.monotonic()

        begin, start = next_report(self._calls(), 120)
        last, when = begin, start
        while when - start < seconds:
            last, when = next_report(last, 120)
        return (last - begin) / (when - start)

    def _rate_while_catching(self, pid: int, catch: str, seconds: float) -> tuple[float, int]:
        """The rate while GDB, scoped to process `pid`, catches `catch` and continues at every
        stop; and how many stops GDB saw meanwhile."""
        done = self.gdb.workdir / f"done-{time.monotonic_ns()}"
        body = f"""
import os

def main():
    run("monitor process {pid}")
    run("{catch}")
    emit(kind="armed")  # GDB places the catchpoint as it resumes, at once
    stops = 0
    while not os.path.exists({str(done)!r}):
        run("continue")
        stops += 1
        emit(kind="stops", count=stops)
    run("delete")
    run("monitor process all")
"""
        proc, out = self.gdb.start("catching", body)
        try:
            wait_record(out, "armed", proc, 120)
            time.sleep(1)  # the first stops (and GDB loading libraries) are not the steady state
            rate = self._rate(seconds)
            done.touch()
            try:
                proc.wait(30)  # a stop comes soon where there are any
            except subprocess.TimeoutExpired:
                interrupt(proc)  # none: ^C ends the `continue` waiting for one
        finally:
            if proc.poll() is None:
                interrupt(proc)
        records = [
            r for r in parse_records(out.read_text(errors="replace")) if r["kind"] == "stops"
        ]
        return rate, records[-1]["count"] if records else 0

    def syscall_rates(self) -> dict[str, Cell]:
        window = self.config.window
        cells = {key: Cell() for key in ("rate_none", "rate_quiet", "rate_openat", "rate_all")}
        runs = (
            ("rate_quiet", self.launcher, "catch syscall openat"),  # it never opens a file
            ("rate_openat", self.dynhello, "catch syscall openat"),  # one open a second
            ("rate_all", self.dynhello, "catch syscall"),
        )
        # The catch-every-call runs come last: they hold the VM stopped most of the time, and
        # under instruction-counted time the guest then runs faster than the host's clock until
        # its time has caught up, which would flatter any rate measured right after.
        for _ in range(self.config.reps):
            cells["rate_none"].values.append(self._rate(window))
            for key, pid, catch in runs[:2]:
                rate, stops = self._rate_while_catching(pid, catch, window)
                cells[key].values.append(rate)
                self.log(f"{catch} in {pid}: {rate:,.0f} syscalls/s, {stops} stops for GDB")
        key, pid, catch = runs[2]
        for _ in range(self.config.reps):
            rate, stops = self._rate_while_catching(pid, catch, window)
            cells[key].values.append(rate)
            self.log(f"{catch} in {pid}: {rate:,.0f} syscalls/s, {stops} stops for GDB")
        return cells

    # -- catch exec -------------------------------------------------------------------------------

    def _trigger(self, which: int, *then: str) -> str:
        commands = "\n".join(f"    run({c!r})" for c in then)
        return f"""
def main():
    run("monitor process {self.launcher}")
    run("set {{int}}{self.launch:#x} = {which}")
{commands}
"""

    def exec_latency(self) -> tuple[Cell, Cell]:
        caught, plain = Cell(), Cell()
        for i in range(self.config.reps):
            body = (
                self._trigger(LAUNCH_DYNHELLO_BRIEF, "monitor catch exec dynhello")
                + """
    seconds = timed("continue")
    text = quiet("monitor info")
    emit(kind="pass", seconds=seconds, scoped="(dynhello)" in text)
    run("monitor process all")
"""
            )
            run = self.gdb.run("catch-exec", body, 120)
            record = run.one("pass")
            if not record["scoped"]:
                raise BenchError("catch exec: the stop was not in the new dynhello")
            caught.values.append(record["seconds"])
            # Without a catchpoint: the same trigger, then the program's own first line. GDB
            # notes the host's time as it lets the guest go (detach); the console is watched
            # meanwhile for the launcher's new child, then for that child's first line.
            before = set(STARTED_RE.findall(self.server.console()))
            body = (
                self._trigger(LAUNCH_DYNHELLO_BRIEF)
                + """
    emit(kind="go", at=time.time())
"""
            )
            proc, out = self.gdb.start("trigger", body)
            deadline = time.monotonic() + 60
            pid = None
            while pid is None or f"dynhello pid={pid} started" not in self.server.console():
                if time.monotonic() > deadline:
                    raise BenchError("the launched dynhello never printed")
                new = set(STARTED_RE.findall(self.server.console())) - before
                pid = pid or (int(next(iter(new))[1]) if new else None)
                time.sleep(0.001)
            seen = time.time()
            go = wait_record(out, "go", proc, 30)["at"]
            proc.wait(30)
            plain.values.append(seen - go)
            self.log(f"catch exec {i + 1}/{self.config.reps}: {caught.values[-1] * 1e3:.0f} ms")
        return caught, plain

    # -- libraries --------------------------------------------------------------------------------

    def library_load(self) -> tuple[Cell, int]:
        """Seconds `sharedlibrary` takes in a fresh process, and how many objects it has."""
        cell, objects = Cell(), 0
        for i in range(self.config.reps):
            before = set(DYNHELLO_RE.findall(self.server.console()))
            self.gdb.run("launch", self._trigger(LAUNCH_DYNHELLO_LONG), 60)
            deadline = time.monotonic() + 30
            while not (new := set(DYNHELLO_RE.findall(self.server.console())) - before):
                if time.monotonic() > deadline:
                    raise BenchError("the launched dynhello never printed")
                time.sleep(0.05)
            pid = int(next(iter(new)))
            body = f"""
def main():
    run("monitor process {pid}")
    seconds = timed("sharedlibrary")
    listing = quiet("info sharedlibrary")
    if "<puts>" not in quiet("x/i puts"):
        raise RuntimeError("puts has no name after sharedlibrary")
    emit(kind="pass", seconds=seconds, objects=listing.count("Yes"))
    run("monitor process all")
"""
            record = self.gdb.run("sharedlibrary", body, 120).one("pass")
            cell.values.append(record["seconds"])
            objects = record["objects"]
            self.log(f"sharedlibrary {i + 1}/{self.config.reps}: {record['seconds']:.3f} s")
        return cell, objects


def measure_inside(image, workdir: Path, mode: str, config: Config, log) -> dict:
    """The step's figures for one time mode, or {"error": why}: a failure costs the table."""
    server = InsideServer(
        workdir, image.kernel, image.initrd, APPEND, memory_mib=MEMORY_MIB, time_mode=mode
    )
    try:
        server.start()
        inside = Inside(server, inside_config(config), workdir, log)
        rates = inside.syscall_rates()
        caught, plain = inside.exec_latency()
        libraries, objects = inside.library_load()
    except BenchError as exc:
        log(f"failed: {exc}" + (f"\n{exc.detail}" if exc.detail else ""))
        return {"error": str(exc)}
    finally:
        server.stop()
    return {
        **{key: cell.values for key, cell in rates.items()},
        "exec_caught": caught.values,
        "exec_plain": plain.values,
        "libraries": libraries.values,
        "library_objects": objects,
    }


def _cell(values: list[float], scale: float = 1.0) -> str:
    summary = summarize([v * scale for v in values])
    return fmt_summary(summary) if summary else "–"


def _ratio(values: list[float], base: list[float]) -> str:
    a, b = summarize(values), summarize(base)
    return f"{a.median / b.median:.3f}x" if a and b and b.median else "–"


def inside_rows(figures: dict[str, dict]) -> list[list[str]]:
    """The table: header, then per mode its rows (mode -> figures)."""
    rows = [["time mode", *HEADER]]
    for mode, f in figures.items():
        if "error" in f:
            rows.append([mode, f"error: {f['error']}", "", ""])
            continue
        none = f["rate_none"]
        rows += [
            [mode, "syscall rate, no catchpoint (syscalls/s)", _cell(none), "1x"],
            [
                mode,
                "syscall rate, catch syscall openat in another process, no stop (syscalls/s)",
                _cell(f["rate_quiet"]),
                _ratio(f["rate_quiet"], none),
            ],
            [
                mode,
                "syscall rate, catch syscall openat in another process, 2 stops/s (syscalls/s)",
                _cell(f["rate_openat"]),
                _ratio(f["rate_openat"], none),
            ],
            [
                mode,
                "syscall rate, catch every syscall of another process (syscalls/s)",
                _cell(f["rate_all"]),
                _ratio(f["rate_all"], none),
            ],
            [mode, "catch exec: trigger to GDB's prompt (ms)", _cell(f["exec_caught"], 1e3), ""],
            [mode, "no catchpoint: trigger to first output (ms)", _cell(f["exec_plain"], 1e3), ""],
            [
                mode,
                f"sharedlibrary, fresh process, {f['library_objects']} objects (s)",
                _cell(f["libraries"]),
                "",
            ],
        ]
    return rows


LEGEND = (
    "sysloop (not debugged) counted against the host's clock while GDB catches system calls of "
    "another process: the launcher (which never opens a file: GDB never stops) or dynhello (an "
    "open a second: GDB stops at its entry and return, and continues); catch syscall openat hooks "
    "the openat handler only, catch syscall (every call) the kernel's dispatcher, which sysloop's "
    "calls hit too: each costs a VM stop and is rejected inside vmigdb; both exec figures start "
    "when the launcher is told to start dynhello (it polls every 10 ms, forks, execs): the caught "
    "one ends at GDB's prompt at its first instruction, its libraries' symbols loaded, the other "
    "at its first line on the console (after the dynamic loader and libc's start-up)"
)

__all__ = ["LEGEND", "fmt_num", "inside_rows", "measure_inside"]
