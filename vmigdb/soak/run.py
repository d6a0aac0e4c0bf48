"""scripts/soak: boot the demo guest under `vmigdb qemu` and drive every GDB workload for N minutes.

The order of things: build (or reuse) the guest image, boot it with its programs (antidebug, probe,
loop, ticker, two spins), wait until each has printed, then run GDB sessions until the time is up.
After every session: the guest console (faults, antidebug's verdicts), vmigdb's stderr and the
programs' progress (each must print again within --stuck-after seconds) are checked. The first
failure ends the run (unless --keep-going, which only goes on past failures that leave the guest
usable) with its evidence kept: console, vmigdb's stderr, GDB transcripts, and after a guest fault
the vCPUs' registers and backtraces as a fresh GDB sees them.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from vmigdb.bench.gdbrun import Gdb, gdb_version, stop
from vmigdb.bench.guest import BenchError, VmigdbServer, qemu_version
from vmigdb.soak.console import GuestConsole
from vmigdb.soak.plan import PROGRAMS, Planner, make_facts
from vmigdb.soak.report import Tally, format_text, to_json
from vmigdb.soak.serverlog import ServerLog
from vmigdb.soak.session import Failure, SessionRunner

log = logging.getLogger("vmigdb.soak")
MEMORY_MIB = 512
FATAL = ("guest fault", "vmigdb exited", "stuck")
# Workloads that make QEMU retranslate the guest's code: single steps (stepi, and stepping off
# every breakpoint hit) and watchpoints (QEMU re-runs the hitting instruction alone, and inserting
# one flushes translations; seen in the 30-minute soak: rdtsc after a watch+bulk session). Under
# --time host antidebug's RDTSC-timed blocks measure that: the `rdtsc` verdict
# --allow-detections may excuse, and only after these.
RETRANSLATING = ("stepi", "conditional", "plain", "scoped", "range", "watch")
EVIDENCE_SCRIPT = """
def main():
    for thread in sorted(gdb.selected_inferior().threads(), key=lambda t: t.num):
        thread.switch()
        for command in ("info registers", "bt 12", "x/8i $pc - 16", "x/8i $pc"):
            try:
                emit(kind="evidence", thread=thread.num, command=command, text=quiet(command))
            except gdb.error as exc:
                emit(kind="evidence", thread=thread.num, command=command, text=str(exc))
"""


class SoakServer(VmigdbServer):
    """`vmigdb qemu` as the bench boots it, with vmigdb's own default time mode and -v if asked."""

    def __init__(self, *args, time_mode: str, verbose: bool, **kwargs) -> None:
        super().__init__(*args, time_mode="host", **kwargs)  # validated as a bench mode...
        self.time_mode = time_mode  # ...but vmigdb itself takes auto too, and checks it
        self.verbose = verbose

    def argv(self) -> list[str]:
        argv = super().argv()
        if self.time_mode == "auto":
            i = argv.index("--time")
            del argv[i : i + 2]
        if self.verbose:
            argv.insert(argv.index("qemu"), "-v")
        return argv


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/soak",
        description="Drive every GDB workload against a 2-vCPU guest for N minutes; fail on any "
        "guest fault, antidebug detection, stuck vCPU, server error or failed GDB command.",
    )
    p.add_argument("--minutes", type=float, default=30.0, help="how long to drive GDB (30)")
    p.add_argument("--smp", type=int, default=2, help="guest vCPUs (2)")
    p.add_argument("--seed", type=int, default=12, help="seed of the workload order (12)")
    p.add_argument("--kernel-package", help="Debian kernel metapackage (default: the demo's)")
    p.add_argument("--time", default="auto", help="vmigdb's --time (auto, host, icount)")
    p.add_argument("--programs", default=PROGRAMS, help=f"guest programs ({PROGRAMS})")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    p.add_argument(
        "--allow-detections",
        default="",
        metavar="NAMES",
        help="antidebug detections (comma list, e.g. rdtsc) counted and reported instead of "
        "failing the soak; by default every detection fails it",
    )
    p.add_argument("--per-session", type=int, default=0, help="workloads per session (1-4)")
    p.add_argument("--stuck-after", type=float, default=60.0, help="seconds of silence (60)")
    p.add_argument("--keep-going", action="store_true", help="go on past non-fatal failures")
    p.add_argument("--verbose-server", action="store_true", help="run vmigdb -v (packet traces)")
    p.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory even if clean")
    args = p.parse_args(argv)
    args.allow = {n for n in args.allow_detections.split(",") if n}
    if args.minutes <= 0 or args.smp < 1:
        p.error("--minutes and --smp must be positive")
    return args


