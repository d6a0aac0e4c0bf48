"""Errors shared by every layer.

`SetupError` is for what a user must fix before vmigdb can run (QEMU missing, a kernel path wrong, a port
taken): the CLI prints its message as one line and exits with status 2. Its message says the fix.
"""


class VmigdbError(Exception):
    """Base of vmigdb's own errors."""


class SetupError(VmigdbError):
    """Something outside vmigdb must change before it can run; the message says what and how."""
