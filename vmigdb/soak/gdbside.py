# ruff: noqa: F821
"""The soak's workloads, run inside GDB 13's own Python (never imported by vmigdb itself).

A soak session is one batch GDB: vmigdb.bench.gdbrun.PRELUDE (emit, run, quiet, value), this file,
then a generated `main()` calling the workloads below in a seeded order, then the bench's EPILOGUE
(`target remote`, main, `delete`, `detach`). Each workload checks what a user would check and
raises `Check` on anything wrong; every register file GDB is shown at a stop is checked for values
no x86-64 CPU can hold (issue 12's RFLAGS 0x56da2246). Records on stdout (`@@ {json}`):
  op      {op, count, ...}         operations done, by kind (the soak's per-minute figures)
  dump    {path, addr, length, pid} a file `dump binary memory` wrote, for the host to compare
  interrupt-me {n}                 GDB is about to `continue`: the host sends it SIGINT
  info    {what, text}             monitor output kept for the report
"""

import random
import re

import gdb

MASK64 = (1 << 64) - 1
RFLAGS_DEFINED = 0x3F7FD7  # CF 1 PF AF ZF SF TF IF DF OF IOPL NT RF VM AC VIF VIP ID
CODE_SEGMENTS = {0x10: "kernel", 0x33: "user", 0x23: "user32"}  # Linux x86-64 selectors
STACK_SEGMENTS = (0x0, 0x18, 0x2B)
CR3_PGD_MASK = 0x000F_FFFF_FFFF_E000  # PCID and the PTI user-half bit masked
CR0_PE_PG = 0x8000_0001
EFER_LME_LMA = 0x500
KERNEL_HALF = 0xFFFF_8000_0000_0000
SCOPE_RE = re.compile(r"scope: process (\d+) \((.*?)\), page tables at (0x[0-9a-f]+)")
# AT&T mnemonics after which the next PC is not the next instruction
TRANSFERS = re.compile(
    r"^(j\w+|call\w*|ret\w*|lret\w*|syscall|sysret\w*|sysexit\w*|iret\w*|int\w*|loop\w*|"
    r"ud[012]|hlt|vmcall|vmmcall)$"
)
PREFIXES = {"lock", "rep", "repz", "repnz", "repe", "repne", "notrack", "bnd", "data16", "addr32",
            "cs", "ds", "es", "fs", "gs", "ss", "rex", "rex.W"}  # fmt: skip


class Check(Exception):
    """Something a user would see as wrong: the session fails with this message."""


STOPS = []
WATCH_TYPES = (gdb.BP_WATCHPOINT, gdb.BP_HARDWARE_WATCHPOINT)


def _on_stop(event):
    record = {"event": type(event).__name__}
    if isinstance(event, gdb.SignalEvent):
        record["signal"] = event.stop_signal
    if isinstance(event, gdb.BreakpointEvent):
        record["breakpoints"] = [bp.number for bp in event.breakpoints]
        record["watch"] = any(bp.type in WATCH_TYPES for bp in event.breakpoints)
    STOPS.append(record)


gdb.events.stop.connect(_on_stop)


def check(ok, message):
    if not ok:
        raise Check(message)


def u64(expression):
    return value(expression) & MASK64


def op(name, count=1, **extra):
    emit(kind="op", op=name, count=count, **extra)


def resume(command="continue"):
    """Run `command` (continue, next...) to its stop; the stop event GDB reported."""
    del STOPS[:]
    run(command)
    check(STOPS, f"{command}: GDB reported no stop")
    LAST_STOP["watch"] = bool(STOPS[-1].get("watch"))
    return STOPS[-1]


# Whether the latest stop was a watchpoint's: vmigdb's QEMU plugin holds those right after the
# access, inside a translation block, where QEMU has not computed the flags yet (see `sane`).
LAST_STOP = {"watch": False}


def expect_breakpoint(stop, what):
    check(
        stop["event"] == "BreakpointEvent",
        f"{what}: expected a breakpoint stop, GDB reported {stop}",
    )


