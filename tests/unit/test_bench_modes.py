"""scripts/bench across time modes: the command line, the servers' arguments, and the report.

Pure parts only: no guest is booted (the benchmark itself is never run by the test suite).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmigdb.bench.clocks import GOALS, HEADER, clock_rows
from vmigdb.bench.guest import QemuServer, VmigdbServer
from vmigdb.bench.report import ModeRun, failed, format_markdown, format_text, load_remarks, to_json
from vmigdb.bench.run import STEPS, parse_args
from vmigdb.bench.stats import QEMU, VMIGDB, Cell
from vmigdb.hv.qemu.process import TIME_MODES


# ---- command line ---------------------------------------------------------------------------------
def test_time_defaults_to_both_modes_and_clocks_is_a_default_step() -> None:
    args = parse_args([])
    assert args.time == ["host", "icount"]
    assert "clocks" in STEPS and args.only == list(STEPS)


def test_time_takes_a_comma_list_without_repeats() -> None:
    assert parse_args(["--time", "icount"]).time == ["icount"]
    assert parse_args(["--time", "icount,host,icount,"]).time == ["icount", "host"]
    assert parse_args(["--only", "clocks"]).only == ["clocks"]


@pytest.mark.parametrize("modes", ["fast", ",", "host,auto"])
def test_time_refuses_what_is_not_a_concrete_mode(modes: str) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--time", modes])


# ---- both servers get the same guest time ---------------------------------------------------------
@pytest.mark.parametrize("mode", sorted(TIME_MODES))
def test_qemu_gdbstub_gets_the_qemu_arguments_vmigdb_adds(mode: str, tmp_path: Path) -> None:
    def argv(cls) -> list[str]:
        kernel, initrd = tmp_path / "k", tmp_path / "i"
        return cls(tmp_path, kernel, initrd, "", memory_mib=512, time_mode=mode).argv()

    qemu = argv(QemuServer)
    n = len(TIME_MODES[mode])
    assert tuple(qemu[len(qemu) - n :]) == TIME_MODES[mode]
    vmigdb = argv(VmigdbServer)
    assert vmigdb[vmigdb.index("--time") + 1] == mode
    assert "-icount" not in vmigdb  # vmigdb adds it itself, from the same TIME_MODES


def test_a_server_refuses_an_unknown_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        QemuServer(tmp_path, tmp_path, tmp_path, "", memory_mib=512, time_mode="auto")


# ---- the clocks table -----------------------------------------------------------------------------
def figures(outliers: int, loop: float, busy: int | None = None) -> dict:
    """What timemodes.measure returns, trimmed to what the table reads."""
    session = lambda n: {  # noqa: E731
        "hits_s": 3.0,
        "steps_s": 4.0,
        "outliers": n,
        "samples": 450,
        "undisturbed_outliers": 1,
        "undisturbed_samples": 460,
    }  # fmt: skip
    return {
        "idle": {"mono": 0.9712, "real": 0.9712, "loop": 0.0},
        "busy": {"mono": 1.0004, "real": 1.0004, "loop": loop},
        "hold": {"mono": 0.99, "real": 0.99, "rtc": 0.9901, "loop": 0.0},
        "stop": {"host_gap": 10012.0, "mono": 0.2, "tsc": -0.61, "rtc": 0.3},
        "rdtsc": session(outliers),
        **({} if busy is None else {"rdtsc_busy": session(busy)}),
    }


def test_clock_rows_one_per_mode_then_the_goals() -> None:
    table = clock_rows(
        {
            "host": figures(61, 2634.4),
            "icount": figures(0, 310.2, busy=2),
            "x": {"error": "boot failed"},
        }
    )
    assert table[0] == HEADER and table[-1] == GOALS
    assert table[1] == [
        "host", "0.971", "1.000", "0.990", "0.6 ms", "61 of 450", "1 of 460", "n/a (1 vCPU)", "",
        "2,634",
    ]  # fmt: skip
    assert table[2][0] == "icount" and table[2][5] == "0 of 450"
    assert table[2][7:] == ["2 of 450", "1 of 460", "310"]
    assert table[3][:2] == ["x", "error: boot failed"] and len(table[3]) == len(HEADER)


# ---- the report -----------------------------------------------------------------------------------
def mode_runs() -> list[ModeRun]:
    host = ModeRun("host", clocks=figures(61, 2634.4), other_cores_busy={QEMU: 0.1, VMIGDB: 0.1})
    host.results = {"stepi": {QEMU: Cell([1100.0]), VMIGDB: Cell([630.0])}}
    icount = ModeRun("icount", clocks=figures(0, 310.2), other_cores_busy={"clocks": 0.9})
    icount.results = {"stepi": {QEMU: Cell([900.0]), VMIGDB: Cell([500.0])}}
    return [host, icount]


def test_text_has_a_titled_table_per_mode_then_the_clocks() -> None:
    text = format_text(mode_runs())
    host = text.index("--time host (QEMU arguments, for both servers: none)")
    icount = text.index(
        f"--time icount (QEMU arguments, for both servers: {' '.join(TIME_MODES['icount'])})"
    )
    clocks = text.index("Guest clocks under vmigdb")
    assert host < icount < clocks
    assert text.count("stepi (steps/s)") == 2
    assert "0.573x" in text[host:icount] and "0.556x" in text[icount:clocks]
    assert text[clocks:].splitlines()[-2].startswith("goal")  # then the legend


def test_markdown_titles_each_mode_and_says_where_the_noise_was() -> None:
    meta = {"date": "d", "quick": True, "nproc": 2, "remarks": ["host load average was 3.00"]}
    md = format_markdown(mode_runs(), meta)
    assert md.startswith("Measured d on 2 x ")
    assert "**`--time host`** (QEMU arguments, for both servers: none)" in md
    assert "**`--time icount`** (QEMU arguments, for both servers: `-icount " in md
    assert md.count("| workload | QEMU gdbstub | vmigdb | ratio | target | met |") == 2
    assert "| time mode | rate, idle |" in md and "| icount | 0.971 |" in md
    clocks = md.index("Guest clocks under vmigdb")
    assert (
        "- other processes kept on average 0.9 during the clocks step under --time icount of"
        in (md[clocks:])
    )
    assert "other processes" not in md[:clocks]  # the servers' parts were quiet
    assert md.rstrip().endswith("- host load average was 3.00")


def test_json_is_keyed_by_mode() -> None:
    doc = json.loads(json.dumps(to_json(mode_runs(), {"date": "d", "nproc": 2})))
    assert doc["meta"] == {"date": "d", "nproc": 2}
    assert list(doc["modes"]) == ["host", "icount"]
    icount = doc["modes"]["icount"]
    assert icount["meta"]["qemu_args"] == list(TIME_MODES["icount"])
    assert (
        icount["workloads"][0]["key"] == "stepi"
        and icount["workloads"][0]["vmigdb"]["median"] == 500
    )
    assert icount["clocks"]["rdtsc"]["outliers"] == 0
    assert doc["modes"]["host"]["meta"]["remarks"] == []


def test_load_remarks_only_when_other_work_was_noticeable() -> None:
    assert load_remarks({"the QEMU gdbstub part": 0.1, "the vmigdb part": 0.2}, 2) == []
    assert load_remarks({}, 2) == []
    run = ModeRun("host", other_cores_busy={QEMU: 0.8, VMIGDB: 0.7, "clocks": 1.5})
    (remark,) = load_remarks(run.servers_load(), 2)
    assert "0.8 during the QEMU gdbstub part, 0.7 during the vmigdb part of the 2 cores" in remark


def test_failed_counts_clock_errors_but_not_n_a() -> None:
    runs = mode_runs()
    assert not failed(runs)
    runs[0].results["dump_memory"] = {VMIGDB: Cell(error="n/a (not available)")}
    assert not failed(runs)
    runs[1].clocks = {"error": "timed out"}
    assert failed(runs)
    assert failed([ModeRun("host", results={"stepi": {QEMU: Cell(error="boot failed")}})])
