"""--otlp: rsttrace's records reach a real OTLP/HTTP logs receiver as OpenTelemetry log records, and
every record handed over is counted once — sent, failed, dropped (queue full) or unsent at exit —
whatever the receiver does: answer, refuse connections, hang, ask to slow down, reject.

The receiver is a ThreadingHTTPServer on 127.0.0.1 that decodes each POST (gzip, JSON) as an
OpenTelemetry Collector's otlp receiver would. Waits poll a condition with a bound; no assertion is
about speed (the one about time is a lower bound: a Retry-After was honoured).
"""
from __future__ import annotations

import calendar
import dataclasses
import gzip
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest

import tracer
from tracer.sinks import records
from tracer.sinks.otlp import (OtlpEndpoint, OtlpSink, SENT_TYPES, otlp_header, otlp_headers_from_env,
                               server_side)

WAIT_S = 20.0          # bound of every wait for a condition


def test_the_tests_use_this_checkout():
    from pathlib import Path
    assert Path(tracer.__file__).resolve().parents[1] == Path(__file__).resolve().parents[2]


# -- a real receiver ---------------------------------------------------------------------------------

@dataclass
class Post:
    path: str
    headers: dict
    doc: dict
    status: int
    at: float

    @property
    def log_records(self) -> list[dict]:
        return [lr for rl in self.doc["resourceLogs"] for sl in rl["scopeLogs"] for lr in sl["logRecords"]]


class Receiver:
    """OTLP/HTTP logs receiver: POST /v1/logs, JSON (gzip or not). `answer(n)` for the n-th POST
    (from 0): (status, headers, body, seconds to wait before answering). `hang_up`: close each
    connection after the answer without saying so (a collector restarted between two batches)."""

    def __init__(self, answer: Callable[[int], tuple] | None = None, hang_up: bool = False):
        self.posts: list[Post] = []
        self.lock = threading.Lock()
        self.release = threading.Event()         # ends the waits of a hanging receiver
        self.answer = answer or (lambda n: (200, {}, b"{}", 0))
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"        # keep-alive, as a collector

            def do_POST(self):
                data = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    data = gzip.decompress(data)
                doc = json.loads(data)
                with receiver.lock:
                    n = len(receiver.posts)
                    status, headers, body, delay = receiver.answer(n)
                    receiver.posts.append(Post(self.path, dict(self.headers), doc, status, time.monotonic()))
                if delay:
                    receiver.release.wait(delay)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = hang_up

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass                              # a client that gave up on a hanging answer

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def accepted(self) -> list[dict]:
        """The log records of the POSTs answered 2xx, in order."""
        with self.lock:
            return [lr for post in self.posts if 200 <= post.status < 300 for lr in post.log_records]

    def count(self) -> int:
        with self.lock:
            return len(self.posts)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(answer=None, hang_up=False) -> Receiver:
        made.append(Receiver(answer, hang_up))
        return made[-1]
    yield make
    for r in made:
        r.close()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < end, f"still waiting after {WAIT_S} s for {what}"
        time.sleep(0.01)


def sink_for(url: str, said: list | None = None, **options) -> OtlpSink:
    """A sink with short waits (retries after 10 ms), whose stderr lines go to `said`."""
    options = {"backoff_s": 0.01, "batch_interval_s": 0.05, "timeout_s": 5.0, **options}
    return OtlpSink(OtlpEndpoint.parse(url), say=(said.append if said is not None else lambda line: None), **options)


def lost(i: int) -> dict:
    return records.lost_record(i, i)


def value(v: dict):
    """An AnyValue back as Python; 64-bit integers must come as decimal strings."""
    (kind, inner), = v.items() if v else (("empty", None),)
    if kind == "intValue":
        assert isinstance(inner, str) and inner.lstrip("-").isdigit(), v
        return int(inner)
    if kind == "arrayValue":
        return [value(x) for x in inner.get("values", [])]
    if kind == "kvlistValue":
        return {kv["key"]: value(kv["value"]) for kv in inner.get("values", [])}
    return inner


def attrs(lr: dict) -> dict:
    keys = [a["key"] for a in lr["attributes"]]
    assert len(keys) == len(set(keys)), keys
    return {a["key"]: value(a["value"]) for a in lr["attributes"]}


