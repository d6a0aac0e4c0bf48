"""The guest kernel: Debian's cloud kernel, resolved through its metapackage and cached by release.

The cloud flavour is small, boots fast under TCG, and has what the demo guest needs built in
(8250 console, devtmpfs, initramfs, KASLR, kallsyms of all symbols).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from vmigdb.errors import SetupError
from vmigdb.images import debian

LOG = logging.getLogger("vmigdb.images")

METAPACKAGE = "linux-image-cloud-amd64"
PACKAGE_PREFIX = "linux-image-"


def release_of(package: str) -> str:
    """linux-image-6.1.0-56-cloud-amd64 -> 6.1.0-56-cloud-amd64 (the guest's `uname -r`)."""
    return package.removeprefix(PACKAGE_PREFIX)


def cached_kernels(kernel_dir: Path) -> list[Path]:
    return sorted(kernel_dir.glob("vmlinuz-*"), key=lambda p: debian.version_key(p.name))


def fetch_kernel(
    cache_dir: Path, log: logging.Logger = LOG, metapackage: str = METAPACKAGE
) -> tuple[Path, str]:
    """Return (vmlinuz path, release), downloading only when the current release is not cached yet.

    `metapackage` picks the kernel line (e.g. linux-image-6.12-cloud-amd64 for a second kernel).

    Without apt (offline, no lists) the newest cached kernel is used, with a warning.
    """
    kernel_dir = cache_dir / "kernels"

    def attempt() -> tuple[Path, str]:
        package = debian.resolve_dependency(metapackage, PACKAGE_PREFIX)
        release = release_of(package)
        vmlinuz = kernel_dir / f"vmlinuz-{release}"
        if vmlinuz.is_file():
            log.info("kernel %s: cached", release)
            return vmlinuz, release
        kernel_dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(dir=cache_dir, prefix="download-"))
        try:
            deb = debian.download(package, workdir, log)
            wanted = {f"boot/vmlinuz-{release}", f"boot/config-{release}"}
            files = debian.extract_members(deb, wanted.__contains__)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if f"boot/vmlinuz-{release}" not in files:
            raise SetupError(
                f"{deb.name} has no boot/vmlinuz-{release}; check '{metapackage}' in apt"
            )
        if f"boot/config-{release}" in files:
            debian.write_atomic(kernel_dir / f"config-{release}", files[f"boot/config-{release}"])
        debian.write_atomic(vmlinuz, files[f"boot/vmlinuz-{release}"])
        log.info("kernel %s: downloaded to %s", release, vmlinuz)
        return vmlinuz, release

    try:
        return debian.with_lists_refresh(attempt, log)
    except debian.AptError as exc:
        cached = cached_kernels(kernel_dir)
        if not cached:
            raise SetupError(
                f"cannot get the guest kernel: {exc}; check that apt can reach Debian's archive "
                f"('apt-get update && apt-get download {metapackage}')"
            ) from exc
        vmlinuz = cached[-1]
        release = vmlinuz.name.removeprefix("vmlinuz-")
        log.warning("apt unavailable (%s); using cached kernel %s", exc, release)
        return vmlinuz, release
