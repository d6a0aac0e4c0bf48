"""The Xen driver: a domain through libvmi's event API, served from one event thread.

libvmi is used from one thread only (its instance is not thread-safe, and the Xen model is not
either): the event thread opens the domain, runs `listen` while the guest runs, and carries out
every call the debugger makes (`_call` queues it and waits for the answer). A stop decided in an
event callback is handed over through a pipe the server watches (`stop_fileno`), as the run-control
contract in `hv/base.py` describes. The mechanisms are in `engine.py`; what the guest could see of
each is in `capabilities.py`.

Opening follows the libvmi 3.7.1 wheel's limits: a full init needs an OS profile in libvmi.conf and
fails without one, so the domain is opened with partial init and paging only (vmigdb reads the
guest itself); it is opened by name, since the wheel's INIT_DOMAINID passes the id as a string
where libvmi reads a uint64 (bug 1); memory is read by physical address and walked by vmigdb, since
the wheel's AccessContext loses the page-table base (bug 2).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.errors import SetupError, log_internal_error
from vmigdb.hv.base import (
    BreakpointType,
    CatchKind,
    Driver,
    DriverError,
    DriverStop,
    MachineGone,
)
from vmigdb.hv.xen import regs
from vmigdb.hv.xen.binding import LibvmiBinding
from vmigdb.hv.xen.capabilities import CAPABILITIES
from vmigdb.hv.xen.catches import CATCHPOINTS
from vmigdb.hv.xen.engine import Engine

log = logging.getLogger("vmigdb.hv.xen")

LISTEN_MS = 20  # one listen while the guest runs: how soon a command or ^C is seen
_FAILED_LISTENS = 3  # in a row: the domain is gone


def open_domain(binding: LibvmiBinding, name: str) -> Any:
    """libvmi's instance for domain `name`, with events. :raises SetupError:"""
    L = binding.libvmi  # noqa: N806
    try:
        vmi = L.Libvmi(name, L.INIT_DOMAINNAME | L.INIT_EVENTS, mode=L.VMIMode.XEN, partial=True)
    except L.LibvmiError as exc:
        reason = str(exc)
        if reason == "VM_NOT_FOUND":
            raise SetupError(f"no Xen domain named {name!r} (xl list shows them)") from None
        raise SetupError(
            f"libvmi could not open domain {name!r} with events ({reason}): run as root in dom0; "
            "another monitor (DRAKVUF, xen-access, a second vmigdb) may hold its vm_event ring"
        ) from None
    try:
        if vmi.init_paging(0) != L.PageMode.IA32E:
            raise SetupError(f"domain {name!r} is not a 64-bit guest in long mode")
        try:
            vmi.slat_get_domain_state()
        except L.LibvmiError:
            raise SetupError(
                f"domain {name!r} has no altp2m, which vmigdb's invisible breakpoints need: "
                'add altp2m = "external" to its xl config and create it again'
            ) from None
    except BaseException:
        vmi.destroy()
        raise
    return vmi


