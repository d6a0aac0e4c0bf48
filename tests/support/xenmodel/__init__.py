"""An executing model of Xen + libvmi, for testing the Xen driver where no Xen host exists.

Use:
    host = XenHost()
    domain = host.create_domain("guest", build_demo_image(checksum=1))
    binding = model_binding(host)          # same shape as binding.real_binding()
    vmi = binding.libvmi.Libvmi("guest", binding.libvmi.INIT_DOMAINNAME |
                                binding.libvmi.INIT_EVENTS, mode=binding.libvmi.VMIMode.XEN,
                                partial=True)

Layers, bottom up (each file says which Xen or libvmi source it follows):
  machine.py   one Unicorn CPU (virtual-TLB mode) over machine memory; vCPUs are contexts
  paging.py    the guest page walk the "hardware" does
  p2m.py       host p2m + altp2m views: per-view gfn remapping and R/W/X, Xen's rules
  vcpu.py      a vCPU: exits (EPT violation, #BP/#DB intercept, CR/MSR writes, MTF), delivery
  domain.py    Xen's side: pause counts, monitor settings, vm_event ring, response handling
  lib_*.py     libvmi's C side (core, events, slat) over the domain, with libvmi's rules
  lib.py       `ModelLib`, the stand-in for the wheel's compiled `_libvmi.lib`
  binding.py   the wheel's own Python package loaded over `ModelLib` (real names and bugs)
  guest/       the keystone-assembled demo guest

Design of the views: Unicorn's physical space is machine memory, never guest-physical. Every
TLB fill walks the guest tables and then the vCPU's view, so remapping a gfn or restricting it
in one view is only a different answer to fills (and a TLB flush when it changes); translated
code is keyed by machine address, so a vCPU in the execute view runs the shadow frame's code
while one in view 0 runs the original, with no copying at view switch.

Limits (deliberate): guest time advances only inside listen (or `Domain.run`); the walk does
not set accessed/dirty bits and its own table reads are not EPT-checked; event delivery writes
the frame without EPT checks; no interrupts, timers, APIC, I/O, CPUID or descriptor-table
events; no W2X/RWX2N access conversions, fast single-step, emulation with supplied read data
or instruction bytes (these raise NotModelled); MTF treats hypervisor-emulated instructions as
Xen does (not a step) but SYSCALL, which the model emulates for Unicorn, as a native one.
"""

from tests.support.xenmodel.binding import LibvmiBinding, model_binding, real_binding
from tests.support.xenmodel.domain import Domain
from tests.support.xenmodel.errors import DomainCrash, NotModelled, XenError
from tests.support.xenmodel.guest import GuestImage, build_demo_image
from tests.support.xenmodel.host import XenHost

__all__ = [
    "Domain", "DomainCrash", "GuestImage", "LibvmiBinding", "NotModelled", "XenError",
    "XenHost", "build_demo_image", "model_binding", "real_binding",
]
