"""Where everything lives in the output folder (README "Output"). Names depend on the unit only.

The folder is a local/mounted directory or an object-store prefix (``s3://bucket/prefix``); ``OutputLayout``
names the paths and ``layout.store`` (``pipeline.stores``) does every read and write, so the modules above it
(claims, writer, prepare, finalize, retry) hold the protocol and not the storage details.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from pipeline.stores import OutputStore, open_store
from pipeline.stores.local import FILE_MODE, LocalStore, atomic_write_bytes, atomic_write_json, fsync_dir

__all__ = ["DamagedState", "FILE_MODE", "OutputLayout", "atomic_write_bytes", "atomic_write_json", "fsync_dir"]


class DamagedState(RuntimeError):
    """A file of the output folder's state cannot be read; the message names it and the way out."""


@dataclass(frozen=True)
class OutputLayout:
    """Paths of one output folder, and the store they live in.

    ``.state`` starts with a dot so Hugging Face loaders, which skip hidden paths, never read it.

    Args:
        root: the folder: a ``Path``, or the ``bucket/prefix`` of an object store.
        store: reads and writes them (default: the local filesystem).
        scratch: a local folder for what cannot be written into an object store as it is made: temp files
            (``tmp/``), Hydra's logs, verify reports. None for a local folder, whose temp files are in ``.state/tmp``
            (the same filesystem, so a rename publishes them).
    """

    root: PurePath
    store: OutputStore = field(default_factory=LocalStore, compare=False)
    scratch: Path | None = None

    @staticmethod
    def open(url: str, storage_options: dict[str, Any] | None = None,
             scratch_dir: str | None = None) -> "OutputLayout":
        """The layout of ``output.dir``: a local path or a URL (``s3://bucket/prefix``); see ``open_store``."""
        store, root, scratch = open_store(url, storage_options, scratch_dir)
        return OutputLayout(root, store, scratch)

    @property
    def url(self) -> str:
        """The folder as the user names it (``/data/tok``, ``s3://bucket/tok``)."""
        return self.store.url(self.root)

    @property
    def data(self) -> PurePath:
        return self.root / "data"

    @property
    def failures(self) -> PurePath:
        return self.root / "failures"

    @property
    def state(self) -> PurePath:
        return self.root / ".state"

    @property
    def done(self) -> PurePath:
        return self.state / "done"

    @property
    def claims(self) -> PurePath:
        return self.state / "claims"

    @property
    def tmp(self) -> Path:
        """Always a local folder: temp files are written here, then published (renamed or uploaded)."""
        return self.scratch / "tmp" if self.scratch is not None else Path(self.state / "tmp")

    @property
    def plan(self) -> PurePath:
        return self.state / "plan.json"

    @property
    def items(self) -> PurePath:
        """Where folders planned before item lists were named by their hash keep theirs."""
        return self.state / "items.jsonl"

    def items_of(self, items_hash: str) -> PurePath:
        """``.state/items-<hash>.jsonl``: named by its hash, so a launch refused for listing other inputs cannot
        replace the planned job's list (it writes its own file beside it)."""
        return self.state / f"items-{items_hash}.jsonl"

    @property
    def finalize_claim(self) -> PurePath:
        return self.state / "finalize.claim"

    def shard(self, unit: int, n_units: int) -> PurePath:
        """``data/train-00042-of-00128.parquet``: the Hub's shard naming, so the split is inferred by any loader."""
        return self.data / f"train-{unit:05d}-of-{n_units:05d}.parquet"

    def failure_log(self, unit: int) -> PurePath:
        return self.failures / f"unit-{unit:05d}.jsonl"

    def marker(self, unit: int) -> PurePath:
        return self.done / f"unit-{unit:05d}.json"

    def read_marker(self, unit: int) -> dict[str, Any]:
        """A unit's done marker. One that cannot be read (cut, emptied) is refused with its path: deleting it
        makes the next run encode the unit again, as if it had never been committed."""
        path = self.marker(unit)
        try:
            marker = json.loads(self.store.read_bytes(path))
            if not isinstance(marker, dict) or not {"counts", "codec", "fingerprint"} <= marker.keys():
                raise ValueError("not a done marker: counts, codec or fingerprint missing")
        except (OSError, ValueError) as e:
            raise DamagedState(f"{self.store.url(path)} is damaged ({type(e).__name__}: {e}); delete it and rerun "
                               f"the same command (unit {unit} is encoded again)") from e
        return marker

    def claim(self, unit: int) -> PurePath:
        return self.claims / f"unit-{unit:05d}"

    def make_dirs(self) -> None:
        for d in (self.data, self.failures, self.done, self.claims):
            self.store.makedirs(d)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def done_units(self) -> set[int]:
        """Units whose done marker exists (one listing: a directory, or one prefix of the object store)."""
        names = self.store.list_names(self.done)
        return {int(name[5:10]) for name in names if name.startswith("unit-") and name.endswith(".json")}
