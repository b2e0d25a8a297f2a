"""What ``pipeline.verify`` leaves behind: ``report.json`` (everything, for scripts), ``report.md`` (a summary for
people) and two PNG plots (duration histogram, code frequency per codebook), drawn with matplotlib's headless
``Agg`` backend so it runs on any cluster node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.layout import atomic_write_bytes, atomic_write_json


def write_report(report: dict[str, Any], report_dir: Path) -> None:
    """Write ``report.json`` and ``report.md`` into ``report_dir`` (created)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report_dir / "report.json", report)
    atomic_write_bytes(report_dir / "report.md", markdown(report).encode())


def codebook_labels(k: int, interleaved: bool) -> list[str]:
    """Names of a row's ``k`` codebooks: ``k=0, k=1, ...``, or for stereo rows ``L0, R0, L1, R1, ...`` (the
    channels of one codebook interleaved).

    >>> codebook_labels(4, True), codebook_labels(2, False)
    (['L0', 'R0', 'L1', 'R1'], ['k=0', 'k=1'])
    """
    return [f"{'LR'[q % 2]}{q // 2}" for q in range(k)] if interleaved else [f"k={q}" for q in range(k)]


def markdown(report: dict[str, Any]) -> str:
    """A page a person reads: verdict, problems, counts, flip rates, round trips, codebooks."""
    lines = [f"# Verify: `{report['output']}`", "", f"**{'PASS' if report['ok'] else 'FAIL'}**", ""]
    if report["problems"]:
        lines += ["## Problems", ""] + [f"- {p}" for p in report["problems"]] + [""]
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    s = report["structure"]
    lines += ["## Contents", "", f"{s['units']} units, {s['shards']} shards, {s['rows']} rows, {s['frames']} frames "
              f"({s['hours']:.3f} h of encoded audio).", ""]
    labels = report.get("codebook_labels")
    lines += _reencode_section(report.get("reencode"), labels) + _roundtrip_section(report.get("roundtrip", []))
    lines += _codebook_section(report.get("codebooks"), labels) + _plots_section(report.get("plots", {}))
    lines.append(f"Took {report['runtime_s']:.1f} s.")
    return "\n".join(lines) + "\n"


def _reencode_section(r: dict[str, Any] | None, labels: list[str] | None = None) -> list[str]:
    if not r:
        return []
    rates = " | ".join(f"{x:.4%}" for x in r["flip_rate_per_codebook"])
    n = len(r["flip_rate_per_codebook"])
    head = " | ".join(labels if labels and len(labels) == n else codebook_labels(n, False))
    return ["## Re-encode at batch 1, fp32", "",
            f"{r['rows']} rows, {r['frames']} frames re-encoded alone: flip rate {r['flip_rate']:.4%} "
            f"(fails above {r['max_flip_rate']:.2%}). Later codebooks flip more: a flip changes every residual "
            "after it (in stereo rows, every later codebook of the same channel).",
            "", f"| {head} |", "|" + "---|" * len(r["flip_rate_per_codebook"]), f"| {rates} |", ""]


def _roundtrip_section(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = ["## Round trip (decode stored codes)", "",
           "| row | SI-SNR (dB) | log-mel L1 | listen |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| `{r['id']}#{r['segment_index']}` | {r['si_snr_db']:.2f} | {r['log_mel_l1']:.3f} | "
                   f"[decoded](audio/{Path(r['decoded_wav']).name}) / [source](audio/{Path(r['source_wav']).name}) |")
    return out + ["", "WAV files are in `audio/`.", ""]


def _codebook_section(c: dict[str, Any] | None, labels: list[str] | None = None) -> list[str]:
    if not c:
        return []
    n = len(c["used_fraction"])
    labels = labels if labels and len(labels) == n else [str(k) for k in range(n)]
    out = ["## Codebooks", "", "| codebook | used | entropy (bits) | perplexity |", "|---|---|---|---|"]
    for label, used, h, ppl in zip(labels, c["used_fraction"], c["entropy_bits"], c["perplexity"]):
        out.append(f"| {label} | {used:.1%} | {h:.2f} | {ppl:.0f} |")
    return out + [""]


def _plots_section(plots: dict[str, str]) -> list[str]:
    return [f"![{name}]({Path(path).name})" for name, path in plots.items()] + ([""] if plots else [])


def plot_all(durations: np.ndarray, usage: np.ndarray | None, report_dir: Path,
             labels: list[str] | None = None) -> dict[str, str]:
    """Draw the PNGs; returns ``{name: path}``. Empty when matplotlib is missing (the report says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: no display on cluster nodes
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    report_dir.mkdir(parents=True, exist_ok=True)
    plots = {"durations": str(report_dir / "durations.png")}
    _duration_histogram(plt, durations, Path(plots["durations"]))
    if usage is not None and usage.sum():
        plots["codebook_usage"] = str(report_dir / "codebook_usage.png")
        _codebook_usage(plt, usage, Path(plots["codebook_usage"]), labels)
    return plots


def _duration_histogram(plt: Any, durations: np.ndarray, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(durations, bins=min(50, max(5, len(durations) // 4)), color="tab:blue")
    ax.set(xlabel="row duration (s)", ylabel="rows", title=f"Segment durations ({len(durations)} rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _codebook_usage(plt: Any, usage: np.ndarray, path: Path, labels: list[str] | None = None) -> None:
    """Rank-frequency curve of each codebook: a flat curve is a well-used codebook, a cliff a collapsed one."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = labels if labels and len(labels) == len(usage) else codebook_labels(len(usage), False)
    for label, counts in zip(labels, usage):
        freq = np.sort(counts)[::-1] / max(1, counts.sum())
        ax.plot(np.arange(1, len(freq) + 1), np.maximum(freq, 1e-9), label=label)
    ax.set(xscale="log", yscale="log", xlabel="code rank", ylabel="frequency", title="Code usage per codebook",
           ylim=(1e-7, 1))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
