"""--metrics ADDR:PORT: a Prometheus exposition endpoint (text format 0.0.4) at /metrics.

Counters come from the kernel's exact per-key counts, read when a scrape arrives (the session reads
the BPF map and hands over plain rows: a sink never touches BPF), so they are exact even when the
ring buffer overflowed or --max-rate held records back. Gauges come from the records the session
emits (listeners, coverage).

Label cardinality is bounded, and stays monotonic:
  - event (6 kinds) × reason (the catalog, ~20; a connection's outcome);
  - netns: the first MAX_NETNS namespaces seen get their own value (`ip netns` name or inode), any
    later one is "other";
  - port: the *service* port (the listener's port; for RSTs the traced one of the two ports,
    else the lower: bpf/maps.bpf.c service_port()): the first MAX_PORTS (netns, port) pairs seen
    get their own value, any later one is "other".
  A pair, once given a label, keeps it, so every series only ever grows.
"""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


def _label_value(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: object) -> str:
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items()) + "}"


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
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "rsttrace serves /metrics")
                    return
                body = sink.scrape().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
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
    def scrape(self) -> str:
        with self._lock:
            seen = self._generation
            self._wanted = True
            self._lock.wait_for(lambda: self._generation != seen, timeout=SCRAPE_WAIT_S)
            return self.render()

    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("rsttrace_info", "gauge", "rsttrace build and kernel (value 1)")
        out.append(f"rsttrace_info{_labels(version=__version__, kernel=self._kernel, schema='rsttrace/1')} 1")
        family("rsttrace_events_total", "counter",
               "Events seen by rsttrace's kernel programs, counted in the kernel (exact: includes records lost "
               "or suppressed), by event, reason, network namespace and service port")
        for (event, reason, netns, port), n in sorted(self._events.items()):
            out.append(f"rsttrace_events_total{_labels(event=event, reason=reason, netns=netns, port=port)} {n}")
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
            family(name, "counter", help_text)
            out.append(f"{name} {stats.get(key, 0)}")
        family("rsttrace_connections_total", "counter",
               "Connections hurt by a drop (or a SYN retransmit), by how their story ended, under the server's "
               "network namespace and port (`connection` records)")
        for (outcome, netns, port), n in sorted(self._connections.items()):
            out.append(f"rsttrace_connections_total{_labels(outcome=outcome, netns=netns, port=port)} {n}")
        family("rsttrace_connect_delay_seconds", "histogram",
               "Delay drops added to connections that were established in the end, by server netns and port")
        for (netns, port), counts in sorted(self._delays.items()):
            for bound, n in zip(DELAY_BUCKETS, counts):
                out.append(f"rsttrace_connect_delay_seconds_bucket{_labels(netns=netns, port=port, le=bound)} {n}")
            out.append(f"rsttrace_connect_delay_seconds_bucket{_labels(netns=netns, port=port, le='+Inf')} {counts[-1]}")
            out.append(f"rsttrace_connect_delay_seconds_sum{_labels(netns=netns, port=port)} "
                       f"{self._delay_sums[(netns, port)]:.6f}")
            out.append(f"rsttrace_connect_delay_seconds_count{_labels(netns=netns, port=port)} {counts[-1]}")
        family("rsttrace_connections_not_followed_total", "counter",
               "Drops and SYN retransmits of connections rsttrace could not follow (the kernel's story map was "
               "full): once per SYN lost, so more than the connections left out")
        out.append(f"rsttrace_connections_not_followed_total {stats.get('stories_full', 0)}")
        family("rsttrace_bpf_runs_skipped_total", "counter",
               "Runs of rsttrace's BPF programs the kernel skipped because a BPF program was already running "
               "on that CPU (their events are missing from rsttrace_events_total), by attach point")
        for hook, n in sorted((stats.get("skipped_runs") or {}).items()):
            out.append(f"rsttrace_bpf_runs_skipped_total{_labels(hook=hook)} {n}")
        otlp = stats.get("otlp")
        if otlp:
            family("rsttrace_otlp_log_records_total", "counter",
                   "Records handed to --otlp, by what became of them: sent, failed (refused, partially rejected or "
                   "given up after retries), dropped_queue_full, unsent_at_exit")
            for outcome in ("sent", "failed", "dropped_queue_full", "unsent_at_exit"):
                out.append(f"rsttrace_otlp_log_records_total{_labels(outcome=outcome)} {otlp[outcome]}")
            family("rsttrace_otlp_log_records_pending", "gauge", "Records queued for --otlp or being sent")
            out.append(f"rsttrace_otlp_log_records_pending {otlp['pending']}")
        family("rsttrace_hook_attached", "gauge", "1 if rsttrace sees this event kind on this kernel (label hook: how)")
        for event, hook in sorted(self._coverage.items()):
            out.append(f"rsttrace_hook_attached{_labels(event=event, hook=hook or 'none')} {1 if hook else 0}")
        rows = sorted(self._listeners, key=lambda r: (r["netns"]["inode"], r["local"]["port"], r["local"]["addr"]))
        for name, field, help_text in (
                ("rsttrace_listener_accept_queue_length", "accept_qlen", "Connections waiting in the accept queue"),
                ("rsttrace_listener_accept_queue_limit", "accept_qmax", "Accept queue limit: min(listen() backlog, somaxconn)"),
                ("rsttrace_listener_drops", "drops", "Listen drops the kernel counted for this listener")):
            family(name, "gauge", help_text)
            for row in rows[:MAX_LISTENERS]:
                if row.get(field) is None:
                    continue
                labels = _labels(netns=self._netns_label.get(row["netns"]["inode"])
                                 or row["netns"]["name"] or row["netns"]["inode"],
                                 addr=row["local"]["addr"], port=row["local"]["port"])
                out.append(f"{name}{labels} {row[field]}")
        family("rsttrace_listeners_not_shown", "gauge", f"Listeners beyond the first {MAX_LISTENERS} (not exported)")
        out.append(f"rsttrace_listeners_not_shown {max(0, len(rows) - MAX_LISTENERS)}")
        family("rsttrace_last_update_timestamp_seconds", "gauge", "When the counts were last read from the kernel")
        out.append(f"rsttrace_last_update_timestamp_seconds {self._updated_at:.3f}")
        return "\n".join(out) + "\n"

    def close(self) -> None:
        if self._thread.ident is not None:      # shutdown() waits for a serve_forever() that never ran
            self._server.shutdown()
        self._server.server_close()