def sane(where, flags_may_lag=None):
    """The selected thread's registers are ones an x86-64 CPU running Linux can hold.
    `flags_may_lag`: a stop vmigdb's QEMU plugin holds inside a translation block (a watchpoint's,
    right after the access) may report RFLAGS unavailable: QEMU computes them lazily."""
    name = f"{where} (thread {gdb.selected_thread().num})"
    if flags_may_lag is None:
        flags_may_lag = LAST_STOP["watch"]
    cs, ss, rip = u64("$cs"), u64("$ss"), u64("$rip")
    try:
        rflags = u64("$eflags")
    except gdb.error as exc:
        if not (flags_may_lag and "not available" in str(exc)):
            raise
        rflags = 2  # unknown: the others are still checked
    check(
        rflags & ~RFLAGS_DEFINED == 0 and rflags & 2,
        f"{name}: RFLAGS {rflags:#x} has bits no x86-64 CPU can hold",
    )
    check(cs in CODE_SEGMENTS, f"{name}: CS {cs:#x} is no Linux code segment")
    check(ss in STACK_SEGMENTS, f"{name}: SS {ss:#x} is no Linux stack segment")
    in_kernel = rip >= KERNEL_HALF
    check(rip < 1 << 47 or in_kernel, f"{name}: RIP {rip:#x} is not canonical")
    check(in_kernel == (cs == 0x10), f"{name}: RIP {rip:#x} with CS {cs:#x}")
    check(u64("$cr0") & CR0_PE_PG == CR0_PE_PG, f"{name}: CR0 {u64('$cr0'):#x}: paging off")
    check(u64("$efer") & EFER_LME_LMA == EFER_LME_LMA, f"{name}: EFER {u64('$efer'):#x}")
    return rip


def all_threads_sane(where):
    selected = gdb.selected_thread()
    threads = sorted(gdb.selected_inferior().threads(), key=lambda t: t.num)
    for thread in threads:
        thread.switch()
        sane(where)
    selected.switch()
    return len(threads)


class Scope:
    def __init__(self, pid, comm, cr3):
        self.pid, self.comm, self.cr3 = pid, comm, cr3

    def holds(self, where):
        """The vCPU stopped in this process's address space (CR3, PCID and PTI bits masked)."""
        cr3 = u64("$cr3")
        check(
            cr3 & CR3_PGD_MASK == self.cr3 & CR3_PGD_MASK,
            f"{where}: stopped with CR3 {cr3:#x}, not in {self.comm} {self.pid} ({self.cr3:#x})",
        )


def scope_to(which):
    """Scope as `monitor process` asks, then read the library list as its reply advises (else a
    breakpoint set at an address of the old process's objects is disabled at the next stop)."""
    if which == "all":
        text = quiet("monitor process all")
        check("whole machine" in text, f"monitor process all: {text!r}")
        quiet("sharedlibrary")
        return None
    text = quiet(f"monitor process {which}")
    quiet("sharedlibrary")
    m = SCOPE_RE.search(text)
    check(m, f"monitor process {which}: {text!r}")
    return Scope(int(m.group(1)), m.group(2), int(m.group(3), 16))


def processes():
    """pid -> (comm, cr3) from `monitor ps`."""
    out = {}
    for line in quiet("monitor ps").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5 and fields[0].isdigit():
            cr3 = int(fields[3], 16) if fields[3].startswith("0x") else None
            out[int(fields[0])] = (fields[2], cr3)
    return out


# ---- the workloads ------------------------------------------------------------------------------


def w_session_start(smp):
    threads = all_threads_sane("attach")
    check(threads == smp, f"GDB sees {threads} threads, the guest has {smp} vCPUs")


def w_info():
    emit(kind="info", what="stealth", text=quiet("monitor stealth"))
    emit(kind="info", what="info", text=quiet("monitor info"))


