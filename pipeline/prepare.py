"""Start-up: make or check the plan (rank 0), clean what a crash left, and build the stages of a rank."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath
from typing import Any, Callable

from pipeline.config import RunConfig, logs_dir
from pipeline.claims import Owner, claim_state, heartbeat, judge
from pipeline.finalize import CodecInfo, finalize
from pipeline.layout import DamagedState, OutputLayout
from pipeline.plan import (Plan, build_plan, check_detail, check_same_job, device_kind, fingerprint_detail,
                           load_items, load_plan, save_items, save_plan, wipe)
from pipeline.retry import drop_stale_stashes, reopen_failed_units
from pipeline.stores import OutputStore, json_bytes
from pipeline.stores.local import LocalStore
from pipeline.sources import Source, build_source
from pipeline.types import AudioItem

log = logging.getLogger(__name__)
_UNIT = re.compile(r"(?:unit|train)-(\d{5})")
_OURS = re.compile(r"train-\d{5}-of-\d{5}\.parquet|unit-\d{5}\.jsonl")  # ``layout.shard``, ``failure_log``


@dataclass
class Job:
    """A planned job as every rank sees it."""

    cfg: RunConfig
    layout: OutputLayout
    plan: Plan
    items: list[AudioItem]
    source: Source

    @property
    def finished(self) -> bool:
        return self.layout.done_units() >= set(range(self.plan.n_units))

    def finalize_if_done(self, stopping: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
        """Merge stats and write the card once every unit is done. The first rank to claim it does it, keeping its
        claim fresh; the others wait until the claim says done, and take over if its owner died, so that every
        run that exits 0 leaves a finalized folder (a finalizer killed mid-way left the others exiting 0 with no
        stats or card). ``stopping``: a stop signal arrived (the wait ends, nothing is finalized)."""
        record = json_bytes(asdict(Owner.me()))
        if not self.finished or not self._claim_finalize(record, stopping):
            return None
        marker = self.layout.read_marker(0)
        with heartbeat(self.layout.store, self.layout.finalize_claim, record, self.cfg.claim_lease_s):
            stats = finalize(self.layout, self.plan, CodecInfo(**marker["codec"]))
        self.layout.store.write_atomic(self.layout.finalize_claim, _FINALIZED, self.layout.tmp)
        return stats

    def _claim_finalize(self, record: bytes, stopping: Callable[[], bool]) -> bool:
        """True when this run is to finalize; False once another run has (waits while one is at it)."""
        store, claim = self.layout.store, self.layout.finalize_claim
        while not store.create_exclusive(claim, record):
            lease = store.read_lease(claim)
            if lease is None:
                continue  # released between our create and our read: try again
            if lease.data == _FINALIZED or stopping():
                return False
            if judge(lease, self.cfg.claim_lease_s) == "stale" and store.take_over(claim, record, lease):
                log.warning("the run finalizing this folder stopped before it was done; finalizing it here")
                return True
            time.sleep(1.0)
        return True


_FINALIZED = json_bytes({"done": True})  # what the finalize claim says once finalize has run


def output_layout(cfg: RunConfig) -> OutputLayout:
    """The output folder of a run; a URL's credentials and endpoint come from ``output.storage_options``, else
    from ``dataset.storage_options`` (inputs and outputs usually share one object store)."""
    options = cfg.output.storage_options
    return OutputLayout.open(cfg.output.dir, cfg.dataset.storage_options if options is None else options,
                             cfg.output.scratch_dir)


def upload_logs(cfg: RunConfig, local_dir: Path) -> None:
    """Copy a run's Hydra logs and resolved config to ``<out>/.logs/<run>`` when its temp files (hence its logs,
    ``config.logs_dir``) live outside the output folder, i.e. on an object store. Nothing to do otherwise."""
    layout = output_layout(cfg)
    if layout.scratch is None or not local_dir.is_dir():
        return
    logs = Path(logs_dir(cfg.output.dir, cfg.output.scratch_dir))
    run_dir = local_dir.relative_to(logs) if local_dir.is_relative_to(logs) else Path(local_dir.name)
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        target = layout.root / ".logs" / run_dir.as_posix() / path.relative_to(local_dir).as_posix()
        layout.store.write_atomic(target, path.read_bytes(), layout.tmp)


def prepare(cfg: RunConfig, ranks, barrier: Callable, weights_sha256: str) -> Job:
    """Rank 0 lists the inputs and writes or checks the plan; the others wait, then read it.

    ``weights_sha256``: the codec's (in the fingerprint): the loaded codec's, or, for a rerun of a finished folder,
    the one recorded for the same checkpoint files (``codecs.identity``), so every setting is checked there too.
    """
    layout = output_layout(cfg)
    detail = fingerprint_detail(cfg, _device_kind(ranks.device), weights_sha256)
    source = build_source(cfg.dataset)
    if ranks.is_main:
        plan, items = _plan_on_main(cfg, layout, source, detail)
    barrier(ranks)
    if not ranks.is_main:
        plan = load_plan(layout)
        items = load_items(layout, plan)
        check_detail(plan, detail, layout.url)
    layout.tmp.mkdir(parents=True, exist_ok=True)  # an object store's scratch folder is local to each host
    return Job(cfg, layout, plan, items, source)


def _plan_on_main(cfg: RunConfig, layout: OutputLayout, source: Source, detail: dict) -> tuple[Plan, list[AudioItem]]:
    layout.store.check_writable(layout.root)
    if not layout.store.exists(layout.plan):
        _refuse_foreign_folder(layout)
    if cfg.output.mode == "overwrite":
        wipe(layout)
    items = source.list_items()
    if cfg.dataset.limit is not None:
        items = items[: cfg.dataset.limit]
    if not items:
        raise ValueError(f"no audio items found in {source.describe()}; check dataset.path and dataset.extensions")
    new = build_plan(items, cfg, detail, source.describe())
    old = load_plan(layout)
    if old is None:
        _refuse_shards_without_plan(layout)
    if old is None and save_plan(layout, new, items):
        log.info("planned %d items in %d units -> %s", new.n_items, new.n_units, layout.url)
        return new, items
    old = old or load_plan(layout)  # another launch planned this folder a moment ago
    assert old is not None
    check_same_job(old, new, layout.url)
    layout.make_dirs()
    save_items(layout, old, items)  # the other ranks read it: a folder planned before lists were named by hash
    # A new run finalizes again (stats may change with retry_failed; a crash may have cut the last finalize).
    layout.store.delete(layout.finalize_claim)
    drop_stale_stashes(layout)
    _reopen_units_without_shards(layout, old.n_units)  # before retry_failed, which stashes the shards it reopens
    if cfg.output.retry_failed:
        reopened = reopen_failed_units(layout, old.n_units)
        log.info("retry_failed: %d unit(s) reopened for their failed items only", len(reopened))
    _refuse_claims_that_are_not_files(layout)
    _clean_uncommitted(layout, cfg.claim_lease_s)
    log.info("resuming: %d of %d units done", len(layout.done_units()), old.n_units)
    return old, items


def _refuse_shards_without_plan(layout: OutputLayout) -> None:
    """Shards in ``data/`` and no plan: an overwrite cut short before it deleted them, or another dataset's files.
    A new plan would add its shards beside them, and loaders read every file there."""
    shards = [name for name in layout.store.list_names(layout.data) if name.endswith(".parquet")]
    if shards:
        raise ValueError(f"output.dir {layout.url} holds {len(shards)} Parquet files in data/ but no plan "
                         "(.state/plan.json): an output.mode=overwrite that was cut short, or files that are not "
                         "this pipeline's. Pass output.mode=overwrite to delete them, or use a new output.dir")


# What this pipeline writes in a folder before its plan exists: Hydra's logs of this run (``config.logs_dir``), and
# the folders and item list ``save_plan`` makes first (a launch killed before its plan leaves them).
_BEFORE_PLAN = {".logs", ".state", "data", "failures"}


def _refuse_foreign_folder(layout: OutputLayout) -> None:
    """A folder with no plan must hold nothing but what the pipeline writes first: a resume would write its card
    over a README.md of someone else's, an overwrite would delete the user's ``data/`` and ``stats.json``. Shards
    and failure logs named as ours are left to ``_refuse_shards_without_plan`` (an overwrite may delete them)."""
    names = layout.store.list_names(layout.root)
    # (a write probe is another launch's ``check_writable``, deleted as soon as made)
    foreign = [n for n in names if n not in _BEFORE_PLAN and not n.startswith(".write-probe-")]
    foreign = sorted(foreign + [f"{d}/{n}" for d in ("data", "failures") if d in names
                                for n in layout.store.list_names(layout.root / d) if not _OURS.fullmatch(n)])
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"output.dir {layout.url} is not empty and is not this pipeline's output (no "
                         f".state/plan.json): it holds {shown}; use a new or empty output.dir, or delete these "
                         "files first")


def _reopen_units_without_shards(layout: OutputLayout, n_units: int) -> None:
    """A done marker whose shard is gone (deleted by hand, an object store's lifecycle rule, a crash of an older
    overwrite between its deletes) would stop finalize on every rerun: the unit is redone instead."""
    shards = set(layout.store.list_names(layout.data))
    for unit in sorted(layout.done_units()):
        if layout.shard(unit, n_units).name not in shards:
            log.warning("unit %d is marked done but its shard %s is missing: encoding it again", unit,
                        layout.shard(unit, n_units).name)
            layout.store.delete(layout.marker(unit))


def _refuse_claims_that_are_not_files(layout: OutputLayout) -> None:
    """A claim path that is a folder (made by hand or by a tool) can be neither read, taken over nor released:
    every run would crash on it."""
    for name in layout.store.list_names(layout.claims):
        path = layout.claims / name
        if isinstance(layout.store, LocalStore) and Path(path).is_dir():
            raise DamagedState(f"{layout.store.url(path)} is a folder, not a claim; delete it and rerun the same "
                               "command")


def _clean_uncommitted(layout: OutputLayout, lease_s: float) -> None:
    """Remove what a crash left: shards, failure logs and temp files of units with no marker and no live claim,
    claims of units that are done (owner killed between marker and release), and stray temp files. Units another
    live run is writing right now are left alone."""
    done = layout.done_units()
    local = LocalStore()  # the temp folder is always local: inside the output folder, or its scratch folder
    for store, folder in ((layout.store, layout.data), (layout.store, layout.failures), (local, layout.tmp),
                          (layout.store, layout.claims)):
        for name in store.list_names(folder):
            path = folder / name
            if _is_leftover(layout, store, folder, path, done, lease_s):
                log.info("removing leftover %s", store.url(path))
                store.delete(path)


def _is_leftover(layout: OutputLayout, store: OutputStore, folder: PurePath, path: PurePath, done: set[int],
                 lease_s: float) -> bool:
    match = _UNIT.search(path.name)
    if match is None:  # temp files of plan/stats writes, renamed-away stale claims (small files)
        lease = store.read_lease(path) if folder in (layout.tmp, layout.claims) else None
        return lease is not None and lease.age_s > lease_s
    unit = int(match.group(1))
    if folder == layout.claims:
        return unit in done
    if unit in done and folder != layout.tmp:
        return False
    if claim_state(layout, unit, lease_s) == "live":
        return False
    # Not if the unit was committed since ``done`` was listed: its owner wrote the marker, then released the claim
    # we found gone (another launch sharing the folder). Temp files are never committed content.
    return folder == layout.tmp or not layout.store.exists(layout.marker(unit))


def _device_kind(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return device_kind("cuda", torch.cuda.get_device_name(torch.device(device)))
    return device_kind("cpu")


def check_weights(plan: Plan, codec, out_dir: str) -> None:
    """Refuse a codec whose weights are not the plan's (loaded after ``prepare`` adopted the plan's hash)."""
    codec_detail = {**plan.fingerprint_detail["codec"], "weights_sha256": codec.fingerprint()["weights_sha256"]}
    check_detail(plan, {**plan.fingerprint_detail, "codec": codec_detail}, out_dir)


def looks_finished(cfg: RunConfig) -> bool:
    """A cheap look before loading anything: does the output folder already hold every unit's marker?"""
    if cfg.output.mode != "resume":  # an overwrite reads no plan: a damaged one is what it may be run to replace
        return False
    layout = output_layout(cfg)
    plan = load_plan(layout)
    return plan is not None and layout.done_units() >= set(range(plan.n_units))


