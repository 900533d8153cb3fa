"""--metrics ADDR:PORT: a Prometheus exposition endpoint at /metrics, through prometheus_client.

A custom collector (the sink itself, in a private CollectorRegistry: no process or platform metrics)
builds the metric families on each scrape; prometheus_client writes them, as OpenMetrics when the
scraper's Accept header asks for it (Prometheus does), else in the text format 0.0.4. rsttrace keeps
its own HTTP server: bound before anything is loaded, closed when rsttrace exits.

Counters come from the kernel's exact per-key counts, read when a scrape arrives (the session reads
the BPF map and hands over plain rows: a sink never touches BPF), so they are exact even when the
ring buffer overflowed or --max-rate held records back. Gauges come from the records the session
emits (listeners, coverage).

Label cardinality is bounded, and stays monotonic:
  - event (6 kinds) × reason (the catalog, ~20; a connection's outcome);
  - netns: the first MAX_NETNS namespaces seen get their own value (`ip netns` name or inode), any
    later one is "other";
  - port: the *service* port (the listener's port; for RSTs the traced one of the two ports,
    else the local one where it is a listener's, else the remote one: bpf/maps.bpf.c
    service_port()): the first MAX_PORTS (netns, port) pairs seen get their own value, any later
    one is "other".
  A pair, once given a label, keeps it, so every series only ever grows.
"""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.utils import floatToGoString

from .. import __version__

# Buckets of the delay drops added to a connection that was established in the end: a SYN
# retransmit waits 1 s, then 2, 4 ... (tcp_syn_retries), a SYN-ACK retransmit likewise.
DELAY_BUCKETS = (0.01, 0.1, 0.5, 1.0, 1.5, 2.0, 3.5, 4.0, 7.5, 8.0, 15.5, 31.5, 63.5)
MAX_NETNS = 64
MAX_PORTS = 256
MAX_LISTENERS = 256
SCRAPE_WAIT_S = 0.5          # a scrape waits this long for fresh counts, then serves the last ones
OTHER = "other"


def parse_listen_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or :PORT (every address); ValueError with the reason otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not ADDR:PORT (e.g. 127.0.0.1:9465, [::1]:9465 or :9465)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


