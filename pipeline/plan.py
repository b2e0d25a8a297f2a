"""Plan stage: the sorted item list cut into units, plus the fingerprint of everything that changes tokens.

Written once to ``<out>/.state/plan.json`` (and the items to ``items-<hash>.jsonl``); every later run of the same
output folder must agree with it, or it is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.config import DatasetConfig, RunConfig
from pipeline.layout import DamagedState, OutputLayout
from pipeline.stores import json_bytes
from pipeline.types import AudioItem

log = logging.getLogger(__name__)

PLAN_VERSION = 1


class PlanMismatch(RuntimeError):
    """The output folder holds a different job."""


@dataclass(frozen=True)
class Plan:
    """The frozen job description. Units are ``[u * unit_size, (u + 1) * unit_size)`` slices of the items."""

    n_items: int
    unit_size: int
    items_hash: str
    fingerprint: str
    fingerprint_detail: dict[str, Any]
    source: dict[str, Any]
    version: int = PLAN_VERSION

    @property
    def n_units(self) -> int:
        return -(-self.n_items // self.unit_size)

    def unit_range(self, unit: int) -> range:
        """Item indices of a unit: a pure function of the sorted list and the unit size, never of the world size.

        >>> p = Plan(n_items=10, unit_size=4, items_hash="", fingerprint="", fingerprint_detail={}, source={})
        >>> p.n_units, list(p.unit_range(0)), list(p.unit_range(2))
        (3, [0, 1, 2, 3], [8, 9])
        """
        return range(unit * self.unit_size, min(self.n_items, (unit + 1) * self.unit_size))


def items_hash(items: list[AudioItem]) -> str:
    """Hash of the ids and sources in order: a changed input list changes it."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.id}\0{it.source}\n".encode())
    return h.hexdigest()[:16]


def fingerprint_detail(cfg: RunConfig, device_kind: str, weights_sha256: str | None = None) -> dict[str, Any]:
    """Every setting and version that can change a token (README "Tokens"), and the codec weights' identity.

    Args:
        weights_sha256: the loaded codec's ``weights_sha256``; None when no codec was loaded (a rerun of a
            finished folder, which adopts the plan's: see ``prepare``).
    """
    import av
    import soundfile
    import soxr
    import torch
    import transformers

    from pipeline import __version__
    from pipeline.writer import ROW_SCHEMA_VERSION

    on_cpu = device_kind.startswith("cpu")
    codec = {k: v for k, v in asdict(cfg.codec).items() if k not in ("device", "threads", "cuda_graph")}
    codec["tf32"] = cfg.codec.tf32 and not on_cpu  # TF32 does not exist on CPU
    codec["weights_sha256"] = weights_sha256
    if cfg.codec.backend == "onnx":  # another runtime version may compute the encoder differently
        from importlib.metadata import version

        codec["onnxruntime"] = version("onnxruntime")
    detail = {
        "codec": codec,
        "device_kind": device_kind,
        # Intra-op threads change float reduction order on CPU; on GPU they do not touch the kernels.
        "cpu_threads": cfg.codec.threads if on_cpu else None,
        "segment": asdict(cfg.segment),
        "batch": asdict(cfg.batch),
        "channels": cfg.channels,
        "resampler": {"soxr": soxr.__version__, "quality": cfg.decode.resample_quality},
        "decoders": {"libsndfile": soundfile.__libsndfile_version__, "av": av.__version__},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "pipeline": __version__,
                     "row_schema": ROW_SCHEMA_VERSION},
    }
    if rows := row_settings(cfg):
        detail["rows"] = rows
    return detail


def row_settings(cfg: RunConfig) -> dict[str, Any]:
    """What shapes a row's columns besides its tokens: a resume with other values would mix, say, rows whose
    caption is ``description`` with rows where it is ``metadata.caption``. Only values off their defaults, so the
    fingerprint of a folder planned before these were in it is unchanged."""
    settings = {name: getattr(cfg.dataset, name) for name in _ROW_SETTINGS}
    settings["rename"] = settings["rename"] or None  # an empty mapping renames nothing, as no mapping
    default = DatasetConfig()
    return {name: value for name, value in settings.items() if value != getattr(default, name)}


_ROW_SETTINGS = ("rename", "sidecar_json", "metadata_columns")  # dataset.* fields that shape rows


# Where the weights were loaded from is provenance, not identity: the fingerprint takes the weights' own hash
# instead, so a copy moved to another mount or cluster is the same job, and new weights at the same path (or a
# Hub revision that moved) are not. The detail keeps both, for the refusal's message and for ``verify``.
_PROVENANCE = ("pretrained", "revision")


def fingerprint_of(detail: dict[str, Any]) -> str:
    return _digest(_without_codec_keys(detail, _PROVENANCE))