def unix_nano(rfc3339: str) -> int:
    whole, frac = rfc3339[:-1].split(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) * 10**9 + int(frac) * 1000


class Recorder:
    def __init__(self):
        self.records: list[dict] = []

    def emit(self, record: dict) -> None:
        self.records.append(record)


# -- what is sent --------------------------------------------------------------------------------------

def test_a_recorded_run_arrives_as_otlp_logs_with_semantic_conventions(receiver):
    from test_golden_sinks import BLUE_NS, HOST_NS, POD_CONTAINER, POD_UID, emit_all
    from tracer.sinks.records import one_line, severity_of

    r = receiver()
    sink, seen = sink_for(r.url), Recorder()
    sink.start()
    before = time.time_ns()
    try:
        emit_all([sink, seen])
    finally:
        sink.close()
    sent = [rec for rec in seen.records if rec["type"] in SENT_TYPES]
    assert {rec["type"] for rec in sent} == {"coverage", "event", "connection", "lost", "suppressed", "storm",
                                            "aggregate", "summary"}
    assert sink.delivery() == {"endpoint": r.url + "/v1/logs", "sent": len(sent), "failed": 0,
                               "dropped_queue_full": 0, "unsent_at_exit": 0, "pending": 0, "retries": 0}
    instances: dict[str, str] = {}           # the same instance in every request of one process
    for post in r.posts:
        assert post.path == "/v1/logs" and post.headers["Content-Type"] == "application/json"
        (resource_logs,) = post.doc["resourceLogs"]
        resource = {a["key"]: value(a["value"]) for a in resource_logs["resource"]["attributes"]}
        instance = resource.pop("service.instance.id")
        assert str(uuid.UUID(instance)) == instance and instance == instances.setdefault("one", instance)
        assert resource == {"service.name": "rsttrace", "service.version": tracer.__version__,
                            "host.name": socket.gethostname(), "os.type": "linux"}
        (scope_logs,) = resource_logs["scopeLogs"]
        assert scope_logs["scope"] == {"name": "rsttrace", "version": tracer.__version__}
    got = r.accepted()
    assert len(got) == len(sent)
    otel_severity = {"info": 9, "notice": 10, "warning": 13, "error": 17}
    for lr, rec in zip(got, sent):                           # in the order they were emitted
        assert lr["body"] == {"stringValue": one_line(rec)}
        assert lr["timeUnixNano"] == str(unix_nano(rec["time"]))
        assert lr["observedTimeUnixNano"].isdigit() and int(lr["observedTimeUnixNano"]) >= before
        assert lr["severityNumber"] == otel_severity[severity_of(rec)]
        name = "rsttrace." + (rec["event"] if rec["type"] == "event" else rec["type"])
        assert attrs(lr)["event.name"] == lr["eventName"] == name

    def find(**match) -> dict:
        """The log record of the first sent record with these top-level values (addresses by port)."""
        for lr, rec in zip(got, sent):
            if all(rec.get(k) == v if k not in ("lport", "rport") else
                   rec[{"lport": "local", "rport": "remote"}[k]]["port"] == v for k, v in match.items()):
                return attrs(lr)
        raise AssertionError(f"no record {match}")

    # nginx aborting its upstream on 8080 (a traced port): the server is the remote end.
    a = find(type="event", event="rst_sent", reason="closed_with_unread_data", family="ipv4")
    assert a["network.transport"] == "tcp" and a["network.type"] == "ipv4"
    assert (a["network.local.address"], a["network.local.port"], a["network.peer.address"], a["network.peer.port"]) \
        == ("127.0.0.1", 41000, "127.0.0.1", 8080)
    assert (a["server.address"], a["server.port"], a["client.address"], a["client.port"]) \
        == ("127.0.0.1", 8080, "127.0.0.1", 41000)
    assert (a["process.pid"], a["process.executable.name"], a["process.user.id"]) == (4242, "nginx", 33)
    assert a["rsttrace.reason"] == "closed_with_unread_data" and a["rsttrace.kernel_reason"] == "TCP_ABORT_ON_CLOSE"
    assert a["rsttrace.inferred"] is False and a["rsttrace.state"] == "CLOSE"
    assert (a["rsttrace.netns.inode"], a["rsttrace.netns.name"]) == (HOST_NS, "host")
    assert a["rsttrace.socket.unread_bytes"] == 4096 and a["rsttrace.process.source"] == "task"
    assert a["rsttrace.evidence.callers"] == ["tcp_send_active_reset", "__tcp_close"]
    assert "rsttrace.explanation" not in a and "rsttrace.local.port" not in a   # in the body, in network.*

    # A SYN dropped at a full accept queue: the listener is the server; its queues flattened.
    a = find(type="event", event="syn_dropped", reason="accept_queue_full", lport=8100)
    assert (a["server.port"], a["client.port"]) == (8100, a["network.peer.port"])
    assert a["rsttrace.queues.accept_qlen"] == 6 and a["rsttrace.queues.accept_qmax"] == 5
    assert a["rsttrace.queues.binding_limit"] == "listen_backlog" and a["rsttrace.queues.sysctls.somaxconn"] == 4096
    assert a["process.executable.name"] == "burst-server" and a["container.id"] == POD_CONTAINER
    assert a["k8s.pod.uid"] == POD_UID and a["rsttrace.process.container.runtime"] == "containerd"

    # curl's connect() refused: the client socket (SYN_SENT) is local, the server the remote port 9.
    a = find(type="event", event="rst_received", state="SYN_SENT", rport=9)
    assert (a["server.port"], a["client.port"], a["client.address"]) == (9, a["network.local.port"], "127.0.0.1")
    assert a["rsttrace.reset_by.reason"] == "no_listener"

    # The RST that refused it: a bare SYN answered on local port 9.
    a = find(type="event", event="rst_sent", reason="no_listener", lport=9)
    assert a["server.port"] == 9 and "process.pid" not in a

    # A connection's story: both ends known; the client's process.
    a = find(type="connection", outcome="never_established", errno="ETIMEDOUT")
    assert (a["client.port"], a["server.port"], a["process.executable.name"]) == (57050, 8100, "curl")
    assert a["rsttrace.drops.syn"] == 7 and a["rsttrace.server.process.comm"] == "burst-server"

    a = find(type="connection", outcome="established")         # a remote client: the server's process
    assert a["network.type"] == "ipv6" and a["process.executable.name"] == "envoy"
    assert a["rsttrace.server.netns.inode"] == BLUE_NS and "rsttrace.client.netns" not in a

    a = find(type="aggregate", event="syn_dropped")
    assert a["rsttrace.count"] == 338 and a["process.pid"] == 6161 and a["rsttrace.port"] == 8100
    a = find(type="lost")
    assert (a["rsttrace.lost"], a["rsttrace.total_lost"]) == (12, 12)
    a = find(type="summary")
    assert a["rsttrace.lost"] == 12 and a["rsttrace.exact_counts.syn_dropped.accept_queue_full"] == 341
    assert isinstance(a["rsttrace.reconciliation"], list) and a["rsttrace.reconciliation"][0]["name"] == "host"


