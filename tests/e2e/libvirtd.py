"""A real libvirtd (Debian's libvirt-daemon) started by the test, private to it.

libvirtd run as root keeps its configuration, sockets and state in fixed system paths. The test
gives it its own: in a private mount namespace (`unshare -m`), a temporary directory is bound over
/etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt, so nothing
of the host's libvirt is read or changed, and virsh reaches this daemon through its socket's
path outside the namespace (`qemu:///system?socket=...`). Its qemu.conf runs QEMU as root with no
cgroups, namespaces or security driver (none of which a container offers) and without virtlogd.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
namespaces = [ ]
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
"""
LIBVIRTD_CONF = """\
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
"""
BINDS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}


def unavailable() -> str | None:
    """Why libvirtd cannot be started here, or None."""
    if os.geteuid() != 0:
        return "libvirtd for QEMU guests runs as root here"
    for tool in ("libvirtd", "virsh", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (scripts/setup installs libvirt-daemon-system)"
    return None


class Libvirtd:
    def __init__(self, tmp: Path) -> None:
        self.root = tmp
        for name in BINDS:
            (tmp / name).mkdir(parents=True, exist_ok=True)
        (tmp / "etc" / "qemu.conf").write_text(QEMU_CONF)
        (tmp / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        mounts = " && ".join(
            f"mkdir -p {target} && mount --bind {tmp / name} {target}"
            for name, target in BINDS.items()
        )
        script = (
            f"{mounts} && exec libvirtd --config /etc/libvirt/libvirtd.conf "
            "--pid-file /run/libvirt/libvirtd.pid"
        )
        self.log = tmp / "libvirtd.log"
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.socket = tmp / "run" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket}"
        deadline = time.monotonic() + 60
        while not self.socket.exists() or self.virsh("version").returncode != 0:
            if self.proc.poll() is not None and not (tmp / "run" / "libvirtd.pid").exists():
                raise RuntimeError(f"libvirtd did not start: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not answer: {self.log.read_text()[-2000:]}")
            time.sleep(0.3)

    def virsh(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout
        )

    def stop(self) -> None:
        pid_file = self.root / "run" / "libvirtd.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
