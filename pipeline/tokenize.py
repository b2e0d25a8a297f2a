"""Entry point: ``python -m pipeline.tokenize dataset=... output.dir=...`` (also under ``accelerate launch``).

``main`` is the only place that sees Hydra; it hands a typed ``RunConfig`` to ``run``, which drives the stages:
plan -> (read, decode, segment in workers) -> batch -> encode -> write -> finalize.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline import lifeline
from pipeline.config import RunConfig, resolve_auto, register_configs

log = logging.getLogger("pipeline.tokenize")


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the launch (from accelerate's PartialState)."""

    rank: int
    world_size: int
    device: str
    # The process group of the planning barrier (its own, long timeout); None when alone.
    plan_group: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class PhaseClock:
    """Wall seconds per phase of a run, for the summary (where a short job's time goes besides the loop)."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self._last = time.monotonic()

    def mark(self, name: str) -> None:
        """The phase ``name`` ends now (a repeated name adds up)."""
        now = time.monotonic()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now


# Rank 0 lists the inputs while the others wait in the planning barrier: minutes to hours on millions of files.
PLAN_WAIT = timedelta(hours=6)
# Test hook: rank 0 sleeps this many seconds before the planning barrier (a slow listing, to test that the
# barrier's wait is not the rendezvous's). Costs nothing when unset.
PLAN_DELAY_ENV = "PIPELINE_TEST_PLAN_DELAY_S"


def setup_ranks(cfg: RunConfig) -> RankInfo:
    """Join the launch accelerate/torchrun started (CPU: gloo, GPU: nccl), or run alone.

    The rendezvous waits ``cfg.rendezvous_timeout_s`` for the other ranks (it waited 6 hours: a rank whose peer
    never came, or whose launcher died, lingered that long); only the planning barrier waits long (``PLAN_WAIT``).
    """
    import torch

    want_cuda = cfg.codec.device.startswith("cuda") or (cfg.codec.device == "auto" and torch.cuda.is_available())
    state = _join(want_cuda, timedelta(seconds=cfg.rendezvous_timeout_s))
    device = "cpu"
    if want_cuda:
        # PartialState is a process-wide singleton: one made earlier in this process for a CPU run (e.g. a script
        # or test that runs twice) keeps device cpu, so take this rank's GPU the way accelerate picks it.
        device = str(state.device) if state.device.type == "cuda" else \
            f"cuda:{state.local_process_index % max(1, torch.cuda.device_count())}"
    if cfg.codec.device.startswith("cuda:"):
        device = cfg.codec.device
    return RankInfo(state.process_index, state.num_processes, device, _plan_group(state.num_processes))


def _join(want_cuda: bool, timeout: timedelta):
    """accelerate's PartialState, whose process-group timeout bounds the rendezvous (and gloo's collectives)."""
    from accelerate import PartialState

    try:
        return PartialState(cpu=not want_cuda, timeout=timeout)
    except (RuntimeError, TimeoutError) as e:  # torch's DistStoreError and gloo's timeouts are RuntimeErrors
        if not _timed_out(e):  # another failure (a CUDA error, a bad address) keeps its own traceback
            raise
        log.error("the ranks of this launch did not all meet within rendezvous_timeout_s=%g s (%s: %s); "
                  "a rank that failed to start, or a launcher that died, leaves the others waiting",
                  timeout.total_seconds(), type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        sys.exit(1)


def _timed_out(error: BaseException) -> bool:
    from torch.distributed import DistStoreError

    text = str(error).lower()
    return isinstance(error, (DistStoreError, TimeoutError)) or "timed out" in text or "timeout" in text


def _plan_group(world_size: int):
    """A gloo group with the planning barrier's long timeout (the default group's is the short rendezvous one, and
    NCCL's barrier would need a device). Made by every rank right after the rendezvous, so it costs no wait."""
    if world_size <= 1:
        return None
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=PLAN_WAIT)


def barrier(ranks: RankInfo) -> None:
    """The planning barrier: the others wait while rank 0 lists the inputs and writes the plan."""
    if ranks.world_size > 1:
        import torch.distributed as dist

        if ranks.is_main and os.environ.get(PLAN_DELAY_ENV):
            time.sleep(float(os.environ[PLAN_DELAY_ENV]))
        dist.barrier(group=ranks.plan_group)


