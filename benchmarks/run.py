"""Throughput and memory benchmark: the naive per-file loop vs the codec's limit vs the pipeline, on the same audio.

    python -m benchmarks.run [--minutes M] [--codec DIR|full|tiny] [--device cpu|cuda] [--out FILE.json]
    python -m benchmarks.run --memory --stages none      # peak memory: 12-minute file, 10x dataset, 1/4 batch cap
    python -m benchmarks.run --nproc 2 --threads 1       # one process per core (torchrun), one thread each

One run generates music-like 44.1 kHz stereo files (FLAC and WAV, ``--min-s``..``--max-s`` seconds each, about
``--minutes`` in all), then measures each stage in its own process (``benchmarks.stages``, ``benchmarks.measure``):

- naive: per file, soundfile -> mono -> soxr -> ``AutoProcessor`` -> ``EncodecModel.encode`` (torch's default
  threads; no batching). What users write today.
- codec: ``Codec.encode`` alone on the pipeline's own batches of the same audio, decoded beforehand: the limit.
- pipeline: ``pipeline.tokenize.run`` end to end into a fresh folder (under ``torchrun`` with ``--nproc N``).

It prints and writes (JSON) audio seconds per second, the realtime factor (wall / audio), CPU seconds, peak RSS
per stage (and peak GPU memory on CUDA), the ratios pipeline/naive and pipeline/codec, and bits per stored token
(whole shards, and the ``codes`` column alone from the Parquet column-chunk metadata). ``--repeat N`` runs the
stages N times interleaved and keeps each stage's fastest run: on a shared machine the fastest is the least
disturbed. Results and method: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.corpus import audio_seconds, machine, make_corpus, make_long_file, replicate
from benchmarks.measure import run_measured
from pipeline.config import REPO_ROOT

STAGES = ("naive", "codec", "pipeline", "host")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=4.0, help="audio to generate, in minutes (default 4)")
    p.add_argument("--min-s", type=float, default=10.0, help="shortest file, seconds")
    p.add_argument("--max-s", type=float, default=60.0, help="longest file, seconds")
    p.add_argument("--format", default="mixed", choices=("mixed", "flac"),
                   help="mixed: FLAC and WAV alternate (default); flac: every file FLAC (the GPU target's input)")
    p.add_argument("--copies", type=int, default=1,
                   help="the dataset is this many hard-linked copies of the generated files (a large dataset "
                        "without generating it; the codec stage encodes the distinct files' batches this many times)")
    p.add_argument("--codec", default="full",
                   help="full | tiny (fixture codecs: full has facebook/encodec_32khz's architecture and cost) or a "
                        "save_pretrained directory / hub id (default full)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--backend", default=None, help="codec.backend: torch | onnx (default: the config's)")
    p.add_argument("--threads", type=int, default=None, help="codec.threads (default: the config's)")
    p.add_argument("--workers", type=int, default=None, help="decode.workers (default: the config's)")
    p.add_argument("--max-audio-s", type=float, default=None, help="batch.max_audio_s (default: the config's)")
    p.add_argument("--max-rows", type=int, default=None, help="batch.max_rows (default: the config's)")
    p.add_argument("--unit-size", type=int, default=1,
                   help="output.unit_size (default 1: a few-minute corpus still has many more units than ranks)")
    p.add_argument("--nproc", type=int, default=1, help="ranks for the codec and pipeline stages (torchrun)")
    p.add_argument("--naive-threads", type=int, default=None, help="threads for the naive loop (default torch's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for the codec and pipeline stages (repeatable), e.g. "
                        "--set codec.dtype=bfloat16 --set codec.compile=true")
    p.add_argument("--stages", default="naive,codec,pipeline",
                   help="comma-separated subset of naive,codec,pipeline,host, or none (default: the first three). "
                        "host: the pipeline with an instant codec, what decode + transfer + batching can feed a GPU")
    p.add_argument("--repeat", type=int, default=1, help="run the stages this many times, keep each one's fastest")
    p.add_argument("--memory", action="store_true",
                   help="also measure the pipeline's peak memory on one long file, a --scale times larger "
                        "dataset, and a quarter of the batch cap")
    p.add_argument("--long-minutes", type=float, default=12.0, help="--memory: length of the long file")
    p.add_argument("--scale", type=int, default=10, help="--memory: the larger dataset is this many copies")
    p.add_argument("--no-storage", action="store_true", help="skip the bits-per-token breakdown (reads every code)")
    p.add_argument("--out", default=None, help="results JSON (default out/benchmarks/<time>.json)")
    p.add_argument("--work", default=None, help="keep generated audio and outputs here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds one stage may run")
    args = p.parse_args(argv)
    args.stages = [] if args.stages in ("", "none") else args.stages.split(",")
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="audio-tokenize-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = benchmark(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out) if args.out else REPO_ROOT / "out" / "benchmarks" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(report(result))
    print(f"\nresults: {out}")
    return 0 if result["ok"] else 1


def benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    codec_dir = resolve_codec(args.codec)
    t0 = time.time()
    files = build_corpus(args, work)
    corpus = {"files": len(files), "audio_s": audio_seconds(files), "sample_rate": 44100, "channels": 2,
              "formats": sorted({p.suffix[1:] for p in files}), "copies": args.copies,
              "generate_s": round(time.time() - t0, 1)}
    result: dict[str, Any] = {"command": [sys.executable, "-m", "benchmarks.run", *sys.argv[1:]],
                              "machine": machine(), "codec": str(codec_dir), "corpus": corpus,
                              "overrides": overrides(args, work / "audio", codec_dir, work / "tokens"),
                              "runs": [], "ok": True}
    for _ in range(args.repeat):
        for stage in args.stages:
            record = measure_stage(stage, args, work, files, codec_dir, work / "audio", corpus["audio_s"])
            result["runs"].append(record)
            result["ok"] &= record["returncode"] == 0
    result["stages"] = best_per_stage(result["runs"])
    result["ratios"] = ratios(result["stages"])
    if "pipeline" in result["stages"] and result["ok"] and not args.no_storage:
        result["storage"] = storage(work / "tokens")
    result["targets"] = targets(result)
    if args.memory:
        result["memory"] = memory_checks(args, work, files, codec_dir)
        result["ok"] &= all(case["returncode"] == 0 for case in result["memory"])
    return result


def build_corpus(args: argparse.Namespace, work: Path) -> list[Path]:
    """The dataset folder ``work/audio``: generated files, or ``--copies`` hard-linked copies of the generated files
    in ``work/distinct``. A ``--work`` folder that already holds the same corpus (same parameters) is reused."""
    params = {"minutes": args.minutes, "min_s": args.min_s, "max_s": args.max_s, "format": args.format,
              "copies": args.copies, "version": 1}
    stamp = work / "audio.corpus.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("params") == params:
        return [Path(f) for f in json.loads(stamp.read_text())["files"]]
    stamp.unlink(missing_ok=True)
    for folder in ("audio", "distinct"):
        shutil.rmtree(work / folder, ignore_errors=True)  # a reused --work must not leave other files in the corpus
    fmt = "flac" if args.format == "flac" else None
    if args.copies == 1:
        files = make_corpus(work / "audio", args.minutes, args.min_s, args.max_s, fmt=fmt)
    else:
        files = replicate(make_corpus(work / "distinct", args.minutes, args.min_s, args.max_s, fmt=fmt),
                          work / "audio", args.copies)
    stamp.write_text(json.dumps({"params": params, "files": [str(f) for f in files]}))
    return files


def resolve_codec(name: str) -> str:
    """``tiny`` / ``full`` -> the fixture codec's directory (built on first use); anything else as given."""
    if name in ("tiny", "full"):
        from pipeline.codecs.testing import fixture_codec_dir

        return str(fixture_codec_dir(name))
    return str(Path(name).expanduser().resolve()) if Path(name).expanduser().is_dir() else name


