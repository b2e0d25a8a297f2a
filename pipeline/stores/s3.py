"""Output on S3 (or an S3-compatible server that enforces conditional writes), through s3fs.

Atomicity on an object store is upload-then-marker: every object is written by one PUT (or one completed
multipart upload), so it appears whole or not at all and nothing is ever streamed into a final key; a shard is
written to a local scratch file first, then uploaded. The done marker, uploaded last, is the commit point.

Claims use S3 conditional requests (moto's server enforces all of them, see tests/test_remote_output.py):

- create-if-absent: ``PutObject`` with ``If-None-Match: *``; a second creator gets 412 PreconditionFailed;
- heartbeat: rewrite the claim object (its body carries the time) with ``If-Match: <our last ETag>``, so an owner
  that lost its claim to a takeover can never overwrite the new owner's claim;
- takeover of a stale claim: ``If-Match: <ETag of the stale object we read>``; of two takers only one matches;
- release: ``DeleteObject`` with ``If-Match``, so we never delete a claim someone took over from us.

``check_writable`` probes all three conditions at start and refuses a server that does not enforce them.

A claim's age is measured on the server's clock (the response's ``Date`` minus the object's ``LastModified``),
so hosts with skewed clocks agree on which claims are stale.
"""

from __future__ import annotations

import email.utils
import posixpath
import uuid
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import IO, Any

from pipeline.stores import Lease

# Error codes of a conditional write that lost: the condition failed (412), a concurrent conditional write
# won (409, AWS asks to retry; we simply count it as lost), or an If-Match on a key that is gone (404).
_LOST = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404"}


