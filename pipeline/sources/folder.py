"""``dataset=folder``: every audio file under a directory (local or an fsspec URL), recursively, with optional
sidecar JSON metadata."""

from __future__ import annotations

import os
from typing import Any

from pipeline.sources.base import FetchedAudio, Source, number_items
from pipeline.sources.storage import SIDECAR_MAX_BYTES, filesystem, is_url, read_bytes, read_sidecar, sidecar_path
from pipeline.types import AudioItem

# Set on items whose file name is not valid UTF-8: such a name cannot be stored in the plan or the Parquet
# output, so the item carries a printable id and fails in fetch with this message instead of vanishing.
BAD_NAME_KEY = "_bad_name"


class FolderSource(Source):
    """Audio files under ``root``; the id is the path relative to ``root`` (POSIX, with extension).

    The extension stays in the id so ``a.wav`` and ``a.flac`` side by side remain two items. Anything named like
    audio is listed, even a directory or a broken link: it then fails in the worker with a reason, so that no
    input is silently dropped. Hidden files and directories (``.name``) are skipped.

    Symlinks: a linked file is an item under its own name. A linked directory is walked only after the whole
    real tree and only if its target was not walked yet, so files keep their real path as id, each directory
    is listed once and link loops end.

    Args:
        root: directory to scan, or an fsspec URL (``s3://bucket/prefix``).
        extensions: file endings without the dot, matched case-insensitively.
        sidecar_json: read ``song.json`` next to ``song.flac`` (audiocraft's convention) as metadata.
        follow_symlinks: descend into linked directories.
        storage_options: fsspec options for a URL root (credentials, endpoint).
        sidecar_max_bytes: larger sidecars fail their item (``read:bad_sidecar``).
    """

    def __init__(self, root: str, extensions: list[str], sidecar_json: bool = True, follow_symlinks: bool = True,
                 storage_options: dict[str, Any] | None = None, sidecar_max_bytes: int = SIDECAR_MAX_BYTES):
        self.remote = is_url(root)
        self.root = root.rstrip("/") if self.remote else os.path.abspath(os.path.expanduser(root))
        if not self.remote and not os.path.isdir(self.root):
            raise ValueError(f"dataset.path {root!r} is not a directory")
        self.extensions = {e.lower().lstrip(".") for e in extensions}
        if not self.extensions:
            raise ValueError("dataset.extensions is empty; list the audio file endings to take, e.g. [wav, flac]")
        self.sidecar_json, self.sidecar_max_bytes = sidecar_json, sidecar_max_bytes
        self.follow_symlinks = follow_symlinks
        self.storage_options = dict(storage_options or {})

    def list_items(self) -> list[AudioItem]:
        pairs = self._list_remote() if self.remote else self._list_local()
        return number_items([_item(rel, source) for rel, source in pairs])

    def _list_local(self) -> list[tuple[str, str]]:
        """(relative POSIX path, path) of every audio-named entry, real tree first, then linked directories."""
        found: list[tuple[str, str]] = []
        seen: set[str] = set()
        links = [(self.root, "")]  # directories to walk: (path, relative path); the root counts as a first link
        while links:
            path, rel = links.pop(0)
            links += self._walk_real(path, rel, seen, found)
        return sorted(found)

    def _walk_real(self, top: str, top_rel: str, seen: set[str], found: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Walk ``top`` without following links; collect audio entries and return the linked dirs met."""
        links: list[tuple[str, str]] = []
        stack = [(top, top_rel)]
        while stack:
            path, rel = stack.pop()
            real = os.path.realpath(path)
            if real in seen:  # walked already under its real path, or a link loop
                continue
            seen.add(real)
            for entry in sorted(_scan(path), key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                child_rel = f"{rel}/{entry.name}" if rel else entry.name
                if self._is_audio_name(entry.name):
                    found.append((child_rel, entry.path))
                if not entry.is_dir(follow_symlinks=True):
                    continue
                if entry.is_symlink():
                    if self.follow_symlinks:
                        links.append((entry.path, child_rel))
                else:
                    stack.append((entry.path, child_rel))
        return links

    def _list_remote(self) -> list[tuple[str, str]]:
        fs, inner = filesystem(self.root, self.storage_options)
        inner = inner.rstrip("/")
        found = []
        for key in fs.find(inner, withdirs=False):
            rel = key[len(inner) + 1:] if key.startswith(inner + "/") else os.path.basename(key)
            if any(part.startswith(".") for part in rel.split("/")) or not self._is_audio_name(rel):
                continue
            found.append((rel, f"{self.root}/{rel}"))
        return sorted(found)

    def _is_audio_name(self, name: str) -> bool:
        return "." in name and name.rsplit(".", 1)[-1].lower() in self.extensions

    def fetch(self, item: AudioItem) -> FetchedAudio:
        if BAD_NAME_KEY in item.metadata:
            raise ValueError(item.metadata[BAD_NAME_KEY])
        meta = read_sidecar(item.source, self.storage_options, self.sidecar_max_bytes) if self.sidecar_json else {}
        data = read_bytes(item.source, self.storage_options) if self.remote else item.source
        return FetchedAudio(data=data, name=item.source, metadata=meta,
                            metadata_from=sidecar_path(item.source) if meta else None)

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", "root": self.root, "extensions": sorted(self.extensions)}


def _scan(path: str) -> list[os.DirEntry]:
    """The entries of a directory; an unreadable one stops the listing, since its items cannot be counted."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError as e:
        raise OSError(f"cannot list {path}: {e}; fix its permissions or exclude it") from e


def _item(rel: str, source: str) -> AudioItem:
    """An item; a name that is not valid UTF-8 gets an escaped, storable id and fails in fetch, naming itself."""
    try:
        rel.encode("utf-8")
        source.encode("utf-8")
    except UnicodeEncodeError:
        printable = os.fsencode(source).decode("utf-8", "backslashreplace")
        message = f"file name is not valid UTF-8: {printable}; rename it (e.g. convmv -t utf-8) to include it"
        rel_printable = os.fsencode(rel).decode("utf-8", "backslashreplace")
        return AudioItem(id=rel_printable, source=printable, index=-1, metadata={BAD_NAME_KEY: message})
    return AudioItem(id=rel, source=source, index=-1)
