"""Paths and fsspec URLs behind one small API, so every source takes ``s3://``, ``gs://``, ... inputs alike.

Local paths stay plain paths all the way to the decoder (it reads them itself, seeking as it likes); a URL is
listed with fsspec on the main process and read into bytes with fsspec in the decode worker. fsspec caches
filesystem instances per process, so each spawned worker opens its connection pool once.
"""

from __future__ import annotations

import json
import os
import posixpath
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


def read_sidecar(audio_path: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """audiocraft's metadata convention: ``song.json`` beside ``song.flac``; {} when there is none.

    Raises:
        ValueError: the sidecar exists but is not a JSON object (the item fails, naming the file).
    """
    sidecar = os.path.splitext(audio_path)[0] + ".json"
    try:
        raw = read_bytes(sidecar, storage_options)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"sidecar {sidecar} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"sidecar {sidecar} holds {type(meta).__name__}, expected a JSON object")
    return meta
