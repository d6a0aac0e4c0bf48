"""vmigdb's TCG plugin for QEMU (runctl.c): where its source is and how it is built.

The plugin is compiled with the host's gcc the first time it is needed (scripts/setup does it
ahead), into vmigdb's cache under a name that carries the hash of its source, so an edited
source is rebuilt and two checkouts never share a stale build.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from vmigdb.errors import SetupError

SOURCE_DIR = Path(__file__).parent
SOURCES = ("runctl.c", "qemu_plugin_api.h")
API_VERSION = 4  # QEMU 10.0's plugin API, the one qemu_plugin_api.h declares


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmigdb" / "plugin"


def source_hash() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    return digest.hexdigest()[:16]


def plugin_path() -> Path:
    """The built plugin (built now if needed). :raises SetupError: without gcc, or if it fails."""
    target = cache_dir() / f"runctl-{source_hash()}.so"
    if target.exists():
        return target
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SetupError(
            "vmigdb's QEMU plugin needs gcc to build: run scripts/setup (or apt-get install gcc)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    cmd = [gcc, "-O2", "-Wall", "-shared", "-fPIC", "-fvisibility=hidden", "-o", str(partial),
           str(SOURCE_DIR / "runctl.c"), "-lpthread"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise SetupError(f"building vmigdb's QEMU plugin failed: {done.stderr.strip()[-500:]}")
    partial.replace(target)
    return target


if __name__ == "__main__":  # scripts/setup: python -m vmigdb.hv.qemu.plugin.build
    print(plugin_path())
