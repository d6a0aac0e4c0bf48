"""The ticker workloads: how fast the guest's own ticker runs while a debugger is attached.

The ticker (a guest program) calls getpid in a loop and prints its count once per guest second.
Each line is stamped with when it appeared on the console, which gives calls per host second:
the guest's real throughput (guest seconds would hide a debugger's cost: under icount they count
instructions, and a VM stop freezes them). Measured detached (no GDB), then
- idle: (a) with GDB attached and continuing, no breakpoints, (b) the same with 4 breakpoints on
  syscalls nothing in the guest makes;
- scoped hot: a breakpoint on getpid, which the ticker runs hot, scoped to another process (the
  parked loop program), so that no hit counts: vmigdb's plugin only (n/a for QEMU's gdbstub, which
  has no process scope, and for vmigdb under host time, where every call would stop the VM).
Each figure is the attached rate over the detached rate measured just before it. The detached
rate of vmigdb's QEMU (its plugin loaded) over that of plain QEMU is "plugin loaded".
"""

from __future__ import annotations

import time

from vmigdb.bench.gdbrun import Gdb, interrupt, wait_record
from vmigdb.bench.guest import BenchError, Server
from vmigdb.bench.observe import host_rate, ticker_lines
from vmigdb.bench.stats import Cell

NEVER_CALLED = (  # syscalls nothing in the demo guest makes: breakpoints that never hit
    "__x64_sys_pivot_root", "__x64_sys_acct", "__x64_sys_swapoff", "__x64_sys_delete_module",
    "__x64_sys_kexec_load", "__x64_sys_reboot",
)  # fmt: skip
SETTLE_S = 0.5  # after GDB says it continues: it inserts the breakpoints and resumes
POLL_S = 0.01  # how often the console is read: the error of each line's arrival time


def window(server: Server, seconds: float) -> float:
    """The ticker's calls per host second over the next `seconds` of its console output."""
    arrivals: list[tuple[float, int, int]] = []
    with open(server.console_path, "rb") as console:
        console.seek(0, 2)
        pending = ""
        end = time.monotonic() + seconds
        while (now := time.monotonic()) < end:
            pending += console.read().decode(errors="replace")
            if "\n" in pending:
                done, _, pending = pending.rpartition("\n")
                arrivals += [(now, pid, calls) for pid, calls in ticker_lines(done + "\n")]
            time.sleep(POLL_S)
    value = host_rate(arrivals)
    if value is None:
        raise BenchError("the ticker printed fewer than two lines in the window")
    return value


def attached(
    server: Server,
    gdb: Gdb,
    seconds: float,
    name: str,
    breakpoints: list[int],
    setup: tuple[str, ...] = (),
) -> float:
    """The ticker's rate while a GDB with these breakpoints sits in `continue`; then ^C, detach."""
    lines = "".join(f'    run("{command}")\n' for command in setup)
    lines += "".join(f'    run("break *{a:#x}")\n' for a in breakpoints)
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


def measure_scoped_hot(server: Server, gdb: Gdb, config, log) -> Cell:
    """A breakpoint on the code the ticker runs hot, scoped away from it: attached / detached."""
    getpid = server.ksyms.get("__x64_sys_getpid")
    if getpid is None:
        raise BenchError("__x64_sys_getpid is not in the guest's ksyms")
    if server.name != "vmigdb":
        return Cell(error="n/a (no process scope: every call stops the VM)")
    if server.time_mode == "host":
        return Cell(error="n/a (host time: no plugin, every call stops the VM)")
    setup = ("monitor process loop",)
    cell = Cell()
    for i in range(config.idle_reps):
        base = window(server, config.idle_window)
        hot = attached(server, gdb, config.idle_window, "scoped-hot", [getpid], setup)
        cell.values.append(hot / base)
        log(
            f"{server.name}: scoped hot {i + 1}/{config.idle_reps}: detached {base:,.0f} calls/s, "
            f"attached x{cell.values[-1]:.3f}"
        )
    return cell


def measure_idle(server: Server, gdb: Gdb, config, log) -> tuple[Cell, Cell, Cell]:
    breakpoints = [server.ksyms[s] for s in NEVER_CALLED if s in server.ksyms][:4]
    if len(breakpoints) < 4:
        raise BenchError("fewer than 4 never-called syscalls found in the guest's ksyms")
    a, b, bases = Cell(), Cell(), Cell()
    for i in range(config.idle_reps):
        base = window(server, config.idle_window)
        bases.values.append(base)
        a.values.append(attached(server, gdb, config.idle_window, "idle-a", []) / base)
        b.values.append(attached(server, gdb, config.idle_window, "idle-b", breakpoints) / base)
        log(
            f"{server.name}: idle {i + 1}/{config.idle_reps}: detached {base:,.0f} calls/s, "
            f"(a) x{a.values[-1]:.3f}, (b) x{b.values[-1]:.3f}"
        )
    return a, b, bases