def naive_codec_dir(codec_dir: str, work: Path) -> str:
    """A checkpoint ``AutoProcessor.from_pretrained`` can load: the fixtures have no ``preprocessor_config.json``,
    so a linked copy gets the ``EncodecFeatureExtractor`` the hub model ships."""
    src = Path(codec_dir)
    if not src.is_dir() or (src / "preprocessor_config.json").exists():
        return codec_dir
    from transformers import EncodecFeatureExtractor

    dst = work / "naive-codec"
    if not dst.exists():
        dst.mkdir(parents=True)
        for f in src.iterdir():
            (dst / f.name).symlink_to(f.resolve())
        config = json.loads((src / "config.json").read_text())
        EncodecFeatureExtractor(sampling_rate=config["sampling_rate"],
                                feature_size=config.get("audio_channels", 1)).save_pretrained(dst)
    return str(dst)


def overrides(args: argparse.Namespace, data: Path, codec_dir: str, out: Path) -> list[str]:
    """Hydra overrides shared by the codec and pipeline stages (so both make the same batches)."""
    ov = ["dataset=folder", f"dataset.path={data}", f"codec.pretrained={codec_dir}", f"codec.device={args.device}",
          f"output.dir={out}", "output.mode=overwrite", f"output.unit_size={args.unit_size}", "progress=false"]
    named = {"codec.backend": args.backend, "codec.threads": args.threads, "decode.workers": args.workers,
             "batch.max_audio_s": args.max_audio_s, "batch.max_rows": args.max_rows}
    ov += [f"{k}={v}" for k, v in named.items() if v is not None]
    return ov + list(args.set)


