"""Attach to a QEMU someone else started, with nothing for vmigdb on its command line but a monitor.

Through the monitor (a QMP socket, or libvirt's pass-through: `QemuMonitor`), vmigdb:
1. notes what it finds: running or paused, and refuses a QEMU that already serves a gdbstub
   (it would take the user's over);
2. finds guest RAM (hostram.py): a shared file it maps, or QEMU's own memory through /proc;
3. adds a gdbstub at run time on a private unix socket (HMP `gdbserver unix:...`) and connects: a
   running VM stops then (QEMU stops it for every new gdbstub client, and owes that stop's reply);
   a paused one stays paused, and nothing is owed (QemuDriver.attach syncs on a sentinel either way);
4. at the end (`Attachment.release`: GDB's detach, a vanished GDB, a signal), takes everything back:
   no breakpoint and no single-step left in QEMU, the VM running if it ran and stopped if it was
   stopped, the gdbstub removed (HMP `gdbserver none` deletes its chardev); a next attach finds
   the VM as the first one did.

What attaching cannot change is said (`monitor info`, `monitor stealth`): the accelerator and
guest time QEMU was started with (no -icount means the TSC shows retranslation; an RTC on host
time shows every stop's length). QEMU TCG plugins are loaded only at QEMU's start, so an attached
vmigdb has none and leaves no plugin state.

A paused VM that GDB resumed and that stopped again is stopped, but QEMU's status then reads
"debug" rather than "paused" (QEMU has no way back to "paused" without running the guest).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmigdb.errors import SetupError
from vmigdb.hv.base import Mechanism
from vmigdb.hv.qemu.channel import QemuChannel
from vmigdb.hv.qemu.driver import QemuDriver
from vmigdb.hv.qemu.gdbstub import GdbstubClient
from vmigdb.hv.qemu.hostram import parse_ram_map, process_memory, shared_file_memory
from vmigdb.hv.qemu.snapshots import QemuSnapshots

log = logging.getLogger("vmigdb.hv.qemu")

GDB_CHARDEV = "gdb"  # the label QEMU gives the chardev of a gdbstub added with `gdbserver`


class QemuMonitor(Protocol):
    """A QMP conversation with QEMU (qmp.Qmp, or libvirt's pass-through)."""

    async def execute(self, cmd: str, args: dict[str, object] | None = None) -> object: ...

    async def hmp(self, command_line: str) -> str: ...

    async def close(self) -> None: ...


@dataclass
class Found:
    """The VM as vmigdb found it: what release puts back."""

    status: str
    running: bool
    chardevs: frozenset[str]


def qemu_pid(cpus: list[dict]) -> int:
    """QEMU's process id, from a vCPU thread's Tgid (works over any monitor transport)."""
    tid = cpus[0]["thread-id"]
    status = Path(f"/proc/{tid}/status").read_text()
    match = re.search(r"^Tgid:\s+(\d+)", status, re.M)
    if match is None:
        raise SetupError(f"cannot tell QEMU's process from its vCPU thread {tid}")
    return int(match.group(1))


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def time_findings(jit: str, argv: list[str]) -> tuple[str, list[Mechanism], list[tuple[str, str]]]:
    """What QEMU's guest time shows of a debugger, as QEMU was started (attaching cannot change
    it): (time mode for the TCG capabilities, extra mechanisms, `monitor info` lines)."""
    icount = "Host - Guest clock" in jit  # `info jit` reports drift only under -icount
    mode = "icount" if icount else "host"
    rtc = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-rtc"), None)
    extra: list[Mechanism] = []
    if not argv:
        rtc_text = "unknown (QEMU's command line is not readable)"
    elif rtc is not None and "clock=vm" in rtc:
        rtc_text = "stops with the VM (-rtc clock=vm)"
    else:
        rtc_text = "follows host time while the VM is stopped (QEMU's default -rtc clock=host)"
        extra.append(
            Mechanism(
                "attached-rtc-host",
                "guest RTC on host time (QEMU started without -rtc clock=vm)",
                True,
                why="the RTC keeps counting while vmigdb holds the VM stopped: a guest comparing it "
                "with its own clocks sees each stop's length; attaching cannot change it",
            )
        )
    notes = [
        (
            "guest time (as QEMU was started; attaching cannot change it)",
            ("instruction-counted (-icount)" if icount else "host time (no -icount)")
            + f"; RTC {rtc_text}",
        )
    ]
    return mode, extra, notes


class Attachment:
    """vmigdb attached to one QEMU: the driver, and how to give the VM back."""

    def __init__(
        self,
        monitor: QemuMonitor,
        driver: QemuDriver,
        found: Found,
        memory_close,
        label: str,
    ) -> None:
        self.monitor = monitor
        self.driver = driver
        self.found = found
        self._memory_close = memory_close
        self.label = label
        self._released = False

    async def release(self) -> None:
        """Give the VM back as it was found (see the module docstring). Safe to call twice."""
        if self._released:
            return
        self._released = True
        try:
            self.driver.release(run=self.found.running)
        except Exception as exc:  # noqa: BLE001 - the gdbstub must go whatever happened
            log.error("could not take everything back through the gdbstub: %s", exc)
        self.driver.close()
        try:
            await self.monitor.hmp("gdbserver none")
            chardevs = await _chardevs(self.monitor)
            status = await self.monitor.execute("query-status")
        except Exception as exc:  # noqa: BLE001
            log.error("could not remove the gdbstub from QEMU: %s", exc)
        else:
            left = chardevs - self.found.chardevs
            if left:
                log.error("QEMU still has chardev(s) %s after detaching", ", ".join(sorted(left)))
            running = bool(status.get("running"))  # type: ignore[union-attr]
            log.info(
                "detached from %s: VM %s (found %s), gdbstub removed",
                self.label,
                status.get("status"),  # type: ignore[union-attr]
                self.found.status,
            )
            if running != self.found.running:
                log.error("the VM is %s, but was found %s", status, self.found.status)
        self._memory_close()
        try:
            await self.monitor.close()
        except Exception:  # noqa: BLE001
            pass


async def _chardevs(monitor: QemuMonitor) -> frozenset[str]:
    """The labels of QEMU's chardevs, less the one QEMU's gdbstub makes for itself: at the first
    `gdbserver` of its life, QEMU 7.2 creates an anonymous chardev ("#chrNNN", filename "gdb")
    that carries the gdbstub's `monitor` commands to an internal HMP monitor; that monitor holds
    it until QEMU exits, so nobody can remove it, and every later gdbstub reuses it. It reaches
    nothing outside QEMU."""
    devs = await monitor.execute("query-chardev") or []
    return frozenset(
        str(d.get("label"))
        for d in devs  # type: ignore[union-attr]
        if not (str(d.get("label")).startswith("#chr") and d.get("filename") == "gdb")
    )


async def _find_memory(monitor: QemuMonitor, pid: int):
    """Guest RAM reader: the shared file when there is one vmigdb can open, else /proc/PID/mem."""
    segments = parse_ram_map(await monitor.hmp("info mtree -f"))
    block = segments[0].block
    memdevs = await monitor.execute("query-memdev") or []
    for dev in memdevs:  # type: ignore[union-attr]
        if dev.get("id") != block or not dev.get("share"):
            continue
        try:
            path = await monitor.execute(
                "qom-get", {"path": f"/objects/{block}", "property": "mem-path"}
            )
        except Exception:  # noqa: BLE001 - not a file backend (memfd...)
            break
        try:
            return shared_file_memory(Path(str(path)), int(dev["size"]), segments)
        except OSError as exc:
            log.info("QEMU's RAM file %s cannot be mapped (%s); reading through /proc", path, exc)
        break
    hvas = []
    for segment in segments:
        text = await monitor.hmp(f"gpa2hva {segment.start:#x}")
        match = re.search(r"is (0x[0-9a-f]+)", text)
        if match is None:
            raise SetupError(f"QEMU did not give the host address of guest RAM: {text.strip()}")
        hvas.append(int(match.group(1), 16))
    return process_memory(pid, segments, hvas)


def _private_dir(owner_uid: int) -> Path:
    """A 0700 directory for the gdbstub's socket, owned by QEMU's user (QEMU creates the socket
    in it; root, or that user, connects)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(tempfile.mkdtemp(prefix="vmigdb-attach-", dir=base))
    if owner_uid != os.getuid():
        os.chown(path, owner_uid, -1)
    path.chmod(0o700)
    return path


async def attach(monitor: QemuMonitor, label: str) -> Attachment:
    """Attach to the QEMU behind `monitor`. :raises SetupError: with what to do."""
    started = time.monotonic()
    status = await monitor.execute("query-status")
    found = Found(
        status=str(status["status"]),  # type: ignore[index]
        running=bool(status["running"]),  # type: ignore[index]
        chardevs=await _chardevs(monitor),
    )
    if found.status in ("inmigrate", "prelaunch", "shutdown", "internal-error", "guest-panicked"):
        raise SetupError(f"the VM is in state {found.status!r}: nothing to attach to yet")
    if GDB_CHARDEV in found.chardevs:
        raise SetupError(
            "QEMU already serves a gdbstub (chardev 'gdb'); vmigdb would take it over: close it "
            "first (monitor command `gdbserver none`), or connect GDB to it directly"
        )
    kvm = await monitor.execute("query-kvm")
    accel = "kvm" if kvm.get("enabled") else "tcg"  # type: ignore[union-attr]
    cpus = await monitor.execute("query-cpus-fast")
    pid = qemu_pid(cpus)  # type: ignore[arg-type]
    memory = await _find_memory(monitor, pid)
    mode, extra, notes = time_findings(await monitor.hmp("info jit"), _cmdline(pid))
    workdir = _private_dir(os.stat(f"/proc/{pid}").st_uid)
    socket_path = workdir / "gdb.sock"
    channel = None
    try:
        reply = await monitor.hmp(f"gdbserver unix:{socket_path},server=on,wait=off")
        if "rror" in reply or not socket_path.exists():
            raise SetupError(f"QEMU could not open a gdbstub: {reply.strip() or 'no socket'}")
        channel = QemuChannel(GdbstubClient.connect(socket_path))
        socket_path.unlink()  # connected: nobody else reaches it
        driver = QemuDriver(channel, memory, accel, mode, "as QEMU was started")
        driver.attach()
    except BaseException:
        if channel is not None:
            channel.close()
        await monitor.hmp("gdbserver none")
        memory.close()
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    added = Mechanism(
        "attached-gdbstub",
        "a gdbstub added to QEMU at run time (HMP gdbserver on a private unix socket), "
        "removed at detach",
        False,
        why="host-side only; connecting stops the VM for a moment, and its clocks stop with it",
    )
    driver.capabilities = dataclasses.replace(
        driver.capabilities,
        memory_read=Mechanism(
            "attached-ram",
            f"reads of guest RAM ({memory.how}) + vmigdb's page walk",
            False,
            why="no guest code runs and no page is touched or mapped in the guest",
        ),
        extra=(*driver.capabilities.extra, added, *extra),
    )
    argv = _cmdline(pid)
    driver.notes = [
        ("attached to", f"{label} (QEMU pid {pid}{', ' + shlex.join(argv[:1]) if argv else ''})"),
        ("found", f"{found.status}; detaching leaves it so, with the gdbstub removed"),
        *notes,
    ]
    driver.snapshots = QemuSnapshots(monitor, icount=mode == "icount")
    log.info(
        "attached to %s in %.2f s (VM was %s)", label, time.monotonic() - started, found.status
    )
    return Attachment(monitor, driver, found, memory.close, label)
