"""File names the way the kernel prints them (``d_path()``), read out of guest memory.

A ``struct path`` is a mount and a dentry. Its name is built from the dentry up: each dentry's
``d_name`` until the mount's root (``vfsmount.mnt_root``), then the same from the dentry the mount
is mounted on (``mount.mnt_mountpoint``) in the parent mount (``mount.mnt_parent``), until a mount
that is its own parent (the root of the namespace). That is ``prepend_path()`` in fs/d_path.c;
names are relative to the global root, as for a process whose root is ``/``. A file whose dentry
has been unlinked reads ``NAME (deleted)``, as in /proc/PID/maps.

Offsets come from BTF; a walk deeper than `MAX_DEPTH` components is taken for a corrupted chain.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmigdb.guest.base import GuestError
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.structs import field_offset, guest_btf

__all__ = ["file_path", "path_name"]

MAX_DEPTH = 256
_CACHE_KEY = "dpath.layout"
_MAX_NAME = 255  # NAME_MAX


@dataclass(frozen=True, slots=True)
class _Layout:
    file_path: int  # file.f_path
    path_mnt: int  # path.mnt
    path_dentry: int  # path.dentry
    d_name_len: int  # dentry.d_name.len (u32)
    d_name_ptr: int  # dentry.d_name.name
    d_parent: int
    d_hash_pprev: int  # dentry.d_hash.pprev: NULL once the dentry is unhashed (unlinked)
    mnt_root: int  # vfsmount.mnt_root
    mount_mnt: int  # mount.mnt (struct vfsmount, embedded)
    mnt_parent: int  # mount.mnt_parent (struct mount *)
    mnt_mountpoint: int  # mount.mnt_mountpoint (struct dentry *)


def _layout(guest: LinuxGuest) -> _Layout:
    cached = guest.memory.cache.get(_CACHE_KEY)
    if cached is not None:
        return cached
    btf = guest_btf(guest)
    # qstr: union { struct { u32 hash; u32 len; }; u64 hash_len; }; const unsigned char *name
    d_name = field_offset(btf, "dentry", "d_name")
    layout = _Layout(
        file_path=field_offset(btf, "file", "f_path"),
        path_mnt=field_offset(btf, "path", "mnt"),
        path_dentry=field_offset(btf, "path", "dentry"),
        d_name_len=d_name + field_offset(btf, "qstr", "len"),
        d_name_ptr=d_name + field_offset(btf, "qstr", "name"),
        d_parent=field_offset(btf, "dentry", "d_parent"),
        d_hash_pprev=field_offset(btf, "dentry", "d_hash")
        + field_offset(btf, "hlist_bl_node", "pprev"),
        mnt_root=field_offset(btf, "vfsmount", "mnt_root"),
        mount_mnt=field_offset(btf, "mount", "mnt"),
        mnt_parent=field_offset(btf, "mount", "mnt_parent"),
        mnt_mountpoint=field_offset(btf, "mount", "mnt_mountpoint"),
    )
    guest.memory.cache[_CACHE_KEY] = layout
    return layout


def _name(guest: LinuxGuest, layout: _Layout, dentry: int) -> bytes:
    mem = guest.memory
    length = min(mem.u32(dentry + layout.d_name_len), _MAX_NAME)
    return mem.read(mem.u64(dentry + layout.d_name_ptr), length) if length else b""


def path_name(guest: LinuxGuest, vfsmount: int, dentry: int) -> str:
    """``d_path()`` of a ``struct path`` given as its two pointers.

    :raises GuestError: on a chain longer than `MAX_DEPTH` (corrupted)
    :raises FaultError: if a structure cannot be read
    """
    layout = _layout(guest)
    mem = guest.memory
    deleted = (
        dentry
        and not mem.u64(dentry + layout.d_hash_pprev)
        and (mem.u64(dentry + layout.d_parent) != dentry)
    )
    parts: list[bytes] = []
    mount = vfsmount - layout.mount_mnt  # real_mount(): container_of(vfsmount, mount, mnt)
    for _ in range(MAX_DEPTH):
        root = mem.u64(mount + layout.mount_mnt + layout.mnt_root)
        parent = mem.u64(dentry + layout.d_parent)
        if dentry == root or dentry == parent:
            upper = mem.u64(mount + layout.mnt_parent)
            if upper == mount or not upper:
                break  # the namespace's root
            dentry = mem.u64(mount + layout.mnt_mountpoint)
            mount = upper
            continue
        parts.append(_name(guest, layout, dentry))
        dentry = parent
    else:
        raise GuestError(f"path of dentry {dentry:#x}: more than {MAX_DEPTH} components")
    text = "/" + "/".join(p.decode("utf-8", "replace") for p in reversed(parts))
    return text + " (deleted)" if deleted else text


def file_path(guest: LinuxGuest, file: int) -> str:
    """``d_path(&file->f_path)``. :raises GuestError, FaultError:"""
    layout = _layout(guest)
    mem = guest.memory
    where = file + layout.file_path
    return path_name(guest, mem.u64(where + layout.path_mnt), mem.u64(where + layout.path_dentry))
