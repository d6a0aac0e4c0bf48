"""`vmigdb attach --qmp` against a QEMU the test starts itself, the way a user would: the demo
kernel with `antidebug` running, guest RAM in a shared file, a blank qcow2 disk, -icount and
-rtc clock=vm. (Reading guest RAM through /proc/PID/mem is tested against libvirt's QEMU, whose RAM
is anonymous memory: test_attach_libvirt.py.)

- Attach/detach in a row against the running guest (5 times; 20 with VMIGDB_SLOW=1): each time
  GDB connects, reads registers and the process list, hits a breakpoint in the kernel and detaches;
  afterwards the VM runs, QEMU has exactly the chardevs it had before (no gdbstub left), and vmigdb
  has exited. antidebug reports no detection in any round, during or after. The attach time
  (vmigdb started, QMP connect, to GDB at its prompt with symbols loaded) is measured.
- A paused VM: attached and detached, it is still paused, with nothing left; `monitor info` names
  the RAM file; snapshots go into the VM's own qcow2 disk.
- SIGTERM to vmigdb while GDB waits in `continue` with a breakpoint set, and GDB killed: the VM
  runs on, with no gdbstub and no breakpoint (a second attach then works, and the guest runs).
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import time

import pytest

from tests.e2e.attach import Attached, PlainQemu, chardevs, qmp, status
from tests.e2e.mi import Gdb

pytestmark = pytest.mark.e2e

ROUND = re.compile(r"^antidebug round=(\d+) detections=(\d+)", re.M)
CYCLES = 20 if os.environ.get("VMIGDB_SLOW") == "1" else 5


@pytest.fixture(scope="module")
def plain_qemu(tmp_path_factory, guest_image):
    tmp = tmp_path_factory.mktemp("plain")
    disk = tmp / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    machine = PlainQemu(
        tmp,
        guest_image.kernel,
        guest_image.initrd,
        "vmigdb.programs=antidebug",
        shared_ram=True,
        disk=disk,
    )
    try:
        machine.wait_console(r"antidebug round=2 ", 180)
        yield machine
    finally:
        machine.stop()


def _rounds(machine: PlainQemu) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for m in ROUND.finditer(machine.console())]


def test_attach_detach_in_a_row_leaves_the_vm_as_found(plain_qemu, tmp_path):
    machine = plain_qemu
    assert status(machine.test_qmp) == "running"
    attach_times = []
    baseline = None
    for cycle in range(CYCLES):
        attached = Attached(tmp_path, "--qmp", str(machine.vmigdb_qmp))
        out = attached.gdb(
            "info registers rip",
            "monitor ps",
            "break __x64_sys_getppid",
            "continue",
            "bt 1",
        )
        attach_times.append(attached.listening)
        assert re.search(r"rip\s+0xffffffff[0-9a-f]+", out), out
        assert re.search(r"^\s+\d+\s+1 antidebug\s", out, re.M), out
        assert "in __x64_sys_getppid ()" in out, out
        assert attached.wait_exit() == 0, attached.stderr()  # GDB's exit detached it
        assert status(machine.test_qmp) == "running"
        devices = chardevs(machine.test_qmp)
        assert "gdb" not in devices
        if baseline is None:
            baseline = devices  # + QEMU's own gdbstub monitor pipe, made once at the first attach
        assert devices == baseline, (cycle, devices, baseline)
        assert "could not" not in attached.stderr() and "still has" not in attached.stderr()
    timed = []
    for _ in range(3):
        started = time.monotonic()
        attached = Attached(tmp_path, "--qmp", str(machine.vmigdb_qmp))
        out = attached.gdb()  # target remote: GDB connects, reads registers, loads symbols
        timed.append(time.monotonic() - started)
        assert "in " in out and attached.wait_exit() == 0
    print(
        f"\nattach: {CYCLES} cycles; listening after {statistics.median(attach_times):.2f} s "
        f"(median); QMP connect to GDB prompt {statistics.median(timed):.2f} s (median of 3, "
        f"min {min(timed):.2f} s)"
    )
    last = _rounds(machine)[-1][0]
    machine.wait_console(rf"antidebug round={last + 3} ", 60)
    rounds = _rounds(machine)
    assert rounds and all(detections == 0 for _, detections in rounds), rounds


def test_paused_vm_stays_paused_and_snapshots_go_to_its_disk(plain_qemu, tmp_path):
    machine = plain_qemu
    before = chardevs(machine.test_qmp)
    qmp(machine.test_qmp, "stop")
    assert status(machine.test_qmp) == "paused"
    attached = Attached(tmp_path, "--qmp", str(machine.vmigdb_qmp))
    out = attached.gdb(
        "monitor info",
        "info registers rip",
        "monitor snapshot save paused1",
        "monitor snapshot list",
        "monitor snapshot load paused1",
        "monitor snapshot delete paused1",
    )
    assert f"shared file {machine.ram_file}" in out, out
    assert "found: paused" in out
    assert "gdbstub channel: 0 resynchronisation(s)" in out  # no stop was owed, none awaited
    assert "snapshot paused1 saved" in out, out
    assert re.search(r"^paused1\s+[\d.]+ MiB", out, re.M), out
    assert "snapshot paused1 loaded" in out
    assert "snapshot paused1 deleted" in out
    assert attached.wait_exit() == 0, attached.stderr()
    assert status(machine.test_qmp) == "paused"
    after = chardevs(machine.test_qmp)
    assert "gdb" not in after
    assert {d for d in after - before if not d.startswith("#chr")} == set()
    snapshots = qmp(machine.test_qmp, "query-block")[0]["inserted"]["image"].get("snapshots", [])
    assert snapshots == []
    qmp(machine.test_qmp, "cont")
    assert status(machine.test_qmp) == "running"


def test_signal_and_vanished_gdb_release_the_vm(plain_qemu, tmp_path):
    machine = plain_qemu
    before = chardevs(machine.test_qmp)
    for how in ("sigterm", "gdb killed"):
        attached = Attached(tmp_path, "--qmp", str(machine.vmigdb_qmp))
        gdb = Gdb(attached.address)
        try:
            gdb.console_cmd("break __x64_sys_reboot")  # never called: the guest runs on
            gdb.cmd("-exec-continue")
            time.sleep(1)
            if how == "sigterm":
                attached.signal(signal.SIGTERM)
                assert attached.wait_exit() == 0, attached.stderr()
            else:
                gdb.ctl.gdb_process.kill()
                assert attached.wait_exit() == 0, attached.stderr()
        finally:
            gdb.close()
            attached.kill()
        assert status(machine.test_qmp) == "running", how
        assert "gdb" not in chardevs(machine.test_qmp)
        assert {d for d in chardevs(machine.test_qmp) - before if not d.startswith("#chr")} == set()
    rounds = len(_rounds(machine))
    time.sleep(4)
    assert len(_rounds(machine)) > rounds  # antidebug still prints its rounds: the guest runs
    assert all(detections == 0 for _, detections in _rounds(machine))
    attached = Attached(tmp_path, "--qmp", str(machine.vmigdb_qmp))
    out = attached.gdb("monitor info")
    assert "breakpoints: 0 requested, 0 held" in out
    assert attached.wait_exit() == 0
