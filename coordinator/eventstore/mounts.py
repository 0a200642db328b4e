"""Which file system a path is on, from the kernel's table of mounts (Linux).

The file store does one thing on its event loop rather than on its threads (a lookup
that finds no log, ``filestore.py``), and only on a local file system: on a network or
FUSE file system a system call can block for as long as its server is away, and every
conversation of the node with it.
"""

from __future__ import annotations

import re
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
# Disks and memory: a stat or a short listing takes microseconds (or a disk read).
LOCAL = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "bcachefs", "tmpfs", "ramfs", "overlay"}
)
_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes space, tab, newline, \ as \ooo


def file_system(path: Path, mountinfo: str) -> str:
    """The type of the file system that the absolute, resolved ``path`` is on, read
    from ``mountinfo`` (the text of ``/proc/self/mountinfo``); '' when no mount holds it.
    Of mounts on the same point the last one listed is the one in effect."""
    found, kind = -1, ""
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if not sep or len(fields) < 5 or not after:
            continue
        point = Path(_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
        depth = len(point.parts)
        if depth >= found and (point == path or point in path.parents):
            found, kind = depth, after[0]
    return kind


def is_local(path: Path) -> bool:
    """Whether ``path`` is on a local disk or in memory (False where it cannot be told:
    no mount table, or a file system not in ``LOCAL``). Blocking I/O: call from a thread."""
    try:
        return file_system(path.resolve(), MOUNTINFO.read_text()) in LOCAL
    except OSError:
        return False
