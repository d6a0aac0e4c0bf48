"""Scripted reversing sessions on a real GDB driving vmigdb (see `vmigdb.script.session`)."""

from vmigdb.script.asm import AssemblyError
from vmigdb.script.mi import GdbError, GdbTimeout
from vmigdb.script.server import Server, ServerError
from vmigdb.script.session import Session
from vmigdb.script.types import Breakpoint, Instruction, Mapping, Page, Process, Stop

__all__ = [
    "AssemblyError",
    "Breakpoint",
    "GdbError",
    "GdbTimeout",
    "Instruction",
    "Mapping",
    "Page",
    "Process",
    "Server",
    "ServerError",
    "Session",
    "Stop",
]
