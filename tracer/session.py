"""One tracing run, from attach to a clean detach: start-up, the loop, shutdown.

    start   probe the kernel → plan the hooks → load the programs (filters in the kernel) → the
            event path (tracer/pipeline.py) and the listener sampler (enrich/listeners.py)
    loop    poll the ring buffer → the pipeline; every so often: losses, storms, listeners,
            reconciliation, metrics
    stop    SIGINT/SIGTERM/--duration/--count → detach, drain, flush, summary
"""
from __future__ import annotations

import gc
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from .enrich import counters, stories
from .enrich.app import AppErrors
from .enrich.origins import Origins
from .enrich.attribution import Attributor
from .enrich.cgroups import cgroup2_mount
from .enrich.exact import ExactCounts
from .enrich.listeners import ListenerSampler, ListenerTracking, netns_alive
from .enrich.reconcile import percpu_totals, reconcile
from .enrich.stories import Stories
from .errors import BPFRefusedError, NotRootError, UnsupportedKernelError
from .events.decode import Decoder
from .kernel.layout import EVENT_SIZE
from .kernel import bpfsys
from .kernel.capabilities import CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, Capabilities, effective_caps, probe
from .kernel.hooks import plan_hooks
from .kernel.loader import DEFAULT_APP_WINDOW_S, DEFAULT_RING_MB, Filters, RstProgram
from .kernel.ringbuf import record_stride
from .pipeline import Pipeline
from .sinks import records
from .sinks.summary import DRAIN_S
from .storm import WINDOW_S as STORM_WINDOW_S, Storms

POLL_INTERVAL = 0.1           # seconds between looks at the ring buffer when it was found empty
LOST_CHECK_INTERVAL = 0.5     # seconds between reads of the kernel's lost counter
LISTENERS_INTERVAL = 2.0      # seconds between `listeners` records
RECONCILE_INTERVAL = 10.0     # seconds between `reconciliation` records (and one at exit)
MAX_BATCH = 2048              # records read from the ring at once, then enriched and written


@dataclass
class Options:
    ports: list[int] = field(default_factory=list)
    pid: int | None = None
    family: int | None = None
    reasons: set[str] = field(default_factory=set)       # only these rsttrace reasons (empty: all)
    netns: list[int] = field(default_factory=list)       # only these netns inodes (filtered in the kernel)
    comms: list[str] = field(default_factory=list)       # only events attributed to a process named so
    cgroups: list[str] = field(default_factory=list)     # ... in one of these cgroups (v2 path prefixes)
    containers: list[str] = field(default_factory=list)  # ... in a container whose id starts so
    duration: float | None = None
    count: int | None = None
    evidence: bool = True                                # symbolize kernel callers into the records
    backend: str = "auto"                                # auto / tracepoint / kprobe / fentry (kernel/hooks.py)
    max_rate: int | None = None                          # event records per second at most (--max-rate)
    ring_mb: int = DEFAULT_RING_MB                       # kernel → rsttrace ring buffer (--ring-mb)
    fast_path: bool = True                               # JSON lines from per-shape templates (fastpath.py)
    stories: bool = True                                 # connections' stories and RST pairs (--no-stories)
    app_errors: bool = False                             # failed syscalls, accept() calls (--app-errors)
    app_window_s: float = DEFAULT_APP_WINDOW_S           # how long before an RST a failure explains it
    origins: bool = False                                # per-packet hooks: who really sent a reset (--origins)


