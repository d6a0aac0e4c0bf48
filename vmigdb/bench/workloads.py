"""The workloads: the same GDB commands against either server, each returning a stats.Cell.

Each repetition is one GDB run; where a pass is short the run makes several passes and the
repetition keeps the best (noise here only ever slows a pass down). Only the GDB commands under test
are timed (inside GDB, around `gdb.execute`); connecting, setting up and stopping are not.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from pathlib import Path

from vmigdb.bench.gdbrun import Gdb
from vmigdb.bench.guest import BenchError, Server, unpark_loop
from vmigdb.bench.idle import NEVER_CALLED, measure_idle, measure_scoped_hot
from vmigdb.bench.observe import FootprintSampler, nice_floor
from vmigdb.bench.stats import Cell, best_of, rate

MB = 1e6  # MB/s are SI: 10^6 bytes per second
MIB = 1 << 20
FULL_LOOP_COUNT = 100_000  # iterations of loop.c's one-line loop, as compiled in
EXTRA_KSYMS = ("page_offset_base", "_etext", *NEVER_CALLED)


@dataclass(frozen=True)
class Config:
    quick: bool
    reps: int  # repetitions: the table shows their median and [min-max]
    passes: int  # passes per repetition where one pass is short; the best one counts
    bulk_bytes: int
    scattered: int  # x/8xg commands per pass
    registers: int  # info registers rip + flushregs per pass
    stepi: int  # instructions per stepi
    cond_n: int  # conditional breakpoint stops at the Nth call
    next_budget: float  # seconds one measured `next` may take: sets the loop count per server
    next_probe: int  # loop count of the probing `next`
    idle_window: float  # seconds of ticker output per idle measurement
    idle_reps: int
    clock_phase: int  # guest seconds of the clocks step's idle phase, and of its busy phase
    seed: int = 6


FULL = Config(
    False,
    reps=3,
    passes=3,
    bulk_bytes=64 * MIB,
    scattered=2000,
    registers=500,
    stepi=2000,
    cond_n=10_000,  # the condition is true once in 10^4 calls (the run-control issue's measure)
    next_budget=30.0,
    next_probe=200,
    idle_window=10.0,
    idle_reps=3,
    clock_phase=30,
)
QUICK = Config(
    True,
    reps=3,
    passes=2,
    bulk_bytes=16 * MIB,
    scattered=500,
    registers=200,
    stepi=500,
    cond_n=10_000,
    next_budget=2.0,
    next_probe=100,
    idle_window=3.5,
    idle_reps=1,
    clock_phase=10,
)


def loop_lines(source: Path) -> tuple[int, int]:
    """(line of the one-line loop, line `next` must land on) in loop.c, found by their markers."""
    lines = source.read_text().splitlines()
    loop = next((i + 1 for i, t in enumerate(lines) if "/* vmigdb-loop-line */" in t), 0)
    after = next((i + 1 for i, t in enumerate(lines) if "vmigdb_loop_done = i;" in t), 0)
    if not loop or after <= loop:
        raise BenchError(
            f"{source}: no '/* vmigdb-loop-line */' followed by 'vmigdb_loop_done = i;'"
        )
    return loop, after


class Workloads:
    def __init__(
        self,
        server: Server,
        config: Config,
        workdir: Path,
        loop_binary: Path,
        loop_source: Path,
        log,
    ) -> None:
        self.server = server
        self.config = config
        self.workdir = workdir
        self.gdb = Gdb(server.address, workdir)
        self.loop_binary = loop_binary
        self.loop_line, self.after_line = loop_lines(loop_source)
        self.log = log
        self.page_offset_base = 0
        self.monitor_help = ""
        ks = server.ksyms
        missing = [
            s for s in ("_stext", "_etext", "page_offset_base", "__x64_sys_getpid") if s not in ks
        ]
        if missing:
            raise BenchError(f"the guest did not print ksyms {missing}")
        if server.loop_line != self.loop_line:
            raise BenchError(
                f"loop says its line is {server.loop_line}, {loop_source} has {self.loop_line}"
            )

    # ---- helpers ---------------------------------------------------------------------------------
    def _reps(self, name: str, one_rep, reps: int | None = None) -> Cell:
        cell = Cell()
        for i in range(reps or self.config.reps):
            value = one_rep()
            cell.values.append(value)
            self.log(f"{self.server.name}: {name} {i + 1}/{reps or self.config.reps}: {value:,.3f}")
        return cell

    def _passes(self, name: str, body: str, timeout: float) -> list[float]:
        run = self.gdb.run(name, body, timeout)
        seconds = [p["seconds"] for p in run.passes()]
        if not seconds:
            raise BenchError(f"{name}: GDB made no pass")
        return seconds

    @property
    def bulk_start(self) -> int:
        return self.page_offset_base + 16 * MIB  # direct map: guest-physical 16 MiB onwards

    # ---- setup -------------------------------------------------------------------------------------
    def prepare(self) -> None:
        is_vmigdb = self.server.name == "vmigdb"
        pob = self.server.ksyms["page_offset_base"]
        body = f"""
