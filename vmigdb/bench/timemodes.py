"""What each time mode (`vmigdb qemu --time ...`) shows the guest, measured from inside the guest.

    .venv/bin/python -m vmigdb.bench.timemodes [--modes host,icount] [--variant NAME=QEMU-ARGS ...]
                                               [--idle S] [--busy S] [--smp N] [--json FILE]

For each mode it boots the demo guest under `vmigdb qemu` with the `clockprobe` program
(vmigdb/images/programs/clockprobe.c), which prints the guest's clocks once a second, and stamps
every line with the host's CLOCK_MONOTONIC as it reaches the console file. Then, per mode:
- rate: guest CLOCK_MONOTONIC and CLOCK_REALTIME against host time over the idle phase and over
  the busy phase (the probe spinning), and the RTC too over 8 s of the hold phase (idle, with the
  RTC's update interrupts on: they give its edges to the ms); 1.000 is perfect, the goal 0.9-1.1;
- stop: GDB connects and holds the guest stopped for 10 s; how far each guest clock (TSC,
  CLOCK_MONOTONIC, CLOCK_REALTIME, RTC) jumped across the stop, beyond the probe's usual 1 s
  step (goal: under 50 ms);
- rdtsc: 50 breakpoint hits on the probe's RDTSC-timed block, then 200 `stepi` through it (10 x 20),
  in real GDB through vmigdb; how many of the probe's samples took over 100x their median (goal 0),
  and how many did with no debugger attached, over the same time, for comparison; with several
  vCPUs, once with the others idle and once beside a busy process (the loop program) on another;
- cost: the busy loop's rate (chunks of 100k iterations per host second).
`--variant NAME=ARGS` measures extra QEMU arguments instead of a `--time` mode (exploration), e.g.
`--variant 'auto=-icount shift=auto,sleep=on'`. `scripts/bench` runs `measure` as its `clocks`
step, once per time mode; this entry point takes about 1.5 minutes per mode with the defaults.
The pure parts (`parse_sample`, `rates`, `stop_jump`) and `ConsoleTail` are what
tests/e2e/test_time_hiding.py uses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vmigdb.bench.gdbrun import Gdb
from vmigdb.bench.guest import BenchError, child_setup, free_port, load_average, unpark_loop
from vmigdb.images.build import demo_append

NS = 1_000_000_000
PERIOD_MS = 1000  # one line a second: more console output would make the guest less idle
HOLD_S = 12  # the hold phase: 8 s of RTC rate, then the 10 s stop (frozen), then 4 s
SAMPLE_RE = re.compile(
    r"clockprobe seq=(?P<seq>\d+) phase=(?P<phase>\w+) mono=(?P<mono>-?\d+) real=(?P<real>-?\d+) "
    r"raw=(?P<raw>-?\d+) tsc=(?P<tsc>\d+) rtc=(?P<rtc>-?\d+) rtc_edge=(?P<rtc_edge>-?\d+) "
    r"work=(?P<work>\d+) samples=(?P<samples>\d+) outliers=(?P<outliers>\d+) rmax=(?P<rmax>\d+)"
)
START_RE = re.compile(
    r"clockprobe start pid=(\d+) period_ms=(\d+) block=0x([0-9a-f]+) rtc_uie=(\d)"
)
CLOCKSOURCE_RE = re.compile(r"clockprobe clocksource=(\S+)")


@dataclass(frozen=True)
class Sample:
    """One clockprobe line: the guest's clocks (ns, TSC ticks, RTC seconds) and the host's time (s)."""

    host: float
    seq: int
    phase: str
    mono: int
    real: int
    raw: int
    tsc: int
    rtc: int
    rtc_edge: int
    work: int
    samples: int
    outliers: int
    rmax: int

    @property
    def rtc_offset(self) -> int | None:
        """The RTC minus CLOCK_REALTIME (ns) at its last update interrupt, if it had one."""
        return self.rtc * NS - self.rtc_edge if self.rtc_edge > 0 else None


def parse_sample(line: str, host: float) -> Sample | None:
    m = SAMPLE_RE.search(line)
    if m is None:
        return None
    g = m.groupdict()
    return Sample(host=host, phase=g.pop("phase"), **{k: int(v) for k, v in g.items()})


def rates(samples: list[Sample]) -> dict[str, float]:
    """Each guest clock's advance over the host's, first to last sample (1.0: same rate).

    "rtc" is CLOCK_REALTIME's rate corrected by how the RTC's offset from it moved; "loop" is the
    busy loop's chunks per host second (the mode's cost), not a rate ratio.
    """
    if len(samples) < 2:
        raise ValueError("need two samples for a rate")
    a, b = samples[0], samples[-1]
    host = b.host - a.host
    if host <= 0:
        raise ValueError("samples span no host time")
    out = {name: (getattr(b, name) - getattr(a, name)) / NS / host for name in ("mono", "real")}
    edged = [s for s in samples if s.rtc_offset is not None]
    if len(edged) >= 2 and edged[-1].rtc_edge > edged[0].rtc_edge:
        drift = edged[-1].rtc_offset - edged[0].rtc_offset  # type: ignore[operator]
        out["rtc"] = out["real"] * (1 + drift / (edged[-1].rtc_edge - edged[0].rtc_edge))
    out["loop"] = (b.work - a.work) / host
    return out


def phase_runs(samples: list[Sample]) -> list[tuple[str, list[Sample]]]:
    """Consecutive samples grouped by phase, in order."""
    runs: list[tuple[str, list[Sample]]] = []
    for s in samples:
        if runs and runs[-1][0] == s.phase:
            runs[-1][1].append(s)
        else:
            runs.append((s.phase, [s]))
    return runs


def stop_jump(samples: list[Sample], host_start: float, host_end: float) -> dict[str, float]:
    """How far each guest clock moved across a stop, beyond its usual step (ms).

    The stop is the widest host-time gap between consecutive samples around [host_start, host_end];
    "usual" is the median step of the ten samples on either side. A clock frozen while stopped
    shows about 0; one that kept running shows the stop's length.
    """
    around = [s for s in samples if host_start - 5 <= s.host <= host_end + 5]
    if len(around) < 4:
        raise ValueError("too few samples around the stop")
    pairs = list(zip(around, around[1:], strict=False))
    before, after = max(pairs, key=lambda p: p[1].host - p[0].host)
    i = samples.index(before)
    near = samples[max(0, i - 10) : i + 1] + samples[i + 1 : i + 12]
    steps = [(y.mono - x.mono) for x, y in zip(near, near[1:], strict=False) if x is not before]
    usual = statistics.median(steps)
    ref = samples[max(0, i - 20) : i + 1]
    tsc_per_ns = (ref[-1].tsc - ref[0].tsc) / max(1, ref[-1].mono - ref[0].mono)
    jump = {
        "host_gap": (after.host - before.host) * 1000,
        "mono": (after.mono - before.mono - usual) / 1e6,
        "real": (after.real - before.real - usual) / 1e6,
        "raw": (after.raw - before.raw - usual) / 1e6,
        "tsc": ((after.tsc - before.tsc) / tsc_per_ns - usual) / 1e6,
    }
    # The RTC: its offset from CLOCK_REALTIME at the last update interrupt before the stop and at
    # the first one after it.
    last = before.rtc_offset
    first = next((s.rtc_offset for s in samples[i + 1 :] if s.rtc_edge > before.rtc_edge), None)
    if last is not None and first is not None:
        jump["rtc"] = (first - last) / 1e6
    return jump


def largest_jump(stop: dict[str, float]) -> float:
    """The largest of `stop_jump`'s clock jumps (ms, absolute): what a goal of 50 ms is held to."""
    return max((abs(v) for k, v in stop.items() if k != "host_gap"), default=float("nan"))


