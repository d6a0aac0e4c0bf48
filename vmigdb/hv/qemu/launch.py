"""Start QEMU and take over its channels: the RAM mapping, the gdbstub, QMP.

Once vmigdb holds its connections and its mapping, the socket paths and the RAM file are unlinked:
nobody else can reach the guest through them, and nothing is left behind if vmigdb is killed (QEMU
itself is ended by the parent-death signal set in process.py).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from vmigdb.errors import SetupError
from vmigdb.hv.base import DriverStop, MachineGone
from vmigdb.hv.qemu.channel import QemuChannel
from vmigdb.hv.qemu.driver import QemuDriver
from vmigdb.hv.qemu.gdbstub import GdbstubClient
from vmigdb.hv.qemu.process import QemuConfig, QemuProcess
from vmigdb.hv.qemu.qmp import Qmp
from vmigdb.hv.qemu.runctl import MonitorClient, PluginLink
from vmigdb.hv.qemu.snapshots import QemuSnapshots
from vmigdb.hv.qemu.trial import try_icount

log = logging.getLogger("vmigdb.hv.qemu")


@dataclass
class QemuMachine:
    """Everything vmigdb holds for one QEMU: the process, the driver, QMP."""

    process: QemuProcess
    driver: QemuDriver
    qmp: Qmp
    attach_stop: DriverStop

    async def shutdown(self) -> None:
        """End QEMU (QMP quit, then signals) and remove every file it had."""
        try:
            await self.qmp.quit()
        except Exception as exc:  # noqa: BLE001 - QEMU may already be gone
            log.debug("QMP quit: %s", exc)
        try:
            await self.qmp.close()
        except Exception:  # noqa: BLE001
            pass
        self.driver.close()
        self.process.terminate()


async def launch_qemu(config: QemuConfig) -> QemuMachine:
    """Boot the guest and attach; the guest is left stopped (the caller resumes it). Where
    "auto" time puts icount on trial (trial.py), the guest has run it first, and QEMU is started
    again with host time if the guest hung under it."""
    machine = await _launch(config)
    if not machine.process.time_trial:
        return machine
    log.info("guest time: trying icount until the guest has brought up every vCPU")
    try:
        verdict = await try_icount(machine.driver)
    except BaseException:
        await machine.shutdown()
        raise
    if verdict.keep:
        log.info("guest time: icount kept: %s", verdict.why)
        machine.driver.time_reason = f"auto: icount kept after a trial: {verdict.why}"
        return machine
    log.warning("guest time: %s; starting QEMU again with host time", verdict.why)
    await machine.shutdown()
    machine = await _launch(dataclasses.replace(config, time_mode="host"))
    machine.driver.time_reason = (  # what `monitor info` says of guest time
        f"auto: icount was tried and {verdict.why}; --smp 1 or QEMU 10 (scripts/setup installs "
        "it) keeps instruction-counted time"
    )
    return machine


async def _launch(config: QemuConfig) -> QemuMachine:
    process = QemuProcess.start(config)
    try:
        client = QemuChannel(GdbstubClient.connect(process.gdb_socket))
        driver = QemuDriver(
            client, process.memory, process.accel, process.config.time_mode, process.time_reason
        )
        driver.qemu_version = process.version
        stop = driver.attach()
        if process.plugin_link is not None:
            monitor = MonitorClient(process.monitor_socket)
            driver.attach_plugin(PluginLink(process.plugin_link), monitor)
        driver.plugin_note = (
            "vmigdb's TCG plugin decides breakpoint scope, conditions and held steps in QEMU"
            if process.plugin_why is None
            else f"QEMU's gdbstub ({process.plugin_why})"
        )
        qmp = await Qmp.connect(process.qmp_socket)
        driver.snapshots = QemuSnapshots(qmp, icount=process.config.time_mode == "icount")
        process.unlink_paths()
    except (OSError, MachineGone, TimeoutError) as exc:
        words = process.last_words()
        process.terminate()
        raise SetupError(f"QEMU did not come up: {exc}. QEMU said: {words or 'nothing'}") from exc
    except BaseException:
        process.terminate()
        raise
    log.info("QEMU %d up (%s), %d vCPU(s)", process.pid, process.accel, len(driver.cpus()))
    return QemuMachine(process, driver, qmp, stop)
