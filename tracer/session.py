"""One tracing run: hook → event → enrich → sink, from attach to a clean detach.

    probe kernel → load programs (filters in the kernel) → poll ring buffer → decode → classify
    → attribute → explain → user-space filters → sinks;   losses counted → `lost` records;
    SIGINT/SIGTERM/--duration/--count → drain, detach, flush, summary.
"""
from __future__ import annotations

import gc
import os
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

from . import fastpath
from .enrich import counters, reasons
from .enrich.attribution import Attributor
from .enrich.cgroups import path_matches
from .enrich.listeners import ListenerSampler, listeners_everywhere, netns_alive
from .enrich.reconcile import percpu_totals, reconcile
from .errors import BPFRefusedError, NotRootError, UnsupportedKernelError
from .kernel import bpfsys, listener_poke
from .events.decode import TCP_STATES, Decoder, Event
from .fastpath import FastPath
from .events.record import F_HAVE_SOCKET, F_ORPHAN, F_UNREAD, HOOK_NAMES, KIND_NAMES, NO_REASON, VERDICT_NAMES
from .kernel.capabilities import Capabilities, probe
from .kernel.hooks import plan_hooks
from .kernel.loader import DEFAULT_RING_MB, Filters, RstProgram
from .kernel.ringbuf import record_stride
from .events.record import EVENT_SIZE
from .storm import WINDOW_S as STORM_WINDOW_S, Storms
from .sinks import records
from .sinks.ratelimit import RateLimit
from .sinks.plain import stderr

POLL_INTERVAL = 0.1           # seconds between looks at the ring buffer when it was found empty
LOST_CHECK_INTERVAL = 0.5     # seconds between reads of the kernel's lost counter
LISTENER_SCAN_INTERVAL = 10.0 # seconds between looks for listeners that predate rsttrace (all netns)
LISTENERS_INTERVAL = 2.0      # seconds between `listeners` records
RECONCILE_INTERVAL = 10.0     # seconds between `reconciliation` records (and one at exit)
MAX_BATCH = 2048              # records read from the ring at once, then enriched and written
DRAIN_S = 20.0                # at exit, how long to go on writing what is still in the ring buffer


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


