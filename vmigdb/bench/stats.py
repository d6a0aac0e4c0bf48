"""The benchmark's arithmetic and output: statistics, ratios, targets, the table, JSON and markdown.

Pure functions only (no processes, no clocks), so tests/unit/test_bench.py can check them.

A workload yields, per server, one value per repetition (each the best of several passes); the table
shows the median of those values and their spread [min-max], and the ratio of the medians oriented
so that higher is better for vmigdb.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

QEMU = "qemu"
VMIGDB = "vmigdb"
SERVERS = (QEMU, VMIGDB)
SERVER_TITLES = {QEMU: "QEMU gdbstub", VMIGDB: "vmigdb"}
DASH = "–"


@dataclass(frozen=True)
class Spec:
    """One row of the table and the target the issue sets for it."""

    key: str
    label: str
    unit: str
    target_value: float
    higher_is_better: bool = True
    target_on: str = "ratio"  # "ratio": vmigdb vs QEMU; "vmigdb": vmigdb's own figure
    qemu_applicable: bool = True

    @property
    def title(self) -> str:
        return f"{self.label} ({self.unit})"

    @property
    def target_text(self) -> str:
        if self.target_on == "ratio":
            return f">= {self.target_value:g}x"
        op = ">=" if self.higher_is_better else "<"
        return f"{op} {self.target_value:g}" + (
            "" if self.unit.startswith("x") else f" {self.unit}"
        )


SPECS: tuple[Spec, ...] = (
    Spec("bulk_read", "bulk read", "MB/s", 1.5),
    Spec("dump_memory", "bulk dump, monitor", "MB/s", 500, target_on=VMIGDB, qemu_applicable=False),
    Spec("scattered", "scattered read", "x/8xg/s", 1.0),
    Spec("registers", "registers", "reads/s", 1.0),
    Spec("stepi", "stepi", "steps/s", 1.5),
    Spec("stepi_default", "stepi, QEMU's breakpoint", "steps/s", 1.0),
    Spec("cond_bp", "conditional bp", "hits/s", 50),
    Spec("next_loop", "next over loop", "s per 100k-iter next", 20, higher_is_better=False),
    Spec("idle_a", "idle, attached", "x detached", 0.95, target_on=VMIGDB),
    Spec("idle_b", "idle, 4 bps", "x detached", 1.0),
    Spec("plugin_loaded", "idle, plugin loaded", "x plain QEMU", 0.95, target_on=VMIGDB,
         qemu_applicable=False),
    Spec("scoped_hot", "scoped bp, hot code", "x detached", 0.9, target_on=VMIGDB),
    Spec(
        "footprint",
        "footprint",
        "MiB",
        100,
        higher_is_better=False,
        target_on=VMIGDB,
        qemu_applicable=False,
    ),
)
SPEC_BY_KEY = {spec.key: spec for spec in SPECS}


def paired_ratio(cells: dict[str, Cell], top: str, bottom: str) -> Cell | None:
    """Repetition i of `top` over repetition i of `bottom` (e.g. one server's detached rate over
    the other's), or None when either server has no figures."""
    a, b = cells.get(top), cells.get(bottom)
    if a is None or b is None or not a.values or not b.values:
        return None
    return Cell(values=[x / y for x, y in zip(a.values, b.values, strict=False) if y])


@dataclass
class Cell:
    """What one server got on one workload: a value per repetition, or why there is none."""

    values: list[float] = field(default_factory=list)
    error: str | None = None  # e.g. "timeout after 200 s", "n/a (not available)"
    note: str | None = None  # how it was measured, when that differs from the plain workload


@dataclass(frozen=True)
class Summary:
    median: float
    lo: float
    hi: float
    n: int


def summarize(values: list[float]) -> Summary | None:
    """Median and spread of the repetitions; None when there are none."""
    if not values:
        return None
    return Summary(statistics.median(values), min(values), max(values), len(values))


def best_of(passes: list[float], higher_is_better: bool = True) -> float:
    """The best pass of a repetition: noise on these machines only ever makes a pass slower."""
    if not passes:
        raise ValueError("no passes")
    return max(passes) if higher_is_better else min(passes)


def rate(amount: float, seconds: float) -> float:
    """amount per second; a zero or negative duration is a measuring bug, not infinity."""
    if seconds <= 0:
        raise ValueError(f"non-positive duration {seconds!r}")
    return amount / seconds


def ratio(spec: Spec, qemu: Summary | None, vmigdb: Summary | None) -> float | None:
    """vmigdb's median against QEMU's, > 1 when vmigdb is better (whatever the unit's direction)."""
    if qemu is None or vmigdb is None or not spec.qemu_applicable:
        return None
    num, den = (
        (vmigdb.median, qemu.median) if spec.higher_is_better else (qemu.median, vmigdb.median)
    )
    if den == 0:
        return None
    return num / den


def target_met(spec: Spec, qemu: Summary | None, vmigdb: Summary | None) -> bool | None:
    """Whether the issue's target is reached (None: cannot tell, a figure is missing)."""
    if spec.target_on == "ratio":
        r = ratio(spec, qemu, vmigdb)
        return None if r is None else r >= spec.target_value
    if vmigdb is None:
        return None
    if spec.higher_is_better:
        return vmigdb.median >= spec.target_value
    return vmigdb.median < spec.target_value


def fmt_num(x: float) -> str:
    """Three significant figures or so, thousands separated."""
    ax = abs(x)
    if ax >= 100:
        return f"{x:,.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_summary(s: Summary) -> str:
    if s.n == 1:
        return fmt_num(s.median)
    return f"{fmt_num(s.median)} [{fmt_num(s.lo)}-{fmt_num(s.hi)}]"


def fmt_cell(spec: Spec, server: str, cell: Cell | None) -> str:
    if server == QEMU and not spec.qemu_applicable:
        return DASH
    if cell is None:
        return "not run"
    if cell.error and not cell.values:
        return cell.error
    s = summarize(cell.values)
    text = fmt_summary(s) if s else "no data"
    return text + ("*" if cell.note else "")


def fmt_ratio(r: float | None) -> str:
    return DASH if r is None else f"{fmt_num(r)}x"


def fmt_met(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: ""}[met]


Results = dict[str, dict[str, Cell]]  # spec key -> server -> cell


def rows(results: Results, specs: tuple[Spec, ...] = SPECS) -> list[list[str]]:
    """The table's cells as text: header first, then one row per workload that was run."""
    out = [["workload", SERVER_TITLES[QEMU], SERVER_TITLES[VMIGDB], "ratio", "target", "met"]]
    for spec in specs:
        if spec.key not in results:
            continue
        cells = results[spec.key]
        q, v = (summarize(c.values) if (c := cells.get(s)) else None for s in SERVERS)
        out.append(
            [
                spec.title,
                fmt_cell(spec, QEMU, cells.get(QEMU)),
                fmt_cell(spec, VMIGDB, cells.get(VMIGDB)),
                fmt_ratio(ratio(spec, q, v)),
                spec.target_text,
                fmt_met(target_met(spec, q, v)),
            ]
        )
    return out


def notes(results: Results, specs: tuple[Spec, ...] = SPECS) -> list[str]:
    """Footnotes: every cell's note and every error next to values."""
    out = []
    for spec in specs:
        for server in SERVERS:
            cell = results.get(spec.key, {}).get(server)
            if cell is None:
                continue
            if cell.note:
                out.append(f"* {spec.label}, {SERVER_TITLES[server]}: {cell.note}")
            if cell.error and cell.values:
                out.append(f"! {spec.label}, {SERVER_TITLES[server]}: {cell.error}")
    return out


def text_table(table: list[list[str]]) -> str:
    """Fixed-width text, columns as wide as their widest cell."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table
    )


def markdown_table(table: list[list[str]]) -> list[str]:
    """The same cells as a markdown table, one line each."""
    head, body = table[0], table[1:]
    md = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return md + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]


def format_table(results: Results, specs: tuple[Spec, ...] = SPECS) -> str:
    """The comparison as text, footnotes under it."""
    return "\n".join([text_table(rows(results, specs)), *notes(results, specs)])


def markdown_heading(meta: dict) -> str:
    """The line that says when, where and how the figures were measured."""
    return (
        f"Measured {meta.get('date', '?')} on {meta.get('nproc', '?')} x {meta.get('cpu', '?')}, "
        f"{meta.get('qemu', 'QEMU ?')}, {meta.get('gdb', 'GDB ?')} "
        f"(`scripts/bench{' --quick' if meta.get('quick') else ''}`; median of "
        f"{meta.get('repetitions', '?')} repetitions [min-max], each the best of "
        f"{meta.get('passes', '?')} passes where a pass is short)."
    )


def format_markdown(results: Results, remarks: list[str], specs: tuple[Spec, ...] = SPECS) -> str:
    """The comparison as a README-ready table, footnotes and remarks as a list under it."""
    md = markdown_table(rows(results, specs))
    extra = [n.replace("*", "\\*", 1) for n in notes(results, specs)] + remarks
    if extra:
        md += [""] + [f"- {n}" for n in extra]
    return "\n".join(md) + "\n"


def to_json(results: Results, meta: dict, specs: tuple[Spec, ...] = SPECS) -> dict:
    """Everything the table shows, and the raw values behind it."""
    workloads = []
    for spec in specs:
        if spec.key not in results:
            continue
        cells = results[spec.key]
        summaries = {s: summarize(cells[s].values) if s in cells else None for s in SERVERS}
        entry: dict = {
            "key": spec.key,
            "workload": spec.label,
            "unit": spec.unit,
            "higher_is_better": spec.higher_is_better,
            "target": {"on": spec.target_on, "value": spec.target_value, "text": spec.target_text},
        }
        for server in SERVERS:
            cell, summary = cells.get(server), summaries[server]
            if server == QEMU and not spec.qemu_applicable:
                entry[server] = None
                continue
            entry[server] = (
                None
                if cell is None
                else {
                    "values": cell.values,
                    "median": summary.median if summary else None,
                    "min": summary.lo if summary else None,
                    "max": summary.hi if summary else None,
                    "error": cell.error,
                    "note": cell.note,
                }
            )
        entry["ratio"] = ratio(spec, summaries[QEMU], summaries[VMIGDB])
        entry["met"] = target_met(spec, summaries[QEMU], summaries[VMIGDB])
        workloads.append(entry)
    return {"meta": meta, "workloads": workloads}
