"""Start and own the qemu-system-x86_64 process that runs the guest.

vmigdb runs QEMU itself so that it can (a) put guest RAM in a shared file it maps read-only
(`PhysicalMemory`), (b) talk QMP on a private unix socket, and (c) use QEMU's own gdbstub, on
another private unix socket, as its run-control channel. None of these is visible to the guest:
the command line adds no device and no firmware entry for debugging's sake.

Whoever can read the RAM file or connect to either socket owns the guest, so all of them are
created owner-only: the RAM file by vmigdb itself (O_EXCL, 0600) before QEMU opens it, the
sockets and logs by QEMU under a 0077 umask inside a private 0700 directory.

Guest time (`QemuConfig.time_mode`, `vmigdb qemu --time`). In both modes every guest clock (TSC,
the kernel's clocksources, the RTC, which follows the VM clock) stops while the VM is stopped: a
guest held at a breakpoint for 10 s sees under 1 ms pass. They differ while the guest runs
(measured with `python -m vmigdb.bench.timemodes`):
- "host": plain TCG, guest time is host time (idle and busy: 1.000x). But the
  debugger's own work shows: QEMU drops its translated code at every breakpoint change and
  single-step toggle, and retranslating takes host time the TSC sees. An RDTSC-timed block
  right after a breakpoint hit or step takes 100-1000x its usual time (61 of ~450 samples in a
  session of 50 hits and 200 steps).
- "icount": `-icount shift=ICOUNT_SHIFT,sleep=on,align=on`. Guest time counts instructions
  retired (2**ICOUNT_SHIFT ns each; the TSC runs at 1 GHz), so retranslation and stepping cost
  the guest no time: no RDTSC outlier in the same session. align=on makes QEMU sleep while the
  guest is ahead of host time and run flat out while it is behind; sleep=on lets an idle guest's
  clock follow host time. Measured: busy 1.00x, idle 0.96-0.99x (host time spent emulating
  devices, e.g. console output, is not guest time: an idle guest falls a little behind and
  catches up when next busy). Costs: a busy guest runs at most 10**9 / 2**ICOUNT_SHIFT
  instructions per host second (a loop plain TCG runs 2600 times a second runs 310 times; the
  demo guest boots to its `ready` line in ~7 s instead of ~3 s), and all vCPUs share one host thread.
- "auto" (the default): the stealthiest mode that works for the machine asked for
  (`resolve_time_mode`): icount under TCG, host under KVM (which cannot count instructions). With
  several vCPUs on QEMU before 10, icount is on trial (trial.py): QEMU 7.2 with icount hangs
  Debian's 6.1 kernel as it starts a second vCPU but boots 6.12, so the guest is run until it has
  brought up every vCPU, and QEMU is started again with host time if it hangs instead. QEMU
  10.0.2 boots 2-vCPU guests under icount (0 RDTSC outliers in 9,038
  samples during breakpoint hits and steps; clocks 0.97x host time idle, 1.00x busy). Its two
  aborts under icount in the soak came from QEMU's own watchpoints, which vmigdb's plugin
  replaces under icount (plugin/runctl.c says how). Whether each vCPU did come up is the
  driver's to tell afterwards (`monitor info` warns of a vCPU still with paging off once the
  kernel runs, naming `--time host`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from vmigdb.errors import SetupError
from vmigdb.hv.qemu.accel import resolve_accel
from vmigdb.hv.qemu.drives import Drive, create_vmstate_image, drive_args, vmstate_args
from vmigdb.hv.qemu.memory import PhysicalMemory, pc_below_4g
from vmigdb.hv.qemu.plugin.build import plugin_path
from vmigdb.hv.qemu.version import icount_boots_smp, known_defects, qemu_version, version_text
from vmigdb.hv.qemu.workdir import make_workdir

log = logging.getLogger("vmigdb.hv.qemu")

SHM_DIR = Path("/dev/shm")
MIN_MEMORY_MIB = 16
MAX_MEMORY_MIB = 1 << 20  # 1 TiB
MAX_SMP = 255  # QEMU 7.2 pc-i440fx max_cpus
READY_TIMEOUT = 10.0

_PR_SET_PDEATHSIG = 1

# icount's instruction time: 2**3 ns, at most 125 million guest instructions per host second. This
# 2-core host, loaded, runs 300-450 MIPS with icount on plain integer code: the guest keeps up with
# host time with room to spare, where shift 2 (250 MIPS) fell behind (0.58x host time). shift=auto
# keeps the rate (0.99x) but changes the instruction time by powers of two as it adapts, so a
# block timed with RDTSC at start shows as >100x later with no debugger at all (85 of 89 samples).
ICOUNT_SHIFT = 3
TIME_MODES: dict[str, tuple[str, ...]] = {
    "host": (),
    "icount": ("-icount", f"shift={ICOUNT_SHIFT},sleep=on,align=on"),
}
TIME_MODE_CHOICES = ("auto", *TIME_MODES)
DEFAULT_TIME_MODE = "auto"


@dataclass(frozen=True)
class QemuConfig:
    """What the user asked for. The kernel command line is "console=ttyS0" + " " + append.

    Without a kernel, the guest boots from its first disk (`drives`) with its own bootloader.
    """

    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    smp: int = 1
    memory_mib: int = 512
    accel: str = "auto"
    serial: Path | None = None
    extra_args: tuple[str, ...] = ()
    binary: str = "qemu-system-x86_64"
    time_mode: str = DEFAULT_TIME_MODE  # a TIME_MODE_CHOICES item: what guest time follows
    drives: tuple[Drive, ...] = ()  # disk images, the first one booted when there is no kernel
    snapshots: bool = True  # a VM-state node for `monitor snapshot` (needs qemu-img)
    # vmigdb's run-control plugin (plugin/runctl.c) where it works: TCG under icount on QEMU 10
    run_plugin: bool = True

    @property
    def kernel_cmdline(self) -> str:
        return "console=ttyS0" + (" " + self.append if self.append else "")


def _opt(value: object) -> str:
    """Escape a value for QEMU's comma-separated option syntax (',' is written ',,')."""
    return str(value).replace(",", ",,")


