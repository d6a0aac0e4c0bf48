"""Choose QEMU's accelerator.

A readable ``/dev/kvm`` is not proof that KVM can run a normal guest: some hosts (this project's CI
included) expose ``/dev/kvm`` from a paravirtual module that cannot, and lack the ``vmx``/``svm``
CPU flag. So "auto" picks KVM only when both the CPU flag and a read-write ``/dev/kvm`` are there.
"""

from __future__ import annotations

import logging
import os

from vmigdb.errors import SetupError

log = logging.getLogger("vmigdb.hv.qemu")

ACCELS = ("auto", "tcg", "kvm")
KVM_DEVICE = "/dev/kvm"


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def host_has_hw_virt(cpuinfo_text: str | None = None) -> bool:
    """True if the CPU flags (``/proc/cpuinfo``, or the text given) include ``vmx`` or ``svm``."""
    text = _read_cpuinfo() if cpuinfo_text is None else cpuinfo_text
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            flags = value.split()
            if "vmx" in flags or "svm" in flags:
                return True
    return False


def kvm_device_usable(path: str = KVM_DEVICE) -> bool:
    """True if the KVM device can be opened read-write (what QEMU needs)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def resolve_accel(
    requested: str, *, cpuinfo_text: str | None = None, kvm_device: str = KVM_DEVICE
) -> str:
    """Map "auto"/"tcg"/"kvm" to the accelerator QEMU will be given ("tcg" or "kvm")."""
    if requested not in ACCELS:
        raise SetupError(f"unknown accelerator {requested!r}: use --accel auto, tcg or kvm")
    if requested == "tcg":
        return "tcg"
    hw_virt = host_has_hw_virt(cpuinfo_text)
    kvm_ok = kvm_device_usable(kvm_device)
    if requested == "kvm":
        if not hw_virt:
            raise SetupError(
                "KVM requested but this CPU has no vmx/svm flag (no hardware virtualization): "
                "use --accel tcg"
            )
        if not kvm_ok:
            raise SetupError(
                f"KVM requested but {kvm_device} cannot be opened read-write "
                "(load kvm_intel/kvm_amd or join the kvm group): use --accel tcg"
            )
        return "kvm"
    accel = "kvm" if hw_virt and kvm_ok else "tcg"
    log.debug("accel auto -> %s (vmx/svm=%s, %s usable=%s)", accel, hw_virt, kvm_device, kvm_ok)
    return accel
