"""Sources: where items come from. ``build_source`` is the one place a ``DatasetConfig`` becomes a Source."""

from __future__ import annotations

from pipeline.config import DatasetConfig
from pipeline.sources.base import FetchedAudio, Source
from pipeline.sources.folder import FolderSource

__all__ = ["FetchedAudio", "Source", "build_source"]


def build_source(cfg: DatasetConfig) -> Source:
    """Make the configured source; unknown kinds fail before any work starts."""
    if cfg.kind == "folder":
        return FolderSource(cfg.path, cfg.extensions, cfg.sidecar_json, cfg.follow_symlinks)
    raise ValueError(f"unknown dataset.kind {cfg.kind!r}; expected one of: folder")
