"""`vmigdb xen` where it cannot run: one line saying what is missing, exit status 2; and the
domain checks the driver makes when opening (on the Xen model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.xenmodel import XenHost, build_demo_image, model_binding
from vmigdb.errors import SetupError
from vmigdb.hv.xen.binding import BINDING_ENV, xen_missing
from vmigdb.hv.xen.driver import XenDriver

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(xen_missing() is None, reason="this machine is a Xen dom0")
def test_vmigdb_xen_without_xen_says_what_is_missing_in_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if k != BINDING_ENV}
    result = subprocess.run([sys.executable, "-m", "vmigdb", "xen", "--domain", "guest"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vmigdb: Xen is not available on this machine: ")
    assert "privcmd" in lines[0] and "libxenctrl" in lines[0]


def test_opening_a_domain_that_does_not_exist() -> None:
    host = XenHost()
    host.create_domain("guest", build_demo_image(1))
    with pytest.raises(SetupError, match="no Xen domain named 'other'"):
        XenDriver(model_binding(host), "other")


def test_a_domain_without_altp2m_is_refused_and_left_unmonitored() -> None:
    host = XenHost()
    domain = host.create_domain("guest", build_demo_image(1), altp2m="disabled")
    with pytest.raises(SetupError, match='altp2m = "external"'):
        XenDriver(model_binding(host), "guest")
    assert not domain.monitor_enabled and domain.pause_count == 0


def test_a_domain_another_monitor_holds_is_refused() -> None:
    host = XenHost()
    host.create_domain("guest", build_demo_image(1))
    first = XenDriver(model_binding(host), "guest")
    try:
        with pytest.raises(SetupError, match="vm_event ring"):
            XenDriver(model_binding(host), "guest")
    finally:
        first.close()


def test_open_and_close_balance_the_pause_and_leave_nothing() -> None:
    host = XenHost()
    domain = host.create_domain("guest", build_demo_image(2))
    driver = XenDriver(model_binding(host), "guest")
    assert domain.pause_count == 1  # opened stopped
    regs = driver.read_registers(2)
    assert regs["rip"] == domain.image.sym("main1").va and regs["r15"] == 1
    assert regs["cr3"] == domain.image.cr3_a and regs["cs"] == 0x10
    driver.close()
    assert domain.pause_count == 0 and not domain.monitor_enabled and not domain.p2m.active
