"""The soak (scripts/soak, python -m vmigdb.soak) inside the suite: issue 12's proving run.

It boots its own guest (2 vCPUs under host-paced guest time, see TIME below; antidebug, probe,
loop, ticker and two spins running) and drives every GDB workload through real GDB 13 for 1
minute: bulk and scattered reads, register reads, stepi, plain, conditional and process-scoped
breakpoints, range steps, watchpoints, ^C, detach and reconnect. It fails on any guest fault, any
stuck program, any vmigdb error, any GDB check (see vmigdb/soak/report.py CHECKS) and any
antidebug detection; under host-paced time, all but the timing ones: a guest that times itself
sees the debugger (README, guest time: declared visible), so `rdtsc` (each single-step makes QEMU
flush its translated code), `syscall_time` (a stop inside its timed system calls) and the clock
checks (a vCPU held back by a busy host while its clocks ran on) are counted, not failed; what a
debugger's bytes or flags would betray (checksum, int3, TF, ptrace, TracerPid) is never allowed.
VMIGDB_SOAK_TIME=auto|icount picks another mode (no detection allowed under icount). This test
asserts it ended clean, having run every workload.

VMIGDB_SLOW=1 runs it for 30 minutes (issue 12's acceptance figure); VMIGDB_SOAK_MINUTES=N for N.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmigdb.hv.qemu.process import resolve_time_mode
from vmigdb.hv.qemu.version import qemu_version
from vmigdb.soak.plan import KINDS
from vmigdb.soak.report import format_text

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MINUTES = float(os.environ.get("VMIGDB_SOAK_MINUTES", 30 if os.environ.get("VMIGDB_SLOW") else 1))
# Host time by default, not auto's icount: under icount a `next` over loop.c's loop waited for
# minutes once (in ~15 minutes of soak), its process having moved to the other vCPU for good (a
# range step ends on the stepping vCPU only: README, range stepping). VMIGDB_SOAK_TIME=auto|icount.
TIME = os.environ.get("VMIGDB_SOAK_TIME", "host")
QEMU = qemu_version(shutil.which("qemu-system-x86_64") or "")
COUNTED = resolve_time_mode(TIME, "tcg", 2, QEMU)[0] == "icount"  # what vmigdb will run
# antidebug.c's timing checks: counted, not failed, unless guest time is instruction-counted
TIMING = (
    set()
    if COUNTED
    else {"rdtsc", "syscall_time", "monotonic_jump", "realtime_jump", "tsc_clock", "rtc"}
)
OPERATION_OF = {
    "bulk": "bulk dump",
    "scattered": "scattered read",
    "registers": "register read",
    "stepi": "stepi",
    "conditional": "conditional stop",
    "plain": "plain hit",
    "scoped": "scoped hit",
    "range": "range step",
    "watch": "watch hit",
    "interrupt": "interrupt",
    "reconnect": "reconnect",
}


@pytest.mark.timeout(int(MINUTES * 60 + 900))
def test_soak_every_workload_on_two_vcpus_leaves_the_guest_unharmed(tmp_path: Path) -> None:
    results = tmp_path / "soak.json"
    argv = [sys.executable, "-m", "vmigdb.soak", "--minutes", str(MINUTES), "--smp", "2"]
    argv += ["--json", str(results), "--workdir", str(tmp_path)]
    argv += ["--time", TIME] + (["--allow-detections", ",".join(sorted(TIMING))] if TIMING else [])
    proc = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=MINUTES * 60 + 840
    )
    assert results.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(results.read_text())
    print("\n" + format_text(report))
    assert proc.returncode == 0 and report["clean"], proc.stdout[-6000:]
    assert report["minutes"] >= MINUTES
    assert set(report["workloads"]) == set(KINDS) == set(OPERATION_OF)
    for kind, operation in OPERATION_OF.items():
        assert report["operations"].get(operation, 0) > 0, (kind, report["operations"])
    ops = report["operations"]
    assert report["operation_details"]["bulk dump: bytes checked"] > 0
    assert (
        report["operation_details"]["conditional stop: false_hits"] >= 100 * ops["conditional stop"]
    )
    ad = report["antidebug"]
    assert ad["rounds"] >= MINUTES * 60 / 4  # about one a second: the battery ran all along
    assert set(ad["detections"]) <= TIMING, ad
    assert report["server"]["errors"] == [] and report["failures"] == []
    assert all(lines >= MINUTES * 60 / 4 for lines in report["programs"].values()), report
