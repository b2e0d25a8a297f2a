"""Paths and fsspec URLs behind one small API, so every source takes ``s3://``, ``gs://``, ... inputs alike.

Local paths stay plain paths all the way to the decoder (it reads them itself, seeking as it likes); a URL is
listed with fsspec on the main process and read into bytes with fsspec in the decode worker. fsspec caches
filesystem instances per process, so each spawned worker opens its connection pool once.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
from typing import Any

import fsspec

# Suffixes fsspec decompresses on the fly when a manifest is opened with ``compression="infer"``.
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def is_url(path: str) -> bool:
    """True for ``proto://...`` (including ``file://``), which fsspec reads; False for plain local paths."""
    head, sep, _ = path.partition("://")
    return bool(sep) and head.replace("+", "").replace("-", "").isalnum()


def filesystem(url: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it (no protocol).

    Args:
        url: an fsspec URL, e.g. ``s3://bucket/prefix``.
        storage_options: passed to the filesystem (credentials, ``client_kwargs.endpoint_url``, ...).
    """
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as e:  # e.g. s3fs not installed: say which extra brings it
        raise ImportError(f"reading {url} needs an fsspec backend: {e} (for s3://: pip install -e '.[s3]')") from e


def read_bytes(path: str, storage_options: dict[str, Any]) -> bytes:
    """The whole object at a URL or local path."""
    fs, inner = filesystem(path, storage_options) if is_url(path) else (fsspec.filesystem("file"), path)
    return fs.cat_file(inner)


def join(root: str, rel: str) -> str:
    """``rel`` under ``root``, with ``..`` resolved (object stores have no ``..`` of their own)."""
    if not is_url(root):
        return os.path.normpath(os.path.join(root, rel))
    protocol, _, inner = root.partition("://")
    return f"{protocol}://{posixpath.normpath(posixpath.join(inner, rel))}"


def dirname(path: str) -> str:
    return posixpath.dirname(path) if is_url(path) else os.path.dirname(os.path.abspath(path))


def relative_to(path: str, root: str) -> str | None:
    """``path`` relative to ``root`` as a POSIX string, or None when it is not under ``root``."""
    if is_url(path) != is_url(root):
        return None
    if is_url(path):
        prefix = root.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else None
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return None if rel == ".." or rel.startswith(".." + os.sep) else rel.replace(os.sep, "/")


# ``dataset.sidecar_max_bytes``'s default. audiocraft's sidecars are a few hundred bytes; 1 MiB leaves room for
# long descriptions and lyrics, and bounds what a bad file costs: a sidecar linked to /dev/zero was read until
# memory ran out (5.4 GB), and every byte of a sidecar is carried by each of its item's rows.
SIDECAR_MAX_BYTES = 1 << 20


class SidecarError(ValueError):
    """A sidecar that exists but cannot be metadata (too large, not a regular file, not a JSON object)."""

    reason = "bad_sidecar"  # the failure log's reason (``read:bad_sidecar``)


def sidecar_path(audio_path: str) -> str:
    """audiocraft's convention: ``song.json`` beside ``song.flac``."""
    return os.path.splitext(audio_path)[0] + ".json"


def read_sidecar(audio_path: str, storage_options: dict[str, Any],
                 max_bytes: int = SIDECAR_MAX_BYTES) -> dict[str, Any]:
    """The metadata in ``song.json`` beside ``song.flac``; {} when there is none (or a directory has its name).

    Args:
        audio_path: the audio file (local path or URL).
        storage_options: fsspec options for a URL.
        max_bytes: larger sidecars are refused; at most ``max_bytes + 1`` bytes are ever read.

    Raises:
        SidecarError: the sidecar exists but is too large, not a regular file (a device, a FIFO), or not a JSON
            object (the item fails, naming the file).
    """
    sidecar = sidecar_path(audio_path)
    raw = _read_remote_capped(sidecar, storage_options, max_bytes) if is_url(sidecar) else _read_local_capped(
        sidecar, max_bytes)
    if raw is None:
        return {}
    if len(raw) > max_bytes:
        raise _too_large(sidecar, max_bytes)
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise SidecarError(f"sidecar {sidecar} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise SidecarError(f"sidecar {sidecar} holds {type(meta).__name__}, expected a JSON object")
    return meta


def _read_local_capped(path: str, max_bytes: int) -> bytes | None:
    """At most ``max_bytes + 1`` bytes of a regular file; None when absent or a directory."""
    try:
        # O_NONBLOCK: opening a FIFO without a writer would block the worker until decode.timeout_s.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            return None
        if not stat.S_ISREG(mode):
            raise SidecarError(f"sidecar {path} is not a regular file (a device, FIFO or socket, or a link to one); "
                               "replace it with a file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(max_bytes + 1)
    finally:
        os.close(fd)


def _read_remote_capped(url: str, storage_options: dict[str, Any], max_bytes: int) -> bytes | None:
    """At most ``max_bytes + 1`` bytes of an object; None when absent or a prefix ("directory")."""
    fs, inner = filesystem(url, storage_options)
    try:
        info = fs.info(inner)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    if info.get("type") == "directory":
        return None
    if (info.get("size") or 0) > max_bytes:  # refused without fetching it
        raise _too_large(url, max_bytes)
    return fs.cat_file(inner, start=0, end=max_bytes + 1)


def _too_large(path: str, max_bytes: int) -> SidecarError:
    return SidecarError(f"sidecar {path} is larger than dataset.sidecar_max_bytes={max_bytes} bytes; shorten it or "
                        "raise the cap")
