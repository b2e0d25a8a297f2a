"""Config schemas: the one seam between Hydra YAML and code.

``conf/`` YAML is validated against these dataclasses (registered in Hydra's ConfigStore), and
``RunConfig.from_dictconfig`` turns the composed config into plain typed objects. Nothing below
``pipeline.tokenize.main`` imports omegaconf.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

MISSING = "???"


@dataclass
class DatasetConfig:
    """Where the items come from. ``kind`` picks the source (``pipeline.sources``)."""

    kind: str = "folder"
    # folder: directory to scan recursively; manifest: the manifest file; hf: hub name, save_to_disk directory,
    # or Parquet/Arrow files (directory, glob, file). Local paths or fsspec URLs (s3://bucket/prefix, gs://...).
    path: str = MISSING
    # fsspec options (a dict) for URL inputs: dataset.storage_options='{client_kwargs: {endpoint_url: ...}}'.
    # Typed Any with a None default because Hydra cannot override an empty or None dict node from the command
    # line. Hydra saves this config under <out>/.logs: leave credentials to the environment (AWS_ACCESS_KEY_ID).
    storage_options: Any = None
    # folder: file endings that count as audio (matched case-insensitively, no dot).
    extensions: list[str] = field(
        default_factory=lambda: ["wav", "flac", "mp3", "ogg", "opus", "m4a", "aac", "aiff", "aif", "wma", "webm", "mp4"]
    )
    # folder/manifest: read audiocraft-style sidecar metadata (song.flac + song.json) into row columns.
    sidecar_json: bool = True
    # folder/manifest: a sidecar larger than this (bytes) fails its item (read:bad_sidecar); at most this + 1
    # bytes are read, and devices/FIFOs are refused (a sidecar linked to /dev/zero was read without end).
    sidecar_max_bytes: int = 1048576
    follow_symlinks: bool = True
    # manifest: relative paths resolve against this (default: the manifest's folder).
    root: str | None = None
    # manifest: the field holding the audio path; manifest/hf: the field holding the id (None: derived from the
    # path relative to root / the audio path if unique, else row-000042).
    path_column: str = "path"
    id_column: str | None = None
    # hf: dataset config name, split, streaming, audio column, metadata columns to carry (None: all scalar ones).
    name: str | None = None
    split: str = "train"
    streaming: bool = False
    audio_column: str = "audio"
    metadata_columns: list[str] | None = None
    # Rename metadata fields (any source, sidecars included) before they become row columns, e.g. an HF dataset's
    # caption as MusicGen's text: dataset.rename='{caption: description}'. A mapped field replaces the row's own.
    # It changes no token, but is part of the job when set (plan.row_settings): a resume cannot mix column layouts.
    # A dict, typed Any for Hydra (as storage_options).
    rename: Any = None
    # Process only the first N items of the sorted list (debugging); None = all.
    limit: int | None = None


@dataclass
class CodecConfig:
    """Which codec and how it runs. Everything here except ``device`` and ``batch_*`` is in the fingerprint."""

    # transformers class family: encodec (default), dac, mimi.
    family: str = "encodec"
    # Hub id or local directory holding a ``save_pretrained`` checkpoint.
    pretrained: str = "facebook/encodec_32khz"
    # Hub revision (branch, tag or commit); pin a commit for reproducible datasets.
    revision: str | None = None
    # Target bandwidth in kbps (EnCodec) selecting the number of codebooks; None = the model's first.
    bandwidth: float | None = None
    # Number of codebooks to keep (DAC/Mimi); None = all.
    num_codebooks: int | None = None
    # Accept EnCodec models whose chunks overlap (48 kHz: 1 s chunks every 0.99 s). Their codes are the chunks'
    # codes one after another (150 frames per chunk), not one stream at the frame rate; refused unless true.
    overlapping_chunks: bool = False
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    # Encoder compute dtype: float32 or bfloat16 (autocast; the RVQ always runs in IEEE fp32).
    dtype: str = "float32"
    # TF32 for convolutions on CUDA (MusicGen trained with it on). Ignored on CPU.
    tf32: bool = True
    # torch.compile the encoder (CUDA only; one graph per bucket shape).
    compile: bool = False
    # Replay the encode as one CUDA graph per bucket shape (CUDA only; captured at start-up, each graph checked to
    # give eager's codes, else that shape runs eager). Not in the fingerprint: it does not change tokens.
    cuda_graph: bool = False
    # CPU backend: torch or onnx (ONNX Runtime, one exported graph per bucket length).
    backend: str = "torch"
    # Intra-op threads for the codec on CPU; changes float reduction order, hence in the fingerprint. 1 (the
    # default) gives the same tokens whatever the launch; auto takes this rank's share of the cores
    # (``codec_threads``), so a resume with another number of ranks per node is refused as a changed job.
    threads: Any = 1


@dataclass
class SegmentConfig:
    """How an item is cut into segments (rows)."""

    # window: fixed windows of length_s every hop_s; clip: the whole item up to max_s.
    kind: str = "window"
    length_s: float = 30.0
    # Window start spacing; None = length_s (no overlap).
    hop_s: float | None = None
    # Tails (and whole items) shorter than this are dropped and counted as skipped.
    min_s: float = 1.0
    # clip: items longer than this are cut to it (the rest is dropped and counted).
    max_s: float = 30.0
    # Zero-pad each segment to the next multiple of this many seconds before encoding (a bucket);
    # None = pad to the full window length, as MusicGen training does with short crops.
    bucket_s: float | None = None


@dataclass
class BatchConfig:
    """Fixed-shape batching. The rows per batch for each bucket derive from these and are in the fingerprint."""

    # Cap on padded audio seconds per batch: bounds memory whatever the file lengths. auto: by device
    # (``batch_audio_s``); the number it resolves to is what the plan and its fingerprint record.
    max_audio_s: Any = "auto"
    # Cap on rows per batch.
    max_rows: int = 64


@dataclass
class DecodeConfig:
    """Decode/resample worker processes."""

    # Worker processes for decode + resample per rank; 0 = in the main process (no crash isolation); auto = laid
    # out for the machine (``decode_workers``).
    workers: Any = "auto"
    # Seconds one item may take to decode before its worker is killed and the item failed.
    timeout_s: float = 120.0
    # soxr quality: HQ or VHQ (part of the fingerprint).
    resample_quality: str = "HQ"


@dataclass
class OutputConfig:
    # A local or mounted folder, or s3://bucket/prefix (README "Remote output").
    dir: str = MISSING
    # fsspec options for an s3:// output.dir (as dataset.storage_options); None: the dataset's storage_options.
    storage_options: Any = None
    # Object-store output: local folder where shards are written before their upload (None: the system temp dir).
    scratch_dir: str | None = None
    # Items per unit (the unit of work, output file and resume). Many more units than processes.
    unit_size: int = 64
    # Parquet compression codec and level.
    compression: str = "zstd"
    compression_level: int = 9
    # resume: continue a matching job, refuse a changed one; overwrite: delete the folder's state and restart.
    mode: str = "resume"
    # Retry only the items recorded as failed in an earlier run of this folder.
    retry_failed: bool = False


@dataclass
class RunConfig:
    """The whole job. Built from Hydra's composed config by ``from_dictconfig``."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # mono | stereo (MusicGen-stereo: L and R encoded separately and interleaved per codebook, K doubles).
    channels: str = "mono"
    # Seconds a claim stays valid without a heartbeat before another run may take the unit over.
    claim_lease_s: float = 120.0
    # Seconds the ranks of a launch wait for each other at start-up (the process-group timeout); the wait for rank 0
    # to plan is separate and long (tokenize.PLAN_WAIT).
    rendezvous_timeout_s: float = 300.0
    progress: bool = True
    # Seed for anything random (verify sampling). Changes no token.
    seed: int = 0
    # Changes nothing: lets a Hydra multirun sweep start N identical jobs that share the units through claims.
    worker_tag: int = 0

    @staticmethod
    def from_dictconfig(cfg: Any) -> "RunConfig":
        """Turn Hydra's DictConfig into typed dataclasses (validated against the schema)."""
        from omegaconf import OmegaConf
        from omegaconf.errors import MissingMandatoryValue

        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        try:
            run = OmegaConf.to_object(merged)
        except MissingMandatoryValue as e:  # e.g. dataset=folder without dataset.path
            raise ValueError(f"{e.full_key} is required: add {e.full_key}=... to the command") from None
        assert isinstance(run, RunConfig)
        run.validate()
        return run

    def validate(self) -> None:
        """Fail fast on arguments that cannot work, with a hint."""
        checks = [
            (self.segment.kind in ("window", "clip"), f"segment.kind must be window or clip, got {self.segment.kind}"),
            (self.segment.length_s > 0, "segment.length_s must be > 0"),
            (self.segment.min_s >= 0, "segment.min_s must be >= 0"),
            (self.channels in ("mono", "stereo"), f"channels must be mono or stereo, got {self.channels}"),
            (self.codec.dtype in ("float32", "bfloat16"), f"codec.dtype must be float32 or bfloat16, got {self.codec.dtype}"),
            (self.codec.threads == "auto" or (isinstance(self.codec.threads, int) and self.codec.threads >= 1),
             f"codec.threads must be auto or an integer >= 1, got {self.codec.threads!r}"),
            (self.output.unit_size >= 1, "output.unit_size must be >= 1"),
            (self.rendezvous_timeout_s > 0, "rendezvous_timeout_s must be > 0"),
            (self.output.mode in ("resume", "overwrite"), "output.mode must be resume or overwrite"),
            (self.batch.max_rows >= 1, "batch.max_rows must be >= 1"),
            (self.batch.max_audio_s == "auto" or (isinstance(self.batch.max_audio_s, (int, float))
                                                  and self.batch.max_audio_s > 0),
             f"batch.max_audio_s must be auto or a number > 0, got {self.batch.max_audio_s!r}"),
            (self.decode.workers == "auto" or (isinstance(self.decode.workers, int) and self.decode.workers >= 0),
             f"decode.workers must be auto or an integer >= 0, got {self.decode.workers!r}"),
            (self.dataset.rename is None or (isinstance(self.dataset.rename, dict) and all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in self.dataset.rename.items())),
             f"dataset.rename must map field names to field names, e.g. '{{caption: description}}', got "
             f"{self.dataset.rename!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_auto(cfg: "RunConfig", device: str) -> "RunConfig":
    """A copy of ``cfg`` with every ``auto`` replaced by its number for this rank's ``device``: what the plan, its
    fingerprint and the stages see."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    batch = replace(cfg.batch, max_audio_s=batch_audio_s(cfg.batch.max_audio_s, device))
    decode = replace(cfg.decode, workers=decode_workers(cfg.decode.workers, device_type, local_ranks))
    codec = replace(cfg.codec, threads=codec_threads(cfg.codec.threads, device_type, local_ranks))
    return replace(cfg, batch=batch, decode=decode, codec=codec)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def codec_threads(setting: Any, device_type: str, local_ranks: int = 1, cores: int | None = None) -> int:
    """``codec.threads``: ``setting`` itself, or for ``auto`` this rank's share of the cores on CPU (the encoder is
    the whole cost there; the naive loop's torch default uses them all too), 1 on CUDA (the host's torch work is
    copies)."""
    if setting != "auto":
        return int(setting)
    if device_type == "cuda":
        return 1
    return max(1, (cores or _cores()) // max(1, local_ranks))


def batch_audio_s(setting: Any, device: str) -> float:
    """``batch.max_audio_s``: ``setting`` itself, or for ``auto`` the batch that suits the device.

    CUDA: 1920 s (64 rows of 30 s) from 64 GB of GPU memory, 480 s from 32 GB, else 240 s. On an H200 with EnCodec
    32 kHz (TF32, 2026-11-26) a batch of 16 rows ran at 4320 audio s/s, 32 at 5006, 64 at 5396, 128 at 5618: the
    LSTM's one step per frame costs the same for any number of rows, so wide batches amortise it. EnCodec runs its
    convolutions in groups of at most 34 rows (CUDA's 32-bit index limit), so memory stops growing there: ~40 MB
    per padded audio second up to 960 s (38 GB), then almost nothing (38.3 GB at 64 rows, 39.0 GB at 128). Wider
    than 64 rows gained 4% more but needs twice the decoded audio in flight before the GPU starts.
    CPU: 30 s, one row. 4-row batches cost 16% (torch) to 29% (ONNX Runtime) less per row when full, but a process
    needs about 1 GB + 35 MB per batch second (2.0 GB at 30 s, 5.1 GB at 120 s, 9.3 GB at 240 s, measured), the
    fastest CPU layout is one process per core, and one row is never a part-empty batch. The CPU choice must not
    depend on the launch (rows per batch are in the fingerprint, and a resume may use another number of ranks).
    Tuned on EnCodec 32 kHz: for codecs with a higher rate or stereo input, check the peak (``benchmarks``) or set
    a number.
    """
    if setting != "auto":
        return float(setting)
    if device.startswith("cuda"):
        import torch

        memory_gb = torch.cuda.get_device_properties(torch.device(device)).total_memory / 1e9
        # Memory is that of the widest convolution group: min(batch, 960 s) at ~40 MB per second, kept under 60%.
        return next((s for s in (1920.0, 480.0) if min(s, 960.0) * 0.040 <= 0.6 * memory_gb), 240.0)
    return 30.0


def decode_workers(setting: Any, device_type: str, local_ranks: int = 1, cores: int | None = None) -> int:
    """Decode worker processes for one rank: ``setting`` itself, or for ``auto`` a layout for the machine.

    On CUDA the GPU outruns one core's decoding by ~10x (44.1 kHz FLAC + soxr at ~420-800x realtime per core vs
    4200-7400x for the encoder on an H100), so a rank takes every core it has but two (for its own threads: the loop, the pipe reader, the
    launcher and the writer, about 0.2 of a core per 1000x realtime, measured on CPU), its share when several ranks
    share a node. On CPU the codec's own threads are the bottleneck and decoding is ~0.5% of a
    core (measured), so two workers keep it fed and leave the cores to the codec.

    Args:
        setting: ``decode.workers``: ``auto`` or an int.
        device_type: ``cuda`` or ``cpu``, where the codec runs.
        local_ranks: ranks on this node (``LOCAL_WORLD_SIZE``); they share its cores.
        cores: cores this process may use (default: its CPU affinity).
    """
    if setting != "auto":
        return int(setting)
    if device_type != "cuda":
        return 2
    return max(1, min(32, (cores or _cores()) // max(1, local_ranks) - 2))


def register_configs() -> None:
    """Register the schema (so YAML typos and wrong types fail at composition time) and our resolvers."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    # ${pipeline.repo:examples/audio}: a path inside this checkout, whatever the working directory.
    OmegaConf.register_new_resolver("pipeline.repo", lambda rel: str(REPO_ROOT / rel), replace=True)
    # ${pipeline.fixture_codec:tiny}: build (once, cached) the offline test codec and return its directory.
    OmegaConf.register_new_resolver("pipeline.fixture_codec", _fixture_codec, replace=True)
    # ${pipeline.logs:${output.dir},${output.scratch_dir}}: where Hydra writes this run's logs.
    OmegaConf.register_new_resolver("pipeline.logs", logs_dir, replace=True)


def logs_dir(out_dir: str, scratch_dir: str | None = None) -> str:
    """``<out>/.logs`` for a local output. An object store cannot take a log appended line by line, so a URL's
    logs go to a local scratch folder, uploaded to ``<out>/.logs`` when the run ends (``prepare.upload_logs``)."""
    from pipeline.sources.storage import is_url
    from pipeline.stores import scratch_folder

    if out_dir.startswith("file://"):
        out_dir = out_dir.removeprefix("file://")
    elif is_url(out_dir):
        return str(scratch_folder(out_dir, scratch_dir) / "logs")
    try:  # Hydra makes this folder before the run: an output.dir that cannot be written must fail in the run,
        Path(out_dir, ".logs").mkdir(parents=True, exist_ok=True)  # with one line, not in Hydra with a traceback
        os.rmdir(tempfile.mkdtemp(dir=Path(out_dir, ".logs")))  # one there already (read-only mount) is not enough
    except OSError:
        return str(scratch_folder(out_dir, scratch_dir) / "logs")
    return f"{out_dir}/.logs"


def _fixture_codec(variant: str) -> str:
    from pipeline.codecs.testing import fixture_codec_dir

    return str(fixture_codec_dir(variant))