def main():
    emit(kind="pob", value=value("*(unsigned long *){pob:#x}"))
    text = ""
    if {is_vmigdb}:
        try:
            text = quiet("monitor help")
        except gdb.error as exc:
            text = str(exc)
    emit(kind="help", text=text)
"""
        run = self.gdb.run("prepare", body, 60)
        self.page_offset_base = run.one("pob")["value"] & (2**64 - 1)
        self.monitor_help = run.one("help")["text"]

    def unpark_loop(self) -> None:
        unpark_loop(self.gdb, self.loop_binary, self.server.console)

    # ---- memory ------------------------------------------------------------------------------------
    def bulk_read(self, footprint: Cell | None) -> Cell:
        n, start = self.config.bulk_bytes, self.bulk_start
        out = self.workdir / "bulk.bin"
        body = f"""
def main():
    for _ in range({self.config.passes}):
        emit(kind="pass", seconds=timed("dump binary memory {out} {start:#x} {start + n:#x}"))
"""
        pid = self.server.server_pid()

        def one() -> float:
            if pid is not None and footprint is not None:
                with FootprintSampler(pid, self.server.memory_mib * 1024) as sampler:
                    seconds = self._passes("bulk", body, 60 + self.config.passes * n / (1 * MB))
                footprint.values.append(sampler.max_kib / 1024)
            else:
                seconds = self._passes("bulk", body, 60 + self.config.passes * n / (1 * MB))
            size = out.stat().st_size
            out.unlink()
            if size != n:
                raise BenchError(f"dump binary memory wrote {size} bytes, not {n}")
            return rate(n / MB, best_of(seconds, higher_is_better=False))

        return self._reps("bulk read MB/s", one)

    def dump_memory(self) -> Cell:
        if "dump-memory" not in self.monitor_help:
            return Cell(error="n/a (not available)")
        n, start = self.config.bulk_bytes, self.bulk_start
        out, check = self.workdir / "dump.bin", self.workdir / "check.bin"
        body = f"""
def main():
    for _ in range({self.config.passes}):
        emit(kind="pass", seconds=timed("monitor dump-memory {out} {start:#x} {n:#x}", True))
    run("dump binary memory {check} {start:#x} {start + MIB:#x}")
"""

        def one() -> float:
            seconds = self._passes("dump-memory", body, 60 + self.config.passes * n / (5 * MB))
            try:
                size = out.stat().st_size
                with open(out, "rb") as f:
                    same = f.read(MIB) == check.read_bytes()
            finally:
                out.unlink(missing_ok=True)
                check.unlink(missing_ok=True)
            if size != n:
                raise BenchError(f"monitor dump-memory wrote {size} bytes, not {n}")
            if not same:
                raise BenchError("monitor dump-memory's first MiB differs from GDB's own read")
            return rate(n / MB, best_of(seconds, higher_is_better=False))

        return self._reps("dump-memory MB/s", one)

    def scattered(self) -> Cell:
        ks = self.server.ksyms
        span = (ks["_etext"] - ks["_stext"] - 64) // 8
        rng = random.Random(self.config.seed)  # same offsets for both servers (KASLR moves _stext)
        commands = self.workdir / "scattered.gdb"
        commands.write_text(
            "".join(
                f"x/8xg {ks['_stext'] + 8 * rng.randrange(span):#x}\n"
                for _ in range(self.config.scattered)
            )
        )
        body = f"""
def main():
    for _ in range({self.config.passes}):
        emit(kind="pass", seconds=timed("source {commands}"))
"""
        timeout = 60 + self.config.passes * self.config.scattered / 100
        return self._reps(
            "scattered x/8xg/s",
            lambda: rate(
                self.config.scattered, best_of(self._passes("scattered", body, timeout), False)
            ),
        )

    # ---- registers and stepping --------------------------------------------------------------------
    def registers(self) -> Cell:
        commands = self.workdir / "registers.gdb"
        commands.write_text("info registers rip\nflushregs\n" * self.config.registers)
        body = f"""
def main():
    for _ in range({self.config.passes}):
        emit(kind="pass", seconds=timed("source {commands}"))
