"""The one way apactl writes anything a user keeps: all or nothing.

A folder is filled under a hidden temporary sibling ``.<name>.tmp-<pid>`` and renamed into place;
an existing folder is first renamed to ``.<name>.old-<pid>`` and deleted only after the swap. A
SIGKILL at any moment therefore leaves the old folder or the new one whole, plus at most a stray
temporary, which the next write of the same name (or ``clean_dead_temps``) removes once the
process that made it is gone. Files go through a temporary file and ``os.replace``.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the renames) to disk; best effort on filesystems that refuse."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp(dest: Path, tag: str) -> Path:
    return dest.with_name(f".{dest.name}.{tag}-{os.getpid()}")


def clean_dead_temps(parent: Path, name: str = "*") -> None:
    """Delete ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` left by processes that are gone."""
    if not parent.is_dir():
        return
    for p in list(parent.glob(f".{name}.tmp-*")) + list(parent.glob(f".{name}.old-*")):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def write_folder(dest: str | Path, write: Callable[[Path], None],
                 exist: Literal["replace", "keep"] = "replace") -> Path:
    """Fill a temporary folder with ``write(tmp)``, then put it at ``dest`` by renames.

    ``exist="keep"``: if ``dest`` appeared meanwhile (another process made the same cache entry)
    keep that one and drop ours.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_dead_temps(dest.parent, dest.name)
    tmp = _temp(dest, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _disk_full_is_oserror(write, tmp)
        fsync_dir(tmp)
        if dest.exists() and exist == "keep":
            return dest
        _swap(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(dest.parent)
    return dest


def _disk_full_is_oserror(write: Callable[[Path], None], tmp: Path) -> None:
    """Run ``write(tmp)``; a failed write on a full disk is an ``OSError(ENOSPC)`` whatever the
    writer raised (torch.save says ``[enforce fail at inline_container.cc] ... unexpected pos``,
    which never mentions the disk)."""
    try:
        write(tmp)
    except RuntimeError as exc:
        free = shutil.disk_usage(tmp).free
        if "unexpected pos" in str(exc) or "write" in str(exc).lower() and free < 64 * 2**20:
            raise OSError(errno.ENOSPC, f"no space left on the device ({free // 2**20} MiB "
                          "free)", str(tmp.parent)) from exc
        raise


def _swap(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; between the two renames both versions exist whole."""
    old = None
    if dest.exists():
        old = _temp(dest, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        if old is not None and not dest.exists():
            os.replace(old, dest)  # put the old version back rather than leave nothing
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_file(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file: readers see old or new, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
