"""A disk-image guest, and snapshots for a detonation loop, with real GDB.

The guest is the Debian 12 test disk (vmigdb/images/disk.py) booted by `vmigdb qemu --drive` from
its own GRUB (no --kernel), 1 GiB of RAM, 1 vCPU, default settings (so guest time is icount: under
`--time host`, QEMU keeps the TSC monotonic across a load, and it jumps by the time since the save;
see hv/qemu/snapshots.py), on a private qcow2 overlay.
Ground truth: the guest's console (systemd's login prompt; `runner pid=N go=... marker=...`), and
the test programs' own symbols (host copies of the same static binaries).

- Awareness with no configuration: kernel symbols, `monitor ps` lists systemd and its daemons,
  `monitor process runner` (started from the disk by a systemd unit) and a breakpoint in its code
  that fires in it with its own argument.
- The detonation loop: save `clean`; make runner start `sample` (GDB writes runner's `runner_go`,
  the only way in: the image has no agent), which bumps a counter file on disk and rewrites
  runner's marker from outside; GDB stops in sample's code and sees both changes; load `clean`:
  GDB stops at the snapshot's state before any guest code runs, the marker is "clean" again, and
  the same breakpoint hits again with the counter read from the disk back at 1. Three rounds.
  Guest clocks continue from the snapshot: after the load, jiffies count the time since the load,
  not the time since the save.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.e2e.disk import DiskVm, disk_image, overlay, program_symbols
from tests.e2e.mi import Gdb

pytestmark = pytest.mark.e2e

FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def image():
    return disk_image()


@pytest.fixture(scope="module")
def vm(tmp_path_factory, image):
    tmp = tmp_path_factory.mktemp("disk")
    machine = DiskVm(tmp, overlay(image.path, tmp))
    FIGURES["boot to login prompt (s)"] = machine.boot_seconds
    try:
        yield machine
    finally:
        machine.stop()
        print("\ndisk guest figures:", FIGURES)


@pytest.fixture(scope="module")
def symbols(image):
    return {
        "runner": program_symbols(image.programs / "runner"),
        "sample": program_symbols(image.programs / "sample"),
    }


def _console_text(gdb: Gdb, command: str, timeout: float = 60) -> str:
    return gdb.console_cmd(command, timeout)


def _string_at(gdb: Gdb, address: int) -> str:
    out = _console_text(gdb, f"x/s {address:#x}")
    match = re.search(r':\s+"(.*)"', out)
    assert match, out
    return match.group(1)


def _u64_at(gdb: Gdb, address: int) -> int:
    out = _console_text(gdb, f"x/gx {address:#x}")
    return int(out.split()[-1], 16)


def _continue(gdb: Gdb, timeout: float = 120) -> dict:
    gdb.cmd("-exec-continue")
    return gdb.wait_stopped(timeout)


def test_boots_to_a_login_prompt_from_its_own_bootloader(vm):
    console = vm.console()
    assert "Debian GNU/Linux 12" in console
    assert re.search(r"runner\[\d+\]: runner pid=\d+", console) or "runner pid=" in console
    assert vm.boot_seconds < 900


def test_awareness_with_no_configuration(vm, symbols):
    runner_pid = int(re.search(r"runner pid=(\d+)", vm.console()).group(1))
    nap = symbols["runner"]["runner_nap"]
    out = vm.gdb(
        "monitor ps",
        "monitor sym __x64_sys_getpid",
        "monitor process runner",
        f"break *{nap:#x}",
        "continue",
        "p $rdi",
        "p/x $pc",
        "info symbol __x64_sys_getpid",
        timeout=300,
    )
    ps = {int(m[1]): m[3] for m in re.finditer(r"^\s+(\d+)\s+(\d+) (\S+)", out, re.M)}
    assert ps.get(1) == "systemd", out
    names = set(ps.values())
    assert {"systemd-journal", "systemd-udevd", "runner", "agetty"} <= names, names
    assert ps.get(runner_pid) == "runner"
    assert f"scope: process {runner_pid} (runner)" in out
    assert re.search(r"__x64_sys_getpid 0xffffffff[0-9a-f]+", out)
    assert f"Breakpoint 1, {nap:#018x}" in out, out
    naps = int(re.search(r"^\$1 = (\d+)", out, re.M).group(1))
    assert naps > 0  # runner's own counter, passed in rdi: it has napped since boot
    assert f"$2 = {nap:#x}" in out


def test_snapshot_loop_three_rounds(vm, symbols):
    runner, sample = symbols["runner"], symbols["sample"]
    go, marker, detonated = runner["runner_go"], runner["runner_marker"], sample["sample_detonated"]
    gdb = Gdb(vm.address, remote_timeout=30)
    try:
        jiffies = int(
            re.search(r"0x[0-9a-f]+", _console_text(gdb, "monitor sym jiffies_64")).group(0), 16
        )
        assert "scope: process" in _console_text(gdb, "monitor process runner")
        assert _string_at(gdb, marker) == "clean"
        saved = _console_text(gdb, "monitor snapshot save clean", timeout=600)
        FIGURES["snapshot save, 1 GiB guest (s)"] = float(re.search(r"in ([\d.]+) s", saved)[1])
        listed = _console_text(gdb, "monitor snapshot list", timeout=120)
        assert re.search(r"^clean\s+[\d.]+ MiB", listed, re.M), listed
        snapshot_pc = gdb.value("$pc")
        snapshot_jiffies = _u64_at(gdb, jiffies)

        # Let guest time pass between the save and the first load, so that a clock that did not
        # go back with the snapshot would show it.
        gdb.cmd("-exec-continue")
        time.sleep(8)
        gdb.cmd("-exec-interrupt")
        gdb.wait_stopped(60)
        before_load = None

        for round_number in (1, 2, 3):
            assert "scope: process" in _console_text(gdb, "monitor process runner")
            _console_text(gdb, f"set {{int}}{go:#x} = 1")
            _console_text(gdb, "monitor process all")
            if round_number == 1:
                _console_text(gdb, f"break *{detonated:#x}")
            stop = _continue(gdb)
            assert int(stop["frame"]["addr"], 16) == detonated, stop
            assert gdb.value("$rdi") == 1  # the counter file held 0: the disk rolled back too
            hit_jiffies = _u64_at(gdb, jiffies)
            if round_number == 1:
                before_load = hit_jiffies - snapshot_jiffies
            else:
                after_load = hit_jiffies - snapshot_jiffies
                # From the snapshot's state to this hit, the guest counted only the time since
                # the load (the round's work), not the 8 s that ran before the first load.
                assert after_load < before_load * 0.7, (before_load, after_load)
            assert "scope: process" in _console_text(gdb, "monitor process runner")
            assert _string_at(gdb, marker) == "infected by sample, run 1"

            loaded = _console_text(gdb, "monitor snapshot load clean", timeout=600)
            FIGURES.setdefault(
                "snapshot load, 1 GiB guest (s)", float(re.search(r"in ([\d.]+) s", loaded)[1])
            )
            assert re.search(r"scope: process \d+ \(runner\) again", loaded), loaded
            assert _string_at(gdb, marker) == "clean"
            arrived = _continue(gdb, 60)  # stops at once at the snapshot's state
            assert int(arrived["frame"]["addr"], 16) == snapshot_pc, arrived
            assert _u64_at(gdb, jiffies) == snapshot_jiffies
        assert "deleted" in _console_text(gdb, "monitor snapshot delete clean", timeout=300)
        assert "(no snapshots)" in _console_text(gdb, "monitor snapshot list", timeout=120)
        gdb.cmd("-target-detach")
    finally:
        gdb.close()
