"""``dataset=folder``: every audio file under a directory, recursively, with optional sidecar JSON metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.sources.base import FetchedAudio, Source, number_items
from pipeline.types import AudioItem


class FolderSource(Source):
    """Audio files under ``root``; the id is the path relative to ``root`` (POSIX, with extension).

    The extension stays in the id so ``a.wav`` and ``a.flac`` side by side remain two items. Anything named like
    audio is listed, even a directory or a broken link: it then fails in the worker with a reason, so that no
    input is silently dropped.

    Args:
        root: directory to scan.
        extensions: lower-case file endings without the dot.
        sidecar_json: read ``song.json`` next to ``song.flac`` (audiocraft's convention) as metadata.
        follow_symlinks: descend into linked directories (each real directory once, so link loops end).
    """

    def __init__(self, root: str, extensions: list[str], sidecar_json: bool = True, follow_symlinks: bool = True):
        self.root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(self.root):
            raise ValueError(f"dataset.path {root!r} is not a directory")
        self.extensions = {e.lower().lstrip(".") for e in extensions}
        self.sidecar_json = sidecar_json
        self.follow_symlinks = follow_symlinks

    def list_items(self) -> list[AudioItem]:
        items = [
            AudioItem(id=Path(path).relative_to(self.root).as_posix(), source=path, index=-1)
            for path in self._walk()
        ]
        return number_items(items)

    def _walk(self) -> list[str]:
        found: list[str] = []
        seen_dirs: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=self.follow_symlinks):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:  # a symlink loop or a second link to the same directory
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames + [d for d in dirnames if self._is_audio_name(d)]:
                if self._is_audio_name(name):
                    found.append(os.path.join(dirpath, name))
        return found

    def _is_audio_name(self, name: str) -> bool:
        return not name.startswith(".") and name.rsplit(".", 1)[-1].lower() in self.extensions and "." in name

    def fetch(self, item: AudioItem) -> FetchedAudio:
        return FetchedAudio(data=item.source, name=item.source, metadata=self._sidecar(item.source))

    def _sidecar(self, path: str) -> dict[str, Any]:
        if not self.sidecar_json:
            return {}
        sidecar = os.path.splitext(path)[0] + ".json"
        if not os.path.isfile(sidecar):
            return {}
        with open(sidecar, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError(f"sidecar {sidecar} holds {type(meta).__name__}, expected a JSON object")
        return meta

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", "root": self.root, "extensions": sorted(self.extensions)}
