"""Getting files out of Debian packages with apt's own tools (apt-cache, apt-get, dpkg-deb).

The guest's kernel and busybox come from Debian's archive, so the project never ships or pins
binaries: a metapackage names the current version, and the cache keeps what was fetched for
offline use.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from vmigdb.errors import SetupError

LOG = logging.getLogger("vmigdb.images")

# The Debian package that provides each host tool we run, for the SetupError naming the fix.
TOOL_PACKAGES = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg": "dpkg",
    "dpkg-deb": "dpkg",
    "gcc": "gcc libc6-dev",
}

T = TypeVar("T")


class AptError(Exception):
    """apt could not give us a package (no lists, no network, stale lists); a cache may stand in."""


def require_tool(name: str) -> str:
    """Return the tool's path, or raise the SetupError that names the package to install."""
    path = shutil.which(name)
    if path is None:
        package = TOOL_PACKAGES.get(name, name)
        raise SetupError(f"{name} not found: install it with 'apt-get install {package}'")
    return path


def run(
    argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 600.0
) -> subprocess.CompletedProcess[str]:
    """Run a host tool with C locale and captured output; a timeout becomes a failed result."""
    require_tool(argv[0])
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    try:
        return subprocess.run(
            list(argv),
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 124, "", f"timed out after {timeout:.0f}s")


def last_error(stderr: str) -> str:
    """The most telling line of a tool's stderr, minus apt's harmless warning about root."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and "unsandboxed" not in ln]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return (errors or lines or ["no error output"])[-1]


# ---- what apt knows about packages ---------------------------------------------------------------


def parse_stanzas(output: str) -> dict[str, dict[str, str]]:
    """Parse `apt-cache show` output (RFC 822 stanzas) into {package: {fields}}; first one wins."""
    packages: dict[str, dict[str, str]] = {}
    for block in re.split(r"\n\s*\n", output):
        fields: dict[str, str] = {}
        last = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and last is not None:
                fields[last] += "\n" + line.strip()
            elif ":" in line:
                last, _, value = line.partition(":")
                fields[last] = value.strip()
        if "Package" in fields:
            packages.setdefault(fields["Package"], fields)
    return packages


def versioned_dependency(depends: str, prefix: str) -> str | None:
    """The package named PREFIX<digit>... (e.g. linux-image-6.1.0-56-cloud-amd64).

    A metapackage's only such dependency is its current versioned package; a signed one is
    preferred over -unsigned/-dbg variants should several be listed.
    """
    names = []
    for alternative in re.split(r"[,|]", depends):
        name = alternative.split("(")[0].strip().split(":")[0]
        if name.startswith(prefix) and name[len(prefix) : len(prefix) + 1].isdigit():
            names.append(name)
    preferred = [n for n in names if not n.endswith(("-unsigned", "-dbg"))]
    return (preferred or names or [None])[0]


_known: dict[str, dict[str, str]] = {}


def forget() -> None:
    """Drop what apt told us, so the next question sees the current lists."""
    _known.clear()


def prefetch(packages: Iterable[str]) -> None:
    """Ask apt about several packages at once: each `apt-cache` run costs ~1 s without pkgcache."""
    res = run(["apt-cache", "show", "--no-all-versions", *packages], timeout=120)
    _known.update(parse_stanzas(res.stdout))


def package_info(package: str) -> dict[str, str]:
    """apt's fields for the candidate version of a package, from the prefetch if there was one."""
    if package not in _known:
        prefetch([package])
    if package not in _known:
        raise AptError(f"apt knows no package {package} (apt lists missing or stale?)")
    return _known[package]


def resolve_dependency(metapackage: str, prefix: str) -> str:
    """The versioned package a metapackage currently depends on."""
    name = versioned_dependency(package_info(metapackage).get("Depends", ""), prefix)
    if name is None:
        raise AptError(f"{metapackage} depends on no {prefix}<version> package")
    return name


def candidate_version(package: str) -> str:
    """The version `apt-get download` would fetch."""
    version = package_info(package).get("Version")
    if not version:
        raise AptError(f"apt shows no version of {package}")
    return version


# ---- apt-get update, once -----------------------------------------------------------------------

_lists_refreshed = False


def update_lists(log: logging.Logger = LOG) -> bool:
    """Run `apt-get update` at most once per process; True if it ran and succeeded (so retry)."""
    global _lists_refreshed
    if _lists_refreshed:
        return False
    _lists_refreshed = True
    _known.clear()
    if os.geteuid() != 0:
        log.warning("apt package lists look missing or stale; run 'sudo apt-get update'")
        return False
    log.info("running apt-get update")
    res = run(["apt-get", "update"], timeout=600)
    if res.returncode != 0:
        log.warning("apt-get update failed: %s", last_error(res.stderr))
        return False
    return True


def with_lists_refresh(attempt: Callable[[], T], log: logging.Logger = LOG) -> T:
    """Call `attempt`, and again after `apt-get update` if apt failed (missing or stale lists)."""
    try:
        return attempt()
    except AptError as exc:
        log.info("%s; refreshing apt lists", exc)
        if not update_lists(log):
            raise
        return attempt()


# ---- download and unpack ------------------------------------------------------------------------


def download(package: str, dest: Path, log: logging.Logger = LOG) -> Path:
    """`apt-get download` one package into `dest` and return the .deb's path."""
    log.info("downloading %s", package)
    res = run(["apt-get", "download", package], cwd=dest, timeout=900)
    for line in res.stderr.splitlines():
        if line.strip() and "unsandboxed" not in line:
            log.debug("apt-get: %s", line)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if res.returncode != 0 or not debs:
        raise AptError(f"'apt-get download {package}' failed: {last_error(res.stderr)}")
    return debs[-1]


def extract_members(deb: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Read the regular files whose path (no leading './') `wanted` accepts out of a .deb's data.

    Streams `dpkg-deb --fsys-tarfile` instead of `dpkg-deb -x` so the kernel package's modules,
    which we do not need, are never written to disk.
    """
    require_tool("dpkg-deb")
    found: dict[str, bytes] = {}
    with tempfile.TemporaryFile() as errfile:
        proc = subprocess.Popen(
            ["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=errfile
        )
        assert proc.stdout is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if member.isfile() and wanted(name):
                        fileobj = tar.extractfile(member)
                        assert fileobj is not None
                        found[name] = fileobj.read()
            proc.stdout.read()  # drain the padding so dpkg-deb exits cleanly
        except tarfile.TarError as exc:
            proc.kill()
            raise SetupError(f"cannot unpack {deb.name} ({exc}); delete it and retry") from exc
        finally:
            proc.stdout.close()
            rc = proc.wait()
        errfile.seek(0)
        err = errfile.read().decode(errors="replace")
    if rc != 0:
        raise SetupError(
            f"dpkg-deb could not unpack {deb.name}: {last_error(err)}; delete it and retry"
        )
    return found


# ---- cache helpers ------------------------------------------------------------------------------


def version_key(text: str) -> list[int | str]:
    """Sort key comparing embedded numbers numerically, so 6.1.0-100 sorts after 6.1.0-56."""
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", text))]


def newest(paths: Iterable[Path]) -> Path | None:
    """The path whose name has the highest version, or None."""
    return max(paths, key=lambda p: version_key(p.name), default=None)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a cache file so that no reader, nor a crash, ever sees it half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