def test_listeners_and_reconciliation_records_are_left_to_json_and_metrics(receiver):
    r = receiver()
    sink = sink_for(r.url)
    sink.start()
    sink.emit(records.listeners_record([]))
    sink.emit(records.reconciliation_record([]))
    sink.emit(lost(1))
    sink.close()
    assert [attrs(lr)["event.name"] for lr in r.accepted()] == ["rsttrace.lost"]


@pytest.mark.parametrize("rec,side", [
    ({"event": "syn_cookie", "state": "LISTEN"}, "local"),
    ({"event": "ack_dropped", "state": None}, "local"),
    ({"event": "rst_sent", "state": "SYN_RECV"}, "local"),
    ({"event": "rst_received", "state": "SYN_SENT"}, "remote"),
    ({"event": "rst_sent", "state": "ESTABLISHED", "process": {"source": "port_listener"}}, "local"),
    ({"event": "rst_received", "state": "ESTABLISHED", "local": 443}, "local"),          # --port 443
    ({"event": "rst_received", "state": "ESTABLISHED", "remote": 443}, "remote"),
    ({"event": "rst_sent", "state": None, "tcp_flags": ["SYN"]}, "local"),              # a refused SYN
    ({"event": "rst_sent", "state": None, "tcp_flags": ["SYN", "ACK"]}, None),
    ({"event": "rst_sent", "state": "ESTABLISHED"}, None),                              # nothing tells
])
def test_which_end_is_the_server(rec, side):
    full = {"local": {"port": rec.get("local", 40000)}, "remote": {"port": rec.get("remote", 50000)},
            "event": rec["event"], "state": rec["state"], "process": rec.get("process"),
            "evidence": {"tcp_flags": rec.get("tcp_flags", [])}}
    assert server_side(full, frozenset({443})) == side


