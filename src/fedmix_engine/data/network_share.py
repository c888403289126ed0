"""Is a folder on a network file system (a hospital file server's NFS or SMB share)?

SQLite's WAL journal keeps its index in shared memory beside the database (the ``-shm`` file), which
only works when every process using the database runs on one machine: on a share that several
workstations open, WAL can corrupt the database. A site folder on a share therefore uses SQLite's
rollback journal, which relies only on file locks. Detected from the mount table on Linux, from
``mount``'s list on macOS (an SMB share under ``/Volumes``) and from the drive type on Windows; elsewhere
a folder is taken to be local.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

NETWORK_TYPES = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "ncpfs", "9p", "ceph", "glusterfs",
                           "lustre", "gpfs", "beegfs", "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs",
                           "fuse.s3fs", "fuse.rclone", "davfs", "fuse.davfs2", "afpfs", "webdav"})
MOUNT_TABLE = Path("/proc/self/mounts")
MACOS_MOUNT = "/sbin/mount"  # without arguments: one line per mount, "<device> on <point> (<type>, <options>)"
_MACOS_LINE = re.compile(r"^.+? on (?P<point>.+) \((?P<type>[^,()]+)[,)]")
ADVICE = "on a network share: annotate it from one workstation at a time"  # said by site info and Annotate


def mount_type(path: Path, table: str) -> str | None:
    """The file system type of the mount holding ``path`` (absolute, resolved), from a Linux mount table
    (``/proc/self/mounts`` lines: device, mount point with spaces as ``\\040``, type, …); None if none does."""
    mounts = []
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            point = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
            mounts.append((point, fields[2]))
    return _innermost(path, mounts)


def macos_mount_type(path: Path, listing: str) -> str | None:
    """The same from macOS's ``mount`` output (``//me@server/Radiology on /Volumes/Radiology (smbfs, nodev, …)``:
    the mount point as it is, spaces included)."""
    matches = (_MACOS_LINE.match(line) for line in listing.splitlines())
    return _innermost(path, [(m["point"], m["type"].strip()) for m in matches if m])


def _innermost(path: Path, mounts: list[tuple[str, str]]) -> str | None:
    """The type of the longest mount point that is ``path`` or one of its parents."""
    best, kind = -1, None
    for point, type_ in mounts:
        inside = path == Path(point) or Path(point) in path.parents
        if inside and len(point) > best:
            best, kind = len(point), type_
    return kind


def is_network_path(path: str | Path) -> bool:
    """Whether ``path`` (an existing folder) lies on a network share; False when it cannot be told."""
    path = Path(path).resolve()
    if sys.platform.startswith("linux"):
        try:
            return mount_type(path, MOUNT_TABLE.read_text()) in NETWORK_TYPES
        except OSError:
            return False
    if sys.platform == "darwin":
        try:
            listing = subprocess.run([MACOS_MOUNT], capture_output=True, text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return macos_mount_type(path, listing) in NETWORK_TYPES
    if os.name == "nt":
        if str(path).startswith("\\\\"):  # a UNC path: \\server\share
            return True
        import ctypes

        drive_remote = 4  # GetDriveTypeW's DRIVE_REMOTE: a mapped network drive
        return ctypes.windll.kernel32.GetDriveTypeW(path.anchor) == drive_remote
    return False
