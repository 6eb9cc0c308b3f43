"""Where Envoy and its longform workers meet (longform.socket_dir): Unix sockets in a directory
only the gateway's own user may enter, so no other process, on the host or in the pod, can hand
a worker a recording or send a piece past admission (the kernel checks who connects)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class SocketDirProblem(Exception):
    """The directory exists but others could reach or replace its sockets."""


def ensure_private(path: str | Path) -> Path:
    """`path`, made (with its parents) if missing, mode 0700; refused if it is not a directory of
    this user's (a link included) or if anyone else may enter it."""
    folder = Path(path)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    found = os.lstat(folder)
    if not stat.S_ISDIR(found.st_mode):
        raise SocketDirProblem(f"longform.socket_dir {folder} is not a directory (a link or a file): "
                               "remove it or name another")
    if found.st_uid != os.geteuid():
        raise SocketDirProblem(f"longform.socket_dir {folder} belongs to user {found.st_uid}, not to this one "
                               f"({os.geteuid()}), who could reach or replace the sockets in it: remove it or name another")
    if found.st_mode & 0o077:
        raise SocketDirProblem(f"longform.socket_dir {folder} may be entered by others (mode "
                               f"{stat.S_IMODE(found.st_mode):o}): `chmod 700 {folder}` or name another")
    return folder
