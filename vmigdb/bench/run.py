"""scripts/bench: vmigdb against QEMU's own gdbstub, side by side, on the same demo guest.

For each time mode (`--time`, default host then icount): boots the guest under QEMU's gdbstub with
that mode's QEMU arguments, runs every workload, shuts it down; then the same under
`vmigdb qemu --time MODE`; then the `clocks` step (vmigdb.bench.timemodes, its own guest) and the
`inside` step (vmigdb.bench.inside: catch syscall, catch exec and library symbols, its own guest).
Never two guests at once: one at a time on a small machine. Prints one table per mode, the clocks
table and the inside table; --json and --markdown write the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from vmigdb.bench import stats
from vmigdb.bench.clocks import measure_clocks
from vmigdb.bench.gdbrun import gdb_version
from vmigdb.bench.guest import (
    BenchError,
    QemuServer,
    Server,
    VmigdbServer,
    cpu_model,
    load_average,
    qemu_version,
)
from vmigdb.bench.inside import measure_inside
from vmigdb.bench.observe import OtherLoad
from vmigdb.bench.report import ModeRun, failed, format_markdown, format_text, to_json
from vmigdb.bench.workloads import EXTRA_KSYMS, FULL, QUICK, Config, Workloads
from vmigdb.errors import SetupError
from vmigdb.hv.qemu.process import TIME_MODES

MEMORY_MIB = 1024
SMP = 1
STEPS = (
    "idle",
    "scoped_hot",
    "bulk_read",
    "dump_memory",
    "scattered",
    "registers",
    "stepi",
    "stepi_default",
    "cond_bp",
    "next_loop",
    "clocks",
    "inside",
)
STEP_KEYS = {"idle": ("idle_a", "idle_b"), "bulk_read": ("bulk_read", "footprint")}
IDLE_BASE = "idle_base"  # the detached ticker rates idle measured (for plugin_loaded)
APPEND = f"vmigdb.programs=ticker,loop:park vmigdb.ksyms={','.join(EXTRA_KSYMS)}"

_start = time.monotonic()


def log(message: str) -> None:
    print(f"bench [{time.monotonic() - _start:6.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench", description="vmigdb against QEMU's own gdbstub, side by side."
    )
    p.add_argument("--quick", action="store_true", help="fewer repetitions, smaller sizes")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the figures as JSON")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="write a README-ready table")
    p.add_argument("--servers", default="qemu,vmigdb", help="comma list: qemu,vmigdb")
    p.add_argument("--only", default=",".join(STEPS), help=f"comma list of {','.join(STEPS)}")
    p.add_argument(
        "--time",
        default="host,icount",
        metavar="MODES",
        help=f"comma list of guest time modes to run everything under ({','.join(TIME_MODES)})",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the work directory (GDB scripts, logs)"
    )
    args = p.parse_args(argv)
    args.servers = [s for s in args.servers.split(",") if s]
    args.only = [s for s in args.only.split(",") if s]
    args.time = list(dict.fromkeys(m for m in args.time.split(",") if m))
    if not args.time:
        p.error("--time needs at least one mode")
    for mode in args.time:
        if mode not in TIME_MODES:
            p.error(f"unknown time mode {mode!r}: use {','.join(TIME_MODES)}")
    for name in args.servers:
        if name not in stats.SERVERS:
            p.error(f"unknown server {name!r}")
    for name in args.only:
        if name not in STEPS:
            p.error(f"unknown workload {name!r}")
    return args


def preflight() -> None:
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("gdb", "gdb")):
        if shutil.which(tool) is None:
            raise SetupError(
                f"{tool} not found: install it with 'apt-get install {package}' "
                "(scripts/bench does, through scripts/setup)"
            )


def run_server(
    cls: type[Server],
    image,
    config: Config,
    mode: str,
    only: list[str],
    results: stats.Results,
    root: Path,
) -> None:
    name = cls.name

    def put(key: str, cell: stats.Cell) -> None:
        results.setdefault(key, {})[name] = cell

    def fail(step: str, message: str) -> None:
        for key in STEP_KEYS.get(step, (step,)):
            if key == "footprint" and name != "vmigdb":
                continue
            if key == "dump_memory" and name != "vmigdb":
                continue
            put(key, stats.Cell(error=message))

    log(f"{name}: booting the guest ({MEMORY_MIB} MiB, {SMP} vCPU, TCG, --time {mode})")
    programs = image.programs
    server = cls(
        root / name,
        image.kernel,
        image.initrd,
        APPEND,
        memory_mib=MEMORY_MIB,
        smp=SMP,
        time_mode=mode,
    )
    try:
        server.start()
    except BenchError as exc:
        server.stop()
        log(f"{name}: {exc}\n{exc.detail}")
        for step in only:
            fail(step, "boot failed")
        return
    try:
        log(f"{name}: guest ready at {server.address}")
        loop_source = Path(__file__).resolve().parents[1] / "images" / "programs" / "loop.c"
        work = Workloads(server, config, server.workdir, programs / "loop", loop_source, log)
        work.prepare()
        unparked = False
        for step in only:
            if step == "dump_memory" and name != "vmigdb":
                continue
            steps_measured = results.get("stepi", {}).get(name)
            if step == "stepi_default" and name != "vmigdb" and steps_measured is not None:
                # QEMU's gdbstub steps the same way in both rows: measured once, under stepi
                put(step, steps_measured)
                continue
            if not server.alive():
                fail(step, f"{server.title} exited")
                continue
            log(f"{name}: {step}")
            try:
                if step in ("cond_bp", "next_loop") and not unparked:
                    work.unpark_loop()
                    unparked = True
                if step == "idle":
                    a, b, bases = work.idle()
                    put("idle_a", a)
                    put("idle_b", b)
                    put(IDLE_BASE, bases)
                elif step == "bulk_read":
                    footprint = stats.Cell() if name == "vmigdb" else None
                    put("bulk_read", work.bulk_read(footprint))
                    if footprint is not None:
                        put("footprint", footprint)
                else:
                    put(step, getattr(work, step)())
            except BenchError as exc:
                log(f"{name}: {step} failed: {exc}" + (f"\n{exc.detail}" if exc.detail else ""))
                fail(step, str(exc) if len(str(exc)) < 40 else "error (see log)")
    except BenchError as exc:
        log(f"{name}: {exc}" + (f"\n{exc.detail}" if exc.detail else ""))
        for step in only:
            if all(name not in results.get(k, {}) for k in STEP_KEYS.get(step, (step,))):
                fail(step, "error (see log)")
    finally:
        server.stop()
        log(f"{name}: guest stopped")


def measured_load(run: ModeRun, part: str, work) -> None:
    """Run `work`, noting how many cores other processes kept busy meanwhile (the part's noise)."""
    other = OtherLoad()
    try:
        with other:
            work()
    finally:
        if other.cores is not None:
            run.other_cores_busy[part] = round(other.cores, 2)


def run_mode(run: ModeRun, image, config: Config, args: argparse.Namespace, root: Path) -> None:
    """One time mode: each server's workloads, then the clocks step; one guest at a time."""
    servers = {"qemu": QemuServer, "vmigdb": VmigdbServer}
    comparison = [step for step in args.only if step not in ("clocks", "inside")]
    for name in args.servers if comparison else []:
        workloads = partial(
            run_server, servers[name], image, config, run.mode, comparison, run.results, root
        )
        measured_load(run, name, workloads)
    plugin_loaded = stats.paired_ratio(run.results.get(IDLE_BASE, {}), "vmigdb", "qemu")
    if plugin_loaded is not None:
        run.results["plugin_loaded"] = {"vmigdb": plugin_loaded}
    for step in ("clocks", "inside"):
        if step not in args.only:
            continue
        if "vmigdb" not in args.servers:
            log(f"{step}: skipped, it measures vmigdb and --servers leaves vmigdb out")
            continue
        log(f"{step}: booting its own guest (--time {run.mode})")

        def measure(step: str = step) -> None:
            what = measure_clocks if step == "clocks" else measure_inside
            figures = what(image, root / step, run.mode, config, lambda m: log(f"{step}: {m}"))
            setattr(run, step, figures)

        measured_load(run, step, measure)
        log(f"{step}: guest stopped")


def machine_meta(config: Config, image, modes: list[str]) -> dict:
    load = load_average()
    remarks = []
    if load > 0.5:
        remarks.append(
            f"host load average was {load:.2f} at the start: other work ran alongside, "
            "figures are noisier than on an idle machine"
        )
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "qemu": qemu_version(),
        "gdb": gdb_version(),
        "guest": {
            "kernel": image.release,
            "memory_mib": MEMORY_MIB,
            "smp": SMP,
            "accel": "tcg",
            "append": APPEND,
        },
        "time_modes": {mode: list(TIME_MODES[mode]) for mode in modes},
        "quick": config.quick,
        "repetitions": config.reps,
        "passes": config.passes,
        "config": {k: v for k, v in vars(config).items()},
        "load_average": load,
        "remarks": remarks,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = QUICK if args.quick else FULL

    def on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with ^C ignored
    runs: list[ModeRun] = []
    root = Path(tempfile.mkdtemp(prefix="vmigdb-bench-"))
    status = 0
    meta: dict = {}
    try:
        preflight()
        from vmigdb.images.build import build_guest

        log("building the demo guest (cached after the first run)")
        image = build_guest()
        if image.programs is None or not (image.programs / "loop").is_file():
            raise SetupError(
                "the demo guest has no loop program: rebuild with 'vmigdb guest build'"
            )
        meta = machine_meta(config, image, args.time)
        for mode in args.time:
            log(f"--time {mode}")
            runs.append(ModeRun(mode))
            run_mode(runs[-1], image, config, args, root / mode)
    except SetupError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log("interrupted: every guest is stopped; the figures so far follow")
        status = 130
    finally:
        if args.keep:
            log(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    meta["elapsed_s"] = round(time.monotonic() - _start, 1)
    log(f"done in {meta['elapsed_s'] / 60:.1f} min")
    print(format_text(runs))
    if args.json:
        args.json.write_text(json.dumps(to_json(runs, meta), indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(format_markdown(runs, meta))
    if status == 0 and failed(runs):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
