"""Build the demo guest (kernel + initramfs) that vmigdb's examples and end-to-end tests boot.

Cache layout under the cache dir (default $XDG_CACHE_HOME/vmigdb, else ~/.cache/vmigdb):
    kernels/vmlinuz-<release>, kernels/config-<release>
    kernels/btf-<release>.bin      the kernel's .BTF section (struct layouts), if it could be extracted
    kernels/modules-<release>/     the few modules of the kernel's package the guest carries
    libc/<version>/                Debian's dynamic loader and libc (libc6)
    busybox/busybox-<debian version>
    programs/<key>/<name>          unstripped static test programs (GDB symbol files)
    initrd/initrd-<key>.cpio
    lock                           serialises concurrent builds
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from vmigdb.images import btf_extract, busybox, debian, initramfs, kernel, programs, userland

LOG = logging.getLogger("vmigdb.images")


@dataclass(frozen=True)
class GuestImage:
    """What QEMU boots (-kernel, -initrd), and where the guest programs' host copies are."""

    kernel: Path
    initrd: Path
    release: str
    programs: Path | None = None  # directory holding each test program as <name>, with debug info
    btf: Path | None = None  # the kernel's raw BTF blob (kernels/btf-<release>.bin), None if absent


# Added to the demo guest's kernel command line: the kernel's crypto self-tests take 6 s of a 20 s
# boot under TCG and check nothing the demo guest is there for.
DEMO_KERNEL_ARGS = "cryptomgr.notests"


def demo_append(append: str = "") -> str:
    """The demo guest's kernel arguments, then the caller's `append`."""
    return f"{DEMO_KERNEL_ARGS} {append}".strip()


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/vmigdb, else ~/.cache/vmigdb (XDG: ignore a relative path)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "vmigdb"


def build_guest(
    cache_dir: Path | None = None,
    *,
    log: logging.Logger = LOG,
    kernel_package: str = kernel.METAPACKAGE,
) -> GuestImage:
    """Fetch or reuse every piece of the demo guest; only what changed is downloaded or rebuilt.

    `kernel_package`: the Debian metapackage that names the kernel (the default follows Debian's
    current cloud kernel; e.g. linux-image-6.12-cloud-amd64 gives a second, different kernel).
    """
    cache_dir = (cache_dir or default_cache_dir()).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(cache_dir / "lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two builds at once would download the same files
        debian.forget()
        debian.prefetch([kernel_package, busybox.PACKAGE, userland.LIBC_PACKAGE])
        vmlinuz, release = kernel.fetch_kernel(cache_dir, log, kernel_package)
        btf = btf_extract.cached_btf(vmlinuz, release, log)
        busybox_path = busybox.fetch_busybox(cache_dir, log)
        programs_dir, programs_key = programs.build_programs(cache_dir, log=log)
        libc, _ = userland.fetch_libc(cache_dir, log)
        modules = userland.fetch_modules(cache_dir, release, log)
        extra = userland.initrd_members(libc, modules)
        initrd = initramfs.build_initrd(
            cache_dir,
            busybox_path,
            programs_dir,
            programs_key,
            log,
            extra=extra,
            extra_key=userland.members_key(extra),
        )
    log.info("demo guest ready in %.1fs: kernel %s", time.monotonic() - start, release)
    return GuestImage(
        kernel=vmlinuz, initrd=initrd, release=release, programs=programs_dir, btf=btf
    )