class Session:
    def __init__(self, options: Options, sinks: list, started_at: float | None = None):
        self.options = options
        self.sinks = sinks
        self.started_at = started_at or time.monotonic()
        self.program: RstProgram | None = None
        self.caps: Capabilities | None = None
        self.pipeline: Pipeline | None = None
        self.exact: ExactCounts | None = None
        self.sampler: ListenerSampler | None = None
        self.listeners: ListenerTracking | None = None
        self.ring = None
        self.lost_reported = 0
        self._stop = False
        self._reopen = False

    # -- start -----------------------------------------------------------------------------
    def start(self) -> Capabilities:
        if os.geteuid() != 0 and not _has_bpf_caps():
            raise NotRootError("rsttrace must run as root (it loads BPF programs)", "run it with sudo")
        caps = probe()
        if not caps.btf:
            raise UnsupportedKernelError(caps.btf_error, "rsttrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y")
        if caps.tracefs is None:
            raise UnsupportedKernelError(caps.tracefs_error)
        refused = caps.prog_load.get("tracepoint", 0)
        if refused:
            raise BPFRefusedError(f"the kernel refuses to load BPF tracepoint programs: {bpfsys.describe(refused)}",
                                  "a seccomp profile, LSM or kernel.unprivileged_bpf_disabled may block bpf(2); "
                                  "see `rsttrace doctor`")
        o = self.options
        self.caps = caps
        self.plan = plan_hooks(caps, o.backend, stories=o.stories, app_errors=o.app_errors, origins=o.origins)
        self.program = RstProgram(caps, Filters(ports=o.ports, pid=o.pid, family=o.family, netns=o.netns,
                                                comms=o.comms, cgroups=cgroup_directories(o.cgroups)),
                                  self.plan, o.ring_mb, o.app_window_s)
        if self.plan.counted:
            found, online = self.program.learn_cpu_offsets()
            if found < online:
                self.plan.coverage.blind_spots.append(
                    f"the kernel's listen counters can be read on {found} of {online} CPUs (the way to a CPU's "
                    f"per-CPU offset failed its check on the others): SYN verdicts there are inferred")
        attributor = Attributor(context_known=bool(caps.softirq_ranges))
        decoder = Decoder(self.program.reason_names)
        told = Stories(attributor) if self.plan.stories else None
        app = AppErrors(self.program, o.app_window_s) if self.plan.app_errors else None
        origins = Origins(self.program, netns_name=attributor.netns.name) if self.plan.origins else None
        self.pipeline = pipeline = Pipeline(o, self.sinks, decoder, attributor, ksym=self.program.ksym,
                                            stories=told, app=app, origins=origins)
        self.exact = ExactCounts(self.program.reason_names, pipeline.stacks, attributor.netns.name)
        self.ring = self.program.open_ring()
        self.storms = Storms(self.program, self.program.ring_bytes, self.exact.reason_of, attributor.netns.name,
                             lambda: self.ring.pending() * record_stride(EVENT_SIZE))
        self.counters_before = counters.read()
        if any(self.plan.coverage.hooks.get(k) for k in ("syn_dropped", "ack_dropped")):
            # Sampled as often as `listeners` records go out: listener owners come from the kernel's
            # record of listen(), not from a race with the sampler.
            self.sampler = ListenerSampler(o.ports, interval=LISTENERS_INTERVAL, netns=o.netns,
                                           seen_in=pipeline.seen_in)
            self.sampler.add_known_namespaces()
            self.sampler.start()
        # With --port, the listeners to learn are few and can be listed: once all are known the
        # per-packet sk_data_ready hook goes (ListenerTracking). The poke (kernel/listener_poke.py)
        # learns them at once where the kernel has the hook for it; it runs on every recvmsg() of
        # the host, so it stays only for the first pokes.
        learning = bool(o.ports) and self.plan.learns_older_listeners
        poking = learning and self.plan.pokes_listeners
        if not poking:
            self.program.stop_poke_hook()
        self.listeners = ListenerTracking(self.program, attributor, self.sampler, o.ports, learning, poking)
        if self.sampler is not None:
            pipeline.on_listener_event = self.listeners.observe
        self.attached_at = time.monotonic()
        # What start-up made (bcc, LLVM's Python side, modules) lives until exit: out of the cyclic
        # GC's sight, and collections rarer — the event path makes no cycles.
        gc.freeze()
        gc.set_threshold(5000, 20, 20)
        pipeline.start_sinks()
        pipeline.emit(records.coverage_record(self.plan.coverage.as_dict(), caps.kernel, self._filter_dict(),
                                              (self.attached_at - self.started_at) * 1000))
        pipeline.flush()
        return caps

    def _filter_dict(self) -> dict:
        o = self.options
        fam = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}.get(o.family) if o.family else None
        return {"ports": o.ports, "pid": o.pid, "family": fam, "reasons": sorted(o.reasons), "netns": o.netns,
                "comm": o.comms, "cgroup": o.cgroups, "container": o.containers}

    # -- loop ------------------------------------------------------------------------------
    def request_stop(self, *_args) -> None:
        self._stop = True

    def request_reopen(self, *_args) -> None:
        """SIGHUP (logrotate's postrotate): reopen outputs between two records, never inside one."""
        self._reopen = True

    def _read_batch(self) -> int:
        """Up to MAX_BATCH records from the ring through the pipeline; how many were read."""
        chunk = self.ring.read(MAX_BATCH)
        return self.pipeline.read(chunk) if chunk else 0

    def run(self) -> None:
        p = self.pipeline
        deadline = self.attached_at + self.options.duration if self.options.duration else None
        next_lost_check = 0.0
        next_listeners = time.monotonic() + LISTENERS_INTERVAL
        next_reconcile = time.monotonic() + RECONCILE_INTERVAL
        next_storm_tick = time.monotonic() + STORM_WINDOW_S
        next_story_sweep = time.monotonic() + stories.SWEEP_EVERY_S
        while not (self._stop or p.done):
            if self._read_batch() < MAX_BATCH:       # the ring is empty (for now): wait a little
                timeout = POLL_INTERVAL
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    timeout = min(timeout, left)
                self.ring.wait(timeout)
            elif deadline is not None and time.monotonic() >= deadline:
                break
            if self._reopen:
                self._reopen = False
                p.flush()
                p.reopen()
            now = time.monotonic()
            if p.limit is not None and p.limit.window_over(now):
                self._report_suppressed(now)
            self._refresh_metrics()
            if now >= next_storm_tick:
                for rec in self.storms.tick(self.program.stats()):
                    p.emit(rec)
                next_storm_tick = now + STORM_WINDOW_S
            if now >= next_story_sweep:
                self._end_stories(idle=True)
                next_story_sweep = now + stories.SWEEP_EVERY_S
            if now >= next_lost_check:
                self._report_losses()
                self.listeners.tick(now)
                next_lost_check = now + LOST_CHECK_INTERVAL
            if self.sampler is not None and now >= next_listeners:
                p.emit(records.listeners_record(self._listener_rows()))
                next_listeners = now + LISTENERS_INTERVAL
            if self.sampler is not None and now >= next_reconcile:
                p.emit(self.reconciliation_record())
                next_reconcile = now + RECONCILE_INTERVAL
            p.flush()

    def _listener_rows(self) -> list[dict]:
        """The listeners, each with the connections it hurt (enrich/stories.py) where stories are on."""
        rows = self.listeners.rows()
        told = self.pipeline.stories
        if told is not None:
            if self.program.counts_handshakes and self.program.bpf is not None:
                told.handshakes = self.program.handshakes()
            for row in rows:
                row["connections"] = told.listener_outcomes(row["netns"]["inode"], row["local"]["port"])
        app = self.pipeline.app
        if app is not None:
            for row in rows:
                row["accept"] = app.accept_block(row["netns"]["inode"], row["local"]["port"])
        return rows

    def reconciliation_record(self, exact=None, percpu=None, device=None) -> dict:
        """rsttrace's counts per netns beside the kernel's (enrich/reconcile.py). `exact` and `percpu`:
        the kernel-side counts, read here unless given (at exit they are read before the maps close)."""
        if exact is None:
            exact = self.program.exact_counts()
        if percpu is None:
            percpu = percpu_totals(self.program.netstat_reads())
        written = {inode: dict(c) for inode, c in self.pipeline.netns_counts.items()}
        if device is None and self.plan.origin_packets:
            device = self.program.device_rsts()
        rows = reconcile(list(self.sampler.netns.values()), ExactCounts.per_netns(exact), written, percpu,
                         self.sampler.at_start, self.sampler.start_counters, device)
        return records.reconciliation_record(rows)

    def _report_suppressed(self, now: float) -> None:
        limit = self.pipeline.limit
        closed = limit.close_window(now)
        if closed is not None:
            window_s, held_back = closed
            self.pipeline.emit(records.suppressed_record(
                window_s, held_back, limit.total_held_back, limit.per_second,
                self.exact.by_kind(self.program.exact_counts()), self.program.stats()["uncounted"]))

    def _refresh_metrics(self) -> None:
        """Metrics sinks ask for the kernel's exact counts when a scrape needs them (a sink never
        touches BPF: the session reads the maps and hands over plain rows)."""
        wanting = [s for s in self.sinks if getattr(s, "wants_counts", None) and s.wants_counts()]
        if wanting:
            rows = self.exact.rows(self.program.exact_counts())
            stats = self.program.stats()
            stats["suppressed"] = self.pipeline.limit.total_held_back if self.pipeline.limit else 0
            stats["skipped_runs"] = self.program.skipped_runs()
            delivered = self._delivery()
            if delivered is not None:
                stats["otlp"] = delivered
            for sink in wanting:
                sink.update_counts(rows, stats)

    def _delivery(self, settle: bool = False) -> dict | None:
        """What the OTLP sink (--otlp) made of the records so far; with `settle`, after sending what
        is queued (bounded: its exit flush)."""
        for sink in self.sinks:
            counts = getattr(sink, "settle" if settle else "delivery", None)
            if counts is not None:
                return counts()
        return None

    def _end_stories(self, idle: bool) -> None:
        """Stories whose ends were silent (idle), or all still open (exit): `connection` records."""
        p = self.pipeline
        if p.stories is None:
            return
        taken = self.program.take_stories(int(stories.IDLE_S * 1e9) if idle else None)
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for key, val in taken:
            p.emit_connection(p.stories.open_story(key, val, now, p.decoder.mono_to_wall, "idle" if idle else "exit"))

    def _report_losses(self) -> None:
        lost = self.program.stats()["lost"]
        if lost > self.lost_reported:
            self.pipeline.emit(records.lost_record(lost - self.lost_reported, lost))
            self.lost_reported = lost

    # -- stop ------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Drain what is still in the ring buffer, detach everything, emit the summary."""
        if self.program is None:
            return {}
        p = self.pipeline
        try:
            # Detached first: nothing new arrives, and every record reserved by then is committed
            # before the last read (a drain while attached stops at a record still being written).
            self.program.detach()
            unwritten = 0
            if p is not None and not p.done:
                deadline = time.monotonic() + DRAIN_S
                while self._read_batch() and time.monotonic() < deadline:
                    p.flush()
                unwritten = self.ring.pending()
            if p is None:
                return {}
            self._report_losses()
            if p.limit is not None:
                self._report_suppressed(time.monotonic())
            self._end_stories(idle=False)
            if p.stories is not None and self.program.counts_handshakes:
                p.stories.handshakes = self.program.handshakes()
            stats = self.program.stats()
            for rec in self.storms.finish(stats):
                p.emit(rec)
            exact = self.program.exact_counts()
            if self.plan.counted:
                self.program.flush_netstat(netns_alive())
            percpu = percpu_totals(self.program.netstat_reads())
            device = self.program.device_rsts() if self.plan.origin_packets else None
            skipped = self.program.skipped_runs()
            self._refresh_metrics()
        finally:
            if self.ring is not None:
                self.ring.close()
            self.program.close()
        reconciliation = None
        if self.sampler is not None:
            self.sampler.stop()
            self.sampler.sample_once()
            p.emit(records.listeners_record(self._listener_rows()))  # the final drop counts, not ones up to 2 s old
            final = self.reconciliation_record(exact, percpu, device)
            p.emit(final)
            reconciliation = final["netns"]
            self.sampler.close()
        after = counters.read()
        summary = records.summary_record(
            p.written_by_kind(), stats["lost"], stats["submitted"], time.monotonic() - self.attached_at,
            {"netns": "rsttrace's own", "delta": counters.delta(self.counters_before, after)},
            self.exact.by_kind(exact), reconciliation,
            suppressed=p.limit.total_held_back if p.limit else 0, uncounted=stats["uncounted"],
            unwritten=unwritten, skipped_runs=skipped, aggregated=stats["aggregated"])
        if p.stories is not None:
            summary["connections"] = p.stories.summary(stats["stories_full"])
        if p.app is not None:
            # Failed path calls whose path the kernel could not read from the process's memory.
            summary["app_errors"] = {"paths_unread": stats["app_paths_unread"]}
        summary["origins"] = self.plan.origin_packets
        delivered = self._delivery(settle=True)
        if delivered is not None:
            summary["otlp"] = delivered
        p.emit(summary)
        return summary


def cgroup_directories(paths: list[str]) -> list[str]:
    """--cgroup paths as directories of the cgroup v2 mount, for the kernel's filter of the failed
    syscalls it keeps (bpf/app.bpf.c: 8 at most; with more, it keeps every process's)."""
    mount = cgroup2_mount() or "/sys/fs/cgroup"
    return [os.path.join(mount, path.lstrip("/")) for path in paths] if len(paths) <= 8 else []


def _has_bpf_caps() -> bool:
    caps = effective_caps()
    return bool(caps >> CAP_SYS_ADMIN & 1 or (caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1))


def install_signal_handlers(session: Session, on_terminal: bool = False) -> None:
    """SIGINT/SIGTERM stop (drain, detach, summary). SIGHUP reopens the outputs (logrotate), except
    for a run that writes to a terminal: there it is the terminal hanging up, and the run stops
    rather than go on tracing for nobody."""
    signal.signal(signal.SIGINT, session.request_stop)
    signal.signal(signal.SIGTERM, session.request_stop)
    signal.signal(signal.SIGHUP, session.request_stop if on_terminal else session.request_reopen)