def run(cfg: RunConfig) -> int:
    """Tokenize the configured dataset into ``cfg.output.dir``. Returns the process exit code."""
    import torch

    from pipeline.codecs import load_codec
    from pipeline.codecs.identity import cached_weights_sha256
    from pipeline.encode import check_channels
    from pipeline.prepare import build_stages, check_weights, looks_finished, prepare
    from pipeline.summary import print_summary

    clock = PhaseClock()
    lifeline.watch_launcher()  # first: an orphan must not wait in the rendezvous either
    ranks = setup_ranks(cfg)
    clock.mark("ranks")
    cfg = resolve_auto(cfg, ranks.device)
    torch.set_num_threads(cfg.codec.threads)
    log.info("rank %d of %d on %s: batch.max_audio_s=%g, decode.workers=%d, codec.threads=%d", ranks.rank,
             ranks.world_size, ranks.device,
             cfg.batch.max_audio_s, cfg.decode.workers, cfg.codec.threads)
    # Load the codec before anything is written, so a missing checkpoint stops the run with nothing to undo.
    # A rerun of a finished folder does no work: it loads no codec when the hash of the same checkpoint files is
    # known (``codecs.identity``), and the plan check still compares the weights with every other setting.
    codec, weights = None, cached_weights_sha256(cfg.codec) if looks_finished(cfg) else None
    if weights is None:
        codec = load_codec(cfg.codec, torch.device(ranks.device))
        check_channels(codec, cfg.channels)  # a channel policy the codec cannot take: before the plan is written
        weights = codec.fingerprint()["weights_sha256"]
    clock.mark("codec")
    job = prepare(cfg, ranks, barrier, weights)
    clock.mark("plan")
    if job.finished:
        log.info("all %d units are done already; nothing to encode", job.plan.n_units)
        stats = job.finalize_if_done() if ranks.is_main else None
        print_summary(stats, job, None) if ranks.is_main else None
        return 0
    if codec is None:  # finished-looking folder that turned out unfinished (e.g. retry_failed); the loaded
        # weights are checked against the plan too: the cache only stood in for them
        codec = load_codec(cfg.codec, torch.device(ranks.device))
        check_channels(codec, cfg.channels)
        check_weights(job.plan, codec, job.layout.url)
        clock.mark("codec")
    runner = build_stages(cfg, job, ranks, codec)
    clock.mark("stages")
    runner.install_signal_handlers()
    try:
        rank_stats = runner.run()
    finally:
        runner.pool.close()
        runner.progress.close()
        runner.claims.close(release=True)
    clock.mark("loop")
    # A stop signal ends the run here, whether it came during the loop or while waiting for another run to finalize.
    stats = None if runner.stop_signal is not None else job.finalize_if_done(
        stopping=lambda: runner.stop_signal is not None)
    if runner.stop_signal is not None:
        if lifeline.launcher_died():
            log.error("rank %d: its launcher died; claims released, exiting", ranks.rank)
        log.warning("stopped by signal %d; run the same command again to finish", runner.stop_signal)
        return 128 + runner.stop_signal
    clock.mark("finalize")
    rank_stats.phases = clock.phases
    if stats is not None or ranks.is_main:
        print_summary(stats, job, rank_stats)
    _shutdown_process_group()
    return 0


def _shutdown_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _upload_logs(cfg: RunConfig) -> None:
    """An object-store output's logs were written locally (``config.logs_dir``): copy them beside the output."""
    from hydra.core.hydra_config import HydraConfig

    from pipeline.prepare import upload_logs

    try:
        upload_logs(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ValueError:  # an output.dir the run refused already, with its own message
        pass
    except Exception as e:  # noqa: BLE001 - the logs are a convenience; never fail (or hide the error of) a run
        log.warning("could not copy the logs to %s/.logs: %s", cfg.output.dir, e)


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(dcfg: DictConfig) -> None:
    from pipeline.codecs.encodec import CodecLoadError
    from pipeline.finalize import InconsistentOutput
    from pipeline.layout import DamagedState
    from pipeline.plan import PlanMismatch

    try:
        cfg = RunConfig.from_dictconfig(dcfg)
    except ValueError as e:  # a bad or missing value: the message says which
        log.error("%s", e)
        sys.exit(2)
    try:
        code = run(cfg)
    except (CodecLoadError, PlanMismatch, DamagedState, InconsistentOutput, ValueError) as e:
        # Our own refusals carry a message written for the user; a traceback would only bury it.
        log.error("%s", e)
        sys.exit(2)
    finally:
        _upload_logs(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    register_configs()
    main()