class S3Store:
    """``OutputStore`` on S3 (see the module docstring).

    Args:
        fs: an ``s3fs.S3FileSystem`` built without a listings cache (other processes write here all the time).
    """

    def __init__(self, fs: Any):
        self.fs = fs
        self._etags: dict[str, str] = {}  # lease path -> the ETag of our last write of it

    @staticmethod
    def connect(url: str, storage_options: dict[str, Any]) -> "S3Store":
        from pipeline.sources.storage import filesystem

        fs, _ = filesystem(url, {"use_listings_cache": False, **storage_options})
        return S3Store(fs)

    def root_of(self, url: str) -> str:
        return self.fs._strip_protocol(url).rstrip("/")

    def url(self, path: PurePath) -> str:
        return f"s3://{path}"

    def check_writable(self, root: PurePath) -> None:
        """Probe the server once: a second ``If-None-Match`` create, an ``If-Match`` overwrite and an ``If-Match``
        delete on a wrong ETag must all fail.

        Some S3-compatible servers ignore (or reject) these headers; claims there would not be exclusive: refuse.
        """
        probe, wrong_etag = root / ".state" / f"probe-{uuid.uuid4().hex}", '"00000000000000000000000000000000"'
        try:
            created = self._put(probe, b"", IfNoneMatch="*")
            again = self._put(probe, b"", IfNoneMatch="*")
            overwritten = self._put(probe, b"", IfMatch=wrong_etag)
            try:
                deleted = self._delete_if(probe, wrong_etag) or not self.exists(probe)
            except OSError:  # the header rejected outright: no conditional deletes here
                deleted = True
        finally:
            self._etags.pop(str(probe), None)
            self.delete(probe)
        if not created or again or overwritten or deleted:
            raise ValueError(f"{self.url(root)}: this S3 endpoint does not enforce conditional writes "
                             f"(If-None-Match / If-Match), which unit claims rely on; use AWS S3 or a server that "
                             f"enforces them, or write to a local folder and copy it")

    def exists(self, path: PurePath) -> bool:
        return self.fs.exists(str(path))

    def read_bytes(self, path: PurePath) -> bytes:
        return self.fs.cat_file(str(path))

    def open_read(self, path: PurePath) -> IO[bytes]:
        return self.fs.open(str(path), "rb")

    def size(self, path: PurePath) -> int:
        return self.fs.size(str(path))

    def list_names(self, folder: PurePath) -> list[str]:
        try:
            entries = self.fs.ls(str(folder), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = (posixpath.basename(e.rstrip("/")) for e in entries)
        return [n for n in names if n and n != folder.name]

    def makedirs(self, folder: PurePath) -> None:
        """Object stores have no folders: a key's prefix exists as soon as the key does."""

    def write_atomic(self, path: PurePath, data: bytes, tmp_dir: Path) -> None:
        self.fs.pipe_file(str(path), data)  # one PUT: the object appears whole or not at all

    def create_atomic(self, path: PurePath, data: bytes, tmp_dir: Path) -> bool:
        return self._put(path, data, IfNoneMatch="*")

    def publish(self, staged: Path, path: PurePath) -> None:
        # One PUT, or a multipart upload whose object appears only at its completion: never a partial object.
        try:
            self.fs.put_file(str(staged), str(path))
        finally:
            staged.unlink(missing_ok=True)

    def delete(self, path: PurePath) -> None:
        try:
            self.fs.rm_file(str(path))
        except FileNotFoundError:
            pass

    def delete_tree(self, folder: PurePath) -> None:
        try:
            self.fs.rm(str(folder), recursive=True)
        except FileNotFoundError:
            pass

    def copy(self, src: PurePath, dst: PurePath) -> None:
        self.fs.copy(str(src), str(dst))  # server-side CopyObject: atomic like a PUT

    def arrow_filesystem(self) -> Any:
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(self.fs))

    def create_exclusive(self, path: PurePath, data: bytes) -> bool:
        return self._put(path, data, IfNoneMatch="*")

    def read_lease(self, path: PurePath) -> Lease | None:
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(str(path))
        try:
            data, response = sync(self.fs.loop, self._get, bucket, key)
        except FileNotFoundError:
            return None
        age = (_server_now(response) - response["LastModified"]).total_seconds()
        return Lease(data, max(0.0, age), response["ETag"])

    def refresh_lease(self, path: PurePath, data: bytes) -> bool:
        etag = self._etags.get(str(path))
        return etag is not None and self._put(path, data, IfMatch=etag)

    def take_over(self, path: PurePath, data: bytes, stale: Lease) -> bool:
        return stale.version is not None and self._put(path, data, IfMatch=stale.version)

    def release_lease(self, path: PurePath) -> None:
        etag = self._etags.pop(str(path), None)
        if etag is not None:
            self._delete_if(path, etag)  # False: gone, or taken over by another owner since; theirs now

    def _delete_if(self, path: PurePath, etag: str) -> bool:
        """Delete ``path`` if its ETag is still ``etag``; False when it is not (or the object is gone)."""
        bucket, key, _ = self.fs.split_path(str(path))
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
        except OSError as e:
            if _lost(e):
                return False
            raise
        return True

    def _put(self, path: PurePath, data: bytes, **condition: str) -> bool:
        """One conditional PUT; False when the condition did not hold. Remembers the new ETag."""
        bucket, key, _ = self.fs.split_path(str(path))
        try:
            response = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except OSError as e:  # s3fs turns botocore's ClientError into OSError subclasses
            if _lost(e):
                self._etags.pop(str(path), None)
                return False
            raise
        self._etags[str(path)] = response["ETag"]
        return True

    async def _get(self, bucket: str, key: str) -> tuple[bytes, dict[str, Any]]:
        """GET one object: body, ETag, LastModified and the response's Date header, from one request."""
        response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with response["Body"] as body:
            return await body.read(), response


def _lost(error: OSError) -> bool:
    """Did a conditional request fail on its condition (rather than on access, network, a missing bucket)?"""
    cause = getattr(error, "__cause__", None)
    response = getattr(cause, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code in _LOST or (not code and status in _LOST)


def _server_now(response: dict[str, Any]) -> datetime:
    """The server's time when it answered (``Date`` header), or ours when the header is missing."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    return email.utils.parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
