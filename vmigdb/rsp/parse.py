"""Argument parsing shared by the packet handlers: every failure is a `PacketError` (E16).

A `ValueError` from deeper down is not a malformed packet but a bug; so the codec's errors are
caught here, where a packet's text is decoded, and nowhere else.
"""

from __future__ import annotations

from vmigdb.rsp.errors import PacketError
from vmigdb.wire import codec


def hex_number(text: bytes) -> int:
    """1-16 hex digits, as RSP writes numbers."""
    try:
        return codec.parse_hex_number(text)
    except ValueError as exc:
        raise PacketError(str(exc)) from None


def addr_len(text: bytes) -> tuple[int, int]:
    """`ADDR,LENGTH`."""
    addr, sep, length = text.partition(b",")
    if not sep:
        raise PacketError("expected ADDR,LENGTH")
    return hex_number(addr), hex_number(length)


def thread_id(text: bytes) -> int:
    """GDB thread ids: -1 all, 0 any, N; the multiprocess form pP.T is accepted too."""
    if text.startswith(b"p"):
        _, _, text = text[1:].partition(b".")
        if not text:
            return -1
    if text == b"-1":
        return -1
    return hex_number(text)


def hex_data(text: bytes) -> bytes:
    """Bytes written as hex digits, two per byte."""
    try:
        return codec.decode_hex(text)
    except ValueError as exc:
        raise PacketError(str(exc)) from None


def binary_data(text: bytes) -> bytes:
    """Bytes written with `}` escapes (X packets)."""
    try:
        return codec.unescape_binary(text)
    except ValueError as exc:
        raise PacketError(str(exc)) from None
