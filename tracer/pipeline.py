"""The event path: ring records → decode → classify → attribute → user-space filters → rate limit →
explain → sinks. It owns what was counted on the way.

    read(chunk)    a chunk of ring records, in ring order (through the per-shape cache where the
                   sinks allow it: tracer/fastpath.py)
    handle(ev)     one decoded event
    emit(record)   any record (events, and what the session reports: coverage, lost, summary …)

Session (tracer/session.py) starts the kernel side, runs the loop and stops; the pipeline knows
nothing of BPF beyond a symbol lookup for kernel stacks.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable

from . import fastpath
from .enrich import reasons
from .enrich.app import AppErrors
from .enrich.attribution import Attributor
from .enrich.cgroups import path_matches
from .enrich.origins import FIREWALL_REASONS, Origins
from .enrich import origins as origin_texts
from .enrich.stacks import Symbolizer
from .enrich.stories import Stories
from .events.decode import Decoder, Event
from .sinks import records
from .sinks.ratelimit import RateLimit


class Pipeline:
    def __init__(self, options, sinks: list, decoder: Decoder, attributor: Attributor,
                 ksym: Callable[[int], str] | None = None, stories: Stories | None = None, app: AppErrors | None = None,
                 origins: Origins | None = None):
        """options: the session's Options (filters, --count, --max-rate, evidence, fast_path).
        ksym: kernel address → symbol, for the events' stacks (None: stacks stay unnamed).
        stories: connections' stories and RST pairs (enrich/stories.py), None with --no-stories.
        app: the application's failed syscalls and accept() calls (enrich/app.py), None with --no-app-errors.
        origins: who really sent a reset (enrich/origins.py), None with --no-origins."""
        self.stories = stories
        self.origins = origins
        self.app = app
        self.options = options
        self.sinks = sinks
        self.decoder = decoder
        self.attributor = attributor
        self.stacks = Symbolizer(ksym) if ksym is not None else None
        self.limit = RateLimit(options.max_rate) if options.max_rate else None
        self.count_limit: int | None = options.count
        # Counted on the way: records written per (event kind, reason); events seen per netns and
        # kind before the user-space filters (what reconciliation compares with the kernel).
        self.counts: Counter[tuple[str, str]] = Counter()
        self.netns_counts: dict[int, Counter[str]] = {}
        self.emitted = 0
        self.done = False                                # --count reached
        # Listener-queue events feed the listener sampler (enrich/listeners.py): set by the session.
        self.on_listener_event: Callable[[Event], None] | None = None
        self.fast = (fastpath.FastPath(self) if options.fast_path and fastpath.supported(sinks) else None)

    # -- records in ------------------------------------------------------------------------
    def read(self, chunk: bytes) -> int:
        """Every record of a ring-reader chunk, in ring order; how many the chunk held."""
        if self.fast is not None:
            return self.fast.process(chunk)
        batch = self.decoder.decode_batch(chunk)
        if batch:
            self.process_batch(batch)
        return len(batch)

    def process_batch(self, batch: list[Event]) -> None:
        self.attributor.prepare(batch)         # attribution prepared once for the whole batch
        for ev in batch:
            if self.done:
                break
            self.handle(ev)

    def handle(self, ev: Event) -> bool:
        """Enrich one event and emit its record; whether it passed the user-space filters (--reason,
        --pid/--comm/--cgroup/--container), --max-rate aside."""
        if ev.kind == "connection":
            return self.handle_connection(ev)
        if self.stacks is not None and (self.options.evidence or ev.kernel_reason is None):
            ev.caller_names = self.stacks.names(ev.hook, ev.callers)
        ev.reason = reasons.classify(ev)
        # A REJECT's RST or ICMP error is not TCP's: kept apart from the rst_sent TcpOutRsts counts
        self.netns_counter(ev.netns)["firewall_reject" if ev.reason in FIREWALL_REASONS else ev.kind] += 1
        if self.options.reasons and ev.reason not in self.options.reasons:
            return False
        self.attributor.attribute(ev)
        if self.on_listener_event is not None:
            self.on_listener_event(ev)
        if not self.wanted(ev):
            return False
        if self.stories is not None:
            self.stories.note(ev)
        if self.limit is not None and not self.limit.allow(time.monotonic(), ev.kind, ev.reason):
            return True  # counted by the limiter (and exactly in the kernel); said in `suppressed` records
        if self.app is not None:
            self.app.note_accept(ev)
        if self.origins is not None:
            self.origins.note(ev)
            ev.explanation = origin_texts.explain(ev, reasons.who(ev)) or reasons.explain(ev)
        else:
            ev.explanation = reasons.explain(ev)
        if self.stories is not None and ev.kind == "rst_received":
            ev.explanation = self.stories.explain_pair(ev, ev.explanation)
        if self.app is not None:
            self.app.note_failures(ev)
        self.counts[(ev.kind, ev.reason)] += 1
        self.emit(records.event_record(ev))
        self.count_written(1)
        return True

    def handle_connection(self, ev: Event) -> bool:
        """A connection's story ended in the kernel: its `connection` record."""
        ev.reason = ev.verdict
        self.netns_counter(ev.netns)[ev.kind] += 1
        self.attributor.attribute(ev)
        if not self.wanted(ev):
            return False
        self.emit_connection(self.stories.connection(ev))
        return True

    def emit_connection(self, story: dict) -> None:
        """A connection's story (enrich/stories.py) as its record."""
        self.counts[("connection", story["outcome"])] += 1
        self.emit(records.connection_record(**story))
        self.count_written(1)

    def netns_counter(self, netns: int) -> Counter[str]:
        per_netns = self.netns_counts.get(netns)
        if per_netns is None:
            per_netns = self.netns_counts[netns] = Counter()
        return per_netns

    def count_written(self, n: int) -> None:
        self.emitted += n
        if self.count_limit is not None and self.emitted >= self.count_limit:
            self.done = True

    def wanted(self, ev: Event) -> bool:
        """The filters that need the attributed process (the kernel has applied port, family and netns)."""
        o = self.options
        proc = ev.process or {}
        # The kernel could not judge softirq events by pid; judge them by the socket owner here.
        if o.pid is not None and ev.softirq and proc.get("pid") != o.pid:
            return False
        if o.comms and proc.get("comm") not in o.comms:
            return False
        if o.cgroups and not any(path_matches((proc.get("cgroup") or {}).get("path"), c) for c in o.cgroups):
            return False
        if o.containers:
            cid = (proc.get("container") or {}).get("id")
            if not cid or not any(cid.startswith(c) for c in o.containers):
                return False
        return True

    def written_by_kind(self) -> dict[str, dict[str, int]]:
        """Records written, per event kind and reason (the summary's `events`)."""
        by_kind: dict[str, dict[str, int]] = {}
        for (kind, reason), n in sorted(self.counts.items()):
            by_kind.setdefault(kind, {})[reason] = n
        return by_kind

    def seen_in(self, netns: int) -> dict[str, int]:
        return dict(self.netns_counts.get(netns, {}))

    # -- records out -----------------------------------------------------------------------
    def emit(self, record: dict) -> None:
        for sink in self.sinks:
            sink.emit(record)

    def flush(self) -> None:
        """End of a poll's worth of records: buffered line outputs write them out."""
        for sink in self.sinks:
            flush = getattr(sink, "flush", None)
            if flush is not None:
                flush()

    def reopen(self) -> None:
        for sink in self.sinks:
            reopen = getattr(sink, "reopen", None)
            if reopen is not None:
                reopen()

    def start_sinks(self) -> None:
        for sink in self.sinks:
            start = getattr(sink, "start", None)      # sinks with threads start them now
            if start is not None:
                start()
