"""Sans-I/O framing codec for the GDB Remote Serial Protocol.

Theory of operation: the owner of a socket hands received bytes to `Decoder.feed` and pulls
events out with `Decoder.next_event` (or `Decoder.events`) until it sees `NEED_DATA`. The
decoder never does I/O, never blocks and never looks at a clock, so the same code frames
traffic in both directions: GDB talking to vmigdb, and vmigdb talking to QEMU's gdbstub.

Outside a frame the single bytes ``+``, ``-`` and 0x03 are acks, nacks and interrupts; ``$``
and ``%`` open a packet or a notification; anything else is noise and is dropped. A frame is
``$payload#xx``. The decoder locates the ``#`` (and any restarting ``$``) with `bytes.find`,
verifies the checksum over the raw payload and expands run-length encoding only when a ``*``
is present, so the common packet costs a handful of C-level calls. Broken frames become
`Corrupt` events and decoding resynchronises at the next ``$``; nothing received can make
the decoder raise, and it never holds more than one frame (at most ``max_packet`` payload
bytes plus a few framing bytes) once drained.

Binary escapes (``}``) are left alone by the decoder: only some packets carry binary data,
and their handlers call `unescape_binary` themselves. Encoding is a pair of plain functions,
since producing a frame needs no state.
"""

from __future__ import annotations

import binascii
import enum
import re
import string
import zlib
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

__all__ = [
    "ACK",
    "INTERRUPT",
    "NACK",
    "NEED_DATA",
    "Ack",
    "Corrupt",
    "Decoder",
    "Event",
    "Interrupt",
    "Nack",
    "NeedData",
    "Notification",
    "Packet",
    "checksum",
    "decode_hex",
    "encode_hex",
    "encode_packet",
    "escape_binary",
    "unescape_binary",
]


class NeedData(enum.Enum):
    """Type of `NEED_DATA`; an enum member so type checkers narrow on ``is NEED_DATA``."""

    NEED_DATA = enum.auto()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Packet:
    """A ``$...#xx`` packet; `data` is run-length expanded but still binary-escaped."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Notification:
    """A ``%...#xx`` asynchronous notification (non-stop mode)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """``+``: the peer received our last packet intact."""


@dataclass(frozen=True, slots=True)
class Nack:
    """``-``: the peer wants our last packet again."""


@dataclass(frozen=True, slots=True)
class Interrupt:
    """0x03 outside a frame: GDB asks the target to stop (Ctrl-C)."""


@dataclass(frozen=True, slots=True)
class Corrupt:
    """A frame that could not be accepted; `raw` is what was discarded (capped if oversized)."""

    reason: str
    raw: bytes


ACK: Final = Ack()
NACK: Final = Nack()
INTERRUPT: Final = Interrupt()

Event: TypeAlias = Packet | Notification | Ack | Nack | Interrupt | Corrupt

_DOLLAR: Final = 0x24
_PERCENT: Final = 0x25
_PLUS: Final = 0x2B
_MINUS: Final = 0x2D
_CTRL_C: Final = 0x03
_RLE_BIAS: Final = 29
# Count characters are printable (' '..'~'), so a run adds 3..97 copies of the previous byte.
_RLE_MIN: Final = 0x20 - _RLE_BIAS
_RLE_MAX: Final = 0x7E - _RLE_BIAS
# An oversized frame is not kept whole in `Corrupt.raw`; a prefix is enough to recognise it.
_OVERSIZED_RAW: Final = 64

# Bytes that mean something between frames; everything else there is skipped in one search.
_SIGNIFICANT: Final = re.compile(rb"[+\-\x03$%]")
# Value of each byte as a hex digit, 0xFF when it is not one (a table beats int(x, 16),
# which would also accept signs, underscores and whitespace).
_HEX_VALUE: Final = bytes(
    int(chr(b), 16) if chr(b) in string.hexdigits else 0xFF for b in range(256)
)
_UNESCAPE: Final = re.compile(rb"\}(.?)", re.DOTALL)


_ADLER_MOD = 65521
_ADLER_CHUNK = 256  # 256 bytes of at most 255 each sum to 65280 < 65521: no modulo happens