# -- batching, the exit flush --------------------------------------------------------------------------

def test_many_records_are_sent_in_batches(receiver):
    r = receiver()
    sink = sink_for(r.url, batch_size=50)
    sink.start()
    try:
        for i in range(230):
            sink.emit(lost(i))
        wait_for(lambda: sink.delivery()["sent"] == 230, "230 records sent")
    finally:
        sink.close()
    assert r.count() >= 5 and all(len(post.log_records) <= 50 for post in r.posts)
    assert [attrs(lr)["rsttrace.lost"] for lr in r.accepted()] == list(range(230))


def test_a_partial_batch_goes_out_after_the_batch_interval(receiver):
    r = receiver()
    sink = sink_for(r.url, batch_size=512, batch_interval_s=0.2)
    sink.start()
    try:
        for i in range(3):
            sink.emit(lost(i))
        wait_for(lambda: sink.delivery()["sent"] == 3, "the 3 records sent without a full batch")
        assert len(r.accepted()) == 3 and r.count() == 1
    finally:
        sink.close()


def test_exit_flush_delivers_what_is_queued(receiver):
    r = receiver()
    sink = sink_for(r.url, batch_interval_s=3600)            # only the exit sends them
    sink.start()
    for i in range(10):
        sink.emit(lost(i))
    assert sink.delivery()["pending"] == 10
    sink.close()
    assert len(r.accepted()) == 10 and r.count() == 1
    d = sink.delivery()
    assert (d["sent"], d["unsent_at_exit"], d["pending"]) == (10, 0, 0)
    sink.emit(lost(10))                                      # after close: counted, not sent
    assert sink.delivery()["unsent_at_exit"] == 1


def test_settle_sends_the_queue_before_the_summary_is_made(receiver):
    r = receiver()
    sink = sink_for(r.url, batch_interval_s=3600)
    sink.start()
    for i in range(5):
        sink.emit(lost(i))
    counts = sink.settle()                                   # Session.finish, before the summary record
    assert (counts["sent"], counts["pending"]) == (5, 0)
    summary = records.summary_record({}, 0, 5, 1.0, {"netns": "rsttrace's own", "delta": {}}, {})
    summary["otlp"] = counts
    sink.emit(summary)
    sink.close()
    assert sink.delivery()["sent"] == 6
    assert attrs(r.accepted()[-1])["rsttrace.otlp.sent"] == 5
    import jsonschema
    from pathlib import Path
    schema = json.loads((Path(__file__).resolve().parents[2] / "schema" / "rsttrace-v1.schema.json").read_text())
    jsonschema.validate(json.loads(json.dumps(summary)), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(json.dumps(summary | {"otlp": {**counts, "sent": -1}})), schema)


# -- a receiver that fails ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_receiver_down_is_retried_then_counted_failed():
    said: list[str] = []
    sink = sink_for(f"http://127.0.0.1:{free_port()}", said, max_attempts=3)
    for i in range(7):                                       # queued before the sender starts: one batch
        sink.emit(lost(i))
    started = time.monotonic()
    sink.start()
    try:
        wait_for(lambda: sink.delivery()["failed"] == 7, "7 records counted failed")
    finally:
        sink.close()
    assert time.monotonic() - started < WAIT_S
    d = sink.delivery()
    assert (d["sent"], d["failed"], d["unsent_at_exit"], d["retries"]) == (0, 7, 0, 2)
    assert len(said) == 1 and "Connection refused" in said[0] and "retrying" in said[0]


