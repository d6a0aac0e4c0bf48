"""scripts/bench's `clocks` step: what a time mode shows the guest's own clocks, under vmigdb.

The measuring is `vmigdb.bench.timemodes.measure` (its own guest under `vmigdb qemu --time MODE`,
TCG like the comparison, with the clockprobe program); this module runs it for scripts/bench and
turns its figures into one table row per mode, the goals timemodes sets in the last row.
"""

from __future__ import annotations

from pathlib import Path

from vmigdb.bench import timemodes
from vmigdb.bench.guest import BenchError
from vmigdb.bench.stats import fmt_num
from vmigdb.bench.workloads import Config

HEADER = [
    "time mode", "rate, idle", "rate, busy", "RTC rate", "largest jump, 10 s stop",
    "RDTSC outliers, debugged", "undisturbed", "other vCPU busy: debugged", "undisturbed",
    "busy loop (chunks/s)",
]  # fmt: skip
# Two vCPUs: an SMP guest is what users run, and where guest time is hardest to hide (the
# run-control issue's RDTSC row: 2 vCPUs, 50 hits + 200 steps, 0 outliers).
CLOCKS_SMP = 2
GOALS = ["goal", "0.9-1.1", "0.9-1.1", "0.9-1.1", "< 50 ms", "0", "", "0", "", "higher"]


def measure_clocks(image, workdir: Path, mode: str, config: Config, log) -> dict:
    """timemodes' figures for one mode, or {"error": why}: a failure costs the row, not the run."""
    try:
        return timemodes.measure(
            image,
            workdir,
            time_mode=mode,
            idle=config.clock_phase,
            busy=config.clock_phase,
            accel="tcg",
            smp=CLOCKS_SMP,
            log=log,
        )
    except (BenchError, ValueError) as exc:
        detail = getattr(exc, "detail", "")
        log(f"failed: {exc}" + (f"\n{detail}" if detail else ""))
        return {"error": str(exc)}


def clock_row(mode: str, figures: dict) -> list[str]:
    """One mode's cells: rates are guest seconds per host second, the jump in ms."""
    if "error" in figures:
        return [mode, f"error: {figures['error']}"] + [""] * (len(HEADER) - 2)
    rtc = figures["hold"].get("rtc")
    rdtsc, busy = figures["rdtsc"], figures.get("rdtsc_busy")
    return [
        mode,
        f"{figures['idle']['mono']:.3f}",
        f"{figures['busy']['mono']:.3f}",
        "?" if rtc is None else f"{rtc:.3f}",
        f"{timemodes.largest_jump(figures['stop']):.1f} ms",
        *outliers(rdtsc),
        *(outliers(busy) if busy else ["n/a (1 vCPU)", ""]),
        fmt_num(figures["busy"]["loop"]),
    ]


def outliers(rdtsc: dict) -> list[str]:
    """A session's outliers, then the probe's own over the same time with no debugger."""
    return [
        f"{rdtsc['outliers']} of {rdtsc['samples']}",
        f"{rdtsc['undisturbed_outliers']} of {rdtsc['undisturbed_samples']}",
    ]


def clock_rows(clocks: dict[str, dict]) -> list[list[str]]:
    """The clocks table's cells: header, one row per mode (mode -> figures), the goals."""
    return [HEADER, *(clock_row(mode, figures) for mode, figures in clocks.items()), GOALS]
