"""One job per dump folder: a lock file held for the job's life.

Two jobs writing one ``job.dump_folder`` corrupt each other silently: each save deletes every
``*.tmp`` checkpoint folder (the other job's in-flight save too), a second job resumes from a
checkpoint the first is still running past, and both rewrite ``metrics.jsonl``. Rank 0 takes an
exclusive POSIX record lock (``fcntl.lockf``, ``F_SETLK``) on ``<dump_folder>/train.lock``
before anything touches the folder and keeps the file open until the process ends; the kernel
releases the lock when the process dies, however it dies, so a crash never leaves a stale lock.
The file's text names the holder (host, pid, parent pid, start time, Slurm job) for the
refusal message; it is informational only (the lock is what counts).

POSIX record locks rather than ``flock``: they work on NFS (through the NFS lock manager) and
Lustre mounted with ``flock``, and a forked child does not inherit them (a ``flock`` lock held by
a forked helper process would outlive the job). Their one pitfall, that closing any descriptor
of the file in the holding process releases the lock, is avoided by never opening the file
elsewhere in the process.
"""

import contextlib
import datetime
import errno
import fcntl
import os
import socket
from dataclasses import dataclass

LOCK_FILE = "train.lock"

# errno values of a file system that does not support locks (some FUSE mounts, NFS without
# a lock manager): the run goes on with a warning rather than not at all.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@dataclass
class FolderLock:
    """An acquired lock (see ``acquire``): keep the object alive for the job's life.

    Attributes:
        folder: the locked folder.
        fd: the open lock file (closing it releases the lock).
    """

    folder: str
    fd: int

    def release(self) -> None:
        """Empty the holder text and release the lock (a process exit does the same, less the
        emptying)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = -1


class FolderInUse(Exception):
    """Another live process holds the lock of ``folder``.

    Attributes:
        folder: the folder.
        holder: the holder's own description (host, pid, start time), or a placeholder when
            the file holds none yet.
    """

    def __init__(self, folder: str, holder: str) -> None:
        super().__init__(f"{folder} is in use by another job ({holder})")
        self.folder, self.holder = folder, holder


class LocksUnsupported(Exception):
    """The file system of ``folder`` refuses file locks (``reason``: the OS error)."""

    def __init__(self, folder: str, reason: str) -> None:
        super().__init__(f"{folder}: file locks are not supported here ({reason})")
        self.folder, self.reason = folder, reason


def holder_description() -> str:
    """This process as the lock's holder: host, pid, parent pid (torchrun's under torchrun),
    UTC start time and the Slurm job id when there is one."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    text = f"pid {os.getpid()} on host {socket.gethostname()}, parent pid {os.getppid()}"
    slurm = os.environ.get("SLURM_JOB_ID")
    if slurm:
        text += f", Slurm job {slurm}"
    return f"{text}, since {now}"


def acquire(folder: str) -> FolderLock:
    """Create ``folder`` if needed and take the exclusive lock of ``<folder>/train.lock``
    without waiting; write this process's description into it.

    Raises:
        FolderInUse: another process holds it (its description in the message).
        LocksUnsupported: the file system does not support locks.
        OSError: the folder or the file cannot be created or opened (permissions, read-only
            file system).
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            holder = _read(fd).strip() or "its holder has not written its name yet"
            os.close(fd)
            raise FolderInUse(folder, holder) from None
        os.close(fd)
        if e.errno in _NO_LOCKS:
            raise LocksUnsupported(folder, e.strerror or str(e)) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder_description() + "\n").encode(), 0)
    return FolderLock(folder, fd)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return ""
