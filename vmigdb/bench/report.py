"""scripts/bench's report across time modes: one comparison table per mode, then the guest clocks.

Text, markdown and JSON carry the same figures. Pure (figures in, text out), so
tests/unit/test_bench_modes.py can check it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmigdb.bench import stats
from vmigdb.bench.clocks import CLOCKS_SMP, clock_rows
from vmigdb.bench.inside import LEGEND as INSIDE_LEGEND
from vmigdb.bench.inside import inside_rows
from vmigdb.hv.qemu.process import TIME_MODES

CLOCKS_TITLE = (
    f"Guest clocks under vmigdb, {CLOCKS_SMP} vCPUs (the clocks step: python -m vmigdb.bench.timemodes)"
)
INSIDE_TITLE = "Inside one process, under vmigdb (the inside step: vmigdb.bench.inside)"
CLOCKS_LEGEND = (
    "rates are guest seconds per host second (the RTC's while idle); the jump is the largest of "
    "the guest clocks' across a 10 s stop; RDTSC outliers (over 100x the median) are counted in "
    "50 breakpoint hits + 200 stepi, then with no debugger over the same time; first with the other "
    "vCPU idle, then again beside a busy process (loop) on it"
)


@dataclass
class ModeRun:
    """One time mode's figures: the servers' comparison and, if measured, the guest clocks."""

    mode: str
    results: stats.Results = field(default_factory=dict)
    clocks: dict | None = None  # timemodes.measure's figures, or {"error": why}
    inside: dict | None = None  # inside.measure_inside's figures, or {"error": why}
    other_cores_busy: dict[str, float] = field(default_factory=dict)  # qemu|vmigdb|clocks -> cores

    @property
    def qemu_args(self) -> str:
        return " ".join(TIME_MODES[self.mode])

    @property
    def title(self) -> str:
        return f"--time {self.mode} (QEMU arguments, for both servers: {self.qemu_args or 'none'})"

    @property
    def markdown_title(self) -> str:
        qemu_args = f"`{self.qemu_args}`" if self.qemu_args else "none"
        return f"**`--time {self.mode}`** (QEMU arguments, for both servers: {qemu_args})"

    def servers_load(self) -> dict[str, float]:
        return {
            f"the {title} part": self.other_cores_busy[server]
            for server, title in stats.SERVER_TITLES.items()
            if server in self.other_cores_busy
        }


def load_remarks(cores_busy: dict[str, float], nproc: int | None) -> list[str]:
    """How many cores other processes kept busy during each part (label -> cores): the noise."""
    if not cores_busy or max(cores_busy.values()) <= 0.2:
        return []
    during = ", ".join(f"{cores:.1f} during {part}" for part, cores in cores_busy.items())
    return [
        f"other processes kept on average {during} of the {nproc} cores busy: "
        "expect more noise than on an idle machine"
    ]


def measured_clocks(runs: list[ModeRun]) -> dict[str, dict]:
    return {run.mode: run.clocks for run in runs if run.clocks is not None}


def measured_inside(runs: list[ModeRun]) -> dict[str, dict]:
    return {run.mode: run.inside for run in runs if run.inside is not None}


def clocks_load(runs: list[ModeRun]) -> dict[str, float]:
    return {
        f"the clocks step under --time {run.mode}": run.other_cores_busy["clocks"]
        for run in runs
        if "clocks" in run.other_cores_busy
    }


def format_text(runs: list[ModeRun]) -> str:
    parts = []
    for run in runs:
        if run.results:
            parts += [run.title, stats.format_table(run.results), ""]
    if clocks := measured_clocks(runs):
        parts += [CLOCKS_TITLE, stats.text_table(clock_rows(clocks)), CLOCKS_LEGEND]
    if inside := measured_inside(runs):
        parts += ["", INSIDE_TITLE, stats.text_table(inside_rows(inside)), INSIDE_LEGEND]
    return "\n".join(parts).rstrip("\n")


def format_markdown(runs: list[ModeRun], meta: dict) -> str:
    """README-ready: the heading line, a titled table per mode, the clocks table, remarks."""
    nproc = meta.get("nproc")
    md = [stats.markdown_heading(meta), ""]
    for run in runs:
        if run.results:
            remarks = load_remarks(run.servers_load(), nproc)
            md += [run.markdown_title, "", stats.format_markdown(run.results, remarks)]
    if clocks := measured_clocks(runs):
        md += [f"{CLOCKS_TITLE}:", "", *stats.markdown_table(clock_rows(clocks)), ""]
        remarks = [CLOCKS_LEGEND, *load_remarks(clocks_load(runs), nproc)]
        md += [f"- {remark}" for remark in remarks] + [""]
    if inside := measured_inside(runs):
        md += [f"{INSIDE_TITLE}:", "", *stats.markdown_table(inside_rows(inside)), ""]
        md += [f"- {INSIDE_LEGEND}", ""]
    md += [f"- {remark}" for remark in meta.get("remarks", [])]
    return "\n".join(md).rstrip("\n") + "\n"


def to_json(runs: list[ModeRun], meta: dict) -> dict:
    """The machine's meta, then per mode (keyed by mode) its comparison and clocks figures."""
    modes = {}
    for run in runs:
        mode_meta = {
            "qemu_args": list(TIME_MODES[run.mode]),
            "other_cores_busy": run.other_cores_busy,
            "remarks": load_remarks(run.servers_load(), meta.get("nproc")),
        }
        modes[run.mode] = {
            **stats.to_json(run.results, mode_meta),
            "clocks": run.clocks,
            "inside": run.inside,
        }
    return {"meta": meta, "modes": modes}


def failed(runs: list[ModeRun]) -> bool:
    """A figure is missing for a reason other than "n/a": the run's exit status says so."""
    cells = [c for run in runs for cells in run.results.values() for c in cells.values()]
    errors = [c.error for c in cells if c.error and not c.values]
    clock_errors = [run.clocks for run in runs if run.clocks and "error" in run.clocks]
    inside_errors = [run.inside for run in runs if run.inside and "error" in run.inside]
    return bool(clock_errors or inside_errors) or any(not e.startswith("n/a") for e in errors)
