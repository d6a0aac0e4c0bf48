"""Which QEMU this is, and what is known to be wrong with it.

QEMU 7.2's TCG single-step (`vCont;s` through its gdbstub) now and then leaves a vCPU's lazily
computed condition codes inconsistent: the vCPU's RFLAGS then holds the low half of a general
register (measured: RFLAGS 0xddbe6666 with RDI 0xffff89e2ddbe6630), reserved bits and VM set, and
the guest kernel dies of a double fault at its next interrupt. Measured on this project's 2-vCPU
guest by sending QEMU's gdbstub, with no vmigdb in between, the packets vmigdb sends for a
conditional breakpoint's false hits (Hg, g, vCont;s:N, vCont;c): the guest died in each of 3 runs
(after 6,160, 18,612 and 40,392 step-overs; single- and multi-threaded TCG alike). The same number
of stops without a step (0x03 then vCont;c, 69,244 times) never harmed it, nor did 70,659
step-overs on QEMU 10.0.2. So vmigdb says so at start on QEMU 7.2, and setup installs QEMU 10.

QEMU 7.2 with icount (instruction-counted guest time) hangs Debian's 6.1 kernel in some boots as
it brings up its second vCPU (after "x86: Booting SMP configuration:"). QEMU 10.0.2 boots the same
2-vCPU guests under icount (`icount_boots_smp`), so `--time auto` chooses icount for them there;
before 10 it puts icount on trial (trial.py).
"""

from __future__ import annotations

import re
import subprocess
from functools import lru_cache

STEP_CORRUPTS_FLAGS = (
    "QEMU {version}'s single-step corrupts a vCPU's RFLAGS about once in 20,000 steps (measured: "
    "3 guest deaths in 65,164 step-overs; none in 70,659 on QEMU 10.0.2): stepping and "
    "conditional breakpoints can crash the guest. Use QEMU 10 (scripts/setup installs it)"
)


# The first QEMU measured to boot SMP guests under icount (10.0.2: the demo's 2-vCPU 6.12 guest).
ICOUNT_SMP_SINCE = (10, 0, 0)


@lru_cache(maxsize=8)
def qemu_version(binary: str) -> tuple[int, int, int] | None:
    """(major, minor, micro) from `BINARY --version`, or None if it cannot be told."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def known_defects(version: tuple[int, int, int] | None) -> list[str]:
    """What is known to be wrong with this QEMU version, as one-line warnings."""
    if version is None or version >= (10, 0, 0):
        return []
    return (
        [STEP_CORRUPTS_FLAGS.format(version=version_text(version))] if version[:2] == (7, 2) else []
    )


def icount_boots_smp(version: tuple[int, int, int] | None) -> bool:
    """Whether this QEMU is known to boot a guest with several vCPUs under icount (None: unknown,
    so no)."""
    return version is not None and version >= ICOUNT_SMP_SINCE


def version_text(version: tuple[int, int, int] | None) -> str:
    """The version as text, e.g. "10.0.2"; "?" when it could not be told."""
    return ".".join(map(str, version)) if version else "?"