def measure_stage(stage: str, args: argparse.Namespace, work: Path, files: list[Path], codec_dir: str,
                  data: Path, audio_s: float, extra: list[str] = (), label: str | None = None) -> dict[str, Any]:
    """Run one stage in a fresh process (tree) and return what it and ``run_measured`` saw."""
    label = label or stage
    out = work / f"tokens-{label}" if label != "pipeline" else work / "tokens"
    shutil.rmtree(out, ignore_errors=True)
    spec = {"device": args.device, "files": [str(f) for f in files], "naive_threads": args.naive_threads,
            "naive_codec_dir": naive_codec_dir(codec_dir, work) if stage == "naive" else None,
            "overrides": [*overrides(args, data, codec_dir, out), *extra], "repeat": 1}
    if stage == "codec" and getattr(args, "copies", 1) > 1 and data == work / "audio":
        # Decoding every copy beforehand in one process would take longer than the whole pipeline run: decode the
        # distinct files and encode their batches once per copy (same batches, same cost).
        spec["overrides"].append(f"dataset.path={work / 'distinct'}")
        spec["repeat"] = args.copies
    spec_path, result_path = work / f"{label}.spec.json", work / f"{label}.result.json"
    spec_path.write_text(json.dumps(spec))
    for stale in work.glob(f"{label}.result*.json"):
        stale.unlink()
    nproc = args.nproc if stage != "naive" else 1
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"] \
        if nproc > 1 else [sys.executable, "-m"]
    cmd = [*launcher, "benchmarks.stages", stage, str(spec_path), str(result_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"[bench] {label}: {' '.join(cmd[1:])}", flush=True)
    load_before = os.getloadavg()[0]
    m = run_measured(cmd, work / f"{label}.log", env=env, timeout_s=args.timeout)
    # Other work on the machine slows every stage; the 1-minute load average before and after shows how much.
    record: dict[str, Any] = {"stage": stage, "label": label, "returncode": m.returncode, "outer_wall_s": m.wall_s,
                              "load_avg_1m": [load_before, os.getloadavg()[0]],
                              "cpu_s": m.cpu_s, "peak_rss_mb": m.peak_rss_mb, "peak_tree_rss_mb": m.peak_tree_rss_mb,
                              "peak_tree_pss_mb": m.peak_tree_pss_mb, "processes": m.max_processes,
                              "audio_s": audio_s}
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob(f"{label}.result*.json"))]
    if m.returncode != 0 or not ranks:
        record["error"] = m.log
        print(f"[bench] {label} failed (exit {m.returncode}):\n{m.log}", file=sys.stderr)
        return record
    record.update(merge_ranks(ranks))
    timed = record["end"] - record["start"]
    record.update(timed_s=timed, audio_s_per_s=audio_s / timed, rtf=timed / audio_s,
                  audio_s_per_cpu_s=audio_s / record["work_cpu_s"])
    if stage in ("pipeline", "host"):
        record["stats"] = _pipeline_stats(out)
        record["rank_loop"] = _summary_line(work / f"{label}.log", "this rank")
        record["wall_time"] = _summary_line(work / f"{label}.log", "wall time")
    print(f"[bench] {label}: {audio_s / timed:.2f} audio s/s, peak RSS {m.peak_rss_mb:.0f} MB", flush=True)
    return record


