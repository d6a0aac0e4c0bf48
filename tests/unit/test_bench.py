"""scripts/bench's pure parts: statistics, ratios, targets, table/JSON/markdown, console and smaps parsing.

The benchmark itself boots guests and is never run by the test suite (timings are not assertions).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmigdb.bench import stats
from vmigdb.bench.gdbrun import parse_records, script_text
from vmigdb.bench.observe import (
    cpu_busy_seconds,
    host_rate,
    nice_floor,
    private_kib,
    ticker_lines,
    ticker_rate,
)
from vmigdb.bench.stats import QEMU, SPEC_BY_KEY, VMIGDB, Cell, Summary
from vmigdb.bench.workloads import loop_lines

LOOP_C = Path(__file__).resolve().parents[2] / "vmigdb" / "images" / "programs" / "loop.c"


# ---- statistics -----------------------------------------------------------------------------------
def test_summarize_median_and_spread() -> None:
    assert stats.summarize([3.0, 1.0, 2.0]) == Summary(2.0, 1.0, 3.0, 3)
    assert stats.summarize([4.0, 1.0, 2.0, 3.0]) == Summary(2.5, 1.0, 4.0, 4)
    assert stats.summarize([]) is None


def test_best_of_follows_the_direction() -> None:
    assert stats.best_of([1.0, 3.0, 2.0]) == 3.0
    assert stats.best_of([1.0, 3.0, 2.0], higher_is_better=False) == 1.0
    with pytest.raises(ValueError):
        stats.best_of([])


def test_rate_refuses_zero_durations() -> None:
    assert stats.rate(64, 2.0) == 32.0
    with pytest.raises(ValueError):
        stats.rate(1, 0.0)


def test_ratio_is_higher_when_vmigdb_is_better_either_way() -> None:
    q, v = Summary(10.0, 9, 11, 3), Summary(20.0, 19, 21, 3)
    assert stats.ratio(SPEC_BY_KEY["bulk_read"], q, v) == 2.0  # MB/s: higher is better
    assert stats.ratio(SPEC_BY_KEY["next_loop"], q, v) == 0.5  # seconds: lower is better
    assert stats.ratio(SPEC_BY_KEY["bulk_read"], None, v) is None
    assert stats.ratio(SPEC_BY_KEY["footprint"], q, v) is None  # QEMU has no such figure


def test_target_met() -> None:
    q = Summary(10.0, 10, 10, 1)
    assert stats.target_met(SPEC_BY_KEY["bulk_read"], q, Summary(15.0, 15, 15, 1)) is True
    assert stats.target_met(SPEC_BY_KEY["bulk_read"], q, Summary(14.9, 14.9, 14.9, 1)) is False
    assert stats.target_met(SPEC_BY_KEY["dump_memory"], None, Summary(600, 1, 1, 1)) is True
    assert stats.target_met(SPEC_BY_KEY["footprint"], None, Summary(99, 1, 1, 1)) is True
    assert stats.target_met(SPEC_BY_KEY["footprint"], None, Summary(100, 1, 1, 1)) is False
    assert stats.target_met(SPEC_BY_KEY["idle_a"], q, Summary(0.95, 1, 1, 1)) is True
    assert stats.target_met(SPEC_BY_KEY["cond_bp"], None, Summary(1, 1, 1, 1)) is None


def test_target_text() -> None:
    assert SPEC_BY_KEY["bulk_read"].target_text == ">= 1.5x"
    assert SPEC_BY_KEY["dump_memory"].target_text == ">= 500 MB/s"
    assert SPEC_BY_KEY["footprint"].target_text == "< 100 MiB"
    assert SPEC_BY_KEY["idle_a"].target_text == ">= 0.95"


# ---- formatting -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "text"),
    [(12345.6, "12,346"), (123.4, "123"), (12.34, "12.3"), (1.234, "1.23"), (0.9634, "0.963")],
)
def test_fmt_num(value: float, text: str) -> None:
    assert stats.fmt_num(value) == text


def sample_results() -> stats.Results:
    return {
        "bulk_read": {QEMU: Cell([12.1, 11.8, 12.4]), VMIGDB: Cell([19.5, 19.0, 20.1])},
        "dump_memory": {VMIGDB: Cell(error="n/a (not available)")},
        "next_loop": {
            QEMU: Cell([300.0, 310.0, 290.0], note="measured over 5,000 iterations, scaled x20"),
            VMIGDB: Cell([0.1, 0.2, 0.15]),
        },
        "cond_bp": {QEMU: Cell([370.0]), VMIGDB: Cell(error="timeout after 200 s")},
        "footprint": {VMIGDB: Cell([30.0, 31.0, 29.0])},
    }


def test_table_rows() -> None:
    table = stats.rows(sample_results())
    assert table[0] == ["workload", "QEMU gdbstub", "vmigdb", "ratio", "target", "met"]
    by_label = {r[0]: r for r in table[1:]}
    assert by_label["bulk read (MB/s)"] == [
        "bulk read (MB/s)", "12.1 [11.8-12.4]", "19.5 [19.0-20.1]", "1.61x", ">= 1.5x", "yes",
    ]  # fmt: skip
    assert by_label["bulk dump, monitor (MB/s)"][1:3] == ["–", "n/a (not available)"]
    assert by_label["next over loop (s per 100k-iter next)"][1:4] == [
        "300 [290-310]*", "0.150 [0.100-0.200]", "2,000x",
    ]  # fmt: skip
    assert by_label["conditional bp (hits/s)"][1:] == [
        "370",
        "timeout after 200 s",
        "–",
        ">= 50x",
        "",
    ]
    assert by_label["footprint (MiB)"][1:] == ["–", "30.0 [29.0-31.0]", "–", "< 100 MiB", "yes"]
    assert [r[0] for r in table[1:]] == [  # the order, whatever the dict's
        "bulk read (MB/s)", "bulk dump, monitor (MB/s)", "conditional bp (hits/s)",
        "next over loop (s per 100k-iter next)", "footprint (MiB)",
    ]  # fmt: skip


def test_format_table_aligns_columns_and_adds_notes() -> None:
    text = stats.format_table(sample_results())
    lines = text.splitlines()
    header = lines[0]
    assert header.startswith("workload") and "QEMU gdbstub" in header
    col = header.index("QEMU gdbstub")
    assert all(line[col - 3 : col] == "   " for line in lines[1:6])
    assert any(
        line.startswith("* next over loop, QEMU gdbstub: measured over 5,000") for line in lines
    )


def test_markdown_has_machine_line_table_and_remarks() -> None:
    meta = {"date": "2025-01-01 00:00 UTC", "nproc": 2, "cpu": "AMD EPYC", "qemu": "QEMU 7.2.22",
            "gdb": "GDB 13.1", "quick": True, "repetitions": 3, "passes": 2,
            "remarks": ["host load average was 3.00"]}  # fmt: skip
    heading = stats.markdown_heading(meta)
    assert heading.startswith(
        "Measured 2025-01-01 00:00 UTC on 2 x AMD EPYC, QEMU 7.2.22, GDB 13.1"
    )
    assert "`scripts/bench --quick`" in heading
    md = stats.format_markdown(sample_results(), meta["remarks"])
    assert "| workload | QEMU gdbstub | vmigdb | ratio | target | met |" in md
    assert "|---|---|---|---|---|---|" in md
    assert (
        "| bulk read (MB/s) | 12.1 [11.8-12.4] | 19.5 [19.0-20.1] | 1.61x | >= 1.5x | yes |" in md
    )
    assert "- host load average was 3.00" in md
    assert "- \\* next over loop" in md


def test_json_round_trips_and_holds_raw_values() -> None:
    doc = json.loads(json.dumps(stats.to_json(sample_results(), {"date": "d"})))
    assert doc["meta"] == {"date": "d"}
    by_key = {w["key"]: w for w in doc["workloads"]}
    bulk = by_key["bulk_read"]
    assert bulk["qemu"]["values"] == [12.1, 11.8, 12.4]
    assert bulk["vmigdb"]["median"] == 19.5 and bulk["vmigdb"]["min"] == 19.0
    assert bulk["ratio"] == pytest.approx(19.5 / 12.1) and bulk["met"] is True
    assert bulk["target"] == {"on": "ratio", "value": 1.5, "text": ">= 1.5x"}
    assert by_key["dump_memory"]["qemu"] is None
    assert by_key["dump_memory"]["vmigdb"]["error"] == "n/a (not available)"
    assert by_key["next_loop"]["higher_is_better"] is False
    assert by_key["cond_bp"]["met"] is None
    assert "scattered" not in by_key  # not run: not reported


# ---- console, /proc and GDB output ----------------------------------------------------------------
def test_ticker_rate_uses_whole_lines_and_guest_seconds() -> None:
    console = (
        "calls=5\n"  # the window may start mid-line
        "ticker pid=95 round=3 calls=300000\n"
        "loop pid=96 round=1 sum=4999950000\n"
        "ticker pid=95 round=4 calls=400000\n"
        "ticker pid=95 round=6 calls=620000\n"
        "ticker pid=95 round=7 calls=7"  # still being written
    )
    assert ticker_rate(console) == pytest.approx(320000 / 3)
    assert ticker_rate("ticker pid=95 round=3 calls=300000\n") is None
    assert ticker_rate("ticker pid=95 round=3 calls=1\nticker pid=99 round=4 calls=2\n") is None


def test_host_rate_is_calls_per_host_second_between_the_first_and_last_line() -> None:
    lines = ticker_lines("ticker pid=95 round=3 calls=300000\nloop pid=96 round=1 sum=1\n"
                         "ticker pid=95 round=4 calls=400000\nticker pid=95 round=5 calls=4")
    assert lines == [(95, 300000), (95, 400000)]  # the last line is still being written
    # two guest seconds of calls that took the host four seconds: 50,000 calls per host second
    assert host_rate([(10.0, 95, 300000), (12.0, 95, 350000), (14.0, 95, 500000)]) == 50000
    assert host_rate([(10.0, 95, 300000)]) is None
    assert host_rate([(10.0, 95, 1), (11.0, 99, 2)]) is None  # the ticker restarted


def test_paired_ratio_divides_repetition_by_repetition() -> None:
    cells = {VMIGDB: Cell([99.0, 200.0]), QEMU: Cell([100.0, 200.0, 300.0])}
    assert stats.paired_ratio(cells, VMIGDB, QEMU).values == [0.99, 1.0]
    assert stats.paired_ratio({VMIGDB: Cell([1.0])}, VMIGDB, QEMU) is None


SMAPS = """\
00400000-00421000 r--p 00000000 08:01 123 /usr/bin/python3.11
Size:                132 kB
Private_Clean:         4 kB
Private_Dirty:         8 kB
7f0000000000-7f0040000000 rw-s 00000000 00:19 42 /dev/shm/vmigdb-abc (deleted)
Size:            1048576 kB
Private_Clean:     65536 kB
Private_Dirty:     10000 kB
7f0050000000-7f0052000000 rw-p 00000000 00:00 0
Size:              32768 kB
Private_Clean:         0 kB
Private_Dirty:     20000 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Private_Clean:         0 kB
Private_Dirty:        16 kB
"""


def test_private_kib_leaves_out_the_guest_ram_file() -> None:
    assert private_kib(SMAPS, exclude_kib=1024 * 1024) == 4 + 8 + 20000 + 16
    assert private_kib(SMAPS, exclude_kib=1 << 40) == 4 + 8 + 65536 + 10000 + 20000 + 16


def test_cpu_busy_seconds_counts_user_nice_system_irq_softirq() -> None:
    tck = os.sysconf("SC_CLK_TCK")
    stat = "cpu  100 20 30 5000 7 1 2 900 0 0\ncpu0 50 10 15 2500 3 0 1 450 0 0\n"
    assert cpu_busy_seconds(stat) == pytest.approx((100 + 20 + 30 + 1 + 2) / tck)
    with pytest.raises(ValueError):
        cpu_busy_seconds("intr 1 2 3\n")


@pytest.mark.parametrize(
    ("x", "n"), [(0.5, 1), (1, 1), (9.9, 5), (882, 500), (1999, 1000), (2000, 2000), (99999, 50000)]
)
def test_nice_floor(x: float, n: int) -> None:
    assert nice_floor(x) == n


def test_parse_records_keeps_only_emitted_json() -> None:
    out = 'Breakpoint 1 at 0x600000\n@@ {"kind": "pass", "seconds": 1.5}\n@@ not json\n@@ {"kind": "done"}\n'
    assert parse_records(out) == [{"kind": "pass", "seconds": 1.5}, {"kind": "done"}]


def test_script_text_is_python_that_connects_then_detaches() -> None:
    text = script_text(
        "def main():\n    emit(kind='pass', seconds=timed('stepi 10'))\n", "127.0.0.1:9"
    )
    compile(text, "script.py", "exec")
    assert 'gdb.execute("target remote 127.0.0.1:9")' in text
    assert text.index("main()") < text.index('"detach"')


def test_loop_c_markers() -> None:
    loop, after = loop_lines(LOOP_C)
    lines = LOOP_C.read_text().splitlines()
    assert "vmigdb_loop_sink += i" in lines[loop - 1]
    assert f"#define LOOP_LINE {loop} " in LOOP_C.read_text()
    assert after > loop
