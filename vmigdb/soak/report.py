"""The soak's figures: operations per minute by kind, what antidebug said under each workload,
every failure with its evidence; as text for the terminal and as JSON (`--json FILE`)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from vmigdb.soak.console import GuestConsole
from vmigdb.soak.serverlog import ServerLog
from vmigdb.soak.session import Failure, SessionResult

CHECKS = (
    "guest console: no oops, panic, BUG, double fault, GPF, lockup, RCU stall, segfault, "
    "unexpected trap, WARNING or reboot (vmigdb/soak/console.py FAULT)",
    "antidebug: every round's verdict; a detection fails unless its name was allowed "
    "(--allow-detections), and allowed ones are counted per workload",
    "no stuck vCPU: after every session every guest program prints progress within "
    "--stuck-after seconds",
    "vmigdb: no traceback, internal error, out-of-step resync, error or refusal on stderr; "
    "the process stays up",
    "every GDB command succeeds; GDB reports no remote protocol trouble",
    "registers at every stop: RFLAGS reserved bits clear, CS/SS Linux selectors, RIP "
    "canonical and matching CS, CR0.PG/PE, EFER.LME/LMA",
    "bulk: dumped process memory equals the program file's bytes; monitor dump-memory too",
    "breakpoints stop at their address; scoped hits are in the scoped process (CR3) with its "
    "own $rdi; conditional stops have exactly the asked $rdi",
    "stepi: each step moves exactly one instruction (or into a branch, exception entry, or "
    "the next rep iteration)",
    "next over loop.c's loop lands on the next line having run the whole loop",
    "watchpoints stop after a real write by the watched code; ^C stops with SIGINT",
    "detach leaves the guest running; a reconnecting GDB sees every vCPU",
)


@dataclass
class Tally:
    sessions: int = 0
    ops: Counter = field(default_factory=Counter)
    extra: Counter = field(default_factory=Counter)
    workloads: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    gdb_warnings: Counter = field(default_factory=Counter)
    infos: dict[str, str] = field(default_factory=dict)
    session_seconds: list[float] = field(default_factory=list)
    progress_waits: list[float] = field(default_factory=list)
    allowed_detections: int = 0

    def add(self, result: SessionResult) -> None:
        self.sessions += 1
        self.ops.update(result.ops)
        self.ops["gdb connect"] += 1
        self.extra.update(result.extra)
        self.workloads.update(result.kinds)
        self.failures += result.failures
        self.gdb_warnings.update(result.warnings)
        self.infos.update(result.infos)
        self.session_seconds.append(result.seconds)


def antidebug_by_workload(console: GuestConsole) -> dict[str, dict]:
    """Rounds printed during (or right after) sessions running each workload kind."""
    table: dict[str, dict] = defaultdict(lambda: {"rounds": 0, "detections": Counter()})
    for r in console.rounds:
        m = re.match(r"session \d+ \((.*)\)$", r.tag)
        for kind in set(m.group(1).split("+")) if m else {r.tag}:
            row = table[kind]
            row["rounds"] += 1
            row["detections"].update(r.names)
    return {
        k: {"rounds": v["rounds"], "detections": dict(v["detections"])} for k, v in table.items()
    }


def to_json(
    tally: Tally, console: GuestConsole, server_log: ServerLog, config: dict, minutes: float
) -> dict:
    per_minute = {k: round(v / minutes, 1) for k, v in sorted(tally.ops.items())} if minutes else {}
    rounds = console.rounds
    return {
        "config": config,
        "clean": not tally.failures,
        "minutes": round(minutes, 2),
        "sessions": tally.sessions,
        "operations": dict(sorted(tally.ops.items())),
        "operations_per_minute": per_minute,
        "operation_details": dict(sorted(tally.extra.items())),
        "workloads": dict(sorted(tally.workloads.items())),
        "session_seconds_max": round(max(tally.session_seconds, default=0), 1),
        "progress_wait_max_s": round(max(tally.progress_waits, default=0), 1),
        "antidebug": {
            "rounds": len(rounds),
            "rounds_with_detections": sum(1 for r in rounds if r.detections),
            "detections": dict(Counter(n for r in rounds for n in r.names)),
            "rdtsc_outliers": sum(r.rdtsc_outliers for r in rounds),
            "by_workload": antidebug_by_workload(console),
            "detection_lines": [f"[{r.tag}] {r.line}" for r in rounds if r.detections][:200],
        },
        "programs": {
            f"{p.spec} pid={p.pid}": p.lines
            for p in sorted(console.programs.values(), key=lambda p: p.pid)
        },
        "kernel_notices": dict(console.notices),
        "server": {
            "stderr_lines": server_log.lines,
            "errors": [f"[{tag}] {line}" for tag, line in server_log.errors][:200],
            "other_messages": dict(server_log.other),
        },
        "gdb_warnings": dict(tally.gdb_warnings),
        "failures": [
            {"what": f.what, "session": f.session, "message": f.message, "detail": f.detail}
            for f in tally.failures
        ],
        "checked": list(CHECKS),
        "monitor": tally.infos,
    }


def format_text(report: dict) -> str:
    lines = [
        f"soak: {report['minutes']:.1f} minutes, {report['sessions']} GDB sessions, "
        f"{'CLEAN' if report['clean'] else 'FAILED'}",
        "",
        f"{'operation':<22} {'count':>10} {'per minute':>11}",
    ]
    for name, count in report["operations"].items():
        lines.append(
            f"{name:<22} {count:>10,} {report['operations_per_minute'].get(name, 0):>11,.1f}"
        )
    if report["operation_details"]:
        lines.append("")
        lines += [f"  {k}: {v:,}" for k, v in report["operation_details"].items()]
    ad = report["antidebug"]
    lines += [
        "",
        f"workloads run: {', '.join(f'{k} x{v}' for k, v in report['workloads'].items())}",
        f"antidebug: {ad['rounds']} rounds, {ad['rounds_with_detections']} with detections "
        f"{ad['detections'] or ''}, {ad['rdtsc_outliers']} rdtsc outliers",
    ]
    for kind, row in sorted(ad["by_workload"].items()):
        lines.append(f"  {kind:<12} {row['rounds']:>5} rounds  detections {row['detections'] or 0}")
    lines.append(
        "programs' progress lines: "
        + ", ".join(f"{k}: {v}" for k, v in report["programs"].items())
        + f" (slowest after a session: {report['progress_wait_max_s']} s)"
    )
    if report["kernel_notices"]:
        lines.append("kernel notices (not failures):")
        lines += [f"  {k} x{v}" for k, v in report["kernel_notices"].items()]
    if report["server"]["other_messages"]:
        lines.append("other vmigdb messages (not failures):")
        lines += [f"  {k} x{v}" for k, v in report["server"]["other_messages"].items()]
    if report["gdb_warnings"]:
        lines.append("GDB warnings (not failures):")
        lines += [f"  {k} x{v}" for k, v in report["gdb_warnings"].items()]
    lines += ["", "checked:"] + [f"  - {c}" for c in report["checked"]]
    if report["failures"]:
        lines += ["", f"FAILURES ({len(report['failures'])}):"]
        for f in report["failures"][:50]:
            lines.append(f"  [{f['what']}] session {f['session']}: {f['message']}")
            if f["detail"]:
                lines += [f"      {d}" for d in f["detail"].splitlines()[-25:]]
    return "\n".join(lines)