def w_bulk(which, segments, prefix, repeats):
    """Dump a process's read-only segments (the pages it has mapped) as the host file has them."""
    scope = scope_to(which)
    runs = []
    for start, length in segments:
        for page in range(start & ~0xFFF, start + length, 0x1000):
            if "not mapped" in quiet(f"monitor vtop {page:#x}"):
                continue
            lo, hi = max(page, start), min(page + 0x1000, start + length)
            if runs and runs[-1][1] == lo:
                runs[-1][1] = hi
            else:
                runs.append([lo, hi])
    check(runs, f"{which}: none of its code is mapped")
    op("vtop", sum((length + 0xFFF) // 0x1000 for _, length in segments))
    total = 0
    for rep in range(repeats):
        for i, (lo, hi) in enumerate(runs):
            path = f"{prefix}-{rep}-{i}.bin"
            quiet(f"dump binary memory {path} {lo:#x} {hi:#x}")
            emit(kind="dump", path=path, addr=lo, length=hi - lo, pid=scope.pid)
            total += hi - lo
    lo, hi = max(runs, key=lambda r: r[1] - r[0])
    path = f"{prefix}-monitor.bin"
    text = quiet(f"monitor dump-memory {path} {lo:#x} {hi - lo:#x}")
    check(f"wrote {hi - lo} bytes" in text and "unmapped" not in text, f"dump-memory: {text!r}")
    emit(kind="dump", path=path, addr=lo, length=hi - lo, pid=scope.pid)
    op("bulk dump", repeats * len(runs) + 1, bytes=total + hi - lo)


def w_scattered(seed, text_reads, direct_reads, ram_mib):
    """x/8xg at random places of the kernel's text and of its direct map of RAM."""
    scope_to("all")
    rng = random.Random(seed)
    banner = quiet("x/s &linux_banner")
    check("Linux version" in banner, f"linux_banner reads {banner!r}")
    stext, etext = u64("(unsigned long)&_stext"), u64("(unsigned long)&_etext")
    direct = u64("*(unsigned long *)&page_offset_base")
    check(direct >= KERNEL_HALF, f"page_offset_base is {direct:#x}")
    for _ in range(text_reads):
        quiet(f"x/8xg {stext + 8 * rng.randrange((etext - stext - 64) // 8):#x}")
    for _ in range(direct_reads):
        phys = rng.randrange(16 << 20, (ram_mib - 1) << 20) & ~7
        quiet(f"x/8xg {direct + phys:#x}")
    op("scattered read", text_reads + direct_reads + 1)


def w_registers(reads):
    for i in range(reads):
        quiet("maintenance flush register-cache")
        rip = u64("$rip")
        check(rip < 1 << 47 or rip >= KERNEL_HALF, f"read {i}: RIP {rip:#x} is not canonical")
    selected = gdb.selected_thread()
    threads = sorted(gdb.selected_inferior().threads(), key=lambda t: t.num)
    for thread in threads:
        thread.switch()
        text = quiet("info registers")
        check(re.search(r"^rip\s+0x", text, re.M), f"info registers: {text[:200]!r}")
        sane("info registers")
    selected.switch()
    op("register read", reads + len(threads))


def _next_pc_is_free(asm):
    words = [w for w in asm.split() if w not in PREFIXES]
    return not (words and TRANSFERS.match(words[0]))


def _exception_entry(pc):
    return quiet(f"info symbol {pc:#x}").startswith("asm_exc_")


def w_stepi(which, addr, steps):
    """Stop in a process at `addr`, then stepi: each step one instruction, registers sane."""
    scope = scope_to(which)
    run(f"break *{addr:#x}")
    stop = resume()
    expect_breakpoint(stop, f"break *{addr:#x} in {which}")
    check(u64("$pc") == addr, f"stopped at {u64('$pc'):#x}, not {addr:#x}")
    scope.holds(f"break *{addr:#x}")
    sane("breakpoint")
    quiet("delete")
    op("scoped hit")
    arch = gdb.selected_frame().architecture()
    for i in range(steps):
        pc = u64("$pc")
        insn = arch.disassemble(pc)[0]
        quiet("stepi")
        new = u64("$pc")
        asm = insn["asm"]
        if new == pc and re.match(r"^(rep|repz|repnz|repe|repne)\b", asm):
            pass  # one iteration of a string instruction
        elif _next_pc_is_free(asm):
            check(
                new == pc + insn["length"] or _exception_entry(new),
                f"stepi {i} at {pc:#x} ({asm}) went to {new:#x}, not {pc + insn['length']:#x}",
            )
        sane(f"stepi {i} after {pc:#x} ({asm})")
    op("stepi", steps)


def w_conditional(loop_pid, target, calls_per_round, ahead, scoped):
    """`break *target if $rdi == N`: about `ahead` false hits stay inside vmigdb, then the Nth."""
    scope = scope_to(str(loop_pid) if scoped else "all")
    run(f"break *{target:#x}")
    stop = resume()
    expect_breakpoint(stop, "break vmigdb_loop_target")
    check(u64("$pc") == target, f"stopped at {u64('$pc'):#x}, not {target:#x}")
    if scope:
        scope.holds("break vmigdb_loop_target")
    op("plain hit")
    want = (u64("$rdi") + ahead) % calls_per_round
    quiet("delete")
    run(f"break *{target:#x} if $rdi == {want}")
    stop = resume()
    expect_breakpoint(stop, f"break if $rdi == {want}")
    pc, rdi = u64("$pc"), u64("$rdi")
    check(pc == target and rdi == want, f"stopped at {pc:#x} with $rdi={rdi}, asked {want}")
    sane("conditional stop")
    quiet("delete")
    op("conditional stop", 1, false_hits=ahead)


def w_plain(kind, hits, spin_values, spin_target):
    """Plain breakpoints for the whole machine, on a kernel function or a user address."""
    scope_to("all")
    if kind == "user":
        # every static test program has code at this address; only the spins run theirs there
        cr3s = {cr3 & CR3_PGD_MASK: pid for pid, (comm, cr3) in processes().items() if cr3}
        run(f"break *{spin_target:#x}")
        foreign = 0
        for i in range(hits):
            expect_breakpoint(resume(), f"hit {i}")
            check(u64("$pc") == spin_target, f"stopped at {u64('$pc'):#x}")
            pid = cr3s.get(u64("$cr3") & CR3_PGD_MASK)
            if pid in spin_values:
                check(u64("$rdi") == spin_values[pid], f"spin {pid}: $rdi={u64('$rdi')}")
            else:
                foreign += 1  # another program's code at the same address: a real hit too
            sane(f"hit {i}")
        op("plain hit", hits, other_process=foreign)
    else:
        address = u64(f"(unsigned long)&{kind}")
        run(f"break {kind}")
        for i in range(hits):
            expect_breakpoint(resume(), f"{kind} hit {i}")
            check(u64("$pc") == address, f"stopped at {u64('$pc'):#x}, not {kind}")
            sane(f"{kind} hit {i}")
        op("plain hit", hits)
    quiet("delete")


def w_scoped(which, where, hits, want_rdi):
    """Breakpoints scoped to one process: every hit is in it (and sees its own argument)."""
    scope = scope_to(which)
    run(f"break *{where:#x}" if isinstance(where, int) else f"break {where}")
    for i in range(hits):
        expect_breakpoint(resume(), f"scoped hit {i}")
        scope.holds(f"scoped hit {i} in {which}")
        if want_rdi is not None:
            check(u64("$rdi") == want_rdi, f"hit {i} in {which}: $rdi={u64('$rdi')}")
        sane(f"scoped hit {i}")
    quiet("delete")
    op("scoped hit", hits)


def w_range(binary, line, after_line, loop_pid, scoped):
    """`next` over loop.c's one-line loop: one range step, landing on the next line."""
    scope_to(str(loop_pid) if scoped else "all")
    if binary not in [o.filename for o in gdb.objfiles()]:
        quiet(f"add-symbol-file {binary}")
    run(f"break loop.c:{line}")
    stop = resume()
    expect_breakpoint(stop, f"break loop.c:{line}")
    here = gdb.find_pc_line(gdb.selected_frame().pc()).line
    check(here == line, f"stopped at line {here}, not {line}")
    quiet("delete")
    before, count = value("vmigdb_loop_sink"), value("vmigdb_loop_count")
    resume("next")
    here = gdb.find_pc_line(gdb.selected_frame().pc()).line
    delta = value("vmigdb_loop_sink") - before
    once = count * (count - 1) // 2
    # Whole runs only. More than one: the process moved to the other vCPU meanwhile, and a range
    # step ends on the stepping vCPU only (README, range stepping), so it ran the loop again.
    check(
        here == after_line and delta > 0 and delta % once == 0,
        f"next over line {line} ({count} iterations): stopped at line {here} (want "
        f"{after_line}) having run the loop {delta / once:g} times, not a whole number of times",
    )
    sane("next")
    op("range step", 1, iterations=count, ran_again=delta // once - 1)
    op("plain hit")


def w_watch(kind, hits, loop_pid, sink, loop_code):
    """A write watchpoint on a variable the guest writes: each stop after a real write."""
    if kind == "user":
        scope = scope_to(str(loop_pid))
        expression = f"*(long *){sink:#x}"
    else:
        scope = scope_to("all")
        expression = "*(unsigned long *)&jiffies"
    run(f"watch {expression}")
    foreign = 0
    for i in range(hits):
        old = u64(expression)
        stop = resume()
        expect_breakpoint(stop, f"watch {expression}")
        check(stop.get("watch"), f"watch {expression}: the stop was not the watchpoint: {stop}")
        pc, new = u64("$pc"), u64(expression)
        sane(f"watch hit {i}")
        if kind == "user":
            cr3 = u64("$cr3") & CR3_PGD_MASK
            if cr3 != scope.cr3 & CR3_PGD_MASK:
                foreign += 1  # another process wrote the same virtual address: still a write
                continue
            check(loop_code[0] <= pc < loop_code[1], f"watch stop at {pc:#x}, not in the sum")
            check(0 < new - old < 1 << 20, f"sink went from {old} to {new}")
        else:
            check(pc >= KERNEL_HALF and 0 < new - old < 100000, f"jiffies {old}->{new} at {pc:#x}")
    quiet("delete")
    op("watch hit", hits, other_process=foreign)


def w_interrupt(times, n0):
    """continue with nothing to stop at; the host sends GDB SIGINT (^C) a moment later."""
    scope_to("all")
    for i in range(times):
        emit(kind="interrupt-me", n=n0 + i)
        stop = resume()
        check(stop.get("signal") == "SIGINT", f"^C: GDB reported {stop}")
        all_threads_sane(f"^C {i}")
    op("interrupt", times)


def w_reconnect(address, smp):
    """Detach (the guest runs on), then connect again like a new user."""
    text = quiet("detach")
    check("detached" in text.lower() or "detaching" in text.lower(), f"detach: {text!r}")
    run(f"target remote {address}")
    threads = all_threads_sane("reconnect")
    check(threads == smp, f"after reconnecting GDB sees {threads} threads, not {smp}")
    op("reconnect")
