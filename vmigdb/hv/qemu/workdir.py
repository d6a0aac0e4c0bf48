"""The private directory each QEMU run works in, and the sweep of ones left by a killed vmigdb.

QEMU's sockets, console log and stderr live in a fresh 0700 directory. vmigdb removes it when it
ends; if vmigdb is SIGKILLed, QEMU dies with it (PR_SET_PDEATHSIG) but the directory stays, with
the guest's console in it. Each directory records its owner (pid and process start time, so a
reused pid is not mistaken for the owner), and the next start removes the ones whose owner is gone.
Only directories carrying that record are ever removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from vmigdb.errors import SetupError

log = logging.getLogger("vmigdb.hv.qemu")

PREFIX = "vmigdb-"
OWNER_FILE = "owner"
# sockaddr_un.sun_path is 108 bytes including the NUL.
MAX_SOCKET_PATH = 107


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot); None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return stat[stat.rindex(")") + 2 :].split()[19]


def owner_is_gone(directory: Path) -> bool:
    """True only for a directory with a readable owner record whose process no longer exists."""
    try:
        pid_text, started = (directory / OWNER_FILE).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    return process_start_time(pid) != started


def sweep_stale(base: Path) -> list[Path]:
    """Remove the workdirs in `base` that this user's dead vmigdb processes left; returns them."""
    removed = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for d in entries:
        if not d.name.startswith(PREFIX) or d.is_symlink() or not d.is_dir():
            continue
        try:
            if d.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if owner_is_gone(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    if removed:
        log.info("removed %d work directories left by a killed vmigdb", len(removed))
    return removed


def make_workdir() -> Path:
    """A private 0700 directory, short enough for unix socket paths, with its owner recorded."""
    candidates = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        candidates.append(runtime)
    candidates += [tempfile.gettempdir(), "/tmp"]
    # Without a readable /proc every process would look gone: then neither record nor sweep.
    started = process_start_time(os.getpid())
    for base in candidates:
        # "/vmigdb-XXXXXXXX/qmp.sock" adds about 30 bytes.
        if len(base) + 32 > MAX_SOCKET_PATH or not os.path.isdir(base):
            continue
        if started is not None:
            sweep_stale(Path(base))
        try:
            d = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))
        except OSError:
            continue
        os.chmod(d, 0o700)
        if started is not None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            with os.fdopen(os.open(d / OWNER_FILE, flags, 0o600), "w") as f:
                f.write(f"{os.getpid()} {started}\n")
        return d
    raise SetupError("cannot create a private directory: make $TMPDIR a short, writable path")
