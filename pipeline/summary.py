"""The one-screen summary printed at the end of a run."""

from __future__ import annotations

from typing import Any


def print_summary(stats: dict[str, Any] | None, job, rank_stats) -> None:
    """Print what was produced (when the job is complete) or what this rank did (when others still work)."""
    lines = ["", "=" * 72]
    if stats is None:
        done = len(job.layout.done_units())
        lines.append(f"this rank committed {rank_stats.units if rank_stats else 0} units; "
                     f"{done}/{job.plan.n_units} units done in total (other ranks still working, or rerun to finish)")
    else:
        lines += [
            f"output      {job.layout.url}",
            f"items       {stats['items']} listed: {stats['ok']} ok, {stats['failed']} failed, "
            f"{stats['skipped']} skipped by policy",
            f"rows        {stats['rows']} segments, {stats['audio_hours']:.3f} h decoded, "
            f"{stats['dropped_s']:.1f} s dropped by the segment policy",
            f"tokens      {stats['tokens']} ({stats['codec']['num_codebooks']} codebooks x "
            f"{stats['codec']['frame_rate']:g} frames/s), {stats['bits_per_token']} bits/token on disk",
            f"units       {stats['units']}, fingerprint {stats['fingerprint']}",
        ]
        if rank_stats is not None and rank_stats.audio_s:
            lines.append(f"this rank   {rank_stats.rank} of {rank_stats.world_size}: {rank_stats.units} units, "
                         f"{rank_stats.audio_s / 3600:.3f} h in "
                         f"{rank_stats.wall_s:.1f} s ({rank_stats.audio_s / max(rank_stats.wall_s, 1e-9):.0f}x "
                         f"realtime); {rank_stats.timing()}")
        if rank_stats is not None and rank_stats.phases:
            lines.append(f"{'wall time':<11} {rank_stats.phases_line()}")
        lines += _reason_lines(stats["failures_by_reason"])
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)


def _reason_lines(by_reason: dict[str, int]) -> list[str]:
    """Failure totals by ``stage:reason``, most frequent first; policy skips apart, since they are not errors."""
    failed = {k: n for k, n in by_reason.items() if not k.startswith("policy:")}
    skipped = {k: n for k, n in by_reason.items() if k.startswith("policy:")}
    lines = []
    for label, group in (("failed by", failed), ("skipped by", skipped)):
        if group:
            ranked = sorted(group.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append(f"{label:<11} " + ", ".join(f"{k} {n}" for k, n in ranked))
    if lines:
        retry = "; to retry the failed ones: output.retry_failed=true" if failed else ""
        lines.append(f"{'':<11} one record per item in failures/*.jsonl{retry}")
    return lines