def build_command_line(
    config: QemuConfig,
    accel: str,
    ram_path: Path,
    gdb_socket: Path,
    qmp_socket: Path,
    console_log: Path,
    vmstate: Path | None = None,
    version: tuple[int, int, int] | None = None,
) -> list[str]:
    """The full argv for QEMU. Pure: no filesystem access, so it can be unit-tested.
    `vmstate`: the qcow2 file of the VM-state node for snapshots (drives.py), if any; `version`:
    QEMU's (`qemu_version`), which decides what `--time auto` is with several vCPUs."""
    cmd = [config.binary, "-accel", accel]
    if accel == "kvm":
        cmd += ["-cpu", "host"]
    cmd += [
        "-m",
        str(config.memory_mib),
        "-smp",
        str(config.smp),
        # Guest RAM in a file vmigdb maps too; share=on so both see the same pages.
        "-object",
        f"memory-backend-file,id=ram0,size={config.memory_mib}M,mem-path={_opt(ram_path)},share=on",
        "-machine",
        "pc,memory-backend=ram0",
    ]
    if config.kernel is not None:
        cmd += ["-kernel", str(config.kernel)]
        if config.initrd is not None:
            cmd += ["-initrd", str(config.initrd)]
        cmd += ["-append", config.kernel_cmdline]
    cmd += drive_args(config.drives)
    if vmstate is not None:
        cmd += vmstate_args(vmstate)
    cmd += [
        "-serial",
        f"file:{config.serial or console_log}",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-chardev",
        f"socket,id=g0,path={_opt(gdb_socket)},server=on,wait=off",
        "-gdb",
        "chardev:g0",
        "-qmp",
        f"unix:{_opt(qmp_socket)},server=on,wait=off",
        # The guest's RTC follows the VM clock, which stops while vmigdb holds the VM stopped.
        "-rtc",
        "clock=vm",
    ]
    cmd += time_args(resolve_time_mode(config.time_mode, accel, config.smp, version)[0], accel)
    cmd += list(config.extra_args)
    return cmd


