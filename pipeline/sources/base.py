"""The source interface: list the items of a dataset once, then fetch one item's audio in a worker."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from pipeline.types import AudioItem

# Item metadata key carrying why a listed entry (a manifest line, a dataset row) is unusable: the item is listed
# like any other, and its fetch raises with this message, so it ends up in the failure log, never stopping the run.
# (The name predates dataset rows: items.jsonl of existing outputs carry it.)
ERROR_KEY = "_manifest_error"


class BrokenItem(ValueError):
    """A listed entry that cannot be an item (its ``ERROR_KEY`` message)."""


def check_broken(item: AudioItem, error: type[BrokenItem] = BrokenItem) -> None:
    """Raise ``error`` (a ``BrokenItem``) for an item listed as broken; nothing for the others."""
    if ERROR_KEY in item.metadata:
        raise error(item.metadata[ERROR_KEY])


@dataclass(slots=True)
class FetchedAudio:
    """What a worker hands to the decoder for one item.

    Args:
        data: a local path, or the encoded file's bytes (HF Audio columns, remote objects).
        name: how the item is named in error messages (path or URL).
        metadata: fields learned only at fetch time (e.g. a sidecar JSON), merged over the item's metadata.
        metadata_from: where ``metadata`` was read (the sidecar's path), for failure messages; None if nowhere.
    """

    data: str | bytes
    name: str
    metadata: dict[str, Any] = field(default_factory=dict)
    metadata_from: str | None = None


class Source(abc.ABC):
    """A dataset of audio items. Must be picklable: workers rebuild nothing, they receive it."""

    @abc.abstractmethod
    def list_items(self) -> list[AudioItem]:
        """All items in a deterministic order (sorted by id, or a table's row order), with ``index`` set to
        their position. Runs once, on rank 0."""

    @abc.abstractmethod
    def fetch(self, item: AudioItem) -> FetchedAudio:
        """Get one item's audio (and late metadata). Runs in a decode worker; may raise."""

    def describe(self) -> dict[str, Any]:
        """What identifies this source in the plan (not its items; those are hashed separately)."""
        return {"kind": type(self).__name__}


def number_items(items: list[AudioItem], sort: bool = True) -> list[AudioItem]:
    """Sort by id (unless ``sort`` is False) and set ``index``; refuse duplicate ids, which would make rows
    ambiguous.

    Args:
        items: the listed items (any ``index``).
        sort: False keeps the given order, when it is deterministic already and worth keeping: a dataset's
            rows in storage order let each worker read a Parquet row group once instead of once per item.
    """
    items = sorted(items, key=lambda it: it.id) if sort else list(items)
    first: dict[str, AudioItem] = {}
    for cur in items:
        prev = first.setdefault(cur.id, cur)
        if prev is not cur:
            raise ValueError(f"duplicate item id {cur.id!r} ({prev.source} and {cur.source}); ids must be unique")
    return [
        AudioItem(id=it.id, source=it.source, index=i, metadata=it.metadata, duration_s=it.duration_s)
        for i, it in enumerate(items)
    ]
