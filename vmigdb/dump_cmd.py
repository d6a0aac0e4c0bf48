"""`vmigdb dump --image FILE [--regs FILE]`: serve a saved guest to GDB, read-only.

The file is a QEMU ELF dump (`monitor dump`, QMP ``dump-guest-memory``) or a raw physical image
(file offset = guest-physical address). libvmi's File driver reads its memory
(`vmigdb.hv.libvmi`); the registers come from the dump's notes, from ``--regs``, or, for a raw
image with neither, the kernel's own page tables are found in RAM (the guest layer's
`kernel_page_tables`, passed in from here: drivers do not know guest OSes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vmigdb.serve import ServeCommand, Target


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image",
        type=Path,
        required=True,
        metavar="FILE",
        help="a QEMU ELF dump (monitor dump, dump-guest-memory) or a raw physical memory image",
    )
    parser.add_argument(
        "--regs",
        type=Path,
        metavar="FILE",
        help="the vCPUs' registers as JSON (vmigdb-registers/1, see README); for an ELF dump it "
        "replaces the registers in its notes. Without it a raw image's kernel page tables are "
        "found in RAM",
    )


async def _open(args: argparse.Namespace) -> Target:
    from vmigdb.guest.registry import kernel_page_tables
    from vmigdb.hv.libvmi import DumpDriver

    # Synchronous on purpose: nothing else runs yet, and a ^C while the raw copy is being made
    # interrupts it here (the half-made copy is removed).
    driver = DumpDriver.open(args.image, registers=args.regs, locate_kernel=kernel_page_tables)

    async def close() -> None:
        driver.close()

    return Target(driver=driver, close=close, gone=lambda: "the dump went away", analyse_first=True)


DUMP = ServeCommand(
    "dump",
    "serve a saved guest (QEMU ELF dump or raw memory image) to GDB, read-only",
    _add_arguments,
    _open,
)
