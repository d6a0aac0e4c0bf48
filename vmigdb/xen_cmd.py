"""`vmigdb xen --domain NAME`: serve a running Xen domain to GDB through libvmi (`vmigdb.serve`).

Run it in dom0, as root, for an HVM domain created with `altp2m = "external"` in its xl config.
"""

from __future__ import annotations

import argparse
import asyncio

from vmigdb.serve import ServeCommand, Target


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--domain", required=True, metavar="NAME", help="the domain's name (xl list)"
    )


async def _open(args: argparse.Namespace) -> Target:
    from vmigdb.hv.xen.binding import load_binding
    from vmigdb.hv.xen.driver import XenDriver

    binding = load_binding()
    driver = await asyncio.to_thread(XenDriver, binding, args.domain)

    async def close() -> None:
        await asyncio.to_thread(driver.close)

    return Target(
        driver=driver,
        close=close,
        run_at_start=True,  # the domain was running; opening it paused it
        gone=lambda: f"Xen domain {args.domain} went away",
    )


XEN = ServeCommand(
    "xen", "serve a running Xen domain (HVM, altp2m) through libvmi", _add_arguments, _open
)