def checksum(payload: bytes) -> int:
    """Modulo-256 sum of the payload bytes as transmitted.

    `sum()` walks a large payload byte by byte in Python objects (~1.2 ms for a 128 KiB `m`
    reply). zlib's Adler-32 keeps the plain byte sum (plus one) in its low half, computed in C;
    over chunks short enough never to reach Adler's modulus it is exactly the sum we need.
    """
    if len(payload) < 1024:
        return sum(payload) & 0xFF
    view = memoryview(payload)
    total = 0
    for start in range(0, len(payload), _ADLER_CHUNK):
        total += (zlib.adler32(view[start : start + _ADLER_CHUNK]) & 0xFFFF) - 1
    return total & 0xFF


def encode_packet(payload: bytes) -> bytes:
    """Frame `payload` as ``$payload#xx``; binary payloads must be escaped by the caller."""
    return b"$%b#%02x" % (payload, checksum(payload))


def escape_binary(data: bytes) -> bytes:
    """Escape ``# $ } *`` as ``}`` + (byte ^ 0x20), as GDB binary data requires."""
    # '}' first: the other replacements introduce '}' characters that must stay unescaped.
    return (
        bytes(data)
        .replace(b"}", b"}]")
        .replace(b"#", b"}\x03")
        .replace(b"$", b"}\x04")
        .replace(b"*", b"}\x0a")
    )


def _unescape_one(match: re.Match[bytes]) -> bytes:
    escaped = match[1]
    if not escaped:
        raise ValueError("binary data ends with a lone '}' escape")
    return bytes((escaped[0] ^ 0x20,))


def unescape_binary(data: bytes) -> bytes:
    """Undo `escape_binary` (any ``}x`` becomes x ^ 0x20); a trailing lone ``}`` is an error."""
    if b"}" not in data:
        return bytes(data)
    return _UNESCAPE.sub(_unescape_one, data)


def decode_hex(text: bytes) -> bytes:
    """Strictly decode hex digits (either case); odd length, spaces or other bytes raise."""
    try:
        return binascii.unhexlify(text)
    except binascii.Error as exc:  # a ValueError subclass, but say what was wrong
        raise ValueError(f"invalid hex data {bytes(text[:40])!r}: {exc}") from None


_HEX_NUMBER = re.compile(rb"[0-9a-fA-F]{1,16}")


def parse_hex_number(text: bytes) -> int:
    """A number as RSP writes it: 1-16 hex digits only (int() would also take signs, 0x, _ and
    spaces). Raises ValueError."""
    if not _HEX_NUMBER.fullmatch(text):
        raise ValueError(f"bad number {bytes(text[:20])!r}")
    return int(text, 16)


def encode_hex(data: bytes) -> bytes:
    """Lowercase hex digits, two per byte."""
    return binascii.hexlify(data)


def _expand_rle(raw: bytes) -> bytes | None:
    """Expand ``x*n`` runs; None if a ``*`` has no byte before it or no valid count after it."""
    out = bytearray()
    start = 0
    end = len(raw)
    while (star := raw.find(b"*", start)) >= 0:
        if star == 0 or star + 1 >= end:
            return None
        count = raw[star + 1] - _RLE_BIAS
        if not _RLE_MIN <= count <= _RLE_MAX:
            return None
        out += raw[start:star]
        out += out[-1:] * count
        start = star + 2
    out += raw[start:]
    return bytes(out)


