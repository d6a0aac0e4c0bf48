"""libvmi-backed drivers. Today: saved guests (QEMU ELF dumps, raw physical images) read through
libvmi's File driver. `DumpDriver` is the driver; `open_image` the reader behind it."""

from vmigdb.hv.libvmi.driver import DUMP_CAPABILITIES, DumpDriver
from vmigdb.hv.libvmi.elfcore import DumpFormatError
from vmigdb.hv.libvmi.image import DumpImage, KernelLocator, open_image

__all__ = [
    "DUMP_CAPABILITIES",
    "DumpDriver",
    "DumpFormatError",
    "DumpImage",
    "KernelLocator",
    "open_image",
]