def resolve_time_mode(
    mode: str, accel: str, smp: int, version: tuple[int, int, int] | None = None
) -> tuple[str, str]:
    """(TIME_MODES key, why) for a requested mode: "auto" becomes the stealthiest that works.
    `version` is QEMU's (None: unknown): with several vCPUs, icount needs QEMU 10 or later."""
    if mode not in TIME_MODE_CHOICES:
        raise SetupError(f"unknown time mode {mode!r}: use one of {', '.join(TIME_MODE_CHOICES)}")
    if mode != "auto":
        return mode, "as asked"
    if accel != "tcg":
        return "host", f"auto: {accel} cannot count instructions"
    if smp == 1:
        return "icount", "auto: TCG with 1 vCPU"
    if icount_boots_smp(version):
        return "icount", f"auto: TCG, and QEMU {version_text(version)} counts {smp} vCPUs' instructions"
    return "icount", (
        f"auto: on trial (trial.py): QEMU {version_text(version)} with icount hangs some kernels "
        "as they start a second vCPU (Debian's 6.1), so it is kept only if the guest brings up "
        "every vCPU"
    )


def icount_on_trial(
    mode: str, accel: str, smp: int, version: tuple[int, int, int] | None
) -> bool:
    """Does "auto" try icount first here, keeping it only if the guest brings every vCPU up?"""
    return mode == "auto" and accel == "tcg" and smp > 1 and not icount_boots_smp(version)


def wants_plugin(
    config: QemuConfig, accel: str, version: tuple[int, int, int] | None
) -> str | None:
    """Why the run-control plugin is not used for this machine, or None when it is.

    It needs plugin API 4 (QEMU 10) and TCG, and icount: its held stops are all-stops only when
    every vCPU runs on QEMU's one icount thread (with host time each vCPU has its own thread)."""
    if not config.run_plugin or os.environ.get("VMIGDB_PLUGIN") == "0":
        return "turned off"
    if accel != "tcg":
        return f"{accel} runs no TCG plugins"
    if version is None or version < (10, 0, 0):
        return f"QEMU {version_text(version)} has no plugin API 4 (QEMU 10 has)"
    if config.time_mode != "icount":
        return "guest time is not instruction-counted (icount): breakpoints stay QEMU's"
    return None


def plugin_args(plugin: Path, plugin_socket: Path, monitor_socket: Path) -> list[str]:
    """QEMU's arguments for vmigdb's plugin and the monitor socket the QEMU driver uses while the
    plugin holds the machine."""
    return [
        "-plugin",
        f"file={_opt(plugin)},sock={_opt(plugin_socket)}",
        "-qmp",
        f"unix:{_opt(monitor_socket)},server=on,wait=off",
    ]


def time_args(mode: str, accel: str) -> list[str]:
    """QEMU's arguments for a time mode (see the module docstring). Pure; SetupError if unusable."""
    if mode not in TIME_MODES:
        raise SetupError(f"unknown time mode {mode!r}: use one of {', '.join(TIME_MODES)}")
    if mode == "icount" and accel != "tcg":
        raise SetupError(
            f"--time icount needs TCG (QEMU counts instructions only when it translates them), "
            f"not {accel}: add --accel tcg or use --time host"
        )
    return list(TIME_MODES[mode])


def _check_config(config: QemuConfig) -> str:
    """Pre-flight checks; returns the resolved QEMU binary path. Raises SetupError with the fix."""
    binary = shutil.which(config.binary)
    if binary is None:
        raise SetupError(
            f"{config.binary} not found: install it with `apt-get install qemu-system-x86`"
        )
    if config.kernel is None and not config.drives:
        raise SetupError("nothing to boot: give --kernel PATH or --drive DISK-IMAGE")
    if config.kernel is None and (config.initrd is not None or config.append):
        raise SetupError(
            "--initrd and --append need --kernel: a disk boots with its own bootloader and "
            "command line"
        )
    for what, path in (("kernel", config.kernel), ("initrd", config.initrd)):
        if path is None:
            continue
        if not Path(path).is_file():
            raise SetupError(f"{what} {path} does not exist or is not a file: check the path")
        if not os.access(path, os.R_OK):
            raise SetupError(f"{what} {path} is not readable: fix its permissions")
    if not 1 <= config.smp <= MAX_SMP:
        raise SetupError(f"smp {config.smp} out of range: use 1 to {MAX_SMP} CPUs")
    if not MIN_MEMORY_MIB <= config.memory_mib <= MAX_MEMORY_MIB:
        raise SetupError(
            f"memory {config.memory_mib} MiB out of range: use {MIN_MEMORY_MIB} to "
            f"{MAX_MEMORY_MIB} MiB"
        )
    return binary


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _create_ram_file(size: int, workdir: Path) -> tuple[Path, int]:
    """Create the guest RAM file owner-only, before QEMU sees it. Returns (path, fd).

    /dev/shm is preferred (tmpfs: RAM-speed, never written back to disk). The workdir is the
    fallback when /dev/shm is missing, read-only, or too small.
    """
    name = f"vmigdb-{secrets.token_hex(16)}"
    shm_ok = SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK | os.X_OK)
    if shm_ok and _free_bytes(SHM_DIR) >= size:
        directory = SHM_DIR
    elif _free_bytes(workdir) >= size:
        directory = workdir
        log.warning(
            "/dev/shm is %s; guest RAM goes in %s instead",
            "too small" if shm_ok else "not writable",
            workdir,
        )
    else:
        raise SetupError(
            f"not enough space for {size >> 20} MiB of guest RAM in /dev/shm or {workdir}: "
            "free some or lower the guest memory"
        )
    path = directory / name
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise SetupError(f"cannot create guest RAM file {path}: {e.strerror}") from e
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise SetupError(f"cannot size guest RAM file {path}: {e.strerror}") from e
    return path, fd