def _without_codec_keys(detail: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {**detail, "codec": {k: v for k, v in detail.get("codec", {}).items() if k not in keys}}


def _digest(detail: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(detail, sort_keys=True).encode()).hexdigest()[:16]


def device_kind(device_type: str, cuda_name: str | None = None) -> str:
    """``cuda:<GPU name>`` or ``cpu:<CPU model>``: the kernels that run differ between them."""
    if device_type == "cuda":
        return f"cuda:{cuda_name}"
    return f"cpu:{cpu_model()}"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for fingerprints and benchmark records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_plan(items: list[AudioItem], cfg: RunConfig, detail: dict[str, Any], source: dict[str, Any]) -> Plan:
    return Plan(len(items), cfg.output.unit_size, items_hash(items), fingerprint_of(detail), detail, source)


def load_plan(layout: OutputLayout) -> Plan | None:
    """The folder's plan; None when it has none. A plan that cannot be read (cut, emptied, edited by hand) is
    refused with its path: nothing in the folder can be checked against it."""
    if not layout.store.exists(layout.plan):
        return None
    try:
        return Plan(**json.loads(layout.store.read_bytes(layout.plan)))
    except (OSError, ValueError, TypeError) as e:  # unreadable, not JSON (cut), not a dict, a key missing or extra
        raise DamagedState(f"{layout.store.url(layout.plan)} is damaged ({type(e).__name__}: {e}): the folder's job "
                           "cannot be known; pass output.mode=overwrite to delete this output and encode it again, "
                           "or use a new output.dir") from e


def save_plan(layout: OutputLayout, plan: Plan, items: list[AudioItem]) -> bool:
    """Items first, plan last: a plan.json on disk always has its items beside it.

    The plan is created only if absent: False when another launch sharing the folder (a SLURM array task)
    created one first; the caller then checks it is the same job.
    """
    layout.make_dirs()
    save_items(layout, plan, items)
    return layout.store.create_atomic(layout.plan, json_bytes(asdict(plan)), layout.tmp)


def save_items(layout: OutputLayout, plan: Plan, items: list[AudioItem]) -> None:
    """The item list under its hash. One already there is kept when it parses to that hash (a resume does not
    rewrite it), and written again when not (cut or edited: the other ranks could never read it)."""
    path = layout.items_of(plan.items_hash)
    if not layout.store.exists(path):
        layout.store.create_atomic(path, _items_bytes(items), layout.tmp)
        return
    try:
        if items_hash(_parse_items(layout.store.read_bytes(path))) == plan.items_hash:
            return
    except (OSError, ValueError, TypeError):
        pass
    log.warning("%s does not hold the planned items (cut or edited): writing it again", layout.store.url(path))
    layout.store.write_atomic(path, _items_bytes(items), layout.tmp)


def _items_bytes(items: list[AudioItem]) -> bytes:
    return "".join(json.dumps(asdict(it), ensure_ascii=False, default=str) + "\n" for it in items).encode()


def _parse_items(data: bytes) -> list[AudioItem]:
    return [AudioItem(**json.loads(line)) for line in data.decode("utf-8").splitlines()]


def load_items(layout: OutputLayout, plan: Plan) -> list[AudioItem]:
    """The planned item list, checked against the plan's hash (ranks other than the first encode from it)."""
    path = layout.items_of(plan.items_hash)
    path = path if layout.store.exists(path) else layout.items
    try:
        items = _parse_items(layout.store.read_bytes(path))
    except (OSError, ValueError, TypeError) as e:  # cut (a line is not JSON), a field missing, not a file
        raise PlanMismatch(f"{layout.store.url(path)} is damaged ({type(e).__name__}: {e}); rerun the same command "
                           "(its first rank writes it again from the inputs)") from e
    if items_hash(items) != plan.items_hash or len(items) != plan.n_items:
        raise PlanMismatch(f"{layout.store.url(path)} lists {len(items)} items (hash {items_hash(items)}), the plan "
                           f"{plan.n_items} (hash {plan.items_hash}); the folder's state was changed by hand or by "
                           "another job: rerun the same command (its first rank writes it again from the inputs), "
                           "or use a new output.dir")
    return items


def check_same_job(old: Plan, new: Plan, out_dir: Path | str) -> None:
    """Refuse to mix two jobs in one folder; say what differs and the two ways out."""
    diffs = []
    if old.items_hash != new.items_hash or old.n_items != new.n_items:
        diffs.append(f"input list: {old.n_items} items (hash {old.items_hash}) -> {new.n_items} (hash {new.items_hash})")
    if old.unit_size != new.unit_size:
        diffs.append(f"output.unit_size: {old.unit_size} -> {new.unit_size}")
    if old.fingerprint != new.fingerprint:
        diffs += [f"{k}: {a} -> {b}" for k, a, b in _dict_diff(old.fingerprint_detail, new.fingerprint_detail)]
    if diffs:
        raise PlanMismatch(
            f"output.dir {out_dir} holds a different job; refusing to mix tokens of two jobs:\n  "
            + "\n  ".join(diffs)
            + "\nWrite to a new output.dir, or pass output.mode=overwrite to delete this one and start again."
        )


def check_detail(plan: Plan, detail: dict[str, Any], out_dir: Path | str) -> None:
    """``check_same_job`` for a run whose only news is its fingerprint detail (same items, same units)."""
    check_same_job(plan, replace(plan, fingerprint=fingerprint_of(detail), fingerprint_detail=detail), out_dir)


def _dict_diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict | None) and isinstance(vb, dict | None) and (va or vb):  # a missing group: {}
            out += _dict_diff(va or {}, vb or {}, f"{prefix}{key}.")
        elif va != vb:
            out.append((f"{prefix}{key}", va, vb))
    return out


def wipe(layout: OutputLayout) -> None:
    """``output.mode=overwrite``: remove the folders this pipeline owns (``data/`` whole, foreign files in it
    included, since loaders read every file there; ``failures/``, ``.state/``, and ``verify/``, whose report would
    describe the old job) and its files at the top (``README.md``, ``stats.json``). Anything else stays."""
    # The card and stats first, then the done markers, the plan last: a wipe cut short leaves the plan with shards
    # but no markers, which the next run of the same job redoes and overwrites; never markers whose shards are gone,
    # shards with no plan, nor a card with no plan (which a later run would take for a user's README.md).
    for name in ("README.md", "stats.json"):
        layout.store.delete(layout.root / name)
    for path in (layout.done, layout.data, layout.failures, layout.root / "verify", layout.state):
        layout.store.delete_tree(path)
