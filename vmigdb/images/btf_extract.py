"""Take the kernel's BTF (its `.BTF` ELF section) out of a bzImage, at guest build time.

A bzImage (Documentation/x86/boot.rst) carries the kernel as a compressed ELF ``vmlinux``: its
setup header gives ``payload_offset`` / ``payload_length`` (protocol 2.08+), counted from the start
of the protected-mode code at ``(setup_sects + 1) * 512``. The payload's last four bytes are the
decompressed size (the build's ``size_append``).

Debian 12's 6.1 kernels are built with CONFIG_KERNEL_LZ4: the payload is an LZ4 *legacy* frame
(magic 0x184C2102, then independent blocks of at most 8 MiB, each prefixed by its compressed size).
Python's standard library has no LZ4, so `lz4_legacy_decompress` decodes LZ4 blocks itself (a whole
~50 MB vmlinux in about 1.5 s, once per kernel, cached). gzip, xz, lzma and bzip2 payloads use the
standard library; zstd (Python < 3.14 has no module for it) goes through the ``zstd`` command when
it is installed.

The result is cached next to the kernel as ``kernels/btf-<release>.bin``.
"""

from __future__ import annotations

import bz2
import logging
import lzma
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

from vmigdb.errors import VmigdbError
from vmigdb.guest.linux.btf import Btf, BtfError
from vmigdb.images import debian

LOG = logging.getLogger("vmigdb.images")

LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20  # every block but the last decompresses to exactly this much
MAX_VMLINUX = 1 << 30


class ExtractError(VmigdbError):
    """The kernel image has no BTF we can reach (unknown compression, no .BTF section, ...)."""


# ---- bzImage --------------------------------------------------------------------------------------


