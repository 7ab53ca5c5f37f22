"""Claim a conversion's output folder, write the result beside it, and move it into place atomically.

Guarantees, whatever happens to the process (an error, Ctrl-C, SIGKILL, a full disk):

* one conversion at a time per output: `.NAME.lock` beside the output folder `NAME` is held with an OS file lock
  (`flock`) while a conversion runs. The OS drops the lock when the process ends, however it ends, so a lock file
  that nobody holds is a leftover, never a running conversion (no pid guessing, no stale-lock timeouts);
* nothing half-written: a conversion writes into its work folder `.NAME.converting-XXXXXXXX/` (`source/` for a
  rewritten source checkpoint, `staging/` for the result) and moves `staging/` to `NAME` only when it is complete;
* a replaced folder is never lost: where the OS can swap two folders atomically (Linux `renameat2`), the new folder
  and the old one trade places in one step; elsewhere the old folder is first moved into the work folder
  (`previous/`), and a conversion killed between the two moves leaves it there;
* leftovers are cleaned up: a conversion that takes the lock of `NAME` removes the work folders that killed
  conversions to `NAME` left (none of them can be alive: it holds the lock), after moving a `previous/` folder back
  to `NAME` if `NAME` is missing. Each work folder holds a README saying what it is, for whoever finds it first.
"""

import ctypes
import errno
import glob
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

WORK_FOLDER_MARKER = ".converting-"

WORK_FOLDER_README = """The work folder of a sparse-llava conversion to {output} (in {parent}); if you find it while no conversion
is running, a conversion was killed. `staging/` holds its unfinished result. `previous/`, if present, is the folder
{output} held before: move it back to {output} if {output} is missing. The next conversion to {output} does exactly
that and removes this folder; or delete it yourself once no conversion to {output} is running.
"""


class OutputBusy(Exception):
    """Another process holds the lock of an output folder."""

    def __init__(self, output: Path, owner: str):
        super().__init__(f"{output} is being written by another conversion ({owner})")
        self.output, self.owner = output, owner


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


class OutputLock:
    """An exclusive OS lock on `.NAME.lock` beside `output`; the file says who holds it, for error messages."""

    def __init__(self, output: Path):
        self.output, self.path, self.fd = output, lock_path(output), None

    def acquire(self, wait: bool, on_wait=None) -> None:
        """Take the lock; if another process holds it, raise `OutputBusy`, or with `wait` block until it is free."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not _try_lock(fd):
                    if not wait:
                        raise OutputBusy(self.output, _describe_owner(fd))
                    if on_wait is not None:
                        on_wait(f"waiting for the conversion ({_describe_owner(fd)}) that is writing {self.output}")
                    _lock(fd)
                # The holder removes the file when it is done: if it did so while we waited, we hold a lock on a
                # file nobody else will ever open, so start again on the one now at the path.
                if _is_current_file(fd, self.path):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(owner).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        # Removed while still held, so that no other process takes a lock on a file that is about to disappear.
        try:
            os.unlink(self.path)
        except OSError:  # Windows cannot remove an open file; the next conversion reuses it
            pass
        os.close(self.fd)  # closing releases the lock
        self.fd = None


class WorkFolder:
    """A conversion's private folder beside its output (see the module docstring)."""

    def __init__(self, output: Path):
        self.output = output
        self.path = Path(tempfile.mkdtemp(prefix=f".{output.name}{WORK_FOLDER_MARKER}", dir=output.parent))
        (self.path / "README.txt").write_text(WORK_FOLDER_README.format(output=output.name, parent=output.parent))
        self.source = self.path / "source"  # a source checkpoint rewritten under the models' names
        self.processor = self.path / "processor"  # the processor files, read and checked before they are shipped
        self.staging = self.path / "staging"  # the result, moved to the output when complete
        self.previous = self.path / "previous"  # a replaced output, while two renames replace it
        for folder in (self.source, self.processor, self.staging):
            folder.mkdir()  # ordinary folders (mkdtemp's own is private to its owner), and staging/ is the result

    def install(self) -> None:
        """Move the finished `staging/` folder to the output, replacing what is there."""
        if not os.path.lexists(self.output):
            os.rename(self.staging, self.output)
            return
        if _exchange(self.staging, self.output):
            _remove(self.staging)  # now the previous output
            return
        os.rename(self.output, self.previous)
        try:
            os.rename(self.staging, self.output)
        except BaseException:
            os.rename(self.previous, self.output)  # put the previous folder back
            raise
        _remove(self.previous)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class ClaimedOutput:
    """A taken output folder (see `claim_output`): `with` it to get its `WorkFolder`; leaving releases everything."""

    def __init__(self, lock: OutputLock, work: WorkFolder):
        self.lock, self.work = lock, work

    def __enter__(self) -> WorkFolder:
        return self.work

    def __exit__(self, *exc_info) -> None:
        try:
            self.work.remove()
        finally:
            self.lock.release()


def claim_output(output: Path, wait: bool, report=print) -> ClaimedOutput:
    """
    Take `output` for one conversion: its lock (raise `OutputBusy` if another process holds it, or with `wait` wait
    for it), then clean up what killed conversions to it left, and make a fresh `WorkFolder`. Raises `OSError` when
    the parent folder cannot be written.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(output)
    lock.acquire(wait, on_wait=report)
    try:
        clean_up_leftovers(output, report)
        return ClaimedOutput(lock, WorkFolder(output))
    except BaseException:
        lock.release()
        raise


def clean_up_leftovers(output: Path, report=print) -> None:
    """
    Remove the work folders of killed conversions to `output` (call with its lock held: then none is alive), and
    first move a `previous/` folder back to `output` if `output` is missing (a replacement killed halfway).
    """
    for work in sorted(output.parent.glob(f".{glob.escape(output.name)}{WORK_FOLDER_MARKER}*")):
        if not work.is_dir() or work.is_symlink():
            continue
        previous = work / "previous"
        if previous.is_dir() and not os.path.lexists(output):
            os.rename(previous, output)
            report(f"restored {output}, which a killed conversion had moved aside to replace it")
        shutil.rmtree(work)
        report(f"removed {work.name}, left behind by a killed conversion to {output.name}")


# --- OS primitives --------------------------------------------------------------------------------------------


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _lock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    while not _try_lock(fd):
        time.sleep(0.5)


def _is_current_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _describe_owner(fd: int) -> str:
    # The holder writes who it is right after taking the lock: give it a moment if it has not yet.
    for _ in range(20):
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            owner = json.loads(os.read(fd, 4096) or b"{}")
            return f"pid {owner['pid']} on {owner['host']}, since {owner['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "owner unknown"


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step where the OS offers it (Linux renameat2); False if it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a kernel or filesystem without the exchange
        return False
    raise OSError(error, os.strerror(error), str(second))
