"""Safe output: write to a temporary sibling, rename into place; never overwrite without being asked."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SpinQuantError


def check_writable(path: Path, overwrite: bool, directory: bool | None = None) -> None:
    """Refuse, before any work, an output that exists (without overwrite), is of the wrong kind, or cannot
    be created. `directory`: True for a folder output, False for a file, None when either is fine."""
    path = Path(path)
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
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure remove it."""
    path = Path(path)
    check_writable(path, overwrite, directory)
    try:
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
        if path.exists():  # only reachable with overwrite=True
            # Move the old output aside first so a failed rename never leaves the user with nothing.
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise SpinQuantError(f"could not write {path} ({e.strerror or e}); free disk space or choose another "
                             "location") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
