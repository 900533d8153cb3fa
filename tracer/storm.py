"""Storms: when events come faster than rsttrace can write them, the kernel side counts them per
shape instead (bpf/maps.bpf.c, storm_absorbs), and this turns those counts into records.

A storm starts in the kernel: the first event that finds more than `high_bytes` of the ring buffer
unread sets `aggregating`. From then on each event is counted per shape (its exact-count key, its
process) and per window (an epoch that this module advances every WINDOW_S); only the first few of
a shape per CPU and window are still written. Every window this module reads the counts of the
window before the last — no program adds to it any more — and writes one `aggregate` record per
shape. When fewer than `calm_rate` events a second arrived in a window and the ring is nearly empty,
it clears `aggregating`, reads what is left and writes the storm's `end`. Nothing goes unaccounted:
written + aggregated + lost = every event the programs saw (the summary says each).
"""
from __future__ import annotations

import os
import time
from typing import Callable

from .kernel.layout import KIND_NAMES
from .sinks import records

WINDOW_S = 1.0
# A storm starts when a quarter of the ring is waiting to be read (the consumer has fallen that far
# behind) and ends below an eighth of that, in a window of fewer than CALM_RATE events a second.
HIGH_FRACTION = 4
CALM_RATE = 5000
# For tests: where a storm starts (bytes of the ring unread; 0: at once) and its calm rate.
HIGH_ENV, CALM_ENV = "RSTTRACE_STORM_HIGH_BYTES", "RSTTRACE_STORM_CALM_RATE"

IDLE, STORM, ENDING = "idle", "storm", "ending"


class Storms:
    def __init__(self, program, ring_bytes: int, reason_of: Callable, netns_name: Callable[[int], str | None],
                 pending: Callable[[], int], clock: Callable[[], float] = time.monotonic):
        self.program = program
        self.clock = clock
        self.reason_of = reason_of            # exact-count key → rsttrace reason (enrich/exact.py ExactCounts.reason_of)
        self.netns_name = netns_name
        self.pending = pending                # bytes of the ring not read yet
        self.high = int(os.environ.get(HIGH_ENV, ring_bytes // HIGH_FRACTION))
        self.low = self.high // 8
        self.calm_rate = float(os.environ.get(CALM_ENV, CALM_RATE))
        self.epoch = 1
        self.state = IDLE
        self.window_started = time.time()
        self.epoch_started: dict[int, float] = {self.epoch: self.window_started}
        self.storm_started = 0.0
        self.ending_ticks = 0
        self._at_start: dict[str, int] = {}
        self._last_stats: dict[str, int] = {"submitted": 0, "aggregated": 0, "lost": 0}
        self._last_total = 0
        self._last_tick = self._prev_tick = clock()
        self.program.set_storm_control(self.high, self.epoch, 0)

    def tick(self, stats: dict[str, int]) -> list[dict]:
        """Once a window: the storm's records of this moment (start, aggregates, end)."""
        out: list[dict] = []
        now = self.clock()
        total = stats["submitted"] + stats["lost"] + stats["aggregated"]
        rate = (total - self._last_total) / max(now - self._last_tick, 1e-3)
        self._prev_tick = self._last_tick
        self._last_total, self._last_tick = total, now
        aggregating = self.program.storm_control()[2]
        previous, self._last_stats = self._last_stats, dict(stats)
        if self.state == IDLE:
            if not aggregating:
                return out
            # It started in the kernel after the previous tick: counted from there.
            self.state, self.storm_started, self._at_start = STORM, time.time() - (now - self._prev_tick), previous
            out.append(records.storm_record("start", self._counts_since(stats), time.time() - self.storm_started,
                                            self.high, self.pending()))
        elif self.state == ENDING and aggregating:
            self.state = STORM                  # it flared up again: the same storm goes on
        self._next_epoch()
        if self.state == STORM:
            out += self._harvest(self.epoch - 2)
            if rate < self.calm_rate and self.pending() <= self.low:
                self.program.set_storm_control(self.high, self.epoch, 0)
                self.state, self.ending_ticks = ENDING, 0
        elif self.state == ENDING:
            self.ending_ticks += 1
            if self.ending_ticks < 2:           # programs may still count into the window it ended in
                out += self._harvest(self.epoch - 2)
            else:
                out += self._harvest(None)
                out.append(self._end(stats))
        return out

    def finish(self, stats: dict[str, int]) -> list[dict]:
        """At exit, the programs detached: every count left, and the end of a storm still going."""
        out = self._harvest(None)
        if self.state != IDLE:
            out.append(self._end(stats))
        return out

    def _end(self, stats: dict[str, int]) -> dict:
        self.state = IDLE
        return records.storm_record("end", self._counts_since(stats), time.time() - self.storm_started,
                                    self.high, self.pending())

    def _counts_since(self, stats: dict[str, int]) -> dict[str, int]:
        """Events written, aggregated and lost since the storm started."""
        return {k: stats[k] - self._at_start[k] for k in ("submitted", "aggregated", "lost")}

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.epoch_started[self.epoch] = time.time()
        _, _, aggregating = self.program.storm_control()
        self.program.set_storm_control(self.high, self.epoch, aggregating if self.state != ENDING else 0)

    def _harvest(self, through_epoch: int | None) -> list[dict]:
        """One `aggregate` record per shape and window, for the windows up to `through_epoch`."""
        taken = self.program.take_storm_shapes(through_epoch)
        out = []
        for key, aggregated, samples in sorted(taken, key=lambda t: (t[0].epoch, -t[1])):
            if not aggregated:
                continue
            shape = key.shape
            start = self.epoch_started.get(key.epoch, self.window_started)
            end = self.epoch_started.get(key.epoch + 1, time.time())
            comm = bytes(key.comm).split(b"\0", 1)[0].decode(errors="replace")
            out.append(records.aggregate_record(
                start, end, KIND_NAMES.get(shape.kind, f"kind_{shape.kind}"), self.reason_of(shape),
                {"inode": shape.netns, "name": self.netns_name(shape.netns)}, shape.service_port,
                {"pid": key.tgid, "comm": comm} if key.tgid else None, aggregated, samples))
        for epoch in [e for e in self.epoch_started if through_epoch is None or e <= through_epoch]:
            if epoch < self.epoch:
                del self.epoch_started[epoch]
        return out
