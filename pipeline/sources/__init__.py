"""Sources: where items come from. ``build_source`` is the one place a ``DatasetConfig`` becomes a Source.

The source modules are imported on first use: decode workers import this package (through ``base``) at start,
and pyarrow + fsspec would add about 0.1 s to every worker start for sources they may not use.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.config import DatasetConfig
from pipeline.sources.base import FetchedAudio, Source

__all__ = ["FetchedAudio", "FolderSource", "HfSource", "ManifestSource", "Source", "build_source"]

# kind -> (module, class)
KINDS = {"folder": ("folder", "FolderSource"), "manifest": ("manifest", "ManifestSource"), "hf": ("hf", "HfSource")}


def __getattr__(name: str) -> Any:
    for module, cls in KINDS.values():
        if name == cls:
            return getattr(importlib.import_module(f"pipeline.sources.{module}"), cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_source(cfg: DatasetConfig) -> Source:
    """Make the configured source; unknown kinds fail before any work starts.

    Constructors only check arguments (no listing, no download): every rank builds the source.
    """
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown dataset.kind {cfg.kind!r}; expected one of: {', '.join(KINDS)}")
    if cfg.storage_options is not None and not isinstance(cfg.storage_options, dict):
        raise ValueError(f"dataset.storage_options must be a dict of fsspec options, got {cfg.storage_options!r}")
    options = dict(cfg.storage_options or {})
    if not isinstance(cfg.sidecar_max_bytes, int) or cfg.sidecar_max_bytes < 1:
        raise ValueError(f"dataset.sidecar_max_bytes must be a positive number of bytes, got {cfg.sidecar_max_bytes!r}")
    module, cls = KINDS[cfg.kind]
    source_cls = getattr(importlib.import_module(f"pipeline.sources.{module}"), cls)
    if cfg.kind == "folder":
        return source_cls(cfg.path, cfg.extensions, cfg.sidecar_json, cfg.follow_symlinks, options,
                          cfg.sidecar_max_bytes)
    if cfg.kind == "manifest":
        return source_cls(cfg.path, cfg.root, cfg.path_column, cfg.id_column, cfg.sidecar_json, options,
                          cfg.sidecar_max_bytes)
    return source_cls(cfg.path, cfg.name, cfg.split, cfg.streaming, cfg.audio_column, cfg.id_column,
                      cfg.metadata_columns, options)
