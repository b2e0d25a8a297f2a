"""Where everything lives in the output folder (DESIGN.md "Output folder"). Names depend on the unit only."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class OutputLayout:
    """Paths of one output folder.

    ``.state`` starts with a dot so Hugging Face loaders, which skip hidden paths, never read it.
    """

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def failures(self) -> Path:
        return self.root / "failures"

    @property
    def state(self) -> Path:
        return self.root / ".state"

    @property
    def done(self) -> Path:
        return self.state / "done"

    @property
    def claims(self) -> Path:
        return self.state / "claims"

    @property
    def tmp(self) -> Path:
        return self.state / "tmp"

    @property
    def plan(self) -> Path:
        return self.state / "plan.json"

    @property
    def items(self) -> Path:
        return self.state / "items.jsonl"

    @property
    def finalize_claim(self) -> Path:
        return self.state / "finalize.claim"

    def shard(self, unit: int, n_units: int) -> Path:
        """``data/train-00042-of-00128.parquet``: the Hub's shard naming, so the split is inferred by any loader."""
        return self.data / f"train-{unit:05d}-of-{n_units:05d}.parquet"

    def failure_log(self, unit: int) -> Path:
        return self.failures / f"unit-{unit:05d}.jsonl"

    def marker(self, unit: int) -> Path:
        return self.done / f"unit-{unit:05d}.json"

    def claim(self, unit: int) -> Path:
        return self.claims / f"unit-{unit:05d}"

    def make_dirs(self) -> None:
        for d in (self.data, self.failures, self.done, self.claims, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def done_units(self) -> set[int]:
        """Units whose done marker exists (one directory listing)."""
        if not self.done.is_dir():
            return set()
        return {int(name[5:10]) for name in os.listdir(self.done) if name.startswith("unit-") and name.endswith(".json")}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; output is shared data, so give it the mode a plain open() would (0666 & ~umask).
FILE_MODE = 0o666 & ~_umask()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry is data of the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write ``path`` so a reader sees the old file, no file, or the whole new one, never a part.

    Temp file in ``tmp_dir`` (same filesystem) -> fsync -> rename -> fsync of the directory.
    """
    tmp_dir = tmp_dir or path.parent
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, tmp_dir: Path | None = None) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), tmp_dir)