class Session:
    def __init__(self, options: Options, sinks: list, started_at: float | None = None):
        self.options = options
        self.sinks = sinks
        self.started_at = started_at or time.monotonic()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.netns_counts: dict[int, Counter[str]] = {}     # netns inode → event kind → count
        self.listen_backlogs: dict[tuple[int, int], int] = {}  # (netns, port) → listen() backlog seen
        self.sampler: ListenerSampler | None = None
        self._learning_listeners = False          # sk_data_ready attached to learn older listeners
        self._older_listeners: dict[tuple[int, int], list[int]] | None = None   # → socket inodes
        self._older_scanned_at = 0.0
        self._resolved_listeners: set[int] = set()
        self._listener_owners: dict[tuple[int, int], tuple[int, str]] = {}   # recorded at listen()
        self.ring = None
        self.fast: FastPath | None = None
        self.emitted = 0
        self.lost_reported = 0
        self.limit = RateLimit(options.max_rate) if options.max_rate else None
        self._reason_cache: dict[tuple, str] = {}
        self._stacks: dict[tuple, list[str]] = {}
        self._stop = False
        self._reopen = False
        self.program: RstProgram | None = None
        self.caps: Capabilities | None = None

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
        self.caps = caps
        self.plan = plan_hooks(caps, self.options.backend)
        self.program = RstProgram(caps, Filters(self.options.ports, self.options.pid, self.options.family,
                                                self.options.netns), self.plan, self.options.ring_mb)
        if self.plan.counted:
            found, online = self.program.learn_cpu_offsets()
            if found < online:
                self.plan.coverage.blind_spots.append(
                    f"the kernel's listen counters can be read on {found} of {online} CPUs (the way to a CPU's "
                    f"per-CPU offset failed its check on the others): SYN verdicts there are inferred")
        self.decoder = Decoder(self.program.reason_names)
        self.attributor = Attributor(context_known=bool(caps.softirq_ranges))
        self.ring = self.program.open_ring()
        self.storms = Storms(self.program, self.program.ring_bytes, self._reason_of, self.attributor.netns.name,
                             lambda: self.ring.pending() * record_stride(EVENT_SIZE))
        if self.options.fast_path and fastpath.supported(self.sinks):
            self.fast = FastPath(self)
        self.counters_before = counters.read()
        if any(self.plan.coverage.hooks.get(k) for k in ("syn_dropped", "ack_dropped")):
            # Sampled as often as `listeners` records go out: listener owners come from the kernel's
            # record of listen(), not from a race with the sampler (measured: 1 % → 0.3 % of a core idle).
            self.sampler = ListenerSampler(self.options.ports, interval=LISTENERS_INTERVAL, netns=self.options.netns,
                                           seen_in=lambda inode: dict(self.netns_counts.get(inode, {})))
            self.sampler.add_known_namespaces()
            self.sampler.start()
        # With --port, the listeners to learn are few and can be listed: once all are known the
        # per-packet sk_data_ready hook goes (_learn_older_listeners).
        self._learning_listeners = bool(self.options.ports) and "-DHAVE_SK_DATA_READY" in self.plan.macros
        # The poke (tracer/kernel/listener_poke.py) learns those at once, where the kernel has the hook
        # for it; it runs on every recvmsg() of the host, so it stays only for the first pokes.
        self._poking = self._learning_listeners and "-DHAVE_SOCK_RECV_LENGTH" in self.plan.macros
        if not self._poking:
            self.program.stop_poke_hook()
        self.attached_at = time.monotonic()
        # What start-up made (bcc, LLVM's Python side, modules) lives until exit: out of the cyclic
        # GC's sight, and collections rarer — the event path makes no cycles (~5 % of its CPU).
        gc.freeze()
        gc.set_threshold(5000, 20, 20)
        for sink in self.sinks:
            start = getattr(sink, "start", None)      # sinks with threads start them now (kernel/kallsyms.py)
            if start is not None:
                start()
        cov = self.plan.coverage.as_dict()
        self._emit(records.coverage_record(cov, caps.kernel, self._filter_dict(),
                                           (self.attached_at - self.started_at) * 1000))
        self._flush()
        return caps

    def _filter_dict(self) -> dict:
        o = self.options
        fam = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}.get(o.family) if o.family else None
        return {"ports": o.ports, "pid": o.pid, "family": fam, "reasons": sorted(o.reasons), "netns": o.netns,
                "comm": o.comms, "cgroup": o.cgroups, "container": o.containers}

    # -- per event -------------------------------------------------------------------------
    def _read_batch(self) -> int:
        """Read, enrich and emit up to MAX_BATCH records (attribution prepared once for the whole
        batch); how many were read."""
        chunk = self.ring.read(MAX_BATCH)
        if not chunk:
            return 0
        if self.fast is not None:
            return self.fast.process(chunk)
        batch = self.decoder.decode_batch(chunk)
        if batch:
            self.process_batch(batch)
        return len(batch)

    def process_batch(self, batch: list[Event]) -> None:
        self.attributor.prepare(batch)
        for ev in batch:
            if self._stop and self.options.count is not None and self.emitted >= self.options.count:
                break
            self.handle(ev)

    def handle(self, ev: Event) -> bool:
        """Enrich one event and emit its record; whether it passed the user-space filters (--reason,
        --pid/--comm/--cgroup/--container), --max-rate aside."""
        if self.program is not None and (self.options.evidence or ev.kernel_reason is None):
            ev.caller_names = self._symbolize(ev.hook, ev.callers)
        ev.reason = reasons.classify(ev)
        per_netns = self.netns_counts.get(ev.netns)
        if per_netns is None:
            per_netns = self.netns_counts[ev.netns] = Counter()
        per_netns[ev.kind] += 1
        if self.options.reasons and ev.reason not in self.options.reasons:
            return False
        self.attributor.attribute(ev)
        if self.sampler is not None:
            if ev.netns not in self.sampler.netns and ev.process and ev.process.get("pid"):
                self.sampler.watch_pid(ev.process["pid"])
            if ev.queues and ev.queues.get("backlog") is not None:
                self.listen_backlogs[(ev.netns, ev.local_port)] = ev.queues["backlog"]
        if not self.wanted(ev):
            return False
        if self.limit is not None and not self.limit.allow(time.monotonic(), ev.kind, ev.reason):
            return True  # counted by the limiter (and exactly in the kernel); said in `suppressed` records
        ev.explanation = reasons.explain(ev)
        self.counts[(ev.kind, ev.reason)] += 1
        self._emit(records.event_record(ev))
        self.emitted += 1
        if self.options.count is not None and self.emitted >= self.options.count:
            self._stop = True
        return True

    def _symbolize(self, hook: str | None, callers: list[int]) -> list[str]:
        """Kernel frames by name; one lookup per distinct stack (a storm has few). The lists are
        shared between events: nothing downstream changes them."""
        key = (hook, *callers)
        names = self._stacks.get(key)
        if names is None:
            names = with_hook(hook, [self.program.ksym(a) for a in callers])
            if len(self._stacks) >= 65536:
                self._stacks.clear()
            self._stacks[key] = names
        return names

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

    def _emit(self, record: dict) -> None:
        for sink in self.sinks:
            sink.emit(record)

    def _flush(self) -> None:
        """End of a poll's worth of records: buffered line outputs write them out."""
        for sink in self.sinks:
            flush = getattr(sink, "flush", None)
            if flush is not None:
                flush()

    # -- loop ------------------------------------------------------------------------------
    def request_stop(self, *_args) -> None:
        self._stop = True

    def request_reopen(self, *_args) -> None:
        """SIGHUP (logrotate's postrotate): reopen outputs between two records, never inside one."""
        self._reopen = True

    def _reopen_outputs(self) -> None:
        self._reopen = False
        for sink in self.sinks:
            reopen = getattr(sink, "reopen", None)
            if reopen is not None:
                reopen()

    def run(self) -> None:
        deadline = self.attached_at + self.options.duration if self.options.duration else None
        next_lost_check = 0.0
        next_listeners = time.monotonic() + LISTENERS_INTERVAL
        next_reconcile = time.monotonic() + RECONCILE_INTERVAL
        next_storm_tick = time.monotonic() + STORM_WINDOW_S
        while not self._stop:
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
                self._flush()
                self._reopen_outputs()
            now = time.monotonic()
            if self.limit is not None and self.limit.window_over(now):
                self._report_suppressed(now)
            self._refresh_metrics()
            if now >= next_storm_tick:
                for rec in self.storms.tick(self.program.stats()):
                    self._emit(rec)
                next_storm_tick = now + STORM_WINDOW_S
            if now >= next_lost_check:
                self._report_losses()
                self._resolve_new_listeners()
                if self._learning_listeners:
                    self._learn_older_listeners(now)
                next_lost_check = now + LOST_CHECK_INTERVAL
            if self.sampler is not None and now >= next_listeners:
                self._emit(self.listeners_record())
                next_listeners = now + LISTENERS_INTERVAL
            if self.sampler is not None and now >= next_reconcile:
                self._emit(self.reconciliation_record())
                next_reconcile = now + RECONCILE_INTERVAL
            self._flush()

    def _learn_older_listeners(self, now: float) -> None:
        """Listeners that existed before rsttrace reach the BPF table only when they next queue a
        connection (sock:sk_data_ready, which fires for every socket receiving data on the host).
        Once every listener on the traced ports in every netns is known, that hook is detached: new
        listeners arrive through listen() (inet_sock_set_state)."""
        if self._older_listeners is None or now - self._older_scanned_at >= LISTENER_SCAN_INTERVAL:
            self._older_listeners = listeners_everywhere(set(self.options.ports))
            self._older_scanned_at = now
            if self._poking:
                self._poke_older_listeners()
        if self._older_listeners.keys() <= self.program.known_listeners().keys():
            self.program.stop_learning_listeners()
            self._learning_listeners = False

    def _poke_older_listeners(self) -> None:
        """One round, at start: a recv() on a copy of each unknown older listener's fd makes it pass
        through sock:sock_recv_length, where the BPF side learns it (tracer/kernel/listener_poke.py).
        Listeners that predate rsttrace all exist by the first scan (later ones call listen() while
        traced), so the hook goes after it; any listener the poke missed is left to sk_data_ready."""
        known = self.program.known_listeners().keys()
        inodes = [inode for key, found in self._older_listeners.items() if key not in known for inode in found]
        if inodes:
            now_ns = time.monotonic_ns()
            self.attributor.sockets.refresh_for([(inode, now_ns) for inode in inodes])
            for inode in inodes:
                for pid in self.attributor.sockets.owners(inode):
                    if listener_poke.poke(pid, inode):      # one owner's copy is enough
                        break
        self.program.stop_poke_hook()
        self._poking = False

    def _resolve_new_listeners(self) -> None:
        """Name each listener's owner as soon as the sampler sees it, before its first drop: by then the
        owner index may have just been rebuilt for another socket, and the process may be gone. The
        BPF programs saw most listeners' owners call listen(): only the others are looked up in
        /proc, once each (a look costs a scan of every fd on the host: ~70 ms with 10k sockets)."""
        if self.sampler is None:
            return
        current = {(st.inode, lst.port, lst.inode) for st in list(self.sampler.netns.values())
                   for lst in st.listeners}
        inodes = {inode for _, _, inode in current}
        self._resolved_listeners &= inodes           # forget closed listeners: bounded over long runs
        new = [(netns, port, inode) for netns, port, inode in current if inode not in self._resolved_listeners]
        if not new:
            return
        self._listener_owners = self.program.known_listeners()
        unknown = [inode for netns, port, inode in new if not self._listener_owners.get((netns, port), (0,))[0]]
        if unknown:
            self.attributor.sockets.refresh_for([(inode, time.monotonic_ns()) for inode in unknown])
        self._resolved_listeners.update(inode for _, _, inode in new)

    def listeners_record(self) -> dict:
        rows = self.sampler.snapshot(self._listener_owner)
        for row in rows:
            backlog = self.listen_backlogs.get((row["netns"]["inode"], row["local"]["port"]))
            if backlog is not None and row["somaxconn"] is not None:
                row["backlog"] = backlog
                row["binding_limit"] = "somaxconn" if backlog > row["somaxconn"] else "listen_backlog"
        return records.listeners_record(rows)

    def _listener_owner(self, netns: int, port: int, inode: int) -> dict | None:
        pid, comm = self._listener_owners.get((netns, port), (0, ""))
        if pid:
            owner = self.attributor.recorded_owner(pid, comm, "listener_owner")
            owner["cgroup"], owner["container"] = self.attributor.cgroups.of(pid)
            return owner
        return self.attributor.owner_of_socket(inode, "listener_owner")

    def reconciliation_record(self, exact=None, percpu=None) -> dict:
        """rsttrace's counts per netns beside the kernel's (enrich/reconcile.py). `exact` and `percpu`:
        the kernel-side counts, read here unless given (at exit they are read before the maps close)."""
        if exact is None:
            exact = self.program.exact_counts()
        if percpu is None:
            percpu = percpu_totals(self.program.netstat_reads())
        counted: dict[int, dict[str, int]] = {}
        for key, n in exact:
            by_kind = counted.setdefault(key.netns, {})
            kind = KIND_NAMES.get(key.kind, f"kind_{key.kind}")
            by_kind[kind] = by_kind.get(kind, 0) + n
        written = {inode: dict(c) for inode, c in self.netns_counts.items()}
        rows = reconcile(list(self.sampler.netns.values()), counted, written, percpu, self.sampler.at_start,
                         self.sampler.start_counters)
        return records.reconciliation_record(rows)

    def _report_suppressed(self, now: float) -> None:
        closed = self.limit.close_window(now)
        if closed is not None:
            window_s, held_back = closed
            self._emit(records.suppressed_record(window_s, held_back, self.limit.total_held_back,
                                                 self.limit.per_second, self.kernel_counts(self.program.exact_counts()),
                                                 self.program.stats()["uncounted"]))

    def _refresh_metrics(self) -> None:
        """Metrics sinks ask for the kernel's exact counts when a scrape needs them (a sink never
        touches BPF: the session reads the maps and hands over plain rows)."""
        wanting = [s for s in self.sinks if getattr(s, "wants_counts", None) and s.wants_counts()]
        if wanting:
            rows = self.count_rows(self.program.exact_counts())
            stats = self.program.stats()
            stats["suppressed"] = self.limit.total_held_back if self.limit else 0
            stats["skipped_runs"] = self.program.skipped_runs()
            for sink in wanting:
                sink.update_counts(rows, stats)

    def _report_losses(self) -> None:
        lost = self.program.stats()["lost"]
        if lost > self.lost_reported:
            self._emit(records.lost_record(lost - self.lost_reported, lost))
            self.lost_reported = lost

    # -- stop ------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Drain what is still in the ring buffer, detach everything, emit the summary."""
        summary = None
        if self.program is not None:
            try:
                # Detached first: nothing new arrives, and every record reserved by then is committed
                # before the last read (a drain while attached stops at a record still being written).
                self.program.detach()
                unwritten = 0
                if not (self.options.count is not None and self.emitted >= self.options.count):
                    deadline = time.monotonic() + DRAIN_S      # a full 32 MiB ring: ~1-3 s to write out
                    while self._read_batch() and time.monotonic() < deadline:
                        self._flush()
                    unwritten = self.ring.pending()
                self._report_losses()
                if self.limit is not None:
                    self._report_suppressed(time.monotonic())
                stats = self.program.stats()
                for rec in self.storms.finish(stats):
                    self._emit(rec)
                exact = self.program.exact_counts()
                if self.plan.counted:
                    self.program.flush_netstat(netns_alive())
                percpu = percpu_totals(self.program.netstat_reads())
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
                self._emit(self.listeners_record())     # the final drop counts, not ones up to 2 s old
                final = self.reconciliation_record(exact, percpu)
                self._emit(final)
                reconciliation = final["netns"]
            after = counters.read()
            by_kind: dict[str, dict[str, int]] = {}
            for (kind, reason), n in sorted(self.counts.items()):
                by_kind.setdefault(kind, {})[reason] = n
            summary = records.summary_record(
                by_kind, stats["lost"], stats["submitted"], time.monotonic() - self.attached_at,
                {"netns": "rsttrace's own", "delta": counters.delta(self.counters_before, after)},
                self.kernel_counts(exact), reconciliation,
                suppressed=self.limit.total_held_back if self.limit else 0, uncounted=stats["uncounted"],
                unwritten=unwritten, skipped_runs=skipped, aggregated=stats["aggregated"])
            self._emit(summary)
        return summary or {}


    def kernel_counts(self, exact) -> dict[str, dict[str, int]]:
        """Exact in-kernel counts per event kind and rsttrace reason (before any user-space filter)."""
        out: dict[str, dict[str, int]] = {}
        for row in self.count_rows(exact):
            by_reason = out.setdefault(row["event"], {})
            by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + row["count"]
        return out

    def count_rows(self, exact) -> list[dict]:
        """The kernel's exact counts as rows: event, reason, netns (inode, name), service port, count."""
        netns_name = self.attributor.netns.name
        return [{"event": KIND_NAMES.get(key.kind, f"kind_{key.kind}"), "reason": self._reason_of(key),
                 "netns": key.netns, "netns_name": netns_name(key.netns), "port": key.service_port, "count": n}
                for key, n in exact]

    def _reason_of(self, key) -> str:
        """rsttrace's reason for one count key, classified as the event itself would be (cached: a
        storm has many keys but few distinct classifications)."""
        memo = (key.kind, key.kernel_reason, key.tcp_flags, key.linger_zero, key.verdict, key.queue_full,
                key.flags, key.state, key.hook, key.callers[0], key.callers[1])
        reason = self._reason_cache.get(memo)
        if reason is None:
            kind = KIND_NAMES.get(key.kind, f"kind_{key.kind}")
            names = self.program.reason_names.get(kind, {})
            kreason = None if key.kernel_reason == NO_REASON else names.get(key.kernel_reason)
            callers = (with_hook(HOOK_NAMES.get(key.hook), [self.program.ksym(a) for a in key.callers if a])
                       if kreason is None else [])
            reason = reasons.classify_fields(kind, kreason, key.tcp_flags, bool(key.linger_zero),
                                             VERDICT_NAMES.get(key.verdict, "none"), bool(key.queue_full),
                                             bool(key.flags & F_ORPHAN), callers, TCP_STATES.get(key.state),
                                             1 if key.flags & F_UNREAD else 0, bool(key.flags & F_HAVE_SOCKET))
            self._reason_cache[memo] = reason
        return reason


