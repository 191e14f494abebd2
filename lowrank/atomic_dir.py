"""Write a folder of files all at once: a staging folder beside it, swapped in when complete.

A reader of the target folder sees either the previous complete contents or the new complete
contents, never a mix: the files are written into a fresh private folder next to the target,
which then takes the target's place in one ``rename`` (an atomic exchange where the system has
one). A failed, interrupted or killed run leaves the target as it was; stale files of an older
run cannot survive, because the folder is replaced whole. Of two runs into the same folder, the
last one to finish wins. Symbolic links are never followed: the target may not be one, and
nothing is written outside the fresh staging folder.

Replacing a folder deletes what it held, so only folders that look like what we write (empty,
or regular files with the given names and suffixes) are replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["OutputDirError", "check_target", "staged"]

_STAGING_TAG = ".lowrank-staging-"


class OutputDirError(ValueError):
    """The output folder cannot be written or replaced (the message is one line)."""


def _replaceable(path: Path, names: frozenset[str], suffixes: frozenset[str]) -> str | None:
    """``None`` when ``path`` (an existing folder) may be replaced, else why not."""
    entries = list(os.scandir(path))
    for entry in entries:
        if not entry.is_file(follow_symlinks=False):
            return f"it holds {entry.name!r}, which is not a plain file"
        if entry.name not in names and Path(entry.name).suffix not in suffixes:
            return f"it holds {entry.name!r}, which this program does not write"
    return None


def check_target(
    target: str | os.PathLike[str], *, names: frozenset[str], suffixes: frozenset[str]
) -> Path:
    """Validate an output folder before any work; return it as an absolute path.

    The folder may be missing (its parent must exist) or a folder of earlier output: only
    regular files, each one of ``names`` or ending in one of ``suffixes``.

    Raises:
        OutputDirError: a file, a symbolic link, a missing parent, a folder of other files, or
            a parent this process cannot write to.
    """
    path = Path(os.path.abspath(os.fspath(target)))
    shown = os.fspath(target)
    if path.is_symlink():
        raise OutputDirError(f"{shown!r} is a symbolic link; pass the folder it points to")
    if path.exists():
        if not path.is_dir():
            raise OutputDirError(f"{shown!r} is a file, not a folder")
        reason = _replaceable(path, names, suffixes)
        if reason is not None:
            raise OutputDirError(
                f"{shown!r} exists and is not an earlier report ({reason}); "
                "choose a new or empty folder"
            )
    parent = path.parent
    if not parent.is_dir():
        raise OutputDirError(f"the parent folder of {shown!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write into {str(parent)!r} (permission denied)")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_staging(target: Path) -> None:
    """Staging folders of runs that were killed (their process no longer exists)."""
    prefix = f".{target.name}{_STAGING_TAG}"
    for entry in os.scandir(target.parent):
        if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
            continue
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _publish(staging: Path, target: Path) -> None:
    """Put ``staging`` in ``target``'s place; the old contents are left for the caller to delete."""
    try:
        os.rename(staging, target)  # no target yet, or an empty folder
        return
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _exchange(staging, target):
        return  # the old contents are now in ``staging``
    # No atomic exchange on this system: two renames, restoring the old folder on failure.
    os.rename(target, _aside(staging))
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(_aside(staging), target)
        raise


def _aside(staging: Path) -> Path:
    return staging.with_name(staging.name + "-old")


@contextlib.contextmanager
def staged(
    target: str | os.PathLike[str], *, names: frozenset[str], suffixes: frozenset[str]
) -> Iterator[Path]:
    """A fresh folder to write into; it replaces ``target`` when the block ends without error.

    The staging folder is created at once (so a folder that cannot be written is found before
    any work) and removed, with everything in it, when the block raises.
    """
    path = check_target(target, names=names, suffixes=suffixes)
    _remove_dead_staging(path)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{path.name}{_STAGING_TAG}{os.getpid()}-", dir=path.parent)
    )
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, (stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO) & ~umask)
        check_target(target, names=names, suffixes=suffixes)  # still safe to replace?
        _publish(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(_aside(staging), ignore_errors=True)