def bzimage_payload(image: bytes) -> bytes:
    """The compressed vmlinux inside a bzImage (with its 4-byte size trailer)."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise ExtractError("not a bzImage: no 'HdrS' setup header")
    version = struct.unpack_from("<H", image, 0x206)[0]
    if version < 0x208:
        raise ExtractError(f"boot protocol {version >> 8}.{version & 0xFF} has no payload fields")
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length < 8 or start + length > len(image):
        raise ExtractError(f"bzImage payload [{start:#x}, +{length:#x}) lies outside the file")
    return image[start : start + length]


# ---- decompressors --------------------------------------------------------------------------------


def lz4_block(src: bytes, limit: int = LZ4_LEGACY_BLOCK) -> bytearray:
    """Decode one raw LZ4 block (the LZ4 block format: token, literals, 2-byte offset, match)."""
    out = bytearray()
    i, n = 0, len(src)
    try:
        while i < n:
            token = src[i]
            i += 1
            literals = token >> 4
            if literals == 15:
                while True:
                    byte = src[i]
                    i += 1
                    literals += byte
                    if byte != 255:
                        break
            if literals:
                if i + literals > n:
                    raise IndexError
                out += src[i : i + literals]
                i += literals
            if i >= n:
                break  # the last sequence is literals only
            distance = src[i] | src[i + 1] << 8
            i += 2
            length = token & 15
            if length == 15:
                while True:
                    byte = src[i]
                    i += 1
                    length += byte
                    if byte != 255:
                        break
            length += 4
            start = len(out) - distance
            if distance == 0 or start < 0:
                raise ExtractError(f"LZ4 match distance {distance} reaches before the block")
            if distance >= length:
                out += out[start : start + length]
            else:  # overlapping match: the last `distance` bytes repeat
                out += (out[start:] * (length // distance + 1))[:length]
            if len(out) > limit:
                raise ExtractError("LZ4 block decodes to more than its size limit")
    except IndexError:
        raise ExtractError("LZ4 block is truncated") from None
    return out


def lz4_legacy_decompress(data: bytes) -> bytes:
    """Decode an LZ4 legacy frame (``lz4 -l``), stopping at trailing bytes that are not a block."""
    if len(data) < 4 or struct.unpack_from("<I", data)[0] != LZ4_LEGACY_MAGIC:
        raise ExtractError("not an LZ4 legacy frame")
    pos, out = 4, bytearray()
    while pos + 4 <= len(data):
        size = struct.unpack_from("<I", data, pos)[0]
        if size == LZ4_LEGACY_MAGIC:  # a concatenated frame
            pos += 4
            continue
        if pos + 4 + size > len(data):
            break  # the bzImage's 4-byte size trailer, or garbage: the frame has ended
        out += lz4_block(data[pos + 4 : pos + 4 + size])
        if len(out) > MAX_VMLINUX:
            raise ExtractError("LZ4 payload decodes to more than 1 GiB")
        pos += 4 + size
    return bytes(out)


def _zlib_stream(wbits: int) -> Callable[[bytes], bytes]:
    def decompress(data: bytes) -> bytes:
        return zlib.decompressobj(wbits).decompress(data, MAX_VMLINUX)

    return decompress


def _lzma_stream(fmt: int) -> Callable[[bytes], bytes]:
    def decompress(data: bytes) -> bytes:
        return lzma.LZMADecompressor(fmt).decompress(data, MAX_VMLINUX)

    return decompress


def _bz2(data: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(data, MAX_VMLINUX)


def _zstd(data: bytes) -> bytes:
    tool = shutil.which("zstd")
    if tool is None:
        raise ExtractError("the kernel is zstd-compressed and the 'zstd' command is not installed")
    # -c to stdout; the bzImage's 4-byte size trailer is cut off by the caller
    done = subprocess.run([tool, "-dcq"], input=data, capture_output=True, check=False)
    if done.returncode != 0 or not done.stdout:
        raise ExtractError(f"zstd failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


# Magic -> (name, decompressor). Order matters only for the magic scan fallback.
FORMATS: list[tuple[bytes, str, Callable[[bytes], bytes]]] = [
    (b"\x02\x21\x4c\x18", "lz4", lz4_legacy_decompress),
    (b"\x1f\x8b\x08", "gzip", _zlib_stream(31)),
    (b"\xfd7zXZ\x00", "xz", _lzma_stream(lzma.FORMAT_XZ)),
    (b"\x28\xb5\x2f\xfd", "zstd", _zstd),
    (b"\x5d\x00\x00", "lzma", _lzma_stream(lzma.FORMAT_ALONE)),
    (b"BZh", "bzip2", _bz2),
]


def decompress_payload(payload: bytes) -> tuple[str, bytes]:
    """(compression name, vmlinux ELF bytes) of a bzImage payload."""
    body = payload[:-4]  # drop the size trailer
    expected = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    for magic, name, decompress in FORMATS:
        if body.startswith(magic):
            try:
                elf = decompress(body)
            except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as e:
                raise ExtractError(f"{name} payload does not decompress: {e}") from e
            if len(elf) != expected:
                LOG.debug("%s payload: %d bytes, trailer says %d", name, len(elf), expected)
            return name, elf
    raise ExtractError(f"unknown kernel compression (payload starts {payload[:6].hex()})")


# ---- ELF --------------------------------------------------------------------------------------


def elf_section(elf: bytes, wanted: str) -> bytes:
    """The contents of a named section of a 64-bit little-endian ELF file."""
    if elf[:4] != b"\x7fELF" or len(elf) < 64:
        raise ExtractError("the decompressed kernel is not an ELF file")
    if elf[4] != 2 or elf[5] != 1:
        raise ExtractError("only 64-bit little-endian ELF kernels are supported")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if shentsize < 64 or shoff + shnum * shentsize > len(elf) or shstrndx >= shnum:
        raise ExtractError("ELF section headers lie outside the file")

    def header(index: int) -> tuple[int, int, int, int]:
        name, kind, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + index * shentsize
        )
        return name, kind, offset, size

    _, _, names_at, names_size = header(shstrndx)
    for index in range(shnum):
        name_off, kind, offset, size = header(index)
        end = elf.find(b"\0", names_at + name_off, names_at + names_size)
        if elf[names_at + name_off : end] == wanted.encode():
            if kind == 8 or offset + size > len(elf):  # SHT_NOBITS, or cut short
                raise ExtractError(f"ELF section {wanted} has no contents in the file")
            return elf[offset : offset + size]
    raise ExtractError(f"the kernel has no {wanted} section (CONFIG_DEBUG_INFO_BTF not set?)")


# ---- entry points -----------------------------------------------------------------------------


def extract_btf(vmlinuz: Path, log: logging.Logger = LOG) -> bytes:
    """The raw BTF blob of a bzImage kernel, checked to parse.

    :raises ExtractError: if any step fails (the message says which)
    """
    payload = bzimage_payload(vmlinuz.read_bytes())
    compression, elf = decompress_payload(payload)
    log.debug("kernel %s: %s-compressed, vmlinux %d bytes", vmlinuz.name, compression, len(elf))
    blob = elf_section(elf, ".BTF")
    try:
        Btf.parse(blob)
    except BtfError as e:
        raise ExtractError(f".BTF section of {vmlinuz.name} does not parse: {e}") from e
    return blob


def btf_path(kernel_dir: Path, release: str) -> Path:
    return kernel_dir / f"btf-{release}.bin"


def cached_btf(vmlinuz: Path, release: str, log: logging.Logger = LOG) -> Path | None:
    """``kernels/btf-<release>.bin`` next to the kernel, extracted only when missing.

    Never fails the guest build: on any error it logs a warning and returns None.
    """
    path = btf_path(vmlinuz.parent, release)
    if path.is_file():
        log.info("kernel BTF %s: cached", release)
        return path
    try:
        blob = extract_btf(vmlinuz, log)
        debian.write_atomic(path, blob)
    except (ExtractError, OSError, MemoryError) as e:
        log.warning("no BTF for kernel %s, guest layouts will be unavailable: %s", release, e)
        return None
    log.info("kernel BTF %s: extracted %d bytes", release, len(blob))
    return path