def test_slow_receiver_times_out_and_is_counted(receiver):
    r = receiver(lambda n: (200, {}, b"{}", 60))             # answers after a minute (or at teardown)
    sink = sink_for(r.url, timeout_s=0.2, max_attempts=2)
    for i in range(4):
        sink.emit(lost(i))
    sink.start()
    try:
        wait_for(lambda: sink.delivery()["failed"] == 4, "4 records counted failed")
    finally:
        sink.close()
    wait_for(lambda: r.count() == 2, "both tries seen by the receiver")
    d = sink.delivery()
    assert (d["sent"], d["failed"], d["retries"]) == (0, 4, 1)


def test_429_with_retry_after_is_retried_and_delivered_once(receiver):
    r = receiver(lambda n: (429, {"Retry-After": "1"}, b"", 0) if n == 0 else (200, {}, b"{}", 0))
    said: list[str] = []
    sink = sink_for(r.url, said)                             # its own backoff: 10 ms
    for i in range(3):
        sink.emit(lost(i))
    sink.start()
    try:
        wait_for(lambda: sink.delivery()["sent"] == 3, "3 records sent")
    finally:
        sink.close()
    assert r.count() == 2 and r.posts[1].at - r.posts[0].at >= 0.9       # Retry-After: 1, not 10 ms
    assert [attrs(lr)["rsttrace.lost"] for lr in r.accepted()] == [0, 1, 2]
    d = sink.delivery()
    assert (d["failed"], d["retries"]) == (0, 1)
    assert any("HTTP 429" in line for line in said) and any("answers again" in line for line in said)


def test_503_then_success_is_retried(receiver):
    r = receiver(lambda n: (503, {}, b"overloaded", 0) if n < 2 else (200, {}, b"", 0))
    sink = sink_for(r.url)
    sink.start()
    try:
        sink.emit(lost(0))
        wait_for(lambda: sink.delivery()["sent"] == 1, "the record sent")
    finally:
        sink.close()
    assert r.count() == 3 and len(r.accepted()) == 1


def test_a_kept_alive_connection_the_receiver_closed_is_reopened_without_a_retry(receiver):
    r = receiver(hang_up=True)
    sink = sink_for(r.url)
    sink.start()
    try:
        for i in range(3):
            sink.emit(lost(i))
            wait_for(lambda: sink.delivery()["sent"] == i + 1, f"record {i} sent")
    finally:
        sink.close()
    assert r.count() == 3 and sink.delivery()["retries"] == 0 and sink.delivery()["failed"] == 0


def test_a_400_is_not_retried_and_counted_failed(receiver):
    r = receiver(lambda n: (400, {}, b'{"message": "bad request"}', 0))
    said: list[str] = []
    sink = sink_for(r.url, said)
    for i in range(3):
        sink.emit(lost(i))
    sink.start()
    try:
        wait_for(lambda: sink.delivery()["failed"] == 3, "3 records counted failed")
    finally:
        sink.close()
    assert r.count() == 1 and sink.delivery()["retries"] == 0
    assert any("HTTP 400" in line and "not retried" in line for line in said)


def test_partial_success_counts_the_rejected_records_as_failed(receiver):
    body = json.dumps({"partialSuccess": {"rejectedLogRecords": "2", "errorMessage": "too old"}}).encode()
    r = receiver(lambda n: (200, {}, body, 0))
    said: list[str] = []
    sink = sink_for(r.url, said)
    for i in range(5):
        sink.emit(lost(i))
    sink.start()
    try:
        wait_for(lambda: sink.delivery()["failed"] == 2, "2 records counted failed")
    finally:
        sink.close()
    d = sink.delivery()
    assert (d["sent"], d["failed"]) == (3, 2) and any("too old" in line for line in said)


