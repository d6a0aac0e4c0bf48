"""QMP through libvirt's QEMU monitor pass-through (`virsh qemu-monitor-command`).

libvirt owns a domain's QMP socket, so vmigdb sends its QMP commands through libvirt instead. It
runs Debian's `virsh` (libvirt-clients) rather than the libvirt Python binding: the binding is a
C extension built against libvirt's headers, and the pass-through is one call per command, which
virsh does as well. libvirt marks a domain that received monitor commands as tainted
("custom-monitor"): visible to the host's administrator, not to the guest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil

from vmigdb.errors import SetupError
from vmigdb.hv.qemu.qmp import QmpError

log = logging.getLogger("vmigdb.hv.qemu")

TIMEOUT = 60.0


class LibvirtMonitor:
    """QMP commands to one libvirt domain. Use `LibvirtMonitor.open`."""

    def __init__(self, virsh: str, uri: str, domain: str) -> None:
        self._virsh = virsh
        self.uri = uri
        self.domain = domain

    @classmethod
    async def open(cls, uri: str, domain: str) -> LibvirtMonitor:
        virsh = shutil.which("virsh")
        if virsh is None:
            raise SetupError("virsh not found: install it with `apt-get install libvirt-clients`")
        monitor = cls(virsh, uri, domain)
        code, out, err = await monitor._run("domstate", domain)
        if code != 0:
            why = "; ".join(
                line.removeprefix("error: ") for line in (err or out).splitlines() if line.strip()
            )
            raise SetupError(f"libvirt at {uri}: {why}")
        if out.split()[:1] not in (["running"], ["paused"]):
            raise SetupError(f"libvirt domain {domain} is {out.strip()}: start it first")
        return monitor

    async def _run(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            self._virsh,
            "-q",
            "-c",
            self.uri,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise QmpError(f"virsh {args[0]} did not answer in {TIMEOUT:.0f} s") from None
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def execute(self, cmd: str, args: dict[str, object] | None = None) -> object:
        request = {"execute": cmd, **({"arguments": args} if args else {})}
        code, out, err = await self._run("qemu-monitor-command", self.domain, json.dumps(request))
        if code != 0:
            raise QmpError(f"QMP {cmd} through libvirt failed: {err.strip() or out.strip()}")
        try:
            reply = json.loads(out)
        except ValueError:
            raise QmpError(f"QMP {cmd} through libvirt: unreadable answer {out[:200]!r}") from None
        if "error" in reply:
            error = reply["error"]
            raise QmpError(f"QMP {cmd} failed: {error.get('desc')}", error.get("class"))
        return reply.get("return")

    async def hmp(self, command_line: str) -> str:
        out = await self.execute("human-monitor-command", {"command-line": command_line})
        return str(out)

    async def close(self) -> None:
        return None
