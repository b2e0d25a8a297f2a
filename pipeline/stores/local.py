"""A local or mounted (NFS, Lustre) output folder: POSIX atomicity, exactly as the pipeline always used it.

- create-if-absent: ``O_CREAT | O_EXCL`` (atomic on POSIX and NFSv3+);
- whole-file writes: temp file in the same filesystem -> fsync -> rename -> fsync of the directory;
- leases: the claim file's mtime is its heartbeat; a stale one is renamed away (only one contender's rename
  succeeds) and created again with ``O_EXCL``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path, PurePath
from typing import IO, Any

from pipeline.stores import Lease, json_bytes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; output is shared data, so give it the mode a plain open() would (0666 & ~umask).
FILE_MODE = 0o666 & ~_umask()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry is data of the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(data: bytes, tmp_dir: Path, name: str) -> str:
    """``data`` in a new, fsynced temp file of ``tmp_dir`` (same filesystem as the target, so rename works)."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f".{name}.", suffix=".tmp")
    os.fchmod(fd, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write ``path`` so a reader sees the old file, no file, or the whole new one, never a part.

    Temp file in ``tmp_dir`` (same filesystem) -> fsync -> rename -> fsync of the directory.
    """
    tmp = _write_temp(data, tmp_dir or path.parent, path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, tmp_dir: Path | None = None) -> None:
    atomic_write_bytes(path, json_bytes(obj), tmp_dir)


class LocalStore:
    """``OutputStore`` on a POSIX filesystem (see the module docstring)."""

    def __init__(self) -> None:
        # Lease path -> the record this process created there: a heartbeat or release of a claim that was taken
        # over meanwhile must not touch the new owner's (on S3 the ETag does this).
        self._leases: dict[str, bytes] = {}

    def url(self, path: PurePath) -> str:
        return str(path)

    def check_writable(self, root: PurePath) -> None:
        """POSIX gives ``O_EXCL``, links and rename everywhere the pipeline runs; what is left to check is that the
        folder can be written at all (read-only mount, permissions, a file in the way), before any work, as one line."""
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            probe = Path(root) / f".write-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"output.dir {root} is not writable: {type(e).__name__}: {e}") from e

    def exists(self, path: PurePath) -> bool:
        return Path(path).exists()

    def read_bytes(self, path: PurePath) -> bytes:
        return Path(path).read_bytes()

    def open_read(self, path: PurePath) -> IO[bytes]:
        return open(path, "rb")

    def size(self, path: PurePath) -> int:
        return Path(path).stat().st_size

    def list_names(self, folder: PurePath) -> list[str]:
        return os.listdir(folder) if Path(folder).is_dir() else []

    def makedirs(self, folder: PurePath) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)

    def write_atomic(self, path: PurePath, data: bytes, tmp_dir: Path) -> None:
        atomic_write_bytes(Path(path), data, tmp_dir)

    def create_atomic(self, path: PurePath, data: bytes, tmp_dir: Path) -> bool:
        """Temp file, then ``link`` to the final name: a link fails if the name exists, and the file it
        publishes is already whole. A filesystem without hard links falls back to rename (last writer wins)."""
        tmp = _write_temp(data, tmp_dir, Path(path).name)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE mounts): as atomic, but not exclusive
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        fsync_dir(Path(path).parent)
        return True

    def publish(self, staged: Path, path: PurePath) -> None:
        try:
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(staged, path)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        fsync_dir(Path(path).parent)

    def delete(self, path: PurePath) -> None:
        Path(path).unlink(missing_ok=True)

    def delete_tree(self, folder: PurePath) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def copy(self, src: PurePath, dst: PurePath) -> None:
        # A hard link costs nothing and survives a later unlink of ``src``; some filesystems refuse links.
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)

    def arrow_filesystem(self) -> None:
        return None

    def create_exclusive(self, path: PurePath, data: bytes) -> bool:
        """Whole or absent: the record goes to a temp file beside the name, then is linked to it (a link fails if
        the name exists). A kill between an ``O_EXCL`` create and its write left an empty claim, which reads as a
        live owner until the lease runs out. Without hard links (some FUSE mounts): ``O_EXCL``, then the write."""
        if Path(path).exists():  # the common contended case, without a temp file (metadata ops are dear on NFS)
            return False
        tmp = Path(path).parent / f".{uuid.uuid4().hex}.tmp"  # no unit number: cleaned up as a stray temp file
        try:
            tmp.write_bytes(data)
        except BaseException:  # a full disk (ENOSPC) left the empty temp file behind
            tmp.unlink(missing_ok=True)
            raise
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            return self._create_exclusive_in_place(path, data)
        finally:
            tmp.unlink(missing_ok=True)
        self._leases[str(path)] = data
        return True

    def _create_exclusive_in_place(self, path: PurePath, data: bytes) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException:  # a full disk left an empty claim, read as a live owner until the lease ran out
            Path(path).unlink(missing_ok=True)
            raise
        self._leases[str(path)] = data
        return True

    def read_lease(self, path: PurePath) -> Lease | None:
        p = Path(path)
        try:
            age = time.time() - p.stat().st_mtime
            return Lease(p.read_bytes(), age, None)
        except FileNotFoundError:
            return None

    def refresh_lease(self, path: PurePath, data: bytes) -> bool:
        """The mtime is the heartbeat (cheap, and a reader needs no clock but its own); ``data`` is not rewritten.
        False when the claim is gone or is another owner's now."""
        try:
            if not self._is_mine(path):
                return False
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    def take_over(self, path: PurePath, data: bytes, stale: Lease) -> bool:
        """Rename the stale claim away (only one contender's rename succeeds), then create it normally.

        A contender that read the same stale claim but comes second would rename away the winner's new claim, so
        the renamed file must be the one judged stale (same owner record); otherwise it goes back, and this
        contender loses (seen: two takers of one stale lease both won, and both did the unit).
        """
        # No "unit-" in the grave's name: the clean-up removes graves by age, not as a unit's claim.
        grave = Path(path).with_name(f".stale-{Path(path).name.removeprefix('unit-')}-{uuid.uuid4().hex}")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return False
        if grave.read_bytes() != stale.data:  # a newer claim: not ours to take
            try:
                os.link(grave, path)  # back in place, unless yet another claim was created meanwhile
            except FileExistsError:
                pass
            grave.unlink(missing_ok=True)
            return False
        grave.unlink(missing_ok=True)
        return self.create_exclusive(path, data)

    def release_lease(self, path: PurePath) -> None:
        """Remove the claim, unless it was taken over since (then it is the new owner's)."""
        try:
            if self._is_mine(path):
                Path(path).unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        self._leases.pop(str(path), None)

    def _is_mine(self, path: PurePath) -> bool:
        """The file still holds the record this process created (True for a lease it did not create here)."""
        mine = self._leases.get(str(path))
        return mine is None or Path(path).read_bytes() == mine
