"""Progress in audio hours, with realtime factor and ETA, for the main rank."""

from __future__ import annotations

import time

from tqdm import tqdm


class Progress:
    """A tqdm bar whose unit is audio hours.

    The total is not known before decoding (a folder has no durations), so it is extrapolated from the hours
    per item seen so far; the ETA is therefore an estimate that settles as items finish.

    Args:
        total_items: items this run is expected to process.
        enabled: draw the bar (only the main rank does).
    """

    def __init__(self, total_items: int, enabled: bool = True):
        self.total_items = total_items
        self.items = self.failed = 0
        self.audio_s = 0.0
        self.t0 = time.monotonic()
        self.bar = tqdm(total=0.0, unit="h", disable=not enabled, dynamic_ncols=True, smoothing=0.1,
                        bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} audio h [{elapsed}<{remaining}{postfix}]")
        self.bar.set_description("tokenize")

    def update(self, audio_s: float = 0.0, items: int = 0, failed: int = 0) -> None:
        self.audio_s += audio_s
        self.items += items
        self.failed += failed
        if self.items:
            self.bar.total = max(self.audio_s, self.audio_s / self.items * self.total_items) / 3600
        self.bar.update(audio_s / 3600)
        self.bar.set_postfix_str(
            f"{self.realtime_factor:.1f}x realtime, items {self.items}/{self.total_items}, failed or skipped {self.failed}",
            refresh=False,
        )

    @property
    def realtime_factor(self) -> float:
        return self.audio_s / max(1e-9, time.monotonic() - self.t0)

    def close(self) -> None:
        self.bar.close()
