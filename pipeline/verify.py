"""``python -m pipeline.verify OUT``: is an output folder complete, consistent and faithful to its audio?

1. Structure (``verify_checks``): plan, a done marker per unit, one shard per unit and no stray shard, one schema
   and the plan's fingerprint in every shard, row and frame counts equal to the markers', no duplicate
   ``(id, segment_index)``, and per row ``n_frames == ceil(n_samples / hop) == T``, K codebooks, codes in
   ``[0, cardinality)``, ``duration_s`` consistent with ``n_samples``.
2. Faithfulness (``verify_audio``): ``--sample`` random rows are re-encoded from their sources at batch 1 in fp32
   and compared with the stored codes (per-codebook flip rate; fails above ``--max-flip-rate``).
3. Listening and quality: ``--decode`` rows are decoded back to WAV beside their source segment, with SI-SNR and
   log-mel L1; code usage and entropy per codebook over all rows; plots.

Exit status 0 when every check passes, 1 otherwise (the problems are printed, and written to the report).
The report goes to ``OUT/verify/`` by default: outside ``data/``, so ``load_dataset(OUT)`` never reads it. An
``s3://`` OUT is read through fsspec (``--storage-options``) and left untouched: its report goes to a local
scratch folder (printed) unless ``--report-dir`` says where.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.layout import OutputLayout
from pipeline.verify_checks import Problem, Scan, codebook_stats, scan_output

if TYPE_CHECKING:  # the codec half imports torch; structure-only runs never pay for it
    from pipeline.codecs.base import Codec
    from pipeline.verify_audio import AudioSetup, SampledRow

_SAMPLE_COLUMNS = ["id", "segment_index", "source", "start_s", "n_samples", "codes"]
_OPTIONAL_COLUMNS = ["scales"]  # absent from shards written before chunked codecs were supported


@dataclass
class VerifyOptions:
    """What to check beyond the structure.

    Args:
        sample: rows to re-encode at batch 1 (0 skips the codec entirely, together with ``decode=0``).
        decode: rows of that sample to decode back to WAV and score.
        seed: picks the sample.
        report_dir: where the report goes; None is ``OUT/verify`` (an object store's OUT: a local scratch folder).
        codec: a directory or hub id overriding the plan's ``codec.pretrained``.
        device: where the reference encode runs (``cpu``, ``cuda``).
        threads: CPU threads of the reference encode; None uses the run's own setting.
        max_flip_rate: fraction of re-encoded codes (all codebooks) allowed to differ.
        storage_options: fsspec options for remote sources and an ``s3://`` OUT (credentials stay in the
            environment).
    """

    sample: int = 16
    decode: int = 2
    seed: int = 0
    report_dir: Path | None = None
    codec: str | None = None
    device: str = "cpu"
    threads: int | None = None
    max_flip_rate: float = 0.05
    storage_options: dict[str, Any] | None = None


@dataclass
class VerifyResult:
    """The verdict. ``problems`` fail the folder; ``warnings`` are worth reading but do not."""

    problems: list[Problem]
    warnings: list[str]
    report: dict[str, Any]
    report_dir: Path

    @property
    def ok(self) -> bool:
        return not self.problems

    def checks_failed(self) -> set[str]:
        return {p.check for p in self.problems}


@dataclass
class _Audit:
    """Results of the codec half, merged into the report."""

    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)


def verify(out: str | Path, options: VerifyOptions | None = None) -> VerifyResult:
    """Check the output folder ``out`` (a path or an ``s3://`` URL) and write the report; see the module
    docstring."""
    from pipeline.verify_report import codebook_labels, plot_all, write_report

    options = options or VerifyOptions()
    started = time.monotonic()
    layout = OutputLayout.open(str(out), options.storage_options)
    report_dir = Path(options.report_dir) if options.report_dir else _default_report_dir(layout)
    scan = scan_output(layout)
    audit = _audit_codes(scan, options, report_dir) if scan.codec and scan.rows else _Audit()
    durations = np.concatenate(scan.durations) if scan.durations else np.zeros(0)
    labels = codebook_labels(len(scan.usage) if scan.usage is not None else 0,
                             bool(scan.codec and scan.codec.interleaved))
    plots = plot_all(durations, scan.usage, report_dir, labels)
    warnings = audit.warnings + ([] if plots else ["matplotlib is not installed: no plots"])
    problems = scan.problems + audit.problems
    report = _report(layout.url, scan, options, problems, warnings, durations, plots, audit.sections)
    report["codebook_labels"] = labels
    report["runtime_s"] = round(time.monotonic() - started, 2)
    write_report(report, report_dir)
    return VerifyResult(problems, warnings, report, report_dir)


def _default_report_dir(layout: OutputLayout) -> Path:
    """``OUT/verify``; for an object store, a local folder beside its scratch files (verify writes nothing there)."""
    return Path(layout.root / "verify") if layout.scratch is None else layout.scratch / "verify"


def _report(output: str, scan: Scan, options: VerifyOptions, problems: list[Problem], warnings: list[str],
            durations: np.ndarray, plots: dict[str, str], sections: dict[str, Any]) -> dict[str, Any]:
    return {
        "output": output,
        "ok": not problems,
        "problems": [str(p) for p in problems],
        "problem_checks": sorted({p.check for p in problems}),
        "warnings": warnings,
        "options": _printable(options),
        "structure": {
            "units": scan.plan.n_units if scan.plan else 0,
            "shards": len(scan.shards),
            "rows": scan.rows,
            "frames": scan.frames,
            "hours": float(durations.sum()) / 3600,
            "duration_s": _summary(durations),
            "fingerprint": scan.plan.fingerprint if scan.plan else None,
            "codec": asdict(scan.codec) if scan.codec else None,
        },
        "codebooks": codebook_stats(scan.usage) if scan.usage is not None else None,
        "plots": plots,
        **sections,
    }


def _printable(options: VerifyOptions) -> dict[str, Any]:
    """The options as JSON; storage options by key only, since they may hold credentials."""
    out = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}
    out["storage_options"] = sorted(options.storage_options) if options.storage_options else None
    return out


def _summary(x: np.ndarray) -> dict[str, float] | None:
    if not len(x):
        return None
    return {"min": float(x.min()), "mean": float(x.mean()), "max": float(x.max())}


def _audit_codes(scan: Scan, options: VerifyOptions, report_dir: Path) -> _Audit:
    """Re-encode the sample and decode part of it; every failure here is recorded, never raised."""
    audit = _Audit()
    if options.sample <= 0 and options.decode <= 0:
        return audit
    rows = sample_rows(scan, max(options.sample, options.decode), options.seed)
    try:
        codec, setup = _load_reference(scan, options, audit)
    except Exception as e:  # noqa: BLE001 - a missing checkpoint is a verdict to report, not a crash
        audit.problems.append(Problem("codec", f"cannot load the codec to re-encode ({type(e).__name__}: {e}); "
                                               "point --codec at the weights, or skip with --sample 0 --decode 0"))
        return audit
    if options.sample > 0:
        _reencode_section(codec, setup, rows[: options.sample], options, audit)
    if options.decode > 0:
        _roundtrip_section(codec, setup, rows[: options.decode], report_dir, audit)
    return audit


def _load_reference(scan: Scan, options: VerifyOptions, audit: _Audit) -> tuple[Codec, AudioSetup]:
    import torch

    from pipeline.codecs import load_codec
    from pipeline.verify_audio import AudioSetup, codec_config, weights_warning

    assert scan.plan is not None and scan.codec is not None
    cfg = codec_config(scan.plan, options.codec, options.device, options.threads)
    codec = load_codec(cfg, torch.device(options.device))
    meta = scan.shards[0].schema().metadata or {}
    warning = weights_warning(codec, (meta.get(b"pipeline.codec_model") or b"").decode() or None)
    audit.warnings += [warning] if warning else []
    setup = AudioSetup.from_plan(scan.plan, scan.codec.sample_rate, options.storage_options)
    if setup.source is None:
        audit.warnings.append(f"the plan's source could not be rebuilt ({setup.source_error}); reading local "
                              "paths only")
    return codec, setup


def _reencode_section(codec: Codec, setup: AudioSetup, rows: list[SampledRow], options: VerifyOptions,
                      audit: _Audit) -> None:
    from pipeline.verify_audio import reencode

    result = reencode(codec, setup, rows)
    audit.warnings += [f"not re-encoded: {s}" for s in result.skipped]
    if result.mismatched_rows:
        audit.problems.append(Problem("reencode_shape", f"{len(result.mismatched_rows)} rows: "
                                                        f"{result.mismatched_rows[:3]}"))
    if result.flip_rate > options.max_flip_rate:
        audit.problems.append(Problem("flip_rate", f"{result.flip_rate:.2%} of re-encoded codes differ from the "
                                                   f"stored ones (limit {options.max_flip_rate:.2%}, per codebook "
                                                   f"{[round(r, 4) for r in result.flip_rate_per_codebook]}): the "
                                                   "codes do not match what the codec makes of the audio"))
    if rows and not result.rows:
        audit.warnings.append("no sampled row could be re-encoded: the flip rate was not measured")
    audit.sections["reencode"] = {
        "rows": result.rows, "frames": result.frames, "flip_rate": result.flip_rate,
        "flip_rate_per_codebook": result.flip_rate_per_codebook, "max_flip_rate": options.max_flip_rate,
        "skipped": result.skipped,
    }


def _roundtrip_section(codec: Codec, setup: AudioSetup, rows: list[SampledRow], report_dir: Path,
                       audit: _Audit) -> None:
    from pipeline.verify_audio import round_trip

    results = []
    for i, row in enumerate(rows):
        try:
            results.append(asdict(round_trip(codec, setup, row, report_dir / "audio", i)))
        except Exception as e:  # noqa: BLE001 - a source that cannot be read back is reported, not fatal
            audit.warnings.append(f"not decoded: {row.id}#{row.segment_index}: {type(e).__name__}: {e}")
    audit.sections["roundtrip"] = results


def sample_rows(scan: Scan, n: int, seed: int) -> list[SampledRow]:
    """``n`` rows drawn uniformly without replacement over all shards (reads only the shards they are in)."""
    from pipeline.verify_audio import SampledRow

    shards = [ref for ref in scan.shards if set(_SAMPLE_COLUMNS) <= set(ref.schema().names)]
    total = sum(ref.rows for ref in shards)
    picks = np.random.default_rng(seed).choice(total, size=min(n, total), replace=False) if n > 0 else []
    bounds = np.cumsum([0] + [ref.rows for ref in shards])
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for order, pick in enumerate(picks):
        shard = int(np.searchsorted(bounds, pick, side="right") - 1)
        by_shard.setdefault(shard, []).append((order, int(pick - bounds[shard])))
    rows: list[tuple[int, SampledRow]] = []
    for shard, wanted in by_shard.items():
        names = shards[shard].schema().names
        columns = _SAMPLE_COLUMNS + [c for c in _OPTIONAL_COLUMNS if c in names]
        table = shards[shard].open().read(columns=columns).take([i for _, i in wanted])
        for (order, _), r in zip(wanted, table.to_pylist()):
            codes = np.asarray(r.pop("codes"), dtype=np.int16)
            scales = r.pop("scales", None)
            rows.append((order, SampledRow(**r, codes=codes,
                                           scales=None if scales is None else np.asarray(scales, np.float32))))
    return [row for _, row in sorted(rows, key=lambda x: x[0])]


def parse_args(argv: list[str] | None = None) -> tuple[str, VerifyOptions]:
    p = argparse.ArgumentParser(prog="python -m pipeline.verify", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the output folder (output.dir of the tokenize run): a path or s3://bucket/prefix")
    p.add_argument("--sample", type=int, default=16, help="rows to re-encode at batch 1 (default 16; 0: none)")
    p.add_argument("--decode", type=int, default=2, help="rows to decode to WAV and score (default 2; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row sample")
    p.add_argument("--report-dir", type=Path, default=None, help="where the report goes (default OUT/verify)")
    p.add_argument("--codec", default=None, help="codec weights (directory or hub id) overriding the plan's")
    p.add_argument("--device", default="cpu", help="device of the reference encode (cpu, cuda)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the run's codec.threads)")
    p.add_argument("--max-flip-rate", type=float, default=0.05,
                   help="fail when more than this fraction of re-encoded codes differ (default 0.05)")
    p.add_argument("--storage-options", type=json.loads, default=None,
                   help='fsspec options for remote sources and an s3:// OUT, as JSON: '
                        '\'{"client_kwargs": {"endpoint_url": "..."}}\'')
    a = p.parse_args(argv)
    return a.out, VerifyOptions(a.sample, a.decode, a.seed, a.report_dir, a.codec, a.device, a.threads,
                                a.max_flip_rate, a.storage_options)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out, options = parse_args(argv)
    result = verify(out, options)
    print(_console_summary(result))
    return 0 if result.ok else 1


def _console_summary(result: VerifyResult) -> str:
    r = result.report
    s = r["structure"]
    lines = [f"{'PASS' if result.ok else 'FAIL'}: {r['output']}: {s['units']} units, {s['rows']} rows, "
             f"{s['hours']:.3f} h"]
    if "reencode" in r:
        enc = r["reencode"]
        lines.append(f"  re-encode at batch 1: {enc['rows']} rows, flip rate {enc['flip_rate']:.4%}")
    for t in r.get("roundtrip", []):
        lines.append(f"  round trip {t['id']}#{t['segment_index']}: SI-SNR {t['si_snr_db']:.2f} dB, "
                     f"log-mel L1 {t['log_mel_l1']:.3f}")
    lines += [f"  problem {p}" for p in r["problems"]] + [f"  warning: {w}" for w in r["warnings"]]
    lines.append(f"  report: {result.report_dir / 'report.md'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
