"""The guest's test programs: tiny static C programs compiled on the host and cached by input hash.

Each `programs/NAME.c` (or `.S`) is one program, installed in the guest as /bin/NAME. They are built
static and non-PIE so that two copies run at the same virtual addresses, and keep their debug info
so the host copy can serve as GDB's symbol file. A source that says `vmigdb-build: dynamic` is
built the way a distribution builds a program instead (dynamically linked against the guest's
Debian libc, position-independent), with `-rdynamic` so its own functions are in its dynamic
symbol table, the one a debugger can read back out of guest memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vmigdb.errors import SetupError
from vmigdb.images import debian

LOG = logging.getLogger("vmigdb.images")

SOURCE_DIR = Path(__file__).parent / "programs"
CFLAGS = ("-static", "-no-pie", "-O1", "-g", "-Wall", "-Werror")
DYNAMIC_CFLAGS = ("-pie", "-fPIE", "-rdynamic", "-O1", "-g", "-Wall", "-Werror")
DYNAMIC_MARKER = b"vmigdb-build: dynamic"
INSTALL_FIX = "apt-get install gcc libc6-dev"


@dataclass(frozen=True)
class Program:
    name: str
    source: Path

    @property
    def dynamic(self) -> bool:
        return DYNAMIC_MARKER in self.source.read_bytes()

    @property
    def cflags(self) -> tuple[str, ...]:
        return DYNAMIC_CFLAGS if self.dynamic else CFLAGS


def list_programs(source_dir: Path = SOURCE_DIR) -> list[Program]:
    """Every program source, sorted by name so that hashes and archives are stable."""
    sources = [*source_dir.glob("*.c"), *source_dir.glob("*.S")]
    return sorted((Program(p.stem, p) for p in sources), key=lambda p: p.name)


def toolchain_id(gcc: str = "gcc") -> str:
    """What identifies the compiler and static libc, so upgrading either rebuilds the programs."""
    if shutil.which(gcc) is None:
        raise SetupError(f"{gcc} not found: install it with '{INSTALL_FIX}'")
    version = debian.run([gcc, "--version"], timeout=60).stdout.splitlines()[:1]
    libc = debian.run([gcc, "-print-file-name=libc.a"], timeout=60).stdout.strip()
    if not os.path.isabs(libc) or not os.path.isfile(libc):
        raise SetupError(f"static C library (libc.a) not found: install it with '{INSTALL_FIX}'")
    st = os.stat(libc)
    return f"{' '.join(version)}|{libc}|{st.st_size}|{st.st_mtime_ns}"


def programs_key(
    sources: dict[str, bytes], toolchain: str, cflags: tuple[str, ...] = CFLAGS
) -> str:
    """A hash of everything that goes into the compiled programs."""
    h = hashlib.sha256(b"vmigdb-programs-v1\0")
    h.update(repr((toolchain, cflags, DYNAMIC_CFLAGS)).encode() + b"\0")
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + len(sources[name]).to_bytes(8, "little") + sources[name])
    return h.hexdigest()


def extra_flags(source: Path) -> list[str]:
    """Flags a program asks for in its source, on a line `vmigdb-cflags: FLAGS` (e.g. a link
    address of its own, so a breakpoint on its code fires in it alone)."""
    for line in source.read_text(errors="replace").splitlines()[:20]:
        _, marker, flags = line.partition("vmigdb-cflags:")
        if marker:
            return flags.split()
    return []


def compile_program(program: Program, output: Path, gcc: str = "gcc") -> None:
    """Compile one program; a missing static libc becomes a SetupError naming the package."""
    res = debian.run(
        [
            gcc,
            *program.cflags,
            *extra_flags(program.source),
            "-o",
            str(output),
            program.source.name,
        ],
        cwd=program.source.parent,
        timeout=300,
    )
    if res.returncode == 0:
        return
    if "cannot find -lc" in res.stderr or "crt1.o" in res.stderr:
        raise SetupError(f"static C library not usable by {gcc}: install it with '{INSTALL_FIX}'")
    raise SetupError(
        f"gcc failed on vmigdb test program {program.source.name}: {debian.last_error(res.stderr)} "
        f"(report it with the output of 'gcc --version')"
    )


def build_programs(
    cache_dir: Path, programs: list[Program] | None = None, log: logging.Logger = LOG
) -> tuple[Path, str]:
    """Compile every program into programs/<key>/NAME unless already there; return (dir, key)."""
    programs = list_programs() if programs is None else programs
    sources = {p.name: p.source.read_bytes() for p in programs}
    key = programs_key(sources, toolchain_id())
    out_dir = cache_dir / "programs" / key[:16]
    if out_dir.is_dir() and all((out_dir / p.name).is_file() for p in programs):
        log.info("test programs: cached in %s", out_dir)
        return out_dir, key
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{key[:16]}."))
    try:
        for program in programs:
            log.info("compiling %s", program.source.name)
            compile_program(program, tmp_dir / program.name)
        tmp_dir.chmod(0o755)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir, key
