"""What the demo guest needs beyond busybox: Debian's C library and one kernel module.

- The dynamic loader and libc from Debian's ``libc6`` (the candidate version, like busybox), so the
  guest can run dynamically linked test programs: processes with shared libraries, their symbols
  read back out of guest memory by vmigdb (issue 18).
- One small module of the guest kernel's own package (``nls_ascii``: no dependencies, an init
  function, harmless to load and unload), for the module-load catchpoint. It comes from the same
  ``linux-image-<release>`` package as the kernel, so its vermagic and signature match.

Both are cached under the cache directory by version, and come back as initramfs members.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

from vmigdb.errors import SetupError
from vmigdb.images import cpio, debian
from vmigdb.images.kernel import PACKAGE_PREFIX

LOG = logging.getLogger("vmigdb.images")

LIBC_PACKAGE = "libc6"
MULTIARCH = "lib/x86_64-linux-gnu"
LIBC_FILES = (f"{MULTIARCH}/ld-linux-x86-64.so.2", f"{MULTIARCH}/libc.so.6")
# The ELF interpreter path programs are linked with; Debian's package makes it a symlink.
INTERPRETER = "lib64/ld-linux-x86-64.so.2"
MODULES = ("fs/nls/nls_ascii.ko",)  # under lib/modules/<release>/kernel/ in the kernel package
GUEST_MODULE_DIR = "lib/modules"  # where the guest finds them: /lib/modules/NAME.ko


def _cached_files(directory: Path, names: tuple[str, ...]) -> dict[str, bytes] | None:
    paths = {name: directory / name for name in names}
    if all(p.is_file() for p in paths.values()):
        return {name: p.read_bytes() for name, p in paths.items()}
    return None


def _fetch(
    cache_dir: Path, target: Path, package: str, members: dict[str, str], log: logging.Logger
) -> dict[str, bytes]:
    """Download `package` and keep `members` (path in the package -> cache name) under `target`."""
    workdir = Path(tempfile.mkdtemp(dir=cache_dir, prefix="download-"))
    try:
        deb = debian.download(package, workdir, log)
        files = debian.extract_members(deb, members.__contains__)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    missing = sorted(set(members) - set(files))
    if missing:
        raise SetupError(f"{package} has no {', '.join(missing)}; check '{package}' in apt")
    out = {}
    for member, name in members.items():
        debian.write_atomic(target / name, files[member], 0o755)
        out[name] = files[member]
    return out


def fetch_libc(cache_dir: Path, log: logging.Logger = LOG) -> tuple[dict[str, bytes], str]:
    """({path in the guest: bytes}, version) of Debian's dynamic loader and libc."""
    libc_dir = cache_dir / "libc"

    def attempt() -> tuple[dict[str, bytes], str]:
        version = debian.candidate_version(LIBC_PACKAGE)
        target = libc_dir / version.replace(":", "_")
        cached = _cached_files(target, LIBC_FILES)
        if cached is not None:
            log.info("libc %s: cached", version)
            return cached, version
        files = _fetch(cache_dir, target, LIBC_PACKAGE, {n: n for n in LIBC_FILES}, log)
        log.info("libc %s: downloaded to %s", version, target)
        return files, version

    try:
        return debian.with_lists_refresh(attempt, log)
    except debian.AptError as exc:
        versions = sorted(libc_dir.glob("*"), key=lambda p: debian.version_key(p.name))
        for directory in reversed(versions):
            cached = _cached_files(directory, LIBC_FILES)
            if cached is not None:
                log.warning("apt unavailable (%s); using cached libc %s", exc, directory.name)
                return cached, directory.name
        raise SetupError(
            f"cannot get the guest's C library: {exc}; check that apt can reach Debian's archive "
            f"('apt-get download {LIBC_PACKAGE}')"
        ) from exc


def fetch_modules(cache_dir: Path, release: str, log: logging.Logger = LOG) -> dict[str, bytes]:
    """{module file name: bytes} of `MODULES`, from the package of kernel `release`."""
    target = cache_dir / "kernels" / f"modules-{release}"
    names = tuple(Path(m).name for m in MODULES)
    cached = _cached_files(target, names)
    if cached is not None:
        log.info("kernel modules %s: cached", release)
        return cached
    package = f"{PACKAGE_PREFIX}{release}"
    members = {f"lib/modules/{release}/kernel/{m}": Path(m).name for m in MODULES}

    def attempt() -> dict[str, bytes]:
        return _fetch(cache_dir, target, package, members, log)

    try:
        files = debian.with_lists_refresh(attempt, log)
    except debian.AptError as exc:
        raise SetupError(
            f"cannot get modules of kernel {release}: {exc}; check that apt can reach Debian's "
            f"archive ('apt-get download {package}')"
        ) from exc
    log.info("kernel modules %s: %s", release, ", ".join(sorted(files)))
    return files


def initrd_members(libc: dict[str, bytes], modules: dict[str, bytes]) -> list[cpio.CpioEntry]:
    """The archive members for the C library and the modules, parents first."""
    entries = [
        cpio.directory("lib"),
        cpio.directory(MULTIARCH),
        cpio.directory("lib64"),
        cpio.directory(GUEST_MODULE_DIR),
    ]
    entries += [cpio.regular(name, libc[name], 0o755) for name in sorted(libc)]
    entries.append(cpio.symlink(INTERPRETER, f"/{MULTIARCH}/ld-linux-x86-64.so.2"))
    entries += [
        cpio.regular(f"{GUEST_MODULE_DIR}/{name}", modules[name]) for name in sorted(modules)
    ]
    return entries


def members_key(entries: list[cpio.CpioEntry]) -> str:
    """A hash of the members, for the initrd's cache key."""
    h = hashlib.sha256(b"vmigdb-userland-v1\0")
    for entry in entries:
        h.update(entry.name.encode() + b"\0" + entry.mode.to_bytes(4, "little"))
        h.update(hashlib.sha256(entry.data).digest())
    return h.hexdigest()