class ConsoleTail:
    """Reads a growing console file in a thread, stamping each line with the host's monotonic time."""

    def __init__(self, path: Path, poll: float = 0.002) -> None:
        self.path = path
        self.poll = poll
        self.lines: list[tuple[float, str]] = []
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="console-tail", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        offset, partial = 0, b""
        while not self._stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            now = time.monotonic()
            if data:
                offset += len(data)
                *complete, partial = (partial + data).split(b"\n")
                with self._lock:
                    for raw in complete:
                        line = raw.decode(errors="replace").rstrip("\r")
                        self.lines.append((now, line))
                        sample = parse_sample(line, now)
                        if sample is not None:
                            self.samples.append(sample)
            time.sleep(self.poll)

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)

    def text(self) -> str:
        with self._lock:
            return "\n".join(line for _, line in self.lines)

    def wait(self, predicate, timeout: float, what: str, alive=lambda: True) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if not alive():
                raise BenchError(f"the guest went away while waiting for {what}")
            time.sleep(0.05)
        raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


class ProbeGuest:
    """`vmigdb qemu` serving the demo guest with clockprobe running, and its console tailed."""

    def __init__(
        self,
        workdir: Path,
        image,
        probe_args: str,
        *,
        time_mode: str | None = None,
        qemu_args: tuple[str, ...] = (),
        smp: int = 1,
        accel: str = "auto",
        extra_programs: str = "",
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.console_path = workdir / "console.log"
        self.stderr_path = workdir / "vmigdb.stderr"
        programs = f"clockprobe:{probe_args}" + (f",{extra_programs}" if extra_programs else "")
        argv = [
            sys.executable, "-m", "vmigdb", "qemu", "--kernel", str(image.kernel),
            "--initrd", str(image.initrd), "--listen", self.address,
            "--serial", str(self.console_path), "--smp", str(smp), "--memory", "512",
            "--accel", accel, "--append", demo_append(f"vmigdb.programs={programs}"),
        ]  # fmt: skip
        if time_mode is not None:
            argv += ["--time", time_mode]
        if qemu_args:
            argv += ["--", *qemu_args]
        self.argv = argv
        self.tail = ConsoleTail(self.console_path)
        with open(workdir / "vmigdb.stdout", "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, preexec_fn=child_setup
            )
        self.gdb = Gdb(self.address, workdir)
        self.pid = self.block = 0
        self.clocksources: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_started(self, timeout: float = 180) -> None:
        try:
            self.tail.wait(
                lambda: START_RE.search(self.tail.text()) and self.tail.snapshot(),
                timeout,
                "clockprobe's first line",
                self.alive,
            )
        except BenchError as exc:
            raise BenchError(str(exc), detail=self.stderr()[-3000:]) from None
        m = START_RE.search(self.tail.text())
        assert m is not None
        self.pid, self.block = int(m.group(1)), int(m.group(3), 16)

    def console_clocksources(self) -> list[str]:
        return CLOCKSOURCE_RE.findall(self.tail.text())

    def wait_phase(self, phase: str, occurrence: int, timeout: float) -> None:
        """Until the probe has begun the `occurrence`th (1-based) run of `phase`."""

        def seen() -> bool:
            runs = [p for p, _ in phase_runs(self.tail.snapshot()) if p == phase]
            return len(runs) >= occurrence

        self.tail.wait(seen, timeout, f"clockprobe phase {phase} #{occurrence}", self.alive)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.tail.close()


def hold_stopped(guest: ProbeGuest, seconds: float) -> tuple[float, float]:
    """GDB connects (the guest stops), waits `seconds`, detaches. Returns the host interval."""
    body = f"""
def main():
    emit(kind="stopped", pc=value("$pc"))
    time.sleep({seconds})
"""
    t0 = time.monotonic()
    guest.gdb.run("hold", body, 60 + seconds)
    return t0, time.monotonic()


def rdtsc_session(guest: ProbeGuest, hits: int = 50, steps: int = 200, per_stop: int = 20) -> dict:
    """Breakpoint hits on the probe's timed block, then stepi through it, scoped to the probe."""
    rounds = steps // per_stop
    body = f"""
def main():
    quiet("monitor process {guest.pid}")
    quiet("break *{guest.block:#x}")
    t = time.monotonic()
    for _ in range({hits}):
        quiet("continue")
        if value("$pc") != {guest.block}:
            raise RuntimeError("stopped at %#x, not at the block" % value("$pc"))
    quiet("delete")
    emit(kind="hits", seconds=time.monotonic() - t)
    t = time.monotonic()
    for _ in range({rounds}):
        quiet("break *{guest.block:#x}")
        quiet("continue")
        quiet("delete")
        for _ in range({per_stop}):
            quiet("stepi")
    emit(kind="steps", seconds=time.monotonic() - t)
    quiet("monitor process all")
"""
    run = guest.gdb.run("rdtsc", body, 600)
    return {"hits_s": run.one("hits")["seconds"], "steps_s": run.one("steps")["seconds"]}


def rdtsc_figures(guest: ProbeGuest, log, beside: str) -> dict:
    """Outliers the probe counts during `rdtsc_session`, then over the same host time with no
    debugger: the probe's own false-positive rate under the same load."""
    wait_lines(guest, 2)
    a = last_sample(guest)
    session = rdtsc_session(guest)
    wait_lines(guest, 2)
    b = last_sample(guest)
    time.sleep(b.host - a.host)
    c = last_sample(guest)
    figures = {
        **session,
        "outliers": b.outliers - a.outliers,
        "samples": b.samples - a.samples,
        "undisturbed_outliers": c.outliers - b.outliers,
        "undisturbed_samples": c.samples - b.samples,
    }
    log(
        f"rdtsc{', ' + beside if beside else ''}: {figures['outliers']} outliers in "
        f"{figures['samples']} samples during 50 hits + 200 steps ({session['hits_s']:.1f} s + "
        f"{session['steps_s']:.1f} s); undisturbed {figures['undisturbed_outliers']} in "
        f"{figures['undisturbed_samples']}"
    )
    return figures


def last_sample(guest: ProbeGuest) -> Sample:
    samples = guest.tail.snapshot()
    if not samples:
        raise BenchError("clockprobe printed nothing")
    return samples[-1]


def wait_lines(guest: ProbeGuest, count: int, timeout: float = 60) -> None:
    n = len(guest.tail.snapshot())
    guest.tail.wait(
        lambda: len(guest.tail.snapshot()) >= n + count, timeout, "clockprobe lines", guest.alive
    )


def probe_spec(idle: int, busy: int) -> str:
    """clockprobe's arguments: idle, busy, hold (the RTC's rate, then the stop), rdtsc for good."""
    return f"{PERIOD_MS}:idle{idle}:busy{busy}:hold{HOLD_S}:rdtsc100000"


def measure(
    image,
    workdir: Path,
    *,
    time_mode: str | None = None,
    qemu_args: tuple[str, ...] = (),
    idle: int = 30,
    busy: int = 30,
    smp: int = 1,
    accel: str = "auto",
    log=print,
) -> dict:
    """Everything this module measures, for one mode; see the module docstring."""
    probe = probe_spec(idle, busy)
    # With several vCPUs the RDTSC session runs twice: with the other vCPUs idle, then beside a
    # busy one (loop, parked until then): on QEMU's one icount thread the vCPUs take turns, and a
    # busy vCPU's turn is what a debugger that cost the timed vCPU its turn would show the guest.
    guest = ProbeGuest(
        workdir,
        image,
        probe,
        time_mode=time_mode,
        qemu_args=qemu_args,
        smp=smp,
        accel=accel,
        extra_programs="loop:park" if smp > 1 else "",
    )
    result: dict = {"argv_tail": guest.argv[guest.argv.index("--append") + 2 :]}
    try:
        guest.wait_started()
        # Phase lengths are guest seconds: a guest clock that runs slow stretches them.
        limit = lambda s: 60 + 12 * s  # noqa: E731
        guest.wait_phase("busy", 1, limit(idle))
        guest.wait_phase("hold", 1, limit(busy))
        wait_lines(guest, 8, limit(8))
        runs = phase_runs(guest.tail.snapshot())
        result["idle"] = rates(runs[0][1][1:])  # the first line: the probe's own start-up
        result["busy"] = rates(runs[1][1])
        result["hold"] = rates(runs[2][1][1:])
        log(
            f"idle {fmt_rates(result['idle'])}; busy {fmt_rates(result['busy'])}; "
            f"hold {fmt_rates(result['hold'])}"
        )

        t0, t1 = hold_stopped(guest, 10)
        wait_lines(guest, 3)
        result["stop"] = stop_jump(guest.tail.snapshot(), t0, t1)
        log("10 s stop: " + ", ".join(f"{k} {v:+.1f} ms" for k, v in result["stop"].items()))

        guest.wait_phase("rdtsc", 1, limit(HOLD_S))
        result["rdtsc"] = rdtsc_figures(guest, log, "the other vCPUs idle" if smp > 1 else "")
        if smp > 1:
            unpark_loop(guest.gdb, image.programs / "loop", guest.tail.text)
            result["rdtsc_busy"] = rdtsc_figures(guest, log, "the loop program busy beside it")
        result["clocksource"] = guest.console_clocksources()
        m = re.search(r"clockprobe calibrated rdtsc_median=(\d+)", guest.tail.text())
        result["rdtsc_median"] = int(m.group(1)) if m else None
    finally:
        guest.stop()
    return result


def fmt_rates(r: dict[str, float]) -> str:
    clocks = " ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "loop")
    return f"{clocks} loop {r['loop']:.0f}/s"


def table(results: dict[str, dict]) -> str:
    """mode -> rates (guest seconds per host second), the largest clock jump over the 10 s stop,
    RDTSC outliers in the session (and undisturbed), the same beside a busy vCPU (several vCPUs),
    busy-loop chunks per host second."""
    head = (
        f"{'mode':<16} {'idle':>6} {'busy':>6} {'rtc':>6} {'stop jump':>10} "
        f"{'rdtsc outliers':>15} {'undisturbed':>12} {'beside busy':>12} {'undisturbed':>12} "
        f"{'loop/s':>7}"
    )
    rows = [head]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"{name:<16} error: {r['error']}")
            continue
        jump = largest_jump(r.get("stop", {}))
        rd, rb = r.get("rdtsc", {}), r.get("rdtsc_busy", {})
        rtc = r.get("hold", {}).get("rtc", float("nan"))
        rows.append(
            f"{name:<16} {r['idle']['mono']:>6.3f} {r['busy']['mono']:>6.3f} {rtc:>6.3f} "
            f"{jump:>7.1f} ms {rd.get('outliers', '?'):>7}/{rd.get('samples', '?'):<7} "
            f"{rd.get('undisturbed_outliers', '?'):>5}/{rd.get('undisturbed_samples', '?'):<6} "
            f"{rb.get('outliers', '-'):>5}/{rb.get('samples', '-'):<6} "
            f"{rb.get('undisturbed_outliers', '-'):>5}/{rb.get('undisturbed_samples', '-'):<6} "
            f"{r['busy']['loop']:>7.0f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmigdb.bench.timemodes", description=__doc__)
    p.add_argument("--modes", default="host,icount", help="comma list of --time modes")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="also measure these extra QEMU arguments (no --time)",
    )
    p.add_argument("--idle", type=int, default=30, help="guest seconds of the idle phase")
    p.add_argument("--busy", type=int, default=30, help="guest seconds of the busy phase")
    p.add_argument("--smp", type=int, default=1)
    p.add_argument("--json", type=Path, metavar="FILE")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    from vmigdb.images.build import build_guest

    image = build_guest()
    runs: list[tuple[str, str, tuple[str, ...]]] = [(m, m, ()) for m in args.modes.split(",") if m]
    for v in args.variant:
        name, _, qargs = v.partition("=")
        # --time host adds no QEMU argument: the variant's are the only ones (the default, auto,
        # would add -icount under TCG).
        runs.append((name, "host", tuple(shlex.split(qargs))))
    root = Path(tempfile.mkdtemp(prefix="vmigdb-timemodes-"))
    results: dict[str, dict] = {}
    start = time.monotonic()

    def log(message: str) -> None:
        print(
            f"timemodes [{time.monotonic() - start:6.1f}s] {message}", file=sys.stderr, flush=True
        )

    try:
        for i, (name, mode, qargs) in enumerate(runs):
            log(f"{name}: booting (load average {load_average():.2f})")
            try:
                results[name] = measure(
                    image,
                    root / f"{i}-{re.sub(r'[^A-Za-z0-9]+', '_', name)}",
                    time_mode=mode,
                    qemu_args=qargs,
                    idle=args.idle,
                    busy=args.busy,
                    smp=args.smp,
                    log=lambda m, n=name: log(f"{n}: {m}"),
                )
            except BenchError as exc:
                log(f"{name}: {exc}\n{exc.detail}")
                results[name] = {"error": str(exc)}
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        else:
            log(f"work directory kept: {root}")
    print(table(results))
    if args.json:
        meta = {"load_average": load_average(), "nproc": os.cpu_count(), "smp": args.smp}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0 if results and all("error" not in r for r in results.values()) else 1


__all__ = ["ConsoleTail", "Sample", "parse_sample", "phase_runs", "rates", "stop_jump"]

if __name__ == "__main__":
    sys.exit(main())
