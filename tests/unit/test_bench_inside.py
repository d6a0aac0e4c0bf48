"""The inside step's table: figures in, rows out (vmigdb.bench.inside)."""

from __future__ import annotations

from vmigdb.bench.inside import inside_rows
from vmigdb.bench.report import ModeRun, failed, format_markdown, format_text

FIGURES = {
    "rate_none": [360_000.0, 365_000.0, 364_000.0],
    "rate_quiet": [364_000.0, 363_000.0, 364_500.0],
    "rate_openat": [362_000.0, 361_000.0, 363_000.0],
    "rate_all": [500.0, 550.0, 600.0],
    "exec_caught": [0.05, 0.07, 0.11],
    "exec_plain": [0.08, 0.09, 0.07],
    "libraries": [0.04, 0.03, 0.07],
    "library_objects": 4,
}


def test_rows_give_medians_spreads_and_ratios() -> None:
    rows = inside_rows({"icount": FIGURES})
    assert rows[0] == ["time mode", "workload", "vmigdb", "x no catchpoint"]
    by_label = {row[1]: row[2:] for row in rows[1:]}
    assert by_label["syscall rate, no catchpoint (syscalls/s)"] == [
        "364,000 [360,000-365,000]",
        "1x",
    ]
    quiet = by_label["syscall rate, catch syscall openat in another process, no stop (syscalls/s)"]
    assert quiet == ["364,000 [363,000-364,500]", "1.000x"]
    every = by_label["syscall rate, catch every syscall of another process (syscalls/s)"]
    assert every == ["550 [500-600]", "0.002x"]
    assert by_label["catch exec: trigger to GDB's prompt (ms)"][0] == "70.0 [50.0-110]"
    assert by_label["sharedlibrary, fresh process, 4 objects (s)"][0] == "0.040 [0.030-0.070]"


def test_an_error_is_one_row_and_fails_the_run() -> None:
    run = ModeRun("host", inside={"error": "sysloop made no progress"})
    assert inside_rows({"host": run.inside}) == [
        ["time mode", "workload", "vmigdb", "x no catchpoint"],
        ["host", "error: sysloop made no progress", "", ""],
    ]
    assert failed([run])


def test_reports_carry_the_table() -> None:
    run = ModeRun("icount", inside=FIGURES)
    assert "Inside one process, under vmigdb" in format_text([run])
    markdown = format_markdown([run], {"date": "today", "nproc": 2, "cpu": "x", "qemu": "q",
                                        "gdb": "g"})  # fmt: skip
    assert "| icount | catch exec: trigger to GDB's prompt (ms) |" in markdown
    assert not failed([run])
