"""What the soak knows about the guest, and the seeded plan of GDB sessions it drives.

Facts come from the host copies of the guest programs (their read-only segments and symbols: the
dump check compares guest memory with these bytes) and from the guest's console (pids, addresses
the programs print). Each session is a few workloads drawn from a shuffled deck of every kind, so
over a run every kind comes up as often as the others, in a seeded, reproducible order.
"""

from __future__ import annotations

import random
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from vmigdb.bench.workloads import loop_lines
from vmigdb.images.programs import SOURCE_DIR

KINDS = (
    "bulk",
    "scattered",
    "registers",
    "stepi",
    "conditional",
    "plain",
    "scoped",
    "range",
    "watch",
    "interrupt",
    "reconnect",
)
PROGRAMS = "antidebug,probe,loop,ticker,spin:1111,spin:2222"
CALLS_PER_ROUND = 4_000_000  # loop.c's CALLS_PER_ROUND
PT_LOAD, PF_W = 1, 2


@dataclass(frozen=True)
class Segment:
    vaddr: int
    offset: int
    size: int


def read_only_segments(path: Path) -> list[Segment]:
    """The PT_LOAD segments without write permission of an ELF64 file (its code and constants).

    Only the program-header table is read, a few fixed offsets of the ELF64 format; no ELF
    library is a dependency of vmigdb for this alone.
    """
    data = path.read_bytes()
    if data[:5] != b"\x7fELF\x02":
        raise ValueError(f"{path} is not an ELF64 file")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    out = []
    for i in range(phnum):
        ptype, flags, offset, vaddr, _pa, filesz, _memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize
        )
        if ptype == PT_LOAD and not flags & PF_W and filesz:
            out.append(Segment(vaddr, offset, filesz))
    return out


