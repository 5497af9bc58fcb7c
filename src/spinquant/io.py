"""Safe output: write to a temporary sibling, rename into place; never overwrite without being asked."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SpinQuantError


def user_path(text: str | Path) -> Path:
    """A path as the user typed it, `~` expanded; an unknown `~user` is an input error, not a crash."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # Path.expanduser: "Could not determine home directory"
        raise SpinQuantError(f"cannot expand {str(text)!r}: no such user's home folder; give the full path") from None


def check_writable(path: Path, overwrite: bool, directory: bool | None = None) -> None:
    """Refuse, before any work, an output that exists (without overwrite), is of the wrong kind, or cannot
    be created. `directory`: True for a folder output, False for a file, None when either is fine."""
    path = Path(path)
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise SpinQuantError(f"{path} is a device, pipe or socket, not a file or folder; choose an output path")
    if path.exists():
        if not overwrite:
            raise SpinQuantError(f"{path} already exists; choose another output path or pass --overwrite")
        if directory is not None and path.is_dir() != directory:
            have, want = ("a folder", "file") if path.is_dir() else ("a file", "folder")
            raise SpinQuantError(f"{path} is {have}, and --overwrite only replaces a {want} with a {want}; "
                                 f"choose a {want} path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise SpinQuantError(f"output folder {parent} does not exist; create it or choose another path")
    if not parent.is_dir():
        raise SpinQuantError(f"output folder {parent} is a file, not a folder; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpinQuantError(f"output folder {parent} is not writable; choose a writable location")


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it to `path`, on failure remove it.

    Without overwrite the final move is exclusive: something created at `path` meanwhile is never replaced
    (the run fails instead). Temporary names carry the writer's pid, so one left by a killed run (SIGKILL,
    power loss) is removed by the next write to the same path."""
    path = Path(path)
    check_writable(path, overwrite, directory)
    _remove_stale_temporaries(path)
    prefix = f".{path.name}.{os.getpid()}."
    try:
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as e:  # e.g. a read-only file system, or no space even for an empty entry
        raise SpinQuantError(f"could not write {path} ({e.strerror or e}); choose a writable location") from None
    # mkstemp/mkdtemp create private (0600/0700) entries; give the output the user's usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if directory else 0o666) & ~umask)
    try:
        yield tmp
        if overwrite and path.exists():
            # Move the old output aside first so a failed rename never leaves the user with nothing.
            old = path.with_name(f"{prefix}old.tmp")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        elif not _move_exclusive(tmp, path):
            _remove(tmp)
            raise SpinQuantError(f"{path} appeared while this run was writing it; it was left as it is: choose "
                                 "another output path or pass --overwrite")
    except SpinQuantError:
        _remove(tmp)
        raise
    except Exception as e:
        _remove(tmp)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # disk full, quota, I/O error
            raise SpinQuantError(f"could not write {path} ({_reason(e)}); free disk space or choose another "
                                 "location") from None
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit: clean up, then let it through
        _remove(tmp)
        raise


def _reason(e: Exception) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)  # safetensors: "Error while serializing: IoError(Os { code: 28, kind: StorageFull, ... })"
    if "code: 28" in text or "StorageFull" in text:
        return os.strerror(28)
    return text.splitlines()[0][:200] if text else type(e).__name__


def _move_exclusive(src: Path, dst: Path) -> bool:
    """Rename src to dst unless dst exists (False then), atomically where the OS allows: renameat2's
    RENAME_NOREPLACE on Linux; a hard link for files elsewhere; check-then-rename for folders there."""
    if _renameat2_noreplace(src, dst):
        return True
    if dst.exists() or dst.is_symlink():
        return False
    if src.is_dir():
        os.rename(src, dst)
        return True
    try:
        os.link(src, dst)  # fails if dst exists
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system
        if dst.exists():
            return False
        os.rename(src, dst)
        return True
    src.unlink()
    return True


def _renameat2_noreplace(src: Path, dst: Path) -> bool:
    """True when renamed; False when dst exists or the call is unavailable here (the caller tells which)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, noreplace = -100, 1
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        return False  # the caller's exists() check reports it
    if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM):  # old kernel, or a file system without the flag
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _remove_stale_temporaries(path: Path) -> None:
    """Remove `.<name>.<pid>.*.tmp` entries beside `path` whose writing process no longer runs."""
    try:
        siblings = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    except OSError:
        return
    for entry in siblings:
        pid = entry.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(entry)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