def merge_ranks(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from every rank's: the span from the first start to the last end; sums of counts; max of peaks."""
    merged = dict(ranks[0])
    merged["start"], merged["end"] = min(r["start"] for r in ranks), max(r["end"] for r in ranks)
    for key in ("batches", "segment_audio_s", "padded_audio_s", "export_s", "work_cpu_s"):
        if key in merged:
            merged[key] = sum(r[key] for r in ranks)
    for key in ("peak_gpu_allocated_mb", "peak_gpu_reserved_mb"):
        if key in merged:
            merged[key] = max(r[key] for r in ranks)
    if len(ranks) > 1:
        merged["rank_spans_s"] = [round(r["end"] - r["start"], 2) for r in ranks]  # unequal: ranks waited
    return merged


def _summary_line(log: Path, head: str) -> str | None:
    """A line of the run summary: ``this rank`` (the loop's own rate, start-up excluded, and where its time went)
    or ``wall time`` (the run's phases: codec load, plan, warm-up, loop, finalize)."""
    try:
        return next((line.strip() for line in log.read_text().splitlines() if line.startswith(head)), None)
    except OSError:
        return None


def _pipeline_stats(out: Path) -> dict[str, Any]:
    try:
        stats = json.loads((out / "stats.json").read_text())
    except OSError:
        return {}
    keys = ("items", "ok", "failed", "skipped", "rows", "frames", "audio_s", "encoded_s", "dropped_s", "tokens",
            "shard_bytes", "bits_per_token")
    return {k: stats.get(k) for k in keys}


def best_per_stage(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each stage's fastest successful run (all runs stay in ``runs``)."""
    best: dict[str, dict[str, Any]] = {}
    for r in runs:
        if "timed_s" in r and (r["label"] not in best or r["timed_s"] < best[r["label"]]["timed_s"]):
            best[r["label"]] = r
    return best


def ratios(stages: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def ratio(a: str, b: str) -> float | None:
        return stages[a]["audio_s_per_s"] / stages[b]["audio_s_per_s"] if a in stages and b in stages else None

    def cpu_ratio(a: str, b: str) -> float | None:
        return stages[a]["audio_s_per_cpu_s"] / stages[b]["audio_s_per_cpu_s"] if a in stages and b in stages \
            else None

    return {"pipeline_over_naive": ratio("pipeline", "naive"), "pipeline_over_codec": ratio("pipeline", "codec"),
            "codec_over_naive": ratio("codec", "naive"), "host_over_codec": ratio("host", "codec"),
            # The same in audio seconds per CPU second: efficiency, less sensitive to other load on the machine.
            "pipeline_over_codec_cpu": cpu_ratio("pipeline", "codec"),
            "pipeline_over_naive_cpu": cpu_ratio("pipeline", "naive")}


def storage(out: Path) -> dict[str, Any]:
    """Bits per stored token: whole shards (as stats.json counts them), the ``codes`` column alone (column-chunk
    metadata), and the marginal cost: the codes' data pages, what is left per token once the per-shard bytes
    (footer with the fingerprint metadata, the codes' dictionary page, the other columns: ~11 KB) are spread over
    a real unit (64 songs of 3 minutes: 2.3M tokens, +0.04 bits/token); next to the codes' unigram entropy per
    codebook (what a context-free entropy coder reaches). Benchmark shards are small, so their whole-file
    figure is mostly those fixed bytes."""
    import numpy as np
    import pyarrow.parquet as pq

    stats = json.loads((out / "stats.json").read_text())
    tokens, shard_bytes = stats["tokens"], stats["shard_bytes"]
    codes = codes_raw = codes_dict = fixed = 0
    counts: list[np.ndarray] = []
    shards = sorted((out / "data").glob("*.parquet"))
    for shard in shards:
        meta = pq.ParquetFile(shard).metadata
        fixed += meta.serialized_size + 8  # footer, its length and the magic bytes (plus 4 at the start)
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                dictionary = col.data_page_offset - col.dictionary_page_offset if col.has_dictionary_page else 0
                if col.path_in_schema.split(".")[0] == "codes":
                    codes, codes_raw, codes_dict = (codes + col.total_compressed_size,
                                                    codes_raw + col.total_uncompressed_size, codes_dict + dictionary)
                    fixed += dictionary  # up to one entry per distinct code: a fixed cost per column chunk
                else:
                    fixed += col.total_compressed_size  # ids and metadata: page headers mostly, a few bytes a row
        for cell in pq.read_table(shard, columns=["codes"]).column("codes").to_pylist():
            for k, row in enumerate(cell):
                counts += [np.zeros(1 << 16, np.int64)] * (k + 1 - len(counts))
                counts[k] = counts[k] + np.bincount(np.asarray(row, np.int64), minlength=1 << 16)
    entropy = [float(-(p[p > 0] * np.log2(p[p > 0])).sum()) for p in (c / max(1, c.sum()) for c in counts)]
    bits = lambda n: 8 * n / tokens  # noqa: E731
    return {"tokens": tokens, "shards": len(shards), "shard_bytes": shard_bytes, "bits_per_token": bits(shard_bytes),
            "fixed_bytes_per_shard": fixed / max(1, len(shards)),
            "marginal_bits_per_token": bits(shard_bytes - fixed),
            "codes_column_bytes": codes, "codes_bits_per_token": bits(codes),
            "codes_data_bits_per_token": bits(codes - codes_dict), "codes_uncompressed_bits_per_token": bits(codes_raw),
            "unigram_entropy_bits": round(sum(entropy) / len(entropy), 3) if entropy else None}


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets (CPU): pipeline >= 0.9x the codec, >= 1.8x naive, < 11.5 bits per token."""
    r, s = result["ratios"], result.get("storage", {})
    checks = {"pipeline_over_codec >= 0.9": (r.get("pipeline_over_codec"), lambda v: v >= 0.9),
              "pipeline_over_naive >= 1.8": (r.get("pipeline_over_naive"), lambda v: v >= 1.8),
              # Per token as the dataset grows: small benchmark shards are mostly footer (see storage()).
              "marginal_bits_per_token < 11.5": (s.get("marginal_bits_per_token"), lambda v: v < 11.5)}
    return {name: None if v is None else {"value": round(v, 3), "met": bool(ok(v))}
            for name, (v, ok) in checks.items()}


def memory_checks(args: argparse.Namespace, work: Path, files: list[Path], codec_dir: str) -> list[dict[str, Any]]:
    """Peak memory of the pipeline on: the corpus; one ``--long-minutes`` file; the corpus ``--scale`` times; the
    corpus with a quarter of the batch cap. Bounded memory means the first three agree and the last is lower."""
    for folder in ("long", "big"):
        shutil.rmtree(work / folder, ignore_errors=True)
    long_file = make_long_file(work / "long", args.long_minutes)
    big = replicate(files, work / "big", args.scale)
    cap = args.max_audio_s if args.max_audio_s is not None else _config_cap(args.device)
    cases = [("corpus", work / "audio", files, []),
             (f"one {args.long_minutes:g}-minute file", work / "long", [long_file], []),
             (f"{args.scale}x corpus", work / "big", big, []),
             (f"corpus, batch.max_audio_s={cap / 4:g}", work / "audio", files, [f"batch.max_audio_s={cap / 4:g}"])]
    out = []
    for i, (name, data, case_files, extra) in enumerate(cases):
        record = measure_stage("pipeline", args, work, case_files, codec_dir, data, audio_seconds(case_files),
                               extra, label=f"memory-{i}")
        record["case"] = name
        out.append(record)
    return out


def _config_cap(device: str) -> float:
    """The ``batch.max_audio_s`` the pipeline uses on ``device`` (``auto`` resolved)."""
    from benchmarks.stages import compose
    from pipeline.config import resolve_auto

    return resolve_auto(compose(["dataset=folder", "dataset.path=."]), device).batch.max_audio_s


def report(result: dict[str, Any]) -> str:
    """A plain-text table of the results."""
    m = result["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load avg at start "
             f"{', '.join(f'{x:.1f}' for x in m['load_avg_at_start'])}",
             f"corpus: {result['corpus']['files']} files, {result['corpus']['audio_s']:.1f} s of 44.1 kHz stereo audio",
             f"codec: {result['codec']}", "",
             f"{'stage':<42}{'audio s/s':>10}{'RTF':>8}{'wall s':>9}{'CPU s':>8}{'peak RSS':>10}{'tree RSS':>10}"
             f"{'tree PSS':>10}"]
    rows = list(result.get("stages", {}).values()) + result.get("memory", [])
    for r in rows:
        name = r.get("case", r["label"])
        if "timed_s" not in r:
            lines.append(f"{name:<42} FAILED (exit {r['returncode']})")
            continue
        pss = r["peak_tree_pss_mb"] or math.nan
        gpu = (f"  GPU {r['peak_gpu_allocated_mb']:.0f} MiB (reserved {r.get('peak_gpu_reserved_mb', 0):.0f})"
               if "peak_gpu_allocated_mb" in r else "")
        lines.append(f"{name[:41]:<42}{r['audio_s_per_s']:>10.2f}{r['rtf']:>8.3f}{r['timed_s']:>9.1f}"
                     f"{r['cpu_s']:>8.1f}{r['peak_rss_mb']:>8.0f}MB{r['peak_tree_rss_mb']:>8.0f}MB{pss:>8.0f}MB{gpu}")
    lines += [f"{r['label']}: {r[key]}" for r in rows for key in ("rank_loop", "wall_time") if r.get(key)]
    lines.append("")
    for name, value in result.get("ratios", {}).items():
        lines.append(f"{name}: {'n/a' if value is None else f'{value:.2f}'}")
    if "storage" in result:
        s = result["storage"]
        lines.append(f"bits/token: {s['bits_per_token']:.2f} whole shards ({s['tokens']} tokens in {s['shards']} "
                     f"shards, {s['fixed_bytes_per_shard']:.0f} fixed bytes each), {s['marginal_bits_per_token']:.2f} "
                     f"marginal, codes column {s['codes_bits_per_token']:.2f} ({s['codes_data_bits_per_token']:.2f} "
                     f"without its dictionary pages); codes' unigram entropy {s['unigram_entropy_bits']}")
    for name, t in result.get("targets", {}).items():
        verdict = "n/a" if t is None else f"{'met' if t['met'] else 'MISSED'} ({t['value']})"
        lines.append(f"target {name}: {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