def symbols(path: Path) -> dict[str, int]:
    """Symbol -> address, from binutils' nm (installed with gcc, which builds the programs)."""
    out = subprocess.run(["nm", str(path)], capture_output=True, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            table.setdefault(parts[2], int(parts[0], 16))
    return table


@dataclass
class Binary:
    name: str
    path: Path
    segments: list[Segment]
    symbols: dict[str, int]

    @classmethod
    def load(cls, programs_dir: Path, name: str) -> Binary:
        path = programs_dir / name
        return cls(name, path, read_only_segments(path), symbols(path))

    def expected(self, addr: int, length: int) -> bytes:
        """The file's bytes for [addr, addr+length) of a read-only segment."""
        for seg in self.segments:
            if seg.vaddr <= addr and addr + length <= seg.vaddr + seg.size:
                start = seg.offset + addr - seg.vaddr
                with open(self.path, "rb") as f:
                    f.seek(start)
                    return f.read(length)
        raise ValueError(f"{self.name}: {addr:#x}+{length:#x} is in no read-only segment")


@dataclass
class Facts:
    """The guest as the soak drives it."""

    address: str
    smp: int
    ram_mib: int
    pids: dict[str, list[int]]  # program name -> pids, in start order
    binaries: dict[str, Binary]
    spin_values: dict[int, int]  # pid -> the value it passes in $rdi
    loop_line: int
    after_line: int

    @property
    def loop_pid(self) -> int:
        return self.pids["loop"][0]

    def binary_of(self, pid: int) -> Binary:
        for name, pids in self.pids.items():
            if pid in pids:
                return self.binaries[name]
        raise KeyError(pid)


def make_facts(
    address: str, smp: int, ram_mib: int, programs_dir: Path, started: dict[int, str]
) -> Facts:
    """`started`: pid -> program spec, as the guest's init printed them."""
    pids: dict[str, list[int]] = {}
    spin_values = {}
    for pid, spec in sorted(started.items()):
        name, _, arg = spec.partition(":")
        pids.setdefault(name, []).append(pid)
        if name == "spin":
            spin_values[pid] = int(arg.split(":")[0] or "0", 0)
    missing = {"probe", "loop", "ticker", "spin"} - set(pids)
    if missing:
        raise ValueError(f"the soak needs these guest programs running: {sorted(missing)}")
    binaries = {name: Binary.load(programs_dir, name) for name in pids}
    loop_line, after_line = loop_lines(SOURCE_DIR / "loop.c")
    return Facts(address, smp, ram_mib, pids, binaries, spin_values, loop_line, after_line)


@dataclass
class Planner:
    """Seeded choices: which workloads each session runs, with which arguments."""

    facts: Facts
    rng: random.Random
    workdir: Path
    per_session: int = 0  # 0: 1-4 workloads a session
    deck: list[str] = field(default_factory=list)
    interrupts: int = 0

    def session(self, number: int) -> tuple[list[str], str, float]:
        """(kinds, the body of main(), a timeout in seconds) for session `number`."""
        count = self.per_session or self.rng.randint(1, 4)
        kinds = []
        for _ in range(count):
            if not self.deck:
                self.deck = list(KINDS)
                self.rng.shuffle(self.deck)
            kinds.append(self.deck.pop())
        calls = [f"w_session_start({self.facts.smp})"]
        if number == 1:
            calls.append("w_info()")
        seconds = 30.0
        for i, kind in enumerate(kinds):
            call, estimate = getattr(self, f"_{kind}")(number, i)
            calls.append(call)
            seconds += estimate
        if self.rng.random() < 0.5:
            calls.append('scope_to("all")')  # else a scope outlives the session, as users do
        body = "def main():\n" + "".join(f"    {c}\n" for c in calls)
        return kinds, body, 120 + 5 * seconds

    # ---- one method per kind: (the call, an estimate of its seconds) -------------------------
    def _pick(self, name: str) -> int:
        return self.rng.choice(self.facts.pids[name])

    def _bulk(self, number: int, i: int) -> tuple[str, float]:
        name = self.rng.choice(["probe", "ticker", "loop", "spin"])
        pid = self._pick(name)
        segments = [(s.vaddr, s.size) for s in self.facts.binaries[name].segments]
        which = name if len(self.facts.pids[name]) == 1 else str(pid)
        prefix = self.workdir / f"dump-{number}-{i}"
        repeats = self.rng.randint(2, 6)
        return f"w_bulk({which!r}, {segments!r}, {str(prefix)!r}, {repeats})", 15.0

    def _scattered(self, number: int, i: int) -> tuple[str, float]:
        text, direct = self.rng.randint(100, 400), self.rng.randint(50, 200)
        seed = self.rng.randrange(1 << 30)
        return f"w_scattered({seed}, {text}, {direct}, {self.facts.ram_mib})", 10.0

    def _registers(self, number: int, i: int) -> tuple[str, float]:
        return f"w_registers({self.rng.randint(100, 300)})", 5.0

    def _stepi(self, number: int, i: int) -> tuple[str, float]:
        choices = [
            ("probe", "__libc_open64"),
            ("probe", "__close"),
            ("spin", "vmigdb_spin_target"),
            ("loop", "vmigdb_loop_sum"),
        ]
        name, symbol = self.rng.choice(choices)
        pid = self._pick(name)
        addr = self.facts.binaries[name].symbols[symbol]
        steps = self.rng.randint(100, 400)
        return f"w_stepi({str(pid)!r}, {addr:#x}, {steps})", 10.0 + steps / 20

    def _conditional(self, number: int, i: int) -> tuple[str, float]:
        target = self.facts.binaries["loop"].symbols["vmigdb_loop_target"]
        ahead = self.rng.randint(100, 500)
        scoped = self.rng.random() < 0.5
        return (
            f"w_conditional({self.facts.loop_pid}, {target:#x}, {CALLS_PER_ROUND}, {ahead}, "
            f"{scoped})",
            10.0 + ahead / 10,
        )

    def _plain(self, number: int, i: int) -> tuple[str, float]:
        kind = self.rng.choice(["__x64_sys_getpid", "do_sys_openat2", "user"])
        hits = self.rng.randint(5, 25)
        target = self.facts.binaries["spin"].symbols["vmigdb_spin_target"]
        return f"w_plain({kind!r}, {hits}, {self.facts.spin_values!r}, {target:#x})", hits

    def _scoped(self, number: int, i: int) -> tuple[str, float]:
        hits = self.rng.randint(5, 20)
        kind = self.rng.choice(["spin", "probe", "ticker"])
        if kind == "spin":
            pid = self._pick("spin")
            where: int | str = self.facts.binaries["spin"].symbols["vmigdb_spin_target"]
            return (
                f"w_scoped({str(pid)!r}, {where:#x}, {hits}, {self.facts.spin_values[pid]})",
                hits,
            )
        where = "do_sys_openat2" if kind == "probe" else "__x64_sys_getpid"
        return f"w_scoped({kind!r}, {where!r}, {hits}, None)", 2.0 * hits

    def _range(self, number: int, i: int) -> tuple[str, float]:
        f = self.facts
        scoped = self.rng.random() < 0.5
        return (
            f"w_range({str(f.binaries['loop'].path)!r}, {f.loop_line}, {f.after_line}, "
            f"{f.loop_pid}, {scoped})",
            15.0,
        )

    def _watch(self, number: int, i: int) -> tuple[str, float]:
        symbols = self.facts.binaries["loop"].symbols
        kind = self.rng.choice(["user", "kernel"])
        code = (symbols["vmigdb_loop_sum"], symbols["vmigdb_loop_parked"])
        hits = self.rng.randint(3, 8)
        return (
            f"w_watch({kind!r}, {hits}, {self.facts.loop_pid}, "
            f"{symbols['vmigdb_loop_sink']:#x}, {code!r})",
            5.0 * hits,
        )

    def _interrupt(self, number: int, i: int) -> tuple[str, float]:
        times = self.rng.randint(1, 3)
        self.interrupts += times
        return f"w_interrupt({times}, {self.interrupts - times})", 5.0 * times

    def _reconnect(self, number: int, i: int) -> tuple[str, float]:
        return f"w_reconnect({self.facts.address!r}, {self.facts.smp})", 10.0