def test_queue_full_drops_new_records_and_counts_them(receiver):
    r = receiver()
    said: list[str] = []
    sink = sink_for(r.url, said, queue_size=5)              # not started yet: nothing leaves the queue
    for i in range(8):
        sink.emit(lost(i))
    d = sink.delivery()
    assert (d["dropped_queue_full"], d["pending"]) == (3, 5) and len(said) == 1 and "dropped" in said[0]
    sink.close()                                             # the exit flush sends the 5 it kept
    assert [attrs(lr)["rsttrace.lost"] for lr in r.accepted()] == [0, 1, 2, 3, 4]
    d = sink.delivery()
    assert (d["sent"], d["dropped_queue_full"], d["unsent_at_exit"]) == (5, 3, 0)


def test_exit_flush_is_bounded_and_counts_what_is_left(receiver):
    r = receiver(lambda n: (200, {}, b"{}", 60))             # hangs on the first batch
    sink = sink_for(r.url, exit_flush_s=0.3, batch_size=2, timeout_s=30)
    for i in range(5):
        sink.emit(lost(i))
    sink.start()
    wait_for(lambda: r.count() == 1, "the first batch in flight")
    started = time.monotonic()
    sink.close()
    assert time.monotonic() - started < WAIT_S               # bounded by the exit flush, not the 30 s timeout
    d = sink.delivery()
    assert (d["sent"], d["failed"], d["unsent_at_exit"], d["pending"]) == (0, 0, 5, 0)


# -- URLs, the CLI, the summary, the metrics ---------------------------------------------------------------

@pytest.mark.parametrize("text,url", [
    ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/logs"),
    ("http://collector:4318/", "http://collector:4318/v1/logs"),
    ("https://otel.example.com", "https://otel.example.com:443/v1/logs"),
    ("http://[::1]:4318", "http://[::1]:4318/v1/logs"),
    ("http://gw:8080/otlp", "http://gw:8080/otlp/v1/logs"),
    ("http://gw:8080/otlp/v1/logs", "http://gw:8080/otlp/v1/logs"),
    ("http://gw:8080/?tenant=a", "http://gw:8080/v1/logs?tenant=a"),
])
def test_otlp_urls(text, url):
    assert OtlpEndpoint.parse(text).url == url


@pytest.mark.parametrize("text", ["ftp://collector:4318", "collector:4318", "http://", "http://h:99999",
                                  "http://h:port", "http://h:0", "http://h:4318/#x", "http://h :4318",
                                  "http://hé:4318"])
def test_bad_otlp_urls(text):
    with pytest.raises(ValueError, match="not an OTLP/HTTP URL"):
        OtlpEndpoint.parse(text)


def test_the_session_asks_the_sink_for_its_counts(receiver):
    """Session.finish puts settle()'s counts in the summary record; _refresh_metrics, delivery()'s."""
    from tracer.session import Options, Session
    r = receiver()
    sink = sink_for(r.url, batch_interval_s=3600)
    session = Session(Options(), [Recorder(), sink])
    sink.start()
    sink.emit(lost(0))
    assert session._delivery()["pending"] == 1
    counts = session._delivery(settle=True)
    assert (counts["sent"], counts["pending"]) == (1, 0)
    sink.close()
    assert Session(Options(), [Recorder()])._delivery() is None


def test_credentials_in_the_url_are_refused():
    with pytest.raises(ValueError, match="credentials"):
        OtlpEndpoint.parse("http://user:secret@collector:4318")


def test_extra_headers_reach_the_receiver_and_ours_stay_ours(receiver):
    r = receiver()
    endpoint = dataclasses.replace(OtlpEndpoint.parse(r.url), headers=(("Authorization", "Bearer s3cret"),
                                                                       ("X-Scope-OrgID", "tenant-1")))
    sink = OtlpSink(endpoint, batch_interval_s=0.05, say=lambda line: None)
    sink.start()
    sink.emit(lost(1))
    sink.close()
    [post] = r.posts
    assert post.headers["Authorization"] == "Bearer s3cret" and post.headers["X-Scope-OrgID"] == "tenant-1"
    assert post.headers["Content-Type"] == "application/json" and len(post.log_records) == 1
    assert "s3cret" not in endpoint.url


@pytest.mark.parametrize("text,header", [
    ("Authorization=Bearer abc=def", ("Authorization", "Bearer abc=def")),
    (" api-key = k1 ", ("api-key", "k1")),
    ("X-Empty=", ("X-Empty", "")),
])
def test_otlp_header_options(text, header):
    assert otlp_header(text) == header


