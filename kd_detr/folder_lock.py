"""The one folder lock of kd-detr: an exclusive, non-blocking ``flock`` on ``<folder>/.lock``.

Used by training runs (:class:`kd_detr.engine.checkpointing.OutputDirLock`, the output dir) and by teacher
caches (:class:`kd_detr.teacher.cache.lock.CacheLock`, the cache folder). The lock file holds the holder's
pid; the kernel drops the lock when the holder exits (a crash leaves no stale lock).

The lock file is opened without following symbolic links (``O_NOFOLLOW``) and must be a regular file with a
single name: the holder truncates it and writes its pid into it, so a ``.lock`` that is a link (symbolic or
hard) to another file would destroy that file, and a dangling link would create its target. Such a ``.lock``
is refused with :class:`LockFileRefused`, one line naming it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from kd_detr.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "FolderLock", "FolderLockError", "LockBusy", "LockFileRefused", "LockUnsupported"]

LOCK_NAME = ".lock"

# O_NONBLOCK: opening a FIFO planted as .lock must not hang (it has no effect on a regular file)
_OPEN_FLAGS = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_NONBLOCK", 0))


class FolderLockError(UserError, OSError):
    """The folder's lock could not be taken (base class)."""


class LockBusy(FolderLockError):
    """Another process holds the lock; ``holder`` is the pid it wrote (``"unknown"`` if none)."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


class LockFileRefused(FolderLockError):
    """The ``.lock`` is not a plain regular file (a symbolic or hard link, a folder, a FIFO, ...)."""


class LockUnsupported(FolderLockError):
    """The lock file could not be locked (a file system without ``flock``). (A lock file that cannot be
    created raises the base class.)"""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse(path: Path, what: str) -> LockFileRefused:
    return LockFileRefused(f"refusing the lock file {path}: it is {what}, and taking the lock would write into it; "
                           f"a lock file must be a regular file: remove {path} and run again")


def _open_lock_file(path: Path) -> int:
    """``os.open`` of ``path`` for the lock, never through a link; :class:`LockFileRefused` for anything but a
    regular file with one name."""
    try:
        fd = os.open(path, _OPEN_FLAGS, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno in (errno.EISDIR, errno.ENXIO, errno.EOPNOTSUPP) and path.is_symlink()):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise _refuse(path, f"a symbolic link (to {target})") from None
        if e.errno == errno.EISDIR:
            raise _refuse(path, "a folder") from None
        if e.errno == errno.ENXIO:  # a socket, or a FIFO without reader on some systems
            raise _refuse(path, _kind(os.lstat(path).st_mode)) from None
        raise FolderLockError(f"cannot create the lock file {path}: {e.strerror or e}: check the permissions of "
                              f"{path.parent}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, _kind(st.st_mode))
        if st.st_nlink != 1:
            raise _refuse(path, f"a hard link (one of {st.st_nlink} names of one file)")
    except BaseException:
        os.close(fd)
        raise
    return fd


class FolderLock:
    """Exclusive, non-blocking ``flock`` on ``<folder>/.lock`` (the folder must exist).

    :meth:`acquire` raises :class:`LockBusy` while another process (or another open of this process) holds it,
    :class:`LockFileRefused` for a ``.lock`` that is not a regular file, :class:`LockUnsupported` when the file
    system cannot lock it, :class:`FolderLockError` when the file cannot be created. On a system without
    ``fcntl`` it takes no lock (``locked`` stays False).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        if self._fd is not None or fcntl is None:
            return self
        while True:
            fd = _open_lock_file(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                try:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                except OSError:
                    holder = "unknown"
                finally:
                    os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LockBusy(f"{self.path} is locked by pid {holder}", holder) from None
                raise LockUnsupported(f"cannot lock {self.path}: {e.strerror or e} (the file system may not "
                                      "support locks)") from None
            # The holder before us may have removed or replaced the file on release: lock the one in place
            # (opened again through the same checks).
            try:
                st = os.stat(self.path, follow_symlinks=False)
                same = st.st_ino == os.fstat(fd).st_ino and st.st_dev == os.fstat(fd).st_dev
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self, remove_file: bool = False) -> None:
        """Empty the file (no pid of a finished holder stays behind), optionally remove it, then unlock.
        Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            if remove_file:
                self.path.unlink(missing_ok=True)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
