"""Errors of the Xen model: hypercall failures, domain crashes, and what the model does not do."""

from __future__ import annotations

import errno


class XenError(Exception):
    """A hypercall the model refuses as Xen does; `errno` is the positive errno Xen returns."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{errno.errorcode.get(code, code)}: {message}")
        self.errno = code


class DomainCrash(Exception):
    """What Xen would answer with domain_crash(): the guest is dead, the model stops it."""


class NotModelled(NotImplementedError):
    """A path real Xen/libvmi has and this model deliberately does not implement (named)."""
