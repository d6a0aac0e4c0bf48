"""`vmigdb attach --libvirt DOMAIN` against a real libvirtd the test starts (tests/e2e/libvirtd.py).

The domain is defined from XML with the Debian 12 test disk (a private qcow2 overlay). With
VMIGDB_SLOW=1 libvirt's QEMU boots that disk (its GRUB, kernel and systemd, minutes under TCG);
by default it boots the demo kernel and initramfs (seconds) with the disk attached. Through
libvirt's monitor pass-through vmigdb adds its gdbstub, reads guest RAM from QEMU's process,
serves GDB (symbols, `monitor ps`, a breakpoint in a process's code, scoped to it), takes a
snapshot into the domain's own qcow2 and loads it, and at detach leaves the domain running with
no gdbstub; a second attach works.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from tests.e2e import libvirtd
from tests.e2e.attach import Attached
from tests.e2e.disk import LOGIN, disk_image, overlay, program_symbols
from vmigdb.images.build import build_guest

pytestmark = pytest.mark.e2e

DOMAIN = "vmigdb-e2e"
SLOW = os.environ.get("VMIGDB_SLOW") == "1"
BOOT_DISK = "<boot dev='hd'/>"
BOOT_KERNEL = """<kernel>{kernel}</kernel><initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 vmigdb.programs=spin:1111</cmdline>"""
XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>
  <features><acpi/></features>
  <clock offset='utc'><timer name='rtc' track='guest'/></clock>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@pytest.fixture(scope="module")
def domain(tmp_path_factory, guest_image):
    why = libvirtd.unavailable()
    if why:
        pytest.skip(why)
    image = disk_image()
    tmp = tmp_path_factory.mktemp("libvirt")
    daemon = libvirtd.Libvirtd(tmp / "daemon")
    console = tmp / "console.log"
    xml = tmp / "domain.xml"
    boot = (
        BOOT_DISK
        if SLOW
        else BOOT_KERNEL.format(kernel=guest_image.kernel, initrd=guest_image.initrd)
    )
    disk = overlay(image.path, tmp)
    xml.write_text(XML.format(name=DOMAIN, boot=boot, disk=disk, console=console))
    ready = LOGIN if SLOW else "vmigdb-guest: ready"
    try:
        for args in (("define", str(xml)), ("start", DOMAIN)):
            result = daemon.virsh(*args)
            assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 900
        while ready not in (console.read_text(errors="replace") if console.exists() else ""):
            assert time.monotonic() < deadline, f"the libvirt domain did not print {ready!r}"
            time.sleep(1)
        yield daemon, image
    finally:
        daemon.virsh("destroy", DOMAIN)
        daemon.virsh("undefine", DOMAIN)
        daemon.stop()


def _monitor(daemon, command: str) -> object:
    result = daemon.virsh("qemu-monitor-command", DOMAIN, json.dumps({"execute": command}))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["return"]


def test_attach_through_libvirt(domain, tmp_path):
    daemon, image = domain
    if SLOW:
        process, code = "runner", program_symbols(image.programs / "runner")["runner_nap"]
    else:
        programs = build_guest().programs
        process, code = "spin", program_symbols(programs / "spin")["vmigdb_spin_target"]
    before = {d["label"] for d in _monitor(daemon, "query-chardev")}
    how = ("--libvirt", DOMAIN, "--connect", daemon.uri)
    attached = Attached(tmp_path, *how)
    out = attached.gdb(
        "monitor info",
        "monitor ps",
        f"monitor process {process}",
        f"break *{code:#x}",
        "continue",
        "monitor snapshot save lv",
        "monitor snapshot list",
        "monitor snapshot load lv",
        "continue",
        "monitor snapshot delete lv",
        timeout=600,
    )
    assert f"attached to: libvirt domain {DOMAIN}" in out, out
    assert "read from QEMU's process" in out
    assert "RTC stops with the VM (-rtc clock=vm)" in out
    first = "systemd" if SLOW else "init"
    assert re.search(rf"^\s+1\s+0 {first}\s", out, re.M), out
    assert re.search(rf"^\s+\d+\s+\d+ {process}\s", out, re.M), out
    assert "scope: process" in out and f"({process})" in out
    assert f"Breakpoint 1, {code:#018x}" in out, out
    assert "snapshot lv saved" in out and re.search(r"^lv\s+[\d.]+ MiB", out, re.M), out
    assert "snapshot lv loaded" in out and "Program stopped." in out
    assert "snapshot lv deleted" in out
    assert attached.wait_exit() == 0, attached.stderr()
    assert daemon.virsh("domstate", DOMAIN).stdout.split()[0] == "running"
    after = {d["label"] for d in _monitor(daemon, "query-chardev")}
    assert "gdb" not in after
    assert {d for d in after - before if not d.startswith("#chr")} == set()

    again = Attached(tmp_path, *how)
    assert "in " in again.gdb("info registers rip")
    assert again.wait_exit() == 0
    assert _monitor(daemon, "query-status")["running"] is True  # type: ignore[index]