def build_stages(cfg: RunConfig, job: Job, ranks, codec):
    """Wire the loaded codec, decode pool, batcher, writer and claims into this rank's Runner."""
    from pipeline.batching import BatchPolicy
    from pipeline.claims import Claims
    from pipeline.encode import warm_up
    from pipeline.finalize import codec_info
    from pipeline.progress import Progress
    from pipeline.runner import Runner
    from pipeline.segment import SegmentPolicy
    from pipeline.workers import DecodePool, DecodeSpec
    from pipeline.writer import UnitWriter

    # run() checked the channel policy against the codec (encode.check_channels) before anything was written.
    info = codec_info(cfg.codec.pretrained, cfg.codec.family, codec, cfg.channels)
    segments = SegmentPolicy.from_config(cfg.segment, codec.sample_rate)
    spec = DecodeSpec(job.source, codec.sample_rate, cfg.channels, cfg.decode.resample_quality, segments,
                      dict(cfg.dataset.rename or {}) or None)
    file_meta = {"pipeline.fingerprint": job.plan.fingerprint,
                 "pipeline.fingerprint_detail": json.dumps(job.plan.fingerprint_detail, sort_keys=True),
                 "pipeline.codec": json.dumps(info.__dict__), "pipeline.codec_model": json.dumps(codec.fingerprint(), default=str)}
    writer = UnitWriter(job.layout, job.plan.n_units, info.num_codebooks, file_meta,
                        cfg.output.compression, cfg.output.compression_level, cfg.dataset.rename)
    remaining = job.plan.n_items - sum(len(job.plan.unit_range(u)) for u in job.layout.done_units())
    batches = BatchPolicy.for_codec(cfg.batch, cfg.channels, codec)
    # Units waiting on a partial batch are normal while it fills: up to a full batch of them (one segment each)
    # before one is encoded part-empty (a fixed 4 made 8-row batches go out half full, measured).
    full_rows = batches.rows_for(segments.length)
    max_waiting = max(4, full_rows // batches.channels)
    # The full-length bucket is the common shape (every window but an item's last); other buckets compile lazily,
    # but get their CUDA graphs here too (captured only at start-up, before the launch threads exist).
    others = [(batches.rows_for(n), n) for n in segments.padded_lengths() if n != segments.length]
    warmup_s = warm_up(codec, full_rows, segments.length, batches.row_channels, others)
    if warmup_s:
        log.info("codec warm-up at %d x %d samples: %.1f s", full_rows, segments.length, warmup_s)
    runner = Runner(
        job.plan, job.items, job.layout, codec,
        DecodePool(spec, cfg.decode.workers, cfg.decode.timeout_s,
                   # two batches' worth of decoded audio may wait for the codec; beyond that workers pause
                   max_buffered_samples=round(2 * cfg.batch.max_audio_s * codec.sample_rate * 2)),
        Claims(job.layout, cfg.claim_lease_s), writer,
        batches,
        Progress(max(1, remaining // ranks.world_size), enabled=cfg.progress and ranks.is_main),
        start_unit=ranks.rank * job.plan.n_units // ranks.world_size,
        marker_extra={"fingerprint": job.plan.fingerprint, "codec": info.__dict__, "rank": ranks.rank},
        max_waiting_units=max_waiting,
    )
    runner.stats.warmup_s = warmup_s
    runner.stats.graphs = "" if codec.graphs is None else codec.graphs.describe()
    runner.stats.rank, runner.stats.world_size = ranks.rank, ranks.world_size
    return runner