"""
        timeout = 60 + self.config.passes * self.config.registers / 100
        return self._reps(
            "registers/s",
            lambda: rate(
                self.config.registers, best_of(self._passes("registers", body, timeout), False)
            ),
        )

    def stepi(self) -> Cell:
        """Steps from a plain breakpoint's stop; vmigdb's plugin holds that stop and does the
        steps where it is loaded (`monitor plugin-breakpoints on`; QEMU's gdbstub otherwise)."""
        return self._stepi("stepi", self.server.name == "vmigdb")

    def stepi_default(self) -> Cell:
        """The same steps with vmigdb's defaults: a plain breakpoint is QEMU's gdbstub's, so its
        stop and the steps from it are QEMU's, through vmigdb."""
        return self._stepi("stepi_default", False)

    def _stepi(self, name: str, plugin: bool) -> Cell:
        getpid = self.server.ksyms["__x64_sys_getpid"]
        body = f"""
def main():
    if {plugin}:
        try:
            quiet("monitor plugin-breakpoints on")
        except gdb.error:  # no plugin here (host time)
            pass
    for _ in range({self.config.passes}):
        run("break *{getpid:#x}")
        run("continue")
        run("delete")
        emit(kind="pass", seconds=timed("stepi {self.config.stepi}"))
    if {plugin}:
        try:
            quiet("monitor plugin-breakpoints off")
        except gdb.error:
            pass
"""
        timeout = 60 + self.config.passes * (10 + self.config.stepi / 100)
        return self._reps(
            "stepi/s",
            lambda: rate(self.config.stepi, best_of(self._passes(name, body, timeout), False)),
        )

    # ---- the loop program --------------------------------------------------------------------------
    def cond_bp(self) -> Cell:
        n, target = self.config.cond_n, self.server.loop_target
        body = f"""
def main():
    quiet("add-symbol-file {self.loop_binary}")
    run("break vmigdb_loop_sum")
    run("continue")
    run("delete")
    run("break *{target:#x} if $rdi == {n}")
    seconds = timed("continue")
    emit(kind="pass", seconds=seconds, rdi=value("$rdi"), pc=value("$pc"))
"""

        def one() -> float:
            run = self.gdb.run("cond", body, 120 + n / 20)
            stop = run.one("pass")
            if stop["rdi"] != n or stop["pc"] != target:
                raise BenchError(
                    f"stopped at pc={stop['pc']:#x} with $rdi={stop['rdi']}, "
                    f"not at {target:#x} with $rdi={n}"
                )
            return rate(n, stop["seconds"])

        return self._reps("cond bp hits/s", one)

    def next_loop(self) -> Cell:
        """Seconds per `next` over 100,000 iterations of one source line.

        One GDB run: `next` over 100, 1,000, ... iterations while the next size up would fit in
        the time budget, then the repetitions at the largest count that fits (100,000 if it does;
        a server that single-steps gets fewer iterations, and its time is scaled to 100,000).
        Each `next` is checked: it lands on the following line with the loop's sum added.
        """
        cfg = self.config
        body = f"""
FULL, BUDGET, LINE = {FULL_LOOP_COUNT}, {cfg.next_budget}, {self.loop_line}

def one(count):
    # stopped anywhere in the loop process: the count applies from its next call on
    run(f"set var vmigdb_loop_count = {{count}}")
    run(f"break loop.c:{{LINE}}")
    run("continue")
    run("delete")
    before = value("vmigdb_loop_sink")
    seconds = timed("next")
    line = gdb.find_pc_line(gdb.selected_frame().pc()).line
    emit(kind="next", count=count, seconds=seconds, line=line,
         delta=value("vmigdb_loop_sink") - before)
    return seconds

def main():
    quiet("add-symbol-file {self.loop_binary}")
    run(f"break loop.c:{{LINE}}")
    run("continue")
    run("delete")
    count = {cfg.next_probe}
    seconds = one(count)
    while count < FULL and seconds * 10 <= BUDGET:
        count = min(FULL, count * 10)
        seconds = one(count)
    probed = count
    if count < FULL:
        count = max(count, min(FULL, nice_floor(BUDGET * count / seconds)))
    emit(kind="count", count=count)
    done = 1 if count == probed else 0  # the last probe already was a repetition at this count
    try:
        for _ in range({cfg.reps} - done):
            one(count)
    finally:
        run(f"set var vmigdb_loop_count = {{FULL}}")
"""
        body = "import math\n" + inspect.getsource(nice_floor) + "\n" + body
        timeout = 180 + (cfg.reps + 3) * cfg.next_budget * 3
        run = self.gdb.run("next", body, timeout)
        count = run.one("count")["count"]
        cell = Cell()
        for stop in run.passes("next"):
            n = stop["count"]
            want = n * (n - 1) // 2
            if stop["line"] != self.after_line or stop["delta"] != want:
                raise BenchError(
                    f"next over {n} iterations ended at line {stop['line']} having added "
                    f"{stop['delta']} to the sink, not at line {self.after_line} having added {want}"
                )
            self.log(f"{self.server.name}: next over {n:,} iterations: {stop['seconds']:.3f} s")
            if n == count:
                cell.values.append(stop["seconds"] * FULL_LOOP_COUNT / n)
        cell.values = cell.values[-cfg.reps :]
        if count != FULL_LOOP_COUNT:
            cell.note = f"measured over {count:,} iterations, scaled x{FULL_LOOP_COUNT / count:g}"
        return cell

    # ---- idle guest ------------------------------------------------------------------------------
    def idle(self) -> tuple[Cell, Cell, Cell]:
        """(a) attached without breakpoints, (b) with 4 that never hit: rate / detached rate;
        and the detached rates themselves."""
        return measure_idle(self.server, self.gdb, self.config, self.log)

    def scoped_hot(self) -> Cell:
        """A breakpoint on code the ticker runs hot, scoped to another process: x detached."""
        return measure_scoped_hot(self.server, self.gdb, self.config, self.log)
