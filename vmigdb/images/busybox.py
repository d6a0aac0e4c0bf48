"""The guest's userland: a static busybox from Debian's busybox-static, cached by package version.

Downloading the package (rather than copying the host's /bin/busybox) makes the guest the same
whatever the host has installed; the host copy is only a fallback when apt cannot be reached.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from vmigdb.errors import SetupError
from vmigdb.images import debian

LOG = logging.getLogger("vmigdb.images")

PACKAGE = "busybox-static"
MEMBERS = ("bin/busybox", "usr/bin/busybox")  # before and after Debian's /usr merge


def _file_name(version: str) -> str:
    """A cache file name for a Debian version (which may hold an epoch colon)."""
    return "busybox-" + version.replace(":", "_").replace("/", "_")


def host_busybox() -> Path | None:
    """The host's busybox if dpkg says busybox-static installed it (a dynamic one would not run)."""
    if shutil.which("dpkg") is None:
        return None
    for candidate in (Path(p) for p in ("/bin/busybox", "/usr/bin/busybox")):
        if candidate.is_file():
            res = debian.run(["dpkg", "-S", str(candidate)], timeout=60)
            if res.returncode == 0 and res.stdout.startswith(f"{PACKAGE}:"):
                return candidate
    return None


def fetch_busybox(cache_dir: Path, log: logging.Logger = LOG) -> Path:
    """Return the path of a static busybox binary for the guest."""
    busybox_dir = cache_dir / "busybox"

    def attempt() -> Path:
        version = debian.candidate_version(PACKAGE)
        target = busybox_dir / _file_name(version)
        if target.is_file():
            log.info("busybox %s: cached", version)
            return target
        busybox_dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(dir=cache_dir, prefix="download-"))
        try:
            deb = debian.download(PACKAGE, workdir, log)
            files = debian.extract_members(deb, MEMBERS.__contains__)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if not files:
            raise SetupError(f"{deb.name} has no bin/busybox; check '{PACKAGE}' in apt")
        debian.write_atomic(target, next(iter(files.values())), 0o755)
        log.info("busybox %s: downloaded to %s", version, target)
        return target

    try:
        return debian.with_lists_refresh(attempt, log)
    except debian.AptError as exc:
        cached = debian.newest(busybox_dir.glob("busybox-*"))
        if cached is not None:
            log.warning("apt unavailable (%s); using cached %s", exc, cached.name)
            return cached
        host = host_busybox()
        if host is not None:
            log.warning("apt unavailable (%s); using the host's %s", exc, host)
            return host
        raise SetupError(
            f"cannot get busybox: {exc}; check that apt can reach Debian's archive "
            f"or run 'apt-get install {PACKAGE}'"
        ) from exc
