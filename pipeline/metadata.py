"""An item's metadata -> the metadata columns of its rows (README "Output", row schema), checked.

The writer and the decode workers share this code: a worker checks each item's metadata right after it is read,
so a value no column can hold (``"moods": 5``, a ``bpm`` beyond float64, a lone surrogate in a title) fails that
item alone, named, in the ``read`` stage; in the writer thread it failed the whole unit's commit and stopped the
run. Pure Python (no pyarrow): workers import it and should start fast.
"""

from __future__ import annotations

import json
import math
from typing import Any

# MusicGen / audiocraft ``MusicInfo`` fields get typed columns of their own; every other metadata field goes into
# the ``metadata`` JSON column, so every shard has the same schema whatever its items carried.
STRING_FIELDS = ("title", "artist", "description", "genre", "key", "instrument", "name")
LIST_FIELDS = ("moods", "keywords")
FLOAT_FIELDS = ("bpm",)


class MetadataError(ValueError):
    """A metadata value that no row column can hold; ``field`` is the item's own name for it (before rename)."""

    def __init__(self, field: str, why: str):
        super().__init__(f"field {field!r} {why}")
        self.field = field


def row_metadata(meta: dict[str, Any], rename: dict[str, str] | None = None) -> dict[str, Any]:
    """The typed metadata columns of a row plus ``metadata`` (JSON of the other fields, or None).

    Args:
        meta: the item's metadata (listing fields, then sidecar fields over them).
        rename: ``dataset.rename``, applied first; a mapped field replaces the row's own.

    Raises:
        MetadataError: a value that does not fit its column, or text that is not valid Unicode (a lone
            surrogate, as a JSON ``\\ud800`` escape or ``json.dumps`` of a non-UTF-8 file name gives).
    """
    meta = dict(meta)
    origin = {name: name for name in meta}  # row field -> the item's own name, for error messages
    for old, new in (rename or {}).items():
        if old in meta:
            meta[new] = meta.pop(old)
            origin[new] = old
    row: dict[str, Any] = {}
    for name in STRING_FIELDS:
        value = meta.pop(name, None)
        row[name] = None if value is None else _text(str(value), origin.get(name, name))
    for name in FLOAT_FIELDS:
        value = meta.pop(name, None)
        row[name] = _to_float(value, origin.get(name, name))
        if row[name] is None and value not in (None, ""):
            meta[name] = value  # not a number (bpm "fast"): kept as given in ``metadata``, never lost
    for name in LIST_FIELDS:
        row[name] = _to_list(meta.pop(name, None), origin.get(name, name))
    row["metadata"] = _json(meta, origin) if meta else None
    return row


def _text(value: str, field: str) -> str:
    """``value`` if it can be stored as UTF-8 (Parquet strings are); a lone surrogate cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start:e.end].encode("unicode_escape").decode("ascii")
        raise MetadataError(field, f"is not valid Unicode text: lone surrogate {bad} at position {e.start} (a JSON "
                                   f"\\uXXXX escape that pairs with nothing, as json.dumps writes for a non-UTF-8 "
                                   "file name); fix the text") from None
    return value


def _to_float(value: Any, field: str) -> float | None:
    """A number (or a numeric string) as float64; None for absent or non-numeric text (kept in ``metadata``).

    A JSON *number* beyond float64 (``1e400`` reads as inf, a 400-digit integer overflows) is refused: it is not a
    bpm, and in the writer it stopped the run (OverflowError).
    """
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None  # "inf" text: kept as given, like "fast"
    try:
        number = float(value)
    except OverflowError:
        raise MetadataError(field, f"is a number beyond float64 ({_short(value)}); expected a finite number") from None
    except (TypeError, ValueError):
        raise MetadataError(field, f"is {type(value).__name__} ({_short(value)}); expected a number") from None
    if not math.isfinite(number):
        raise MetadataError(field, f"is {number} ({_short(value)}); expected a finite number")
    return number


def _to_list(value: Any, field: str) -> list[str] | None:
    """audiocraft stores moods/keywords as a list or a comma-separated string; normalise to a list of strings."""
    if value is None:
        return None
    if isinstance(value, str):
        return [_text(v.strip(), field) for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise MetadataError(field, f"is {type(value).__name__} ({_short(value)}); expected a list of strings or a "
                                   "comma-separated string")
    out = []
    for v in value:
        if isinstance(v, (dict, list, tuple)) or v is None:
            raise MetadataError(field, f"holds {type(v).__name__} ({_short(v)}); expected strings")
        out.append(_text(str(v), field))
    return out


def _json(meta: dict[str, Any], origin: dict[str, str]) -> str:
    """The ``metadata`` column: JSON of the fields without a column of their own."""
    for name, value in meta.items():
        check_unicode(value, origin.get(name, name))
        _text(str(name), origin.get(name, name))
    try:
        return json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError) as e:  # keys of mixed types; an int past Python's 4300-digit limit
        raise MetadataError(", ".join(sorted(map(str, meta))), f"cannot be written as JSON: {e}") from None


def check_unicode(value: Any, field: str) -> None:
    """Raise ``MetadataError`` naming ``field`` unless every string (key or value) inside ``value`` is valid
    Unicode (storable as UTF-8)."""
    if isinstance(value, str):
        _text(value, field)
    elif isinstance(value, dict):
        for k, v in value.items():
            _text(str(k), field)
            check_unicode(v, field)
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_unicode(v, field)


def _short(value: Any) -> str:
    """``repr`` of a value, cut: a 400-digit number or a long list must not flood the failure log."""
    try:
        text = repr(value)
    except ValueError:  # int repr beyond Python's digit limit
        return "an integer past Python's digit limit"
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"
