"""Errors shared by every layer.

`SetupError` is for what a user must fix before vmigdb can run (QEMU missing, a kernel path wrong, a port
taken): the CLI prints its message as one line and exits with status 2. Its message says the fix.
"""

from __future__ import annotations

import logging


class VmigdbError(Exception):
    """Base of vmigdb's own errors."""


class SetupError(VmigdbError):
    """Something outside vmigdb must change before it can run; the message says what and how."""


INTERNAL_ERROR = "internal error"  # how every bug's log line starts: tests and users look for it


def log_internal_error(log: logging.Logger, what: str, exc: BaseException) -> None:
    """Log `exc` as a bug in vmigdb (not a bad request, not a refusal), with its traceback.

    Every layer that turns an unexpected exception into an answer (an `Eff` reply, a reported stop)
    says so through here, so a bug is never mistaken for a malformed packet and the fuzz tests can
    see each one.
    """
    log.error("%s %s: %s: %s", INTERNAL_ERROR, what, type(exc).__name__, exc, exc_info=exc)
