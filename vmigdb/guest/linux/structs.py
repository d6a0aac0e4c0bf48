"""Reading kernel structures for the walkers (`tasks`, `modules`): BTF offsets and sizes, symbol
addresses, and the bound on list walks. Each failure is a `GuestError` naming what is missing."""

from __future__ import annotations

from vmigdb.guest.base import GuestError
from vmigdb.guest.linux.btf import Btf, BtfError
from vmigdb.guest.linux.guest import LinuxGuest

__all__ = ["MAX_LIST_ENTRIES", "field_offset", "field_size", "guest_btf", "symbol_address"]

MAX_LIST_ENTRIES = 100_000
"""Longest kernel list a walk follows before calling it corrupted (PID_MAX_LIMIT is 4M, but a
VM with more than 100k live tasks is not what vmigdb debugs)."""


def guest_btf(guest: LinuxGuest) -> Btf:
    """``guest.btf``. :raises GuestError: if the kernel has none (CONFIG_DEBUG_INFO_BTF=n)."""
    try:
        return guest.btf
    except BtfError as e:
        raise GuestError(f"kernel has no usable BTF: {e}") from None


def field_offset(btf: Btf, struct: str, path: str) -> int:
    """``offsetof(struct <struct>, <path>)`` from BTF.

    :raises GuestError: ``"BTF has no field task_struct.tasks"`` if the struct or field is absent.
    """
    try:
        return btf.offset_of(struct, path)
    except BtfError:
        raise GuestError(f"BTF has no field {struct}.{path}") from None


def field_size(btf: Btf, struct: str, path: str) -> int:
    """``sizeof(((struct <struct> *)0)-><path>)`` from BTF. :raises GuestError: if absent."""
    try:
        return btf.size_of(btf.member_type(struct, path))
    except BtfError:
        raise GuestError(f"BTF has no field {struct}.{path} (or it has no size)") from None


def symbol_address(guest: LinuxGuest, name: str) -> int:
    """Address of kernel symbol *name*. :raises GuestError: if kallsyms has no such symbol."""
    sym = guest.symbols.lookup(name)
    if sym is None:
        raise GuestError(f"kernel has no symbol {name!r}")
    return sym.address
