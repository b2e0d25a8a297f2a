"""The weights' hash without loading them: a cache keyed by the checkpoint files' identity.

A rerun of a finished folder must compare the codec's ``weights_sha256`` (the sha256 of the loaded state dict,
``hf.weights_sha256``) with the plan's, but loading a checkpoint only for that takes seconds to minutes. So each
load records its hash under the (resolved path, size, mtime_ns) of every file of the checkpoint folder, and a
later run with the same files on disk reads the hash back. Other files (another checkpoint, the same path
rewritten) have another key: the cache has no entry, and the caller loads the codec to compute it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from pipeline.config import CodecConfig

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$AUDIO_TOKENIZE_CACHE/weights``, else ``~/.cache/audio-tokenize/weights`` (beside the fixture codecs)."""
    env = os.environ.get("AUDIO_TOKENIZE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "audio-tokenize") / "weights"


def checkpoint_folder(cfg: CodecConfig) -> Path | None:
    """The local folder ``cfg.pretrained`` names: itself, or a Hub id's snapshot in the HF cache (no network
    call). None when it is neither (the codec must be loaded to know its weights)."""
    local = Path(cfg.pretrained).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.pretrained, revision=cfg.revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a valid id, ...: the caller loads the codec instead
        return None


def files_key(folder: Path) -> str | None:
    """A digest of (resolved path, size, mtime_ns) of every file in ``folder`` (a Hub snapshot's files are links
    to blobs: the blobs are what is identified). None when the folder cannot be listed."""
    try:
        entries = []
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            real = path.resolve()
            st = real.stat()
            entries.append(f"{path.name}\0{real}\0{st.st_size}\0{st.st_mtime_ns}")
    except OSError:
        return None
    return hashlib.sha256("\n".join(entries).encode()).hexdigest() if entries else None


def cached_weights_sha256(cfg: CodecConfig) -> str | None:
    """The ``weights_sha256`` recorded when these very files were last loaded; None when unknown."""
    folder = checkpoint_folder(cfg)
    key = files_key(folder) if folder is not None else None
    if key is None:
        return None
    try:
        return json.loads((cache_dir() / f"{key}.json").read_text())["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or a damaged entry: load and record again
        return None


def remember_weights_sha256(cfg: CodecConfig, key: str | None, sha256: str) -> None:
    """Record ``sha256`` for the files ``key`` identified before they were loaded (``files_key``); a cache that
    cannot be written only costs a codec load next time."""
    if key is None:
        return
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump({"pretrained": cfg.pretrained, "revision": cfg.revision, "weights_sha256": sha256}, f)
        os.replace(tmp, folder / f"{key}.json")  # whole or absent: a reader never sees half an entry
    except OSError as e:
        log.debug("could not record the weights hash in %s: %s", folder, e)
