"""Guest programs for the Xen model: x86-64 images assembled with keystone.

`build_demo_image()` is the one image the model tests (and the Xen driver tests) run: long mode with
4-level page tables, a GDT/TSS/IDT whose #BP and #DB handlers count, two kernel-mode vCPU programs,
a user-mode routine run in two address spaces, and feature switches in its data page.
"""

from tests.support.xenmodel.guest.image import GuestImage, Symbol, VcpuInit, build_demo_image

__all__ = ["GuestImage", "Symbol", "VcpuInit", "build_demo_image"]