class XenDriver(Driver):
    name = "xen"
    capabilities = CAPABILITIES

    def __init__(self, binding: LibvmiBinding, domain: str) -> None:
        self._b = binding
        self.domain = domain
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._ready: DriverStop | None = None
        self._cond = threading.Condition()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        self._engine: Engine | None = None
        self._gone = False
        self._finish = False
        self._thread = threading.Thread(target=self._main, name="vmigdb-xen-events", daemon=True)
        self._thread.start()
        try:
            self._call(self._open)
        except BaseException:
            self._stop_thread()
            raise

    # -- the event thread -------------------------------------------------------------------------

    def _open(self) -> None:
        vmi = open_domain(self._b, self.domain)
        b = self._b
        handle = b.extra_ffi.cast("void *", int(b.ffi.cast("uintptr_t", vmi.vmi)))  # bug 7
        try:
            self._engine = Engine(vmi, b, handle, self._publish)
        except BaseException:
            vmi.destroy()
            raise
        self.vmid = vmi.get_vmid()
        self.ncpus = len(self._engine.vcpus)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if threading.current_thread() is self._thread:
            return fn(*args)
        if self._gone:
            raise MachineGone(f"Xen domain {self.domain} is gone")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, args, future))
        return future.result()

    def _main(self) -> None:
        failures = 0
        while not self._finish:
            engine = self._engine
            running = engine is not None and engine.running
            try:
                item = self._commands.get(block=not running, timeout=None if running else 0.2)
            except queue.Empty:
                item = None
            if item is not None:
                fn, args, future = item
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
                continue
            if engine is None or not engine.running:
                continue
            try:
                engine.vmi.listen(LISTEN_MS)
                failures = 0
                engine.after_listen()
            except self._b.libvmi.LibvmiError as exc:
                failures += 1
                log.warning("libvmi listen failed: %s", exc)
                if failures >= _FAILED_LISTENS:
                    self._gone = True
                    engine.running = False
                    self._publish(DriverStop(None, 9, exited=0))
            except Exception as exc:  # noqa: BLE001 - a bug: stop the guest, tell GDB
                log_internal_error(log, "while the Xen guest ran", exc)
                try:
                    engine.vmi.pause_vm()
                    engine.running = False
                    engine.candidates = []
                    self._publish(DriverStop(1, 5))
                except Exception as again:  # noqa: BLE001
                    log_internal_error(log, "stopping the Xen guest after a bug", again)

    def _publish(self, stop: DriverStop) -> None:
        with self._cond:
            self._ready = stop
            self._cond.notify_all()
        try:
            os.write(self._wfd, b"!")
        except OSError:
            pass

    def _stop_thread(self) -> None:
        self._finish = True
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(10)
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def engine(self) -> Engine:
        assert self._engine is not None
        return self._engine

    # -- stopped-state verbs --------------------------------------------------------------------------

    def cpus(self) -> list[int]:
        return list(range(1, self.ncpus + 1))

    def read_physical(self, pa: int, length: int) -> bytes:
        return self._call(self.engine.read_physical, pa, length)

    def physical_ranges(self) -> list[tuple[int, int]]:
        return [(0, self.engine.ram_end)]

    def write_physical(self, pa: int, data: bytes) -> None:
        self._call(self.engine.write_physical, pa, bytes(data))

    def read_registers(self, cpu: int) -> RegisterFile:
        self._check_cpu(cpu)
        return self._call(regs.read_registers, self.engine.vmi, self._b.libvmi, cpu - 1)

    def write_register(self, cpu: int, regnum: int, value: bytes) -> None:
        self._check_cpu(cpu)
        self._call(regs.write_register, self.engine.vmi, self._b.libvmi, cpu - 1, regnum, value)

    def _check_cpu(self, cpu: int) -> None:
        if not 1 <= cpu <= self.ncpus:
            raise DriverError(f"no vCPU {cpu}")

    def insert_breakpoint(
        self,
        type: BreakpointType,
        addr: int,
        length: int,
        mechanism: str | None = None,
        scope_cr3: int | None = None,
    ) -> None:
        self._call(self.engine.insert, type, addr, length, scope_cr3)

    def remove_breakpoint(self, type: BreakpointType, addr: int, length: int) -> None:
        self._call(self.engine.remove, type, addr, length)

    def catchpoints(self) -> tuple[CatchKind, ...]:
        return CATCHPOINTS

    def set_catch(self, name: str, on: bool, scope_cr3: int | None = None) -> str:
        return self._call(self.engine.catches.set, name, on, scope_cr3)

    # -- run control ----------------------------------------------------------------------------------

    def resume(self, actions: dict[int, str]) -> None:
        for cpu in actions:
            self._check_cpu(cpu)
        with self._cond:
            self._ready = None
        self._call(self.engine.resume, dict(actions))

    def stop_fileno(self) -> int:
        return self._rfd

    def poll_stop(self) -> DriverStop | None:
        try:
            while os.read(self._rfd, 64):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._cond:
            stop, self._ready = self._ready, None
        return stop

    def wait_stop(self, timeout: float) -> DriverStop:
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready is not None, timeout):
                raise TimeoutError(f"the Xen domain did not stop within {timeout} s")
            stop, self._ready = self._ready, None
        return stop

    def interrupt(self) -> None:
        if self._engine is not None:
            self._engine.interrupt_requested = True

    def kill(self) -> None:
        """vmigdb does not destroy Xen domains: GDB's kill detaches, leaving the domain running."""
        log.warning(
            "kill: vmigdb leaves Xen domain %s running, with nothing of the debugger", self.domain
        )

    def close(self) -> None:
        if self._engine is not None and not self._gone and not self._finish:
            try:
                self._call(self.engine.close)
            except Exception as exc:  # noqa: BLE001 - closing goes on
                log.error("could not release Xen domain %s cleanly: %s", self.domain, exc)
        self._stop_thread()

    def describe(self) -> list[tuple[str, str]]:
        lines = [
            ("driver", "xen (libvmi 3.7.1 event API: altp2m, MTF, EPT, CR3/MSR intercepts)"),
            ("domain", f"{self.domain} (id {self.vmid})"),
            ("vcpus", str(self.ncpus)),
            ("guest RAM", f"{self.engine.ram_end // (1 << 20)} MiB, read through libvmi"),
        ]
        return lines + self._call(self.engine.describe)
