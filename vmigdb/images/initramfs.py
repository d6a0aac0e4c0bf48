"""The guest's initramfs: busybox, the /init script and the test programs in a newc cpio.

Rebuilt only when an input changes: the archive is cached under a hash of its inputs, and its bytes
are deterministic (fixed mtimes, owners and inode numbers). It is not compressed: under TCG the
kernel took 2 s of every boot to gunzip it, loading the 14 MB plain archive costs nothing visible.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from vmigdb.images import cpio, debian

LOG = logging.getLogger("vmigdb.images")

INIT_SCRIPT = Path(__file__).parent / "init.sh"
FORMAT = b"vmigdb-initrd-v2\0"  # bump when the archive layout below changes
DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "etc", "proc", "root", "sys", "var")
ETC_FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": b"root:x:0:\n",
    "etc/hostname": b"vmigdb-guest\n",
}


def initrd_key(busybox: bytes, init_script: bytes, programs_key: str, extra_key: str = "") -> str:
    """Hash of every input: busybox, /init, the programs (keyed by sources, flags, gcc) and the
    extra members (the C library, kernel modules: `userland.members_key`)."""
    h = hashlib.sha256(FORMAT)
    for part in (
        hashlib.sha256(busybox).digest(),
        hashlib.sha256(init_script).digest(),
        programs_key.encode(),
        extra_key.encode(),
    ):
        h.update(part)
    return h.hexdigest()


def initrd_entries(
    busybox: bytes,
    init_script: bytes,
    programs: dict[str, bytes],
    extra: list[cpio.CpioEntry] | None = None,
) -> list[cpio.CpioEntry]:
    """The archive's members, parents first, programs sorted by name, then `extra` (in order)."""
    entries = [cpio.directory(d) for d in DIRS]
    entries.append(cpio.directory("tmp", 0o1777))
    # The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
    entries.append(cpio.chardev("dev/console", 5, 1))
    entries += [cpio.regular(name, data) for name, data in ETC_FILES.items()]
    entries.append(cpio.regular("bin/busybox", busybox, 0o755))
    entries.append(cpio.regular("init", init_script, 0o755))
    entries += [cpio.regular(f"bin/{name}", programs[name], 0o755) for name in sorted(programs)]
    entries += extra or []
    return entries


def build_initrd(
    cache_dir: Path,
    busybox: Path,
    programs_dir: Path,
    programs_key: str,
    log: logging.Logger = LOG,
    extra: list[cpio.CpioEntry] | None = None,
    extra_key: str = "",
) -> Path:
    """Return the cached initrd for these inputs, writing it first if needed. `extra` members
    (hashed as `extra_key`) go in after the programs."""
    busybox_bytes = busybox.read_bytes()
    init_bytes = INIT_SCRIPT.read_bytes()
    key = initrd_key(busybox_bytes, init_bytes, programs_key, extra_key)
    path = cache_dir / "initrd" / f"initrd-{key[:16]}.cpio"
    if path.is_file():
        log.info("initrd: cached %s", path)
        return path
    programs = {p.name: p.read_bytes() for p in sorted(programs_dir.iterdir()) if p.is_file()}
    archive = cpio.newc_archive(initrd_entries(busybox_bytes, init_bytes, programs, extra))
    debian.write_atomic(path, archive)
    log.info("initrd: wrote %s (%d programs)", path, len(programs))
    return path
