"""`--time auto` with 2 vCPUs on QEMU 7.2 (Debian 12's own, oldqemu.py): icount is tried first and
kept only if the guest brings up every vCPU under it. Debian's 6.1 kernel hangs there as it starts
its second vCPU (4 of 4 boots with --time icount given), yet came up under the trial in every boot
measured here; either way the guest must come up, under the time mode vmigdb then names."""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import Vm
from tests.e2e.oldqemu import path_with, qemu_7_2_dir

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def old_qemu():
    bin_dir, why = qemu_7_2_dir()
    if bin_dir is None:
        pytest.skip(why)
    return bin_dir


def test_auto_time_on_qemu_7_2_boots_two_vcpus_keeping_icount_only_if_the_guest_did(
    tmp_path, guest_image, old_qemu
) -> None:
    vm = Vm(
        tmp_path,
        guest_image.kernel,
        guest_image.initrd,
        smp=2,
        env=path_with(old_qemu),
        listen_timeout=180,
    )  # returns once the guest says "ready"
    try:
        stderr = vm.stderr()
        assert "QEMU 7.2" in stderr  # its known defects are named at start
        verdict = re.search(
            r"guest time: (icount kept: every vCPU came up|CPU#.*never rested)", stderr
        )
        assert verdict, stderr
        assert "smp: Brought up 1 node, 2 CPUs" in vm.console()
        info = vm.gdb("monitor info", "info threads")
        assert "Thread 2" in info
        if verdict.group(1).startswith("icount kept"):
            assert "auto: icount kept after a trial: every vCPU came up" in info, info
        else:
            assert "starting QEMU again with host time" in stderr
            assert "icount was tried and CPU#" in info and "never rested in HLT" in info, info
    finally:
        vm.stop()


def test_auto_time_on_qemu_7_2_gives_a_guest_busy_on_every_vcpu_host_time(
    tmp_path, guest_image, old_qemu
) -> None:
    """`idle=poll`: the guest's vCPUs never rest in HLT, as in the hang, so the trial cannot tell
    it from a hung one and takes the mode that boots every guest."""
    vm = Vm(
        tmp_path,
        guest_image.kernel,
        guest_image.initrd,
        smp=2,
        append="idle=poll",
        env=path_with(old_qemu),
        listen_timeout=180,
    )
    try:
        stderr = vm.stderr()
        assert re.search(r"guest time: CPU#0(, CPU#1)? never rested in HLT", stderr), stderr
        assert "starting QEMU again with host time" in stderr
        assert "smp: Brought up 1 node, 2 CPUs" in vm.console()
        info = vm.gdb("monitor info")
        assert "icount was tried and CPU#0" in info and "never rested in HLT" in info, info
        assert "--smp 1 or QEMU 10" in info
    finally:
        vm.stop()
