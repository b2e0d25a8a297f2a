"""Output stores: the one seam between the output folder's logic and the storage under it.

``open_store`` is the one place the ``output.dir`` scheme picks an implementation:

- a plain path (or ``file://``): ``LocalStore``, POSIX semantics on a local or mounted (NFS, Lustre) filesystem:
  ``O_EXCL`` creates, temp file + fsync + rename, mtime heartbeats;
- ``s3://``: ``S3Store``, through s3fs: every write is one PUT (an object appears whole or not at all), creates
  are ``If-None-Match: *`` and takeovers ``If-Match: <ETag>`` (S3 conditional writes).

Other schemes (``gs://``, ``az://``, ``memory://``, ...) are refused: claims need an atomic create-if-absent and
compare-and-swap that fsspec does not offer in general, and untested support would be worse than none.

Paths are ``PurePath`` objects built by ``OutputLayout``: a ``Path`` for a local folder, a ``PurePosixPath``
(``bucket/prefix/...``, no scheme) for an object store, so code that forgets the store fails loudly there.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import IO, Any, Protocol

# Schemes whose conditional writes are implemented and tested (s3a is s3fs's alias for s3).
OBJECT_SCHEMES = ("s3", "s3a")


@dataclass(frozen=True)
class Lease:
    """A claim object as read back: its content, how long since it was last written, and its version.

    Args:
        data: the owner record the claimant wrote.
        age_s: seconds since the last write (heartbeat), measured on the store's clock.
        version: what a conditional overwrite must match (the object's ETag); None on a local filesystem.
    """

    data: bytes
    age_s: float
    version: str | None


class OutputStore(Protocol):
    """What the output folder needs from storage. Methods take paths built by ``OutputLayout``.

    ``tmp_dir`` arguments name a local folder for temp files; a store whose writes are atomic by themselves
    (an object PUT) ignores it.
    """

    def url(self, path: PurePath) -> str: ...

    def check_writable(self, root: PurePath) -> None:
        """Refuse, before any work, a store that cannot give the guarantees claims rely on."""

    def exists(self, path: PurePath) -> bool: ...

    def read_bytes(self, path: PurePath) -> bytes: ...

    def open_read(self, path: PurePath) -> IO[bytes]: ...

    def size(self, path: PurePath) -> int: ...

    def list_names(self, folder: PurePath) -> list[str]:
        """Names directly under ``folder`` (one listing); [] when it does not exist."""

    def makedirs(self, folder: PurePath) -> None: ...

    def write_atomic(self, path: PurePath, data: bytes, tmp_dir: Path) -> None:
        """Replace ``path``: a reader sees the old content, no file, or the whole new one, never a part."""

    def create_atomic(self, path: PurePath, data: bytes, tmp_dir: Path) -> bool:
        """Create ``path`` with the whole of ``data`` unless it exists; False when it did."""

    def publish(self, staged: Path, path: PurePath) -> None:
        """Make the finished local file ``staged`` the content of ``path`` atomically; ``staged`` is consumed."""

    def delete(self, path: PurePath) -> None:
        """Remove ``path`` if it exists."""

    def delete_tree(self, folder: PurePath) -> None: ...

    def copy(self, src: PurePath, dst: PurePath) -> None: ...

    def arrow_filesystem(self) -> Any:
        """What pyarrow's ``filesystem=`` argument takes to read these paths (None: local paths)."""

    # Leases (unit claims): create-if-absent, heartbeat, race-free takeover of a stale one, release.

    def create_exclusive(self, path: PurePath, data: bytes) -> bool: ...

    def read_lease(self, path: PurePath) -> Lease | None: ...

    def refresh_lease(self, path: PurePath, data: bytes) -> bool:
        """Heartbeat a lease this process holds; False when it is gone or someone else holds it now."""

    def take_over(self, path: PurePath, data: bytes, stale: Lease) -> bool:
        """Replace the stale lease ``stale`` with ours; of several contenders exactly one succeeds."""

    def release_lease(self, path: PurePath) -> None:
        """Remove a lease this process holds (and only if it still holds it, where the store can tell)."""


def json_bytes(obj: Any) -> bytes:
    """The pipeline's JSON files (plan, markers, stats): indented, keys sorted, one trailing newline."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def open_store(url: str, storage_options: dict[str, Any] | None = None,
               scratch_dir: str | None = None) -> tuple[OutputStore, PurePath, Path | None]:
    """The store for ``output.dir``, the root path inside it, and the local scratch folder (None: temp files go
    in the output folder itself).

    Args:
        url: ``output.dir``: a local path, ``file://...`` or ``s3://bucket/prefix``.
        storage_options: fsspec options for a URL (endpoint, credentials; keep secrets in the environment).
        scratch_dir: under it, an object store's local scratch folder: shards before upload, Hydra's logs,
            verify reports (default: the system temp dir).
    """
    if storage_options is not None and not isinstance(storage_options, dict):
        raise ValueError(f"output.storage_options must be a dict of fsspec options, got {storage_options!r}")
    from pipeline.sources.storage import is_url  # imports fsspec: only when a layout is opened

    scheme, _, inner = url.partition("://")
    if not is_url(url) or scheme == "file":
        from pipeline.stores.local import LocalStore

        return LocalStore(), Path(inner if is_url(url) else url).expanduser().resolve(), None
    if scheme not in OBJECT_SCHEMES:
        raise ValueError(
            f"output.dir={url}: writing to {scheme}:// is not supported. output.dir may be a local or mounted "
            f"folder, or s3://bucket/prefix (AWS S3, or an S3-compatible server that enforces conditional writes): "
            f"claims need an atomic create-if-absent and compare-and-swap. Write to a local folder and copy it.")
    from pipeline.stores.s3 import S3Store

    store = S3Store.connect(url, dict(storage_options or {}))
    return store, PurePosixPath(store.root_of(url)), scratch_folder(url, scratch_dir)


def scratch_folder(url: str, scratch_dir: str | None) -> Path:
    """A local folder for one output URL's temp files and logs, shared by the processes of this host."""
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path(scratch_dir or tempfile.gettempdir()).expanduser() / "audio-tokenize" / digest
