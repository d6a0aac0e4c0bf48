"""The idle-guest workload: how fast the guest's own ticker runs while a debugger is attached.

The ticker (a guest program) prints its getpid count once per guest second. A window of its output
gives calls per second: detached (no GDB), then (a) with GDB attached and continuing, no
breakpoints, (b) the same with 4 breakpoints on syscalls nothing in the guest makes. Each figure is
the attached rate over the detached rate measured just before.
"""

from __future__ import annotations

import time

from vmigdb.bench.gdbrun import Gdb, interrupt, wait_record
from vmigdb.bench.guest import BenchError, Server
from vmigdb.bench.observe import ticker_rate
from vmigdb.bench.stats import Cell

NEVER_CALLED = (  # syscalls nothing in the demo guest makes: breakpoints that never hit
    "__x64_sys_pivot_root", "__x64_sys_acct", "__x64_sys_swapoff", "__x64_sys_delete_module",
    "__x64_sys_kexec_load", "__x64_sys_reboot",
)  # fmt: skip
SETTLE_S = 0.5  # after GDB says it continues: it inserts the breakpoints and resumes


def window(server: Server, seconds: float) -> float:
    """The ticker's calls per guest second over the next `seconds` of its console output."""
    offset = len(server.console())
    time.sleep(seconds)
    value = ticker_rate(server.console()[offset:])
    if value is None:
        raise BenchError("the ticker printed fewer than two lines in the window")
    return value


def attached(server: Server, gdb: Gdb, seconds: float, name: str, breakpoints: list[int]) -> float:
    """The ticker's rate while a GDB with these breakpoints sits in `continue`; then ^C, detach."""
    lines = "".join(f'    run("break *{a:#x}")\n' for a in breakpoints)
    body = f"""
def main():
{lines}    emit(kind="continuing")
    run("continue")
    emit(kind="interrupted", pc=value("$pc"))
"""
    proc, out = gdb.start(name, body)
    try:
        wait_record(out, "continuing", proc, 60)
        time.sleep(SETTLE_S)
        value = window(server, seconds)
    finally:
        interrupt(proc)
    stopped = wait_record(out, "interrupted", proc, 1)
    if stopped["pc"] in breakpoints:
        raise BenchError(f"a breakpoint that should never hit did, at {stopped['pc']:#x}")
    return value


def measure_idle(server: Server, gdb: Gdb, config, log) -> tuple[Cell, Cell]:
    breakpoints = [server.ksyms[s] for s in NEVER_CALLED if s in server.ksyms][:4]
    if len(breakpoints) < 4:
        raise BenchError("fewer than 4 never-called syscalls found in the guest's ksyms")
    a, b = Cell(), Cell()
    for i in range(config.idle_reps):
        base = window(server, config.idle_window)
        a.values.append(attached(server, gdb, config.idle_window, "idle-a", []) / base)
        b.values.append(attached(server, gdb, config.idle_window, "idle-b", breakpoints) / base)
        log(
            f"{server.name}: idle {i + 1}/{config.idle_reps}: detached {base:,.0f} calls/s, "
            f"(a) x{a.values[-1]:.3f}, (b) x{b.values[-1]:.3f}"
        )
    return a, b