class Decoder:
    """Turns a byte stream from either RSP peer into `Event`s; see the module docstring."""

    __slots__ = ("max_packet", "check_checksums", "_buf", "_pos", "_scanned", "_skipping")

    def __init__(self, max_packet: int = 0x20000 * 2 + 64, *, check_checksums: bool = True):
        #: Largest raw payload accepted; bigger frames become Corrupt("oversized").
        self.max_packet = max_packet
        #: When False, checksum digits must still be hex but their value is not compared
        #: (for peers in no-ack mode that do not bother). Verifying is the safe default.
        self.check_checksums = check_checksums
        self._buf = bytearray()
        self._pos = 0  # next unconsumed byte; a frame in progress starts here
        self._scanned = 0  # payload bytes of that frame already searched for '#' and '$'
        self._skipping = False  # discarding the rest of an oversized frame

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events (to watch memory use)."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Append received bytes; an empty `data` is harmless."""
        self._buf += data

    def events(self) -> list[Event]:
        """Every event decodable from the bytes fed so far."""
        out: list[Event] = []
        while (event := self.next_event()) is not NEED_DATA:
            out.append(event)
        return out

    def next_event(self) -> Event | Literal[NeedData.NEED_DATA]:
        """The next event, or `NEED_DATA` when the buffered bytes hold no complete one."""
        buf = self._buf
        end = len(buf)
        pos = self._pos
        while pos < end:
            if self._skipping:
                pos = self._skip_oversized(buf, pos, end)
                if self._skipping:
                    break
                continue
            byte = buf[pos]
            if byte == _DOLLAR or byte == _PERCENT:
                event = self._frame(buf, pos, end)
                if event is not NEED_DATA:
                    return event
                pos = self._pos
                break
            if byte == _PLUS:
                self._pos = pos + 1
                return ACK
            if byte == _MINUS:
                self._pos = pos + 1
                return NACK
            if byte == _CTRL_C:
                self._pos = pos + 1
                return INTERRUPT
            match = _SIGNIFICANT.search(buf, pos + 1)
            pos = end if match is None else match.start()
        # Drop consumed bytes now: what is left is at most one partial frame, and deleting a
        # bytearray's prefix only moves its start pointer.
        if pos:
            del buf[:pos]
        self._pos = 0
        return NEED_DATA

    def _skip_oversized(self, buf: bytearray, pos: int, end: int) -> int:
        """Discard an oversized frame's tail through ``#xx``, or up to a new ``$``."""
        hash_at = buf.find(b"#", pos)
        dollar = buf.find(b"$", pos, end if hash_at < 0 else hash_at)
        if dollar >= 0:
            self._skipping = False
            return dollar
        if hash_at < 0:
            return end
        if hash_at + 3 > end:
            return hash_at  # wait for the checksum digits
        self._skipping = False
        return _trailer_end(buf, hash_at)

    def _frame(self, buf: bytearray, start: int, end: int) -> Event | Literal[NeedData.NEED_DATA]:
        """Decode the frame opened at `start`, setting `_pos` past whatever it consumed."""
        scan = start + 1 + self._scanned
        hash_at = buf.find(b"#", scan)
        dollar = buf.find(b"$", scan, end if hash_at < 0 else hash_at)
        # Whatever comes first decides; checking the size first makes the outcome independent
        # of how the stream was split into feed() calls.
        first = dollar if dollar >= 0 else hash_at if hash_at >= 0 else end
        if first - start - 1 > self.max_packet:
            self._scanned = 0
            self._skipping = dollar < 0
            self._pos = first
            raw = bytes(buf[start : start + min(_OVERSIZED_RAW, self.max_packet + 2)])
            return Corrupt("oversized", raw)
        if dollar >= 0:
            self._scanned = 0
            self._pos = dollar
            return Corrupt("restarted", bytes(buf[start:dollar]))
        if hash_at < 0 or hash_at + 3 > end:
            self._scanned = (end if hash_at < 0 else hash_at) - start - 1
            self._pos = start
            return NEED_DATA
        self._scanned = 0
        hi = _HEX_VALUE[buf[hash_at + 1]]
        lo = _HEX_VALUE[buf[hash_at + 2]]
        if hi > 15 or lo > 15:
            stop = _trailer_end(buf, hash_at)
            self._pos = stop
            return Corrupt("bad checksum digits", bytes(buf[start:stop]))
        self._pos = hash_at + 3
        payload = bytes(buf[start + 1 : hash_at])
        if self.check_checksums and sum(payload) & 0xFF != hi << 4 | lo:
            return Corrupt("bad checksum", bytes(buf[start : hash_at + 3]))
        if b"*" in payload:
            expanded = _expand_rle(payload)
            if expanded is None:
                return Corrupt("bad run-length encoding", bytes(buf[start : hash_at + 3]))
            payload = expanded
        return Packet(payload) if buf[start] == _DOLLAR else Notification(payload)


def _trailer_end(buf: bytearray, hash_at: int) -> int:
    """End of the two checksum bytes after `hash_at`, stopping early at a ``$`` among them."""
    if buf[hash_at + 1] == _DOLLAR:
        return hash_at + 1
    if buf[hash_at + 2] == _DOLLAR:
        return hash_at + 2
    return hash_at + 3