def _make_preexec(parent_pid: int) -> Callable[[], None]:
    """Child-side setup: die with the parent (PR_SET_PDEATHSIG), even if it dies during fork."""
    libc = ctypes.CDLL(None, use_errno=True)  # resolved before fork; the child only calls it
    prctl = libc.prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:  # parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


_T = TypeVar("_T")
_spawn_lock = threading.Lock()
_spawn_queue: queue.SimpleQueue[tuple[Callable[[], object], Future[object]]] | None = None


def _spawner(q: queue.SimpleQueue[tuple[Callable[[], object], Future[object]]]) -> None:
    while True:
        fn, fut = q.get()
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            fut.set_exception(e)


def _in_long_lived_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` (a fork) in a thread that lives as long as the process.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. A
    caller on a worker thread (``asyncio.to_thread``, a thread pool) would otherwise have QEMU
    killed as soon as that worker retires. The main thread qualifies; otherwise one daemon
    thread, started on first use, does every fork.
    """
    global _spawn_queue
    if threading.current_thread() is threading.main_thread():
        return fn()
    with _spawn_lock:
        if _spawn_queue is None:
            _spawn_queue = queue.SimpleQueue()
            threading.Thread(
                target=_spawner, args=(_spawn_queue,), name="vmigdb-qemu-spawner", daemon=True
            ).start()
    fut: Future[object] = Future()
    _spawn_queue.put((fn, fut))
    return fut.result()  # type: ignore[return-value]


def _unlink(path: Path | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e)


def _last_resort(popen: subprocess.Popen[bytes], paths: list[Path], workdir: Path) -> None:
    """Run if a QemuProcess is dropped (or the interpreter exits) without terminate()."""
    if popen.poll() is None:
        popen.kill()
        try:
            popen.wait(2.0)
        except subprocess.TimeoutExpired:
            pass
    for p in paths:
        _unlink(p)
    shutil.rmtree(workdir, ignore_errors=True)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _maps_file(pid: int, dev: int, ino: int) -> bool:
    """True once process ``pid`` has mmapped the file (dev, ino): QEMU has opened the RAM file."""
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}"
    try:
        with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) >= 5 and fields[4] == str(ino) and fields[3] == want:
                    return True
    except OSError:
        pass
    return False


# How QEMU says why it stops by itself (cpu_abort, error_report, assert, a signal's message).
_QEMU_FATAL = re.compile(r"^qemu: fatal|^qemu-system-\S+: |Assertion .* failed|^\*\*")


class QemuProcess:
    """A running QEMU owned by vmigdb. Create with `QemuProcess.start`; end with `terminate`."""

    config: QemuConfig
    accel: str
    workdir: Path
    gdb_socket: Path
    qmp_socket: Path
    console_log: Path
    stderr_log: Path
    ram_path: Path
    memory: PhysicalMemory
    pid: int
    command_line: list[str]
    version: tuple[int, int, int] | None = None  # QEMU's, once started

    def __init__(self, config: QemuConfig, accel: str) -> None:
        """Not started yet: use `QemuProcess.start`."""
        self.config = config
        self.accel = accel
        self._popen: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self.memory = None  # type: ignore[assignment]
        self.plugin_link: socket.socket | None = None  # vmigdb's plugin, connected (runctl.py)
        self.plugin_socket: Path | None = None
        self.monitor_socket: Path | None = None
        self.plugin_why: str | None = "not started"  # why the plugin is not used; None: it is
        self.time_trial = False  # icount kept only if the guest brings up every vCPU (trial.py)

    @classmethod
    def start(cls, config: QemuConfig) -> QemuProcess:
        """Check the host, create the private files, start QEMU and wait for its sockets."""
        binary = _check_config(config)
        # icount is a TCG feature: with --accel auto it picks TCG even where KVM would work.
        icount_auto = config.time_mode == "icount" and config.accel == "auto"
        accel = resolve_accel("tcg" if icount_auto else config.accel)
        version = qemu_version(binary)
        time_mode, why = resolve_time_mode(config.time_mode, accel, config.smp, version)
        trial = icount_on_trial(config.time_mode, accel, config.smp, version)
        log.info("guest time: %s (%s)", time_mode, why)
        if config.time_mode == "icount" and config.smp > 1 and not icount_boots_smp(version):
            log.warning(  # asked for: "auto" puts icount on trial instead (trial.py)
                "--time icount on QEMU %s: QEMU 7.2 with icount hangs Debian's 6.1 kernel as it "
                "starts its second CPU (after 'x86: Booting SMP configuration:'; 6.12 boots): use "
                "--smp 1, --time host or QEMU 10 if the guest stops there",
                version_text(version),
            )
        config = dataclasses.replace(config, time_mode=time_mode)
        size = config.memory_mib << 20

        self = cls(config, accel)
        self.time_reason = why  # why config.time_mode is what it is, for `monitor info`
        self.time_trial = trial
        self.workdir = make_workdir()
        ram_fd = -1
        try:
            self.gdb_socket = self.workdir / "gdb.sock"
            self.qmp_socket = self.workdir / "qmp.sock"
            self.console_log = config.serial or self.workdir / "console.log"
            self.stderr_log = self.workdir / "qemu.stderr"
            self.ram_path, ram_fd = _create_ram_file(size, self.workdir)
            st = os.fstat(ram_fd)
            self._ram_id = (st.st_dev, st.st_ino)
            self.memory = PhysicalMemory(ram_fd, size, pc_below_4g(size), writable=True)
            self.vmstate = self.workdir / "vmstate.qcow2"
            if not (config.snapshots and create_vmstate_image(self.vmstate)):
                if config.snapshots:
                    log.warning("qemu-img not found: no snapshots (apt-get install qemu-utils)")
                self.vmstate = None
            self.command_line = build_command_line(
                config,
                accel,
                self.ram_path,
                self.gdb_socket,
                self.qmp_socket,
                self.console_log,
                self.vmstate,
                version,
            )
            self.plugin_why = wants_plugin(config, accel, version)
            listener = None
            if self.plugin_why is None:
                try:
                    plugin = plugin_path()
                except SetupError as exc:
                    self.plugin_why = str(exc)
                    log.warning("no run-control plugin: %s", exc)
                else:
                    self.plugin_socket = self.workdir / "runctl.sock"
                    self.monitor_socket = self.workdir / "monitor.sock"
                    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    listener.bind(str(self.plugin_socket))
                    # owner-only like QEMU's sockets (the 0700 directory already shuts others out)
                    os.chmod(self.plugin_socket, 0o600)
                    listener.listen(1)
                    self.command_line += plugin_args(
                        plugin, self.plugin_socket, self.monitor_socket
                    )
            argv = [binary, *self.command_line[1:]]
            log.info("starting QEMU: %s", " ".join(self.command_line))
            stderr_fd = os.open(
                self.stderr_log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
            try:
                # Own session: a ^C typed at vmigdb's terminal must not reach QEMU, because
                # vmigdb shuts down in order (remove breakpoints, resume, then stop QEMU).
                # PDEATHSIG still ends QEMU if vmigdb dies without doing so.
                self._popen = _in_long_lived_thread(
                    lambda: subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=stderr_fd,
                        close_fds=True,
                        start_new_session=True,
                        umask=0o077,  # QEMU's sockets and logs come out 0600
                        preexec_fn=_make_preexec(os.getpid()),
                    )
                )
            finally:
                os.close(stderr_fd)
            os.close(ram_fd)
            ram_fd = -1
            self.pid = self._popen.pid
            self._finalizer = weakref.finalize(
                self,
                _last_resort,
                self._popen,
                [self.ram_path, self.gdb_socket, self.qmp_socket],
                self.workdir,
            )
            self._wait_ready()
            if listener is not None:
                listener.settimeout(READY_TIMEOUT)
                try:
                    self.plugin_link, _ = listener.accept()
                except TimeoutError as exc:
                    raise SetupError(
                        f"vmigdb's QEMU plugin did not connect: {self.last_words(1).strip()}"
                    ) from exc
                finally:
                    listener.close()
        except BaseException:
            if ram_fd >= 0:
                os.close(ram_fd)
            self._abort_start()
            raise
        self.version = version
        for defect in known_defects(self.version):
            log.warning("%s", defect)
        log.info("QEMU pid %d up (accel %s), workdir %s", self.pid, accel, self.workdir)
        return self

    def _abort_start(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()
            self._popen.wait()
        self.cleanup()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            code = self.poll()
            if code is not None:
                words = self.last_words(1).strip() or "no message"
                raise SetupError(f"QEMU exited at startup (status {code}): {words}")
            # QEMU creates its sockets before the RAM backend: wait for both, so that the
            # RAM file can be unlinked as soon as start() returns.
            if (
                _is_socket(self.gdb_socket)
                and _is_socket(self.qmp_socket)
                and (self.monitor_socket is None or _is_socket(self.monitor_socket))
                and _maps_file(self.pid, *self._ram_id)
            ):
                return
            if time.monotonic() >= deadline:
                raise SetupError(
                    f"QEMU did not open its sockets within {READY_TIMEOUT:.0f} s: "
                    f"{self.last_words(1).strip() or 'no message'}"
                )
            time.sleep(0.01)

    def unlink_paths(self) -> None:
        """Remove the RAM file and sockets from the filesystem.

        Call once vmigdb is connected to both sockets and QEMU has opened the RAM file (QMP
        answering means it has): the mapping and the open connections stay valid, and nobody
        else can open them any more. Safe to call twice.
        """
        for p in (self.ram_path, self.gdb_socket, self.qmp_socket):
            _unlink(p)
        for p in (self.plugin_socket, self.monitor_socket):
            if p is not None:
                _unlink(p)

    def poll(self) -> int | None:
        """QEMU's exit status, or None while it runs."""
        return None if self._popen is None else self._popen.poll()

    def last_words(self, lines: int = 20) -> str:
        """The last ``lines`` lines QEMU wrote to stderr (for error messages), after the line
        that says why if it is further up: a fatal error's register dump is longer than that."""
        try:
            with open(self.stderr_log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 65536))
                data = f.read()
        except OSError:
            return ""
        text = data.decode("utf-8", errors="replace").splitlines()
        if lines <= 0:
            return ""
        tail = text[-lines:]
        why = [line for line in text[:-lines] if _QEMU_FATAL.search(line)][-1:]
        return "\n".join([*why, *(["..."] if why else []), *tail])

    def terminate(self, timeout: float = 5.0) -> None:
        """SIGTERM QEMU (it shuts down cleanly), SIGKILL after ``timeout``; then `cleanup`."""
        p = self._popen
        if p is not None and p.poll() is None:
            log.debug("terminating QEMU pid %d", p.pid)
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("QEMU pid %d ignored SIGTERM for %.1f s; killing it", p.pid, timeout)
                p.kill()
                p.wait()
        self.cleanup()

    def cleanup(self) -> None:
        """Unmap guest RAM and remove the RAM file, sockets and workdir. Idempotent.

        Does not stop QEMU (see `terminate`).
        """
        if self.memory is not None:
            self.memory.close()
        for name in ("ram_path", "gdb_socket", "qmp_socket"):
            _unlink(getattr(self, name, None))
        if getattr(self, "workdir", None) is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._finalizer is not None and self.poll() is not None:
            self._finalizer.detach()

    def __enter__(self) -> QemuProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return f"<QemuProcess pid={getattr(self, 'pid', None)} accel={self.accel}>"


__all__ = ["TIME_MODES", "QemuConfig", "QemuProcess", "build_command_line", "time_args"]
