"""QEMU 7.2, Debian 12's own, unpacked beside the QEMU 10 that scripts/setup installs: vmigdb
still runs where QEMU 10 is absent, and the tests that check it need the old QEMU at hand.

It is fetched once with `apt-get download` from Debian 12's main suite and unpacked with `dpkg -x`
into the cache (no package is installed); a wrapper points it at its own modules, and it reads
its firmware from the installed QEMU's data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from vmigdb.images.build import default_cache_dir

FIRMWARE_DIRS = ("/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu")
PACKAGES = ("qemu-system-x86/bookworm", "qemu-system-common/bookworm")  # the binary, its modules


def qemu_7_2_dir() -> tuple[Path | None, str]:
    """(a directory to put first in PATH, or None; why not)."""
    root = default_cache_dir() / "qemu-7.2"
    binary = root / "usr" / "bin" / "qemu-system-x86_64"
    bin_dir = root / "bin"
    if not (bin_dir / "qemu-system-x86_64").exists():
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            return None, "no apt-get/dpkg to fetch Debian 12's QEMU 7.2"
        download = root.with_name("qemu-7.2.download")
        shutil.rmtree(download, ignore_errors=True)
        download.mkdir(parents=True)
        fetched = subprocess.run(
            ["apt-get", "download", "-qq", *PACKAGES],
            cwd=download,
            capture_output=True,
            text=True,
            timeout=300,
        )
        debs = sorted(download.glob("*.deb"))
        if fetched.returncode != 0 or len(debs) != len(PACKAGES):
            return None, f"apt-get download failed: {fetched.stderr.strip()[-300:]}"
        shutil.rmtree(root, ignore_errors=True)
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, timeout=300)
        shutil.rmtree(download, ignore_errors=True)
        bin_dir.mkdir()
        modules = root / "usr" / "lib" / "x86_64-linux-gnu" / "qemu"  # not QEMU 10's
        wrapper = bin_dir / "qemu-system-x86_64"
        # Its firmware: the installed QEMU's (it looks beside itself, where there is none).
        firmware = " ".join(f"-L {d}" for d in FIRMWARE_DIRS)
        wrapper.write_text(
            f'#!/bin/sh\nQEMU_MODULE_DIR="{modules}" exec "{binary}" {firmware} "$@"\n'
        )
        wrapper.chmod(0o755)
    return bin_dir, ""


def path_with(bin_dir: Path) -> dict[str, str]:
    """The environment with `bin_dir` first in PATH."""
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