def wait_programs(server: SoakServer, console: GuestConsole, timeout: float) -> None:
    """Until init has started everything and each program has printed progress once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        console.poll()
        if console.ready and console.programs and not console.silent_since(0):
            return
        if not server.alive():
            raise BenchError("vmigdb exited while the guest booted", detail=server.stderr()[-3000:])
        time.sleep(0.5)
    silent = ", ".join(p.spec for p in console.silent_since(0))
    raise BenchError(f"guest programs never printed: {silent or '(none started)'}")


class Soak:
    def __init__(self, args: argparse.Namespace, server: SoakServer, workdir: Path) -> None:
        self.args = args
        self.server = server
        self.workdir = workdir
        self.console = GuestConsole(server.console_path)
        self.server_log = ServerLog(server.stderr_path)
        self.tally = Tally()
        self.rounds_checked = 0
        self.faults_checked = 0
        self.errors_checked = 0
        self.kinds: dict[int, list[str]] = {}  # session number -> its workloads

    def health(self, session: int) -> list[Failure]:
        """Everything found since the last call: faults, detections, server errors, an exit."""
        c, s = self.console, self.server_log
        c.poll()
        s.poll()
        out = [Failure("guest fault", line, session) for _, line in c.faults[self.faults_checked :]]
        self.faults_checked = len(c.faults)
        for r in c.rounds[self.rounds_checked :]:
            if not r.detections:
                continue
            if not set(r.names) <= self.args.allow:
                out.append(Failure("detection", f"[{r.tag}] {r.line}", session))
            elif not self.retranslated(r.tag):
                out.append(
                    Failure(
                        "detection",
                        f"[{r.tag}] {r.line} (allowed only after workloads that make QEMU "
                        f"retranslate: {', '.join(RETRANSLATING)}; this session and the one before did not)",
                        session,
                    )
                )
            else:
                self.tally.allowed_detections += 1
        self.rounds_checked = len(c.rounds)
        out += [Failure("detection", f"unparsed verdict: {line}", session)
                for _, line in c.garbled_detections]  # fmt: skip
        c.garbled_detections.clear()
        out += [
            Failure("server error", line, session) for _, line in s.errors[self.errors_checked :]
        ]
        self.errors_checked = len(s.errors)
        if not self.server.alive():
            out.append(Failure("vmigdb exited", self.server.stderr()[-2000:], session))
        return out

    def retranslated(self, tag: str) -> bool:
        """Did the session a console line was read in (or the one before it) make QEMU
        retranslate the guest's code (RETRANSLATING)?"""
        m = re.match(r"session (\d+) ", tag)
        if not m:
            return False
        number = int(m.group(1))
        return any(set(self.kinds.get(n, ())) & set(RETRANSLATING) for n in (number, number - 1))

    def wait_progress(self, session: int) -> list[Failure]:
        """The guest runs between sessions: every program must print again, soon."""
        self.console.poll()
        mark, started = self.console.offset, time.monotonic()
        while time.monotonic() - started < self.args.stuck_after:
            self.console.poll()
            if not self.console.silent_since(mark):
                self.tally.progress_waits.append(time.monotonic() - started)
                return []
            if self.console.faults[self.faults_checked :] or not self.server.alive():
                return []  # health() reports it
            time.sleep(0.2)
        silent = self.console.silent_since(mark)
        return [
            Failure(
                "stuck",
                f"no progress for {self.args.stuck_after:.0f} s with the guest running and no "
                f"debugger attached: {', '.join(f'{p.spec} (pid {p.pid})' for p in silent)}",
                session,
            )
        ]

    def evidence(self, gdb: Gdb) -> Path:
        """After a guest fault: each vCPU's registers, backtrace and code, as GDB sees them."""
        proc, out = gdb.start("evidence", EVIDENCE_SCRIPT)
        try:
            proc.wait(120)
        except Exception:  # noqa: BLE001  (a hung GDB is evidence too)
            stop(proc)
        return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="soak: %(message)s", stream=sys.stderr)
    from vmigdb.images.build import build_guest

    image = build_guest(**({"kernel_package": args.kernel_package} if args.kernel_package else {}))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmigdb-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "gdb").mkdir(exist_ok=True)
    append = f"vmigdb.programs={args.programs}"
    server = SoakServer(
        workdir / "server",
        image.kernel,
        image.initrd,
        append,
        memory_mib=MEMORY_MIB,
        smp=args.smp,
        time_mode=args.time,
        verbose=args.verbose_server,
    )
    config = {
        "kernel": image.release,
        "smp": args.smp,
        "memory_mib": MEMORY_MIB,
        "time": args.time,
        "programs": args.programs,
        "seed": args.seed,
        "minutes_asked": args.minutes,
        "allow_detections": sorted(args.allow),
        "stuck_after_s": args.stuck_after,
        "versions": f"{qemu_version()}, {gdb_version()}",
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "workdir": str(workdir),
    }
    log.info("workdir %s; booting %s with %d vCPUs", workdir, image.release, args.smp)
    minutes = 0.0
    try:
        with server:
            soak = Soak(args, server, workdir)
            wait_programs(server, soak.console, 180)
            started = {p.pid: p.spec for p in soak.console.programs.values()}
            facts = make_facts(server.address, args.smp, MEMORY_MIB, image.programs, started)
            rng = random.Random(args.seed)
            gdb = Gdb(server.address, workdir / "gdb")
            runner = SessionRunner(gdb, soak.console, soak.server_log, facts, rng, server.alive)
            planner = Planner(facts, rng, workdir / "gdb", per_session=args.per_session)
            failures = soak.health(0)  # anything wrong at boot
            soak.tally.failures += failures
            begin = time.monotonic()
            number = 0
            while not failures and time.monotonic() - begin < args.minutes * 60:
                number += 1
                kinds, body, timeout = planner.session(number)
                soak.kinds[number] = kinds
                result = runner.run(number, kinds, body, timeout)
                soak.tally.add(result)
                found = soak.wait_progress(number) + soak.health(number)
                soak.tally.failures += found  # the session's own are in already
                failures = result.failures + found
                log.info(
                    "session %d (%s): %.1f s%s; %.1f of %.0f min",
                    number,
                    "+".join(kinds),
                    result.seconds,
                    f", {len(failures)} failure(s)" if failures else "",
                    (time.monotonic() - begin) / 60,
                    args.minutes,
                )
                for f in failures:
                    log.warning("  [%s] %s", f.what, f.message)
                if any(f.what == "guest fault" for f in failures) and server.alive():
                    log.warning("guest fault: evidence in %s", soak.evidence(gdb))
                if not failures and result.transcript is not None:
                    result.transcript.unlink(missing_ok=True)
                    result.transcript.with_suffix(".py").unlink(missing_ok=True)
                if args.keep_going and not any(f.what in FATAL for f in failures):
                    failures = []
            minutes = (time.monotonic() - begin) / 60
            report = to_json(soak.tally, soak.console, soak.server_log, config, minutes)
    except BenchError as exc:
        log.error("%s%s", exc, f"\n{exc.detail}" if exc.detail else "")
        return 2
    report["antidebug"]["allowed_detections"] = soak.tally.allowed_detections
    print(format_text(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if report["clean"] and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"\nevidence kept in {workdir} (console: server/console.log, vmigdb: "
              f"server/server.stderr, GDB transcripts: gdb/)")  # fmt: skip
    return 0 if report["clean"] else 1