class MetricsSink:
    ignores_events = True        # counts come from the kernel's exact counts, not from event records
    def __init__(self, address: tuple[str, int]):
        self._lock = threading.Condition()
        self._generation = 0                 # bumped by every update_counts()
        self._wanted = False                 # a scrape waits for fresh counts
        self._netns_label: dict[int, str] = {}
        self._port_label: dict[tuple[int, int], str] = {}
        self._events: dict[tuple[str, str, str, str], int] = {}
        self._stats: dict[str, int] = {}
        self._coverage: dict[str, str | None] = {}
        self._kernel = ""
        self._listeners: list[dict] = []
        self._connections: dict[tuple[str, str, str], int] = {}      # (outcome, netns, port) → count
        self._delays: dict[tuple[str, str], list[int]] = {}          # (netns, port) → cumulative buckets, count
        self._delay_sums: dict[tuple[str, str], float] = {}
        self._updated_at = 0.0
        # A private registry holding this sink only: no process or platform collectors, nothing global.
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "rsttrace serves /metrics")
                    return
                # OpenMetrics when the scraper asks for it (Prometheus does), else the text format 0.0.4.
                encoder, content_type = choose_encoder(self.headers.get("Accept"))
                body = sink.scrape(encoder)
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):   # no access log on rsttrace's stderr
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            daemon_threads = True

        self._server = Server(address, Handler)   # OSError (in use, bad address): the caller says so
        self.address = self._server.server_address[:2]
        # Bound now (errors before anything is loaded), served once the session calls start().
        self._thread = threading.Thread(target=self._server.serve_forever, name="rsttrace-metrics", daemon=True)

    def start(self) -> None:
        if self._thread.ident is None:
            self._thread.start()

    # -- from the session (main thread) ------------------------------------------------------
    def emit(self, record: dict) -> None:
        kind = record["type"]
        with self._lock:
            if kind == "coverage":
                self._coverage = {k: v["hook"] for k, v in record["hooks"].items()}
                self._kernel = record["kernel"]
            elif kind == "listeners":
                self._listeners = record["listeners"]
            elif kind == "connection":
                self._count_connection(record)

    def _count_connection(self, record: dict) -> None:
        """A connection's story (enrich/stories.py): its outcome, and the delay added to one that made it,
        under the server's netns and port."""
        server = record["server"]
        netns = server["netns"] or record["client"]["netns"] or {"inode": 0, "name": None}
        labels = (self._netns_of(netns["inode"], netns["name"]), self._port_of(netns["inode"], server["port"]))
        key = (record["outcome"], *labels)
        self._connections[key] = self._connections.get(key, 0) + 1
        if record["delay_s"] is not None:
            counts = self._delays.setdefault(labels, [0] * (len(DELAY_BUCKETS) + 1))   # cumulative buckets, count
            for i, bound in enumerate(DELAY_BUCKETS):
                if record["delay_s"] <= bound:
                    counts[i] += 1
            counts[-1] += 1
            self._delay_sums[labels] = self._delay_sums.get(labels, 0.0) + record["delay_s"]

    def wants_counts(self) -> bool:
        return self._wanted

    def update_counts(self, rows: list[dict], stats: dict[str, int]) -> None:
        """rows: the kernel's exact counts (event, reason, netns, netns_name, port, count)."""
        events: dict[tuple[str, str, str, str], int] = {}
        with self._lock:
            for row in rows:
                netns = self._netns_of(row["netns"], row["netns_name"])
                port = self._port_of(row["netns"], row["port"])
                key = (row["event"], row["reason"], netns, port)
                events[key] = events.get(key, 0) + row["count"]
            self._events = events
            self._stats = dict(stats)
            self._updated_at = time.time()
            self._generation += 1
            self._wanted = False
            self._lock.notify_all()

    def _netns_of(self, inode: int, name: str | None) -> str:
        label = self._netns_label.get(inode)
        if label is None:
            label = (name or str(inode)) if len(self._netns_label) < MAX_NETNS else OTHER
            self._netns_label[inode] = label
        return label

    def _port_of(self, netns: int, port: int) -> str:
        label = self._port_label.get((netns, port))
        if label is None:
            label = str(port) if len(self._port_label) < MAX_PORTS else OTHER
            self._port_label[(netns, port)] = label
        return label

    # -- from a scrape (HTTP thread) ---------------------------------------------------------
    def scrape(self, encoder=generate_latest) -> bytes:
        with self._lock:
            seen = self._generation
            self._wanted = True
            self._lock.wait_for(lambda: self._generation != seen, timeout=SCRAPE_WAIT_S)
        return encoder(self._registry)

    def render(self, openmetrics: bool = False) -> str:
        """The exposition of what the sink holds now: the classic text format (0.0.4), or OpenMetrics."""
        return (generate_openmetrics if openmetrics else generate_latest)(self._registry).decode()

    def collect(self):
        """The metric families, for prometheus_client (CollectorRegistry.collect, on a scrape's thread)."""
        with self._lock:
            return self._families()

    def _families(self) -> list:
        out: list = []
        info = GaugeMetricFamily("rsttrace_info", "rsttrace build and kernel (value 1)",
                                 labels=("version", "kernel", "schema"))
        info.add_metric((__version__, self._kernel, "rsttrace/1"), 1)
        out.append(info)
        events = CounterMetricFamily(
            "rsttrace_events_total",
            "Events seen by rsttrace's kernel programs, counted in the kernel (exact: includes records lost "
            "or suppressed), by event, reason, network namespace and service port",
            labels=("event", "reason", "netns", "port"))
        for key, n in sorted(self._events.items()):
            events.add_metric(key, n)
        out.append(events)
        stats = self._stats
        for name, key, help_text in (
                ("rsttrace_records_delivered_total", "submitted", "Event records the kernel put into the ring buffer"),
                ("rsttrace_records_lost_total", "lost", "Event records lost because the ring buffer was full "
                                                        "(still in rsttrace_events_total)"),
                ("rsttrace_records_suppressed_total", "suppressed", "Event records held back by --max-rate "
                                                                     "(still in rsttrace_events_total)"),
                ("rsttrace_events_aggregated_total", "aggregated", "Events counted per shape in the kernel during "
                                                                   "storms instead of written one by one (still in "
                                                                   "rsttrace_events_total)"),
                ("rsttrace_events_uncounted_total", "uncounted", "Events that found the in-kernel count map full "
                                                                  "(missing from rsttrace_events_total)")):
            out.append(CounterMetricFamily(name, help_text, value=stats.get(key, 0)))
        connections = CounterMetricFamily(
            "rsttrace_connections_total",
            "Connections hurt by a drop (or a SYN retransmit), by how their story ended, under the server's "
            "network namespace and port (`connection` records)",
            labels=("outcome", "netns", "port"))
        for key, n in sorted(self._connections.items()):
            connections.add_metric(key, n)
        out.append(connections)
        delay = HistogramMetricFamily(
            "rsttrace_connect_delay_seconds",
            "Delay drops added to connections that were established in the end, by server netns and port",
            labels=("netns", "port"))
        for labels, counts in sorted(self._delays.items()):
            buckets = [(floatToGoString(bound), n) for bound, n in zip(DELAY_BUCKETS, counts)]
            delay.add_metric(labels, buckets + [("+Inf", counts[-1])], self._delay_sums[labels])
        out.append(delay)
        out.append(CounterMetricFamily(
            "rsttrace_connections_not_followed_total",
            "Drops and SYN retransmits of connections rsttrace could not follow (the kernel's story map was "
            "full): once per SYN lost, so more than the connections left out", value=stats.get("stories_full", 0)))
        skipped = CounterMetricFamily(
            "rsttrace_bpf_runs_skipped_total",
            "Runs of rsttrace's BPF programs the kernel skipped because a BPF program was already running "
            "on that CPU (their events are missing from rsttrace_events_total), by attach point", labels=("hook",))
        for hook, n in sorted((stats.get("skipped_runs") or {}).items()):
            skipped.add_metric((hook,), n)
        out.append(skipped)
        otlp = stats.get("otlp")
        if otlp:
            records = CounterMetricFamily(
                "rsttrace_otlp_log_records_total",
                "Records handed to --otlp, by what became of them: sent, failed (refused, partially rejected or "
                "given up after retries), dropped_queue_full, unsent_at_exit", labels=("outcome",))
            for outcome in ("sent", "failed", "dropped_queue_full", "unsent_at_exit"):
                records.add_metric((outcome,), otlp[outcome])
            out.append(records)
            out.append(GaugeMetricFamily("rsttrace_otlp_log_records_pending", "Records queued for --otlp or being sent",
                                         value=otlp["pending"]))
        hooks = GaugeMetricFamily("rsttrace_hook_attached",
                                  "1 if rsttrace sees this event kind on this kernel (label hook: how)",
                                  labels=("event", "hook"))
        for event, hook in sorted(self._coverage.items()):
            hooks.add_metric((event, hook or "none"), 1 if hook else 0)
        out.append(hooks)
        rows = sorted(self._listeners, key=lambda r: (r["netns"]["inode"], r["local"]["port"], r["local"]["addr"]))
        for name, field, help_text in (
                ("rsttrace_listener_accept_queue_length", "accept_qlen", "Connections waiting in the accept queue"),
                ("rsttrace_listener_accept_queue_limit", "accept_qmax", "Accept queue limit: min(listen() backlog, somaxconn)"),
                ("rsttrace_listener_drops", "drops", "Listen drops the kernel counted for this listener")):
            family = GaugeMetricFamily(name, help_text, labels=("netns", "addr", "port"))
            for row in rows[:MAX_LISTENERS]:
                if row.get(field) is None:
                    continue
                netns = (self._netns_label.get(row["netns"]["inode"]) or row["netns"]["name"]
                         or row["netns"]["inode"])
                family.add_metric((str(netns), str(row["local"]["addr"]), str(row["local"]["port"])), row[field])
            out.append(family)
        out.append(GaugeMetricFamily("rsttrace_listeners_not_shown",
                                     f"Listeners beyond the first {MAX_LISTENERS} (not exported)",
                                     value=max(0, len(rows) - MAX_LISTENERS)))
        out.append(GaugeMetricFamily("rsttrace_last_update_timestamp_seconds",
                                     "When the counts were last read from the kernel", value=round(self._updated_at, 3)))
        return out

    def close(self) -> None:
        if self._thread.ident is not None:      # shutdown() waits for a serve_forever() that never ran
            self._server.shutdown()
        self._server.server_close()