@pytest.mark.parametrize("text,why", [
    ("Authorization", "not NAME=VALUE"), ("=Injected", "not NAME=VALUE"), ("bad name=v", "not NAME=VALUE"),
    ("Content-Type=text/plain", "sets this header itself"), ("Host=x", "sets this header itself"),
    ("X-Key=a\r\nInjected: 1", "line break"),
])
def test_bad_otlp_headers_are_refused_without_echoing_the_value(text, why):
    with pytest.raises(ValueError, match=why) as err:
        otlp_header(text)
    assert "Injected" not in str(err.value) and "text/plain" not in str(err.value)


def test_headers_from_the_opentelemetry_variables():
    both = {"OTEL_EXPORTER_OTLP_HEADERS": "a=1", "OTEL_EXPORTER_OTLP_LOGS_HEADERS": "api-key=k%3D1%2C2, tenant=t"}
    assert otlp_headers_from_env(both) == (("api-key", "k=1,2"), ("tenant", "t"))       # the logs signal's first
    assert otlp_headers_from_env({"OTEL_EXPORTER_OTLP_HEADERS": "a=1,,"}) == (("a", "1"),)
    assert otlp_headers_from_env({}) == ()
    with pytest.raises(ValueError, match="^OTEL_EXPORTER_OTLP_HEADERS: 'oops' is not NAME=VALUE"):
        otlp_headers_from_env({"OTEL_EXPORTER_OTLP_HEADERS": "oops"})


@pytest.mark.parametrize("argv,env,error", [
    (["--otlp-header", "a=1"], {}, "--otlp-header needs --otlp URL"),
    (["--otlp", "http://127.0.0.1:4318", "--otlp-header", "Authorization"], {},
     "Invalid value for --otlp-header: 'Authorization' is not NAME=VALUE"),
    (["--otlp", "http://127.0.0.1:4318"], {"OTEL_EXPORTER_OTLP_HEADERS": "k=a\nb"},
     "Invalid value for --otlp-header: OTEL_EXPORTER_OTLP_HEADERS: k: a header value cannot hold a line break"),
])
def test_bad_headers_are_a_usage_error_before_anything_loads(argv, env, error):
    from click.testing import CliRunner
    from tracer.cli import main
    result = CliRunner(env=env).invoke(main, argv)
    assert result.exit_code == 2 and error in result.output, result.output


def test_open_sinks_adds_the_otlp_sink_beside_the_line_output():
    from tracer.cli import open_sinks
    sinks, ui = open_sinks("json", "/dev/null", otlp=OtlpEndpoint.parse(f"http://127.0.0.1:{free_port()}"))
    try:
        assert not ui and [type(s).__name__ for s in sinks] == ["JsonSink", "OtlpSink"]
    finally:
        for sink in sinks:
            sink.close()


def test_exit_summary_and_metrics_say_what_became_of_the_log_records():
    from tracer.sinks.metrics import MetricsSink
    from tracer.sinks.summary import print_summary
    otlp = {"endpoint": "http://c:4318/v1/logs", "sent": 90, "failed": 4, "dropped_queue_full": 5,
            "unsent_at_exit": 1, "pending": 0, "retries": 7}
    lines: list[str] = []
    print_summary({"events": {}, "exact_counts": {}, "duration_s": 1.0, "lost": 0, "kernel_counters": {"delta": {}},
                   "otlp": otlp}, lines.append)
    assert ("rsttrace: --otlp http://c:4318/v1/logs: 90 log records sent, 4 failed (refused, or given up after "
            "retries), 5 dropped (queue full), 1 unsent at exit") in lines
    sink = MetricsSink(("127.0.0.1", 0))
    try:
        sink.update_counts([], {"otlp": otlp})
        text = sink.render()
    finally:
        sink.close()
    for outcome, n in (("sent", 90), ("failed", 4), ("dropped_queue_full", 5), ("unsent_at_exit", 1)):
        assert f'rsttrace_otlp_log_records_total{{outcome="{outcome}"}} {n}.0\n' in text
    assert "rsttrace_otlp_log_records_pending 0.0\n" in text