TRACING_FRAMES = ("bpf_prog_", "bpf_trace_run", "__bpf_trace_", "__traceiter_")


def with_hook(hook: str | None, callers: list[str]) -> list[str]:
    """Kernel frames innermost first, starting with the hooked function: an fentry program runs
    before that function's frame exists, so its stack starts at the caller. Frames of the tracing
    machinery itself (the BPF program, the tracepoint's dispatch) are left out."""
    callers = [name for name in callers if not name.startswith(TRACING_FRAMES)]
    if hook and (not callers or callers[0] != hook):
        return [hook, *callers]
    return callers


def _has_bpf_caps() -> bool:
    from .kernel.capabilities import CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, _effective_caps
    caps = _effective_caps()
    return bool(caps >> CAP_SYS_ADMIN & 1 or (caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1))


def install_signal_handlers(session: Session, on_terminal: bool = False) -> None:
    """SIGINT/SIGTERM stop (drain, detach, summary). SIGHUP reopens the outputs (logrotate), except
    for a run that writes to a terminal: there it is the terminal hanging up, and the run stops
    rather than go on tracing for nobody."""
    signal.signal(signal.SIGINT, session.request_stop)
    signal.signal(signal.SIGTERM, session.request_stop)
    signal.signal(signal.SIGHUP, session.request_stop if on_terminal else session.request_reopen)


