"""Files written whole or not at all, and their digests: the one module that writes a file through
a temp file and one rename, and that hashes files.

Every writer of a file a user or a later run reads (eval reports, the model card, meta.json, the
FID cache, health.jsonl, trackers.json, study results, `sample.py`'s outputs, classifier weights,
copied shards) goes through `atomic_path` or `write_text`: the bytes go to a hidden temp file in the
same folder (so the rename is atomic on POSIX file systems), optionally fsynced, then renamed over
the target. A write that fails for any reason (a full disk, an exception of any type from the
library writing the bytes, a signal) removes the temp file and leaves the old target as it was.

Temp names are `.NAME.tmpPID` (hidden, so a glob for `*.json` or `*.tar` never picks one up, and
per process, so two processes writing the same cache never share one); `suffix=` appends the
target's extension for writers that pick a format from it (numpy's `save`, PIL).

Checkpoint folders are written the same way one level up, by `bidvl.checkpoint` (a temp folder
and one rename); the shard writer (`bidvl.data.writer`) renames many temp files together only
when all are complete. Both use `fsync_folder` and `file_sha256` from here.

`write_failure(exc, where)` names a failed write in the same words wherever it happened (a
checkpoint, the export, the trackers' logs): the errno and the file. A write through `atomic_path`
that the file system refuses (a full disk, a quota, an I/O error, a read-only folder) raises
`WriteError` with those words (so do the trackers' writes: bidvl.tracking.tracker_writes), so
every command reports it in one line (exit 2).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BidvlError

BLOCK = 1 << 20


class WriteError(BidvlError, OSError):
    """A file the file system would not let us write (the message names it, the errno and that
    the previous file, if any, is untouched)."""


def write_errno(exc: BaseException, near: str | os.PathLike) -> str:
    """"CODE (text)" for a failed write, whatever raised it: an OSError names its errno; torch's zip
    writer (RuntimeError "unexpected pos ...", "file write failed") and safetensors
    (SafetensorError "... StorageFull ...") do not, so a full file system is recognised by the free
    space `near` the file written."""
    text = (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).splitlines()[0][:300]
    number = getattr(exc, "errno", None)
    if number:
        return f"{errno.errorcode.get(number, str(number))} ({text})"
    try:
        full = shutil.disk_usage(Path(near).parent).free < 1 << 20
    except OSError:
        full = False
    if full or "No space left" in str(exc) or "StorageFull" in str(exc):
        return f"ENOSPC (no space left on device; {type(exc).__name__}: {text})"
    return f"{type(exc).__name__} ({text})"


def write_failure(exc: BaseException, where: str | os.PathLike) -> str:
    """"CODE (text) at FILE" (`write_errno`): the error's file, else `where`."""
    return f"{write_errno(exc, where)} at {getattr(exc, 'filename', None) or where}"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB blocks (checkpoint manifests, shard digests, the FID
    module's identity of weights files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def temp_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """The hidden per-process temp name beside `path` (see the module docstring)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")


def fsync_folder(folder: str | os.PathLike) -> None:
    """Makes renames in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "", fsync: bool = False,
                mkdir: bool = True) -> Iterator[Path]:
    """Yields a temp path for the caller to write; when the block ends normally it replaces `path`
    (fsynced first with `fsync=True`). On any exception the temp file is removed and the target is
    untouched; one the file system raised (any OSError, or a library's error on a full disk) comes
    out as a WriteError naming `path`. Writers that choose a format by extension pass
    `suffix=Path(path).suffix`."""
    path = Path(path)
    tmp = temp_path(path, suffix)
    try:
        if mkdir:
            path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_folder(path.parent)
    except Exception as exc:
        failure = write_errno(exc, path)
        if isinstance(exc, BidvlError) or not (isinstance(exc, OSError) or failure.startswith("ENOSPC")):
            raise  # the caller's own error, not the file system's
        raise WriteError(f"cannot write {path}: {failure}; the previous {path.name}, if any, is untouched") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except NotADirectoryError:  # its folder could not be made: there is no temp file
            pass


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """Writes `text` to `path` whole or not at all (see `atomic_path`); returns the path."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Writes `data` to `path` whole or not at all (see `atomic_path`); returns the path."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)
