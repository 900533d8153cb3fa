"""Files only root could have written: what rsttrace keeps in /run/rsttrace is loaded into the
kernel (programs) or compiled into it (struct offsets), so a file or directory someone else could
have changed is not used.

A path is walked from / one component at a time without following a symbolic link; the directory,
every directory above it and the file must be root's and not writable by group or others (a sticky
directory above, such as /tmp, is accepted: others cannot rename or remove root's entries there).
A refusal is said once per run, on stderr, and the cache is simply not used.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import sys
from typing import Callable

class Refused(Exception):
    """The cache directory or an entry is one that someone other than root could have written."""


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_said = False


def refuse(err: Refused) -> None:
    """Say why the cache is not used, once per run."""
    global _said
    if not _said:
        _said = True
        print(f"rsttrace: cache not used: {err}", file=sys.stderr, flush=True)


def check(st: os.stat_result, path: str, above: bool = False) -> None:
    if st.st_uid != 0:
        raise Refused(f"{path} belongs to uid {st.st_uid}, not root")
    if st.st_mode & 0o022 and not (above and st.st_mode & stat.S_ISVTX):
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit)
        raise Refused(f"{path} is writable by {who}")


def open_checked_directory(path: str, create: bool = False) -> int:
    """A descriptor of directory `path`, reached from / one component at a time without following
    a symbolic link, each component checked (_check). `create`: make what is missing, root's alone.
    Raises Refused, or OSError (FileNotFoundError where it does not exist)."""
    parts = [p for p in os.path.normpath(path).split("/") if p]
    fd = os.open("/", _DIRECTORY_FLAGS)
    try:
        check(os.fstat(fd), "/", above=bool(parts))
        walked = ""
        for i, name in enumerate(parts):
            walked += "/" + name
            try:
                next_fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
                next_fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=fd)
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                link = stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
                raise Refused(f"{walked} is {'a symbolic link' if link else 'not a directory'}") from None
            os.close(fd)
            fd = next_fd
            check(os.fstat(fd), walked, above=i < len(parts) - 1)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_directory(path: str, create: bool = False) -> int | None:
    """open_checked_directory(), or None where it does not exist, cannot be opened or is refused
    (said once)."""
    try:
        return open_checked_directory(path, create)
    except Refused as err:
        refuse(err)
    except OSError:
        pass
    return None


def read_json(path: str) -> dict | None:
    """The cache entry at `path` (JSON), if it is there and only root could have written it (check()); None otherwise."""
    dir_fd = open_directory(os.path.dirname(path))
    if dir_fd is None:
        return None
    try:
        # O_NONBLOCK: a FIFO put there would otherwise block the open (refused just after).
        fd = os.open(os.path.basename(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            refuse(Refused(f"{path} is a symbolic link"))
        return None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{path} is not a regular file")
        check(st, path)
        with os.fdopen(fd, "rb", closefd=False) as f:
            entry = json.load(f)
        try:
            os.utime(fd)           # recently used: kept by _prune
        except OSError:
            pass
        return entry if isinstance(entry, dict) else None
    except Refused as err:
        refuse(err)
        return None
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def write_json(path: str, entry: dict, after: Callable[[int], None] | None = None) -> bool:
    """Keep `entry` at `path`, root's alone, in a directory that passes the same checks as for
    reading (made where missing); False where it cannot be. `after(dir_fd)` runs in that directory."""
    dir_fd = open_directory(os.path.dirname(path), create=True)
    if dir_fd is None:
        return False
    name = os.path.basename(path)
    tmp = f"{name}.{os.getpid()}"
    try:
        try:
            os.unlink(tmp, dir_fd=dir_fd)      # left by an earlier run with this pid
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if after is not None:
            after(dir_fd)        # e.g. pruning, in the directory checked
    except OSError:
        return False
    finally:
        os.close(dir_fd)
    return True