def print_summary(summary: dict, out=stderr) -> None:
    if not summary:
        return
    total = sum(sum(r.values()) for r in summary["events"].values())
    held = f", suppressed {summary['suppressed']} (--max-rate)" if summary.get("suppressed") else ""
    if summary.get("aggregated"):
        held += f", aggregated {summary['aggregated']} during storms (counted per shape, not written one by one)"
    out(f"rsttrace: {total} events in {summary['duration_s']:.1f}s, lost {summary['lost']}{held}")
    if summary.get("unwritten"):
        out(f"rsttrace: {summary['unwritten']} records were still in the ring buffer when writing gave up "
            f"after {DRAIN_S:.0f} s (counted below)")
    skipped = summary.get("skipped_runs") or {}
    if skipped:
        out(f"rsttrace: the kernel skipped {sum(skipped.values())} runs of rsttrace's programs ("
            + ", ".join(f"{hook} {n}" for hook, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
            + "): another BPF program was running on that CPU when the event fired (an interrupt nested "
              "in it); those events are in no record and no count")
    shown = summary["events"]
    if summary.get("suppressed") or summary["lost"] or summary.get("unwritten") or summary.get("aggregated"):
        shown = summary["exact_counts"]
        out("  counted in the kernel (every event past the kernel's filters, written or not):")
    for kind, by_reason in shown.items():
        for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1]):
            out(f"  {n:>8}  {kind:<13} {reason}")
    delta = summary["kernel_counters"]["delta"]
    moved = {k: v for k, v in delta.items() if v}
    if moved:
        out("  kernel counters (rsttrace's netns): " + ", ".join(f"{k} +{v}" for k, v in moved.items()))
    for ns in summary.get("reconciliation") or []:
        k, ours = ns["kernel"], ns.get("counted") or ns["rsttrace"]
        listen = ours.get("syn_dropped", 0) + ours.get("ack_dropped", 0)
        if not (k.get("TcpOutRsts") or k.get("TcpExtListenDrops") or ours):
            continue
        name = ns["name"] or ns["inode"]
        gone = " (gone: its last readings)" if ns.get("gone") else ""
        since = {"created_after_start": " (made after start: counted from 0)",
                 "late": f" (first read late: {ns.get('events_before_baseline', 0)} events before)"}.get(ns.get("baseline"), "")
        other = ns.get("unexplained", {}).get("TcpExtListenDrops")
        other = f", {other} the kernel counted where no hook saw a drop" if other else ""
        out(f"  netns {name}{since}{gone}: RSTs sent {ours.get('rst_sent', 0)} seen / {_known(k.get('TcpOutRsts'))} "
            f"counted (TcpOutRsts); listen drops {listen} seen / {_known(k.get('TcpExtListenDrops'))} counted "
            f"(ListenDrops){other}")


def _known(value: int | None) -> str:
    return "?" if value is None else str(value)
