"""Files a run writes and reads, safely: atomic writes, one writer per run dir, checked reads.

- `atomic_write_text` / `atomic_write_json` / `atomic_write_bytes`: a temporary file in the target's own
  directory, flushed and fsynced, then renamed over the target (and the directory fsynced), so a reader,
  a kill or a full disk sees the old content or the new one, never half of it. A failed write removes its
  temporary file.
- `RunDirLock`: an exclusive `fcntl.flock` on `<run dir>/.lock`, held for the life of the process that took
  it; the kernel releases it when that process dies, however it dies, so a stale lock file never blocks.
- `locked`: the same kind of lock on any file, waiting for its holder (e.g. one process converts a cache
  entry while the others wait for it).
- `fsync_path` / `fsync_dir`: a file's writes made durable; a rename made durable (best effort).
- `read_json`: a JSON file, with the file's path in the error when it is unreadable or damaged.
- `is_disk_full`: whether an error (or one it was raised from) is ENOSPC / EDQUOT.
- `sha256_file`, `sealed` / `read_sealed_json`: digests that let a cache entry prove it reads back as written
  (a JSON record carries the sha256 of the rest of itself).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the run dir's lock."""


class DamagedFile(ValueError):
    """A file exists but does not read back as what was written (truncated, garbage, wrong digest)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either its old content or all of `data`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, value, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(value, indent=indent))


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') writes to the disk; OSError when it cannot."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (best effort where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fsync_path(directory)


def read_json(path: Path):
    """The JSON value in `path`; DamagedFile naming the file when it is empty or not JSON, OSError (which
    names the file) when it cannot be read."""
    path = Path(path)
    text = path.read_bytes()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedFile(f"{path}: damaged ({'empty' if not text.strip() else error})") from None


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks); OSError names the file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(value) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(record: dict) -> dict:
    """`record` with a "sha256" field holding the digest of the rest, for `read_sealed_json`."""
    return {**record, "sha256": json_sha256(record)}


def read_sealed_json(path: Path) -> dict:
    """A record written as `sealed(...)`, without its digest; DamagedFile naming the file when it does not
    parse, is not a sealed record or its digest does not match (e.g. flipped bytes)."""
    value = read_json(path)
    if not isinstance(value, dict) or "sha256" not in value:
        raise DamagedFile(f"{path}: damaged (no sha256 digest)")
    record = {k: v for k, v in value.items() if k != "sha256"}
    if json_sha256(record) != value["sha256"]:
        raise DamagedFile(f"{path}: damaged (sha256 digest mismatch)")
    return record


def is_disk_full(error: BaseException | None) -> bool:
    """True when `error`, or an error it was raised from, is 'no space left' (ENOSPC, EDQUOT)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):  # libraries that wrap the OSError in their own type
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive flock on `path` (created if absent) for the `with` block, waiting while another
    process holds it; released when the block ends or the process dies."""
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class RunDirLock:
    """Exclusive lock on a run dir for one writer: `acquire()` raises RunDirLocked naming the dir and the
    holder's pid. Re-entrant within a process (a second `acquire` of the same dir is a no-op)."""

    _held: dict[str, int] = {}  # resolved dir -> open descriptor, per process

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_FILE

    def acquire(self) -> RunDirLock:
        key = str(self.run_dir.resolve())
        if key in self._held:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise RunDirLocked(
                f"{self.run_dir} is in use by another prefopt process"
                f"{f' (pid {holder})' if holder else ''}; wait for it to end, or choose another run dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._held[key] = fd
        return self

    def release(self) -> None:
        fd = self._held.pop(str(self.run_dir.resolve()), None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
