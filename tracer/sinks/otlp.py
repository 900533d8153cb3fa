"""--otlp URL: records as OpenTelemetry log records, over OTLP/HTTP with the JSON encoding.

    POST URL/v1/logs   Content-Type: application/json   Content-Encoding: gzip
    {"resourceLogs": [{"resource": {"attributes": [service.name, service.version, service.instance.id,
                                                    host.name, os.type]},
                       "scopeLogs": [{"scope": {"name": "rsttrace", "version": ...},
                                      "logRecords": [one per record, batched]}]}]}

The records syslog gets (syslog.SENT_TYPES: events, `connection`, `lost`, `suppressed`, `coverage`,
`storm`, `aggregate`, `summary`) become one log record each: the body is the record's sentence
(records.one_line), the attributes OpenTelemetry's semantic conventions where they have a name
(network.*, server.* / client.*, process.*, event.name) and the rest of the record under rsttrace.*,
nested objects flattened to dotted keys (rsttrace.queues.accept_qlen), lists as arrays.

Written with the standard library's http.client (and jsonenc.py, rsttrace's JSON encoder), not the
OpenTelemetry SDK: the SDK is not packaged in Debian 12, and rsttrace must run from Debian's python3
with nothing but bcc, click and rich. OTLP/HTTP JSON is a stable part of the OTLP spec, and
one POST of a fixed shape is all a log exporter needs.

Delivery never blocks the event path: emit() converts the record and appends it to a bounded queue
(QUEUE_SIZE; when full, new records are dropped and counted); a sender thread posts batches of up to
BATCH_SIZE records, at the latest BATCH_INTERVAL_S after the oldest was queued, retrying connection
errors, timeouts, 429 and 5xx with exponential backoff (Retry-After honoured), never other 4xx. At
exit the queue is flushed for at most EXIT_FLUSH_S. Every record handed over ends in exactly one
count: sent, failed (rejected, partially rejected, or given up after retries), dropped_queue_full,
or unsent_at_exit.
"""
from __future__ import annotations

import calendar
import gzip
import http.client
import math
import re
import socket
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Callable
from urllib.parse import unquote, urlsplit


from .. import __version__
from . import jsonenc
from .records import severity_of, one_line
from .syslog import SENT_TYPES

BATCH_SIZE = 512              # log records per POST at most
BATCH_INTERVAL_S = 1.0        # the oldest queued record waits this long at most for its batch to fill
QUEUE_SIZE = 10_000           # log records waiting to be sent at most; beyond, new ones are dropped (counted)
TIMEOUT_S = 5.0               # per request: connecting, and each wait for the receiver's bytes
MAX_ATTEMPTS = 6              # tries of one batch: the first and 5 retries, then its records count as failed
BACKOFF_S = 0.5               # first wait before a retry, doubled each time ...
MAX_BACKOFF_S = 30.0          # ... up to this
MAX_RETRY_AFTER_S = 60.0      # a receiver's Retry-After is honoured up to this
EXIT_FLUSH_S = 5.0            # at exit, queued records are sent for at most this long, then counted unsent

# rsttrace's severities (records.severity_of, syslog's names) as OpenTelemetry severity numbers:
# INFO 9, INFO2 10 (syslog's notice, as OpenTelemetry's syslog mapping has it), WARN 13, ERROR 17.
SEVERITY = {"info": (9, "INFO"), "notice": (10, "NOTICE"), "warning": (13, "WARN"), "error": (17, "ERROR")}
LISTENER_EVENTS = ("syn_dropped", "syn_cookie", "ack_dropped")
SERVER_STATES = ("LISTEN", "SYN_RECV", "NEW_SYN_RECV")
SERVER_SOURCES = ("listener_owner", "port_listener")
_NOT_RSTTRACE = ("schema", "type", "time", "explanation")     # in the envelope or the body instead


# HTTP's token characters (RFC 9110): what a header's name may be made of.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_OWN_HEADERS = ("content-type", "content-encoding", "content-length", "host", "transfer-encoding", "connection")
# The OpenTelemetry exporters' variables for extra request headers (the logs signal's first):
# "key1=value1,key2=value2", values percent-encoded.
HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_LOGS_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")


def otlp_header(text: str, *, percent_encoded: bool = False) -> tuple[str, str]:
    """NAME=VALUE as a request header (an API key, Authorization for a Collector behind a proxy);
    ValueError naming what is wrong, never the value (it is often a secret)."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if percent_encoded:
        value = unquote(value)
    if not sep or not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not NAME=VALUE with an HTTP header name" if name
                         else "a header is not NAME=VALUE with an HTTP header name (no name)")
    if name.lower() in _OWN_HEADERS:
        raise ValueError(f"{name}: rsttrace sets this header itself")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"{name}: a header value cannot hold a line break or NUL")
    return name, value


def otlp_headers_from_env(environ) -> tuple[tuple[str, str], ...]:
    """Headers from OTEL_EXPORTER_OTLP_LOGS_HEADERS, else OTEL_EXPORTER_OTLP_HEADERS (as the SDKs read them)."""
    for variable in HEADER_VARIABLES:
        text = environ.get(variable, "").strip()
        if text:
            try:
                return tuple(otlp_header(item, percent_encoded=True) for item in text.split(",") if item.strip())
            except ValueError as err:
                raise ValueError(f"{variable}: {err}") from None
    return ()


@dataclass(frozen=True)
class OtlpEndpoint:
    """Where log records go: the URL's scheme, host, port and path (…/v1/logs), and the extra request
    headers the receiver wants (kept out of `url`, which is printed)."""
    scheme: str
    host: str
    port: int
    path: str
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    @classmethod
    def parse(cls, text: str) -> "OtlpEndpoint":
        """http(s)://HOST[:PORT][/PATH]: the logs are posted to PATH/v1/logs (a PATH that already
        ends in /v1/logs is kept as it is); ValueError with the reason otherwise."""
        usage = f"{text!r} is not an OTLP/HTTP URL (http://HOST:4318 or https://HOST[:PORT][/PATH])"
        if not text.isascii() or any(c.isspace() or ord(c) < 32 for c in text):
            raise ValueError(usage)
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise ValueError(usage) from None
        if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
            raise ValueError(usage)
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"{text!r}: credentials in an OTLP URL are not supported")
        if parts.fragment:
            raise ValueError(usage)
        path = parts.path.rstrip("/")
        if not path.endswith("/v1/logs"):
            path += "/v1/logs"
        if parts.query:
            path += "?" + parts.query
        return cls(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path)


# -- a record as an OTLP log record ---------------------------------------------------------------

_second = ["", 0]       # the last whole second parsed: records come in bursts within one second


def time_unix_nano(text: str) -> int:
    """A record's `time` (RFC 3339, UTC: 2026-11-22T09:43:46.123456Z) in ns since the epoch."""
    whole, _, frac = text.rstrip("Z").partition(".")
    if whole != _second[0]:
        _second[:] = whole, calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
    return _second[1] * 1_000_000_000 + int((frac or "0").ljust(9, "0")[:9])


def any_value(value: Any) -> dict[str, Any]:
    """OTLP's AnyValue in the protobuf JSON mapping (64-bit integers as decimal strings)."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value} if math.isfinite(value) else {"stringValue": str(value)}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, (list, tuple)):
        return {"arrayValue": {"values": [any_value(v) for v in value]}}
    if isinstance(value, dict):
        return {"kvlistValue": {"values": [{"key": str(k), "value": any_value(v)}
                                           for k, v in value.items() if v is not None]}}
    if value is None:
        return {}
    return {"stringValue": str(value)}


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    """Nested objects as dotted keys (prefix.a.b); nulls and empty objects leave no attribute."""
    if isinstance(value, dict):
        for key, inner in value.items():
            flatten(f"{prefix}.{key}", inner, out)
    elif value is not None:
        out[prefix] = value


def server_side(rec: dict, traced_ports: frozenset[int] = frozenset()) -> str | None:
    """Which end of an event's connection is the server: "local", "remote", or None where rsttrace
    cannot tell. A listener's event: local. An RST: its socket's state (a listener, a half-open
    server side; a connecting client), then the process found as the local port's listener, then
    the one of the two ports --port traces, then a bare SYN answered with RST (for the local port)."""
    if rec["event"] in LISTENER_EVENTS or rec["state"] in SERVER_STATES:
        return "local"
    if rec["state"] == "SYN_SENT":
        return "remote"
    if (rec.get("process") or {}).get("source") in SERVER_SOURCES:
        return "local"
    local, remote = rec["local"]["port"] in traced_ports, rec["remote"]["port"] in traced_ports
    if local != remote:
        return "local" if local else "remote"
    flags = (rec.get("evidence") or {}).get("tcp_flags") or []
    if rec["event"] == "rst_sent" and "SYN" in flags and "ACK" not in flags:
        return "local"
    return None


def _process_attributes(proc: dict | None, out: dict[str, Any]) -> dict[str, Any]:
    """process.* and container.* of a record's process; what has no semantic convention is returned."""
    if not proc:
        return {}
    out["process.pid"] = proc.get("pid")
    out["process.executable.name"] = proc.get("comm")
    if proc.get("uid") is not None:
        out["process.user.id"] = proc["uid"]
    rest = {k: v for k, v in proc.items() if k not in ("pid", "comm", "uid")}
    container = rest.get("container")
    if container:
        out["container.id"] = container.get("id")
        if container.get("pod_uid"):
            out["k8s.pod.uid"] = container["pod_uid"]
        pod = container.get("pod")
        if pod:
            out["k8s.namespace.name"], out["k8s.pod.name"] = pod["namespace"], pod["name"]
            if pod["container"]:
                out["k8s.container.name"] = pod["container"]
    return rest


def event_attributes(rec: dict, traced_ports: frozenset[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"event.name": f"rsttrace.{rec['event']}", "network.transport": "tcp",
                           "network.type": rec["family"]}
    local, remote = rec["local"], rec["remote"]
    out.update({"network.local.address": local["addr"], "network.local.port": local["port"],
                "network.peer.address": remote["addr"], "network.peer.port": remote["port"]})
    side = server_side(rec, traced_ports)
    if side is not None:
        server, client = (local, remote) if side == "local" else (remote, local)
        out.update({"server.address": server["addr"], "server.port": server["port"],
                    "client.address": client["addr"], "client.port": client["port"]})
    proc_rest = _process_attributes(rec.get("process"), out)
    rest = {k: v for k, v in rec.items() if k not in (*_NOT_RSTTRACE, "family", "local", "remote", "process")}
    if proc_rest:
        rest["process"] = proc_rest
    flatten("rsttrace", rest, out)
    return out


def connection_attributes(rec: dict) -> dict[str, Any]:
    """A connection's story: client and server are known; process.* is the client's, else the server's."""
    client, server = rec["client"], rec["server"]
    out: dict[str, Any] = {"event.name": "rsttrace.connection", "network.transport": "tcp",
                           "network.type": rec["family"],
                           "server.address": server["addr"], "server.port": server["port"],
                           "client.address": client["addr"], "client.port": client["port"]}
    _process_attributes(client.get("process") or server.get("process"), out)
    rest = {k: v for k, v in rec.items() if k not in (*_NOT_RSTTRACE, "family", "client", "server")}
    rest["client"] = {k: v for k, v in client.items() if k not in ("addr", "port")}
    rest["server"] = {k: v for k, v in server.items() if k not in ("addr", "port")}
    flatten("rsttrace", rest, out)
    return out


def record_attributes(rec: dict) -> dict[str, Any]:
    """Any other record: its content under rsttrace.*, an aggregate's process as process.*."""
    kind = rec["type"]
    out: dict[str, Any] = {"event.name": f"rsttrace.{kind}"}
    rest = {k: v for k, v in rec.items() if k not in _NOT_RSTTRACE}
    if kind == "aggregate":
        out["network.transport"] = "tcp"
        _process_attributes(rest.pop("process", None), out)
    flatten("rsttrace", rest, out)
    return out


def log_record(rec: dict, traced_ports: frozenset[int] = frozenset(), observed_ns: int | None = None) -> dict[str, Any]:
    """One rsttrace record as an OTLP LogRecord (protobuf JSON mapping)."""
    kind = rec["type"]
    if kind == "event":
        attrs = event_attributes(rec, traced_ports)
    elif kind == "connection":
        attrs = connection_attributes(rec)
    else:
        attrs = record_attributes(rec)
    number, text = SEVERITY[severity_of(rec)]
    return {
        "timeUnixNano": str(time_unix_nano(rec["time"])),
        "observedTimeUnixNano": str(observed_ns if observed_ns is not None else time.time_ns()),
        "severityNumber": number,
        "severityText": text,
        "body": {"stringValue": one_line(rec)},
        "attributes": [{"key": k, "value": any_value(v)} for k, v in attrs.items() if v is not None],
        "eventName": attrs["event.name"],
    }


def resource_attributes() -> list[dict[str, Any]]:
    # service.instance.id tells apart the rsttrace processes of one host (one per --netns, say):
    # a random UUID per process, as the conventions ask.
    attrs = {"service.name": "rsttrace", "service.version": __version__, "service.instance.id": str(uuid.uuid4()),
             "host.name": socket.gethostname(), "os.type": "linux"}
    return [{"key": k, "value": any_value(v)} for k, v in attrs.items()]


# -- the sink -------------------------------------------------------------------------------------

RETRY, DONE, REJECTED = "retry", "done", "rejected"


def _retry_after(value: str | None) -> float | None:
    """Retry-After: seconds, or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class OtlpSink:
    """Records to an OTLP/HTTP logs receiver, batched by a sender thread (start() starts it)."""

    def __init__(self, endpoint: OtlpEndpoint, *, batch_size: int = BATCH_SIZE,
                 batch_interval_s: float = BATCH_INTERVAL_S, queue_size: int = QUEUE_SIZE,
                 timeout_s: float = TIMEOUT_S, max_attempts: int = MAX_ATTEMPTS, backoff_s: float = BACKOFF_S,
                 max_backoff_s: float = MAX_BACKOFF_S, exit_flush_s: float = EXIT_FLUSH_S,
                 compress: bool = True, say: Callable[[str], None] = _stderr):
        self.endpoint = endpoint
        self.batch_size, self.batch_interval_s, self.queue_size = batch_size, batch_interval_s, queue_size
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self.backoff_s, self.max_backoff_s, self.exit_flush_s = backoff_s, max_backoff_s, exit_flush_s
        self.compress = compress
        self._say = say
        self._traced_ports: frozenset[int] = frozenset()
        # A request is these bytes around the batch's records, joined by commas.
        self._head = (b'{"resourceLogs":[{"resource":' + jsonenc.dumps({"attributes": resource_attributes()})
                      + b',"scopeLogs":[{"scope":' + jsonenc.dumps({"name": "rsttrace", "version": __version__})
                      + b',"logRecords":[')
        self._tail = b"]}]}]}"
        self._cv = threading.Condition()
        self._queue: deque[tuple[float, bytes]] = deque()       # (monotonic time queued, log record's JSON)
        self._inflight = 0                   # records the sender took and has not settled yet
        self._urgent = False                 # send what is queued without waiting for a full batch
        self._closing = False
        self._final = False                  # counts are closed: a late outcome of the sender is ignored
        self._exit_deadline: float | None = None
        self._counts = {"sent": 0, "dropped_queue_full": 0, "failed": 0, "unsent_at_exit": 0}
        self._retries = 0                    # POSTs repeated after a failure that may pass later
        self._full_said = False
        self._failing: str | None = None     # why the receiver last failed (said once, until it answers)
        self._conn: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._run, name="rsttrace-otlp", daemon=True)

    # -- from the session (main thread) ------------------------------------------------------
    def start(self) -> None:
        if self._thread.ident is None:
            self._thread.start()

    def emit(self, record: dict) -> None:
        kind = record["type"]
        if kind == "coverage":
            # The traced ports tell an RST's server side (server_side()).
            self._traced_ports = frozenset((record.get("filters") or {}).get("ports") or ())
        if kind not in SENT_TYPES:
            return
        # Kept encoded: a queued record costs its JSON (~2 KB), not a tree of dicts and strings.
        entry = jsonenc.dumps(log_record(record, self._traced_ports))
        with self._cv:
            if self._final:
                self._counts["unsent_at_exit"] += 1
                return
            full = len(self._queue) >= self.queue_size
            if not full:
                self._queue.append((time.monotonic(), entry))
                if len(self._queue) in (1, self.batch_size):
                    self._cv.notify_all()
                return
            self._counts["dropped_queue_full"] += 1
            say, self._full_said = not self._full_said, True
        if say:
            self._say(f"rsttrace: --otlp {self.endpoint.url}: {self.queue_size} log records wait to be sent; new "
                      f"ones are dropped (and counted) until the queue drains")

    def delivery(self) -> dict[str, Any]:
        """What became of the records handed over so far: the summary's and the metrics' `otlp`
        (pending: still queued or being sent; retries: POSTs repeated)."""
        with self._cv:
            return {"endpoint": self.endpoint.url, **self._counts,
                    "pending": len(self._queue) + self._inflight, "retries": self._retries}

    def settle(self) -> dict[str, Any]:
        """At exit, before the summary: send what is queued now, waiting at most what is left of the
        exit flush (EXIT_FLUSH_S, shared with close()); then delivery()."""
        self.start()
        with self._cv:
            self._begin_exit()
            self._urgent = True
            self._cv.notify_all()
            self._cv.wait_for(lambda: not self._queue and not self._inflight or self._thread_gone(),
                              timeout=max(0.0, self._exit_deadline - time.monotonic()))
            self._urgent = False
        return self.delivery()

    def close(self) -> None:
        """Flush what is queued (bounded by the exit flush), then count what is left unsent."""
        self.start()
        with self._cv:
            self._begin_exit()
            self._closing = True
            self._cv.notify_all()
        self._thread.join(max(0.0, self._exit_deadline - time.monotonic()))
        with self._cv:
            if not self._final:
                self._final = True
                self._counts["unsent_at_exit"] += len(self._queue) + self._inflight
                self._queue.clear()
                self._inflight = 0
                self._cv.notify_all()
        conn = self._conn
        if conn is not None and not self._thread.is_alive():
            conn.close()

    def _begin_exit(self) -> None:
        if self._exit_deadline is None:
            self._exit_deadline = time.monotonic() + self.exit_flush_s

    def _thread_gone(self) -> bool:
        return self._thread.ident is not None and not self._thread.is_alive()

    # -- the sender thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                batch = self._next_batch()
                if batch is None:
                    return
                self._inflight = len(batch)
            try:
                outcome = self._deliver(batch)
            except Exception as err:             # a bug: these records are lost, the next batches are not
                self._say(f"rsttrace: --otlp {self.endpoint.url}: {len(batch)} log records not sent: "
                          f"{type(err).__name__}: {err}")
                outcome = {"failed": len(batch)}
            with self._cv:
                if not self._final:
                    for name, n in outcome.items():
                        self._counts[name] += n
                    self._inflight = 0
                    if len(self._queue) < self.queue_size // 2:
                        self._full_said = False
                self._cv.notify_all()
            if "unsent_at_exit" in outcome:
                return

    def _next_batch(self) -> list[bytes] | None:
        """Under the lock: the next batch to send, once it is full, its oldest record has waited
        BATCH_INTERVAL_S, or the session is leaving; None when the thread is done."""
        while True:
            if self._final or self._past_exit_deadline():
                return None
            queue = self._queue
            if queue and (self._closing or self._urgent or len(queue) >= self.batch_size
                          or time.monotonic() - queue[0][0] >= self.batch_interval_s):
                return [queue.popleft()[1] for _ in range(min(self.batch_size, len(queue)))]
            if self._closing:
                return None                     # nothing left to send
            if queue:
                self._cv.wait(max(0.0, queue[0][0] + self.batch_interval_s - time.monotonic()))
            else:
                self._cv.wait()

    def _past_exit_deadline(self) -> bool:
        return self._exit_deadline is not None and time.monotonic() >= self._exit_deadline

    def _deliver(self, batch: list[bytes]) -> dict[str, int]:
        """Post one batch, retrying what may succeed later; which counts its records go to."""
        n = len(batch)
        body = self._head + b",".join(batch) + self._tail
        if self.compress:
            body = gzip.compress(body, compresslevel=1)
        backoff = self.backoff_s
        attempt = 0
        while True:
            attempt += 1
            timeout = self.timeout_s
            if self._exit_deadline is not None:
                timeout = min(timeout, self._exit_deadline - time.monotonic())
                if timeout <= 0:
                    return {"unsent_at_exit": n}
            verdict, detail, wait = self._post(body, timeout)
            if verdict == DONE:
                rejected = min(n, detail)
                if self._failing is not None:
                    self._say(f"rsttrace: --otlp {self.endpoint.url} answers again")
                    self._failing = None
                if rejected:
                    self._say(f"rsttrace: --otlp {self.endpoint.url} rejected {rejected} of {n} log records "
                              f"(partial success){': ' + wait if wait else ''}")
                return {"sent": n - rejected, "failed": rejected}
            if verdict == REJECTED:
                self._say(f"rsttrace: --otlp {self.endpoint.url} refused {n} log records: {detail} "
                          f"(not retried)")
                return {"failed": n}
            if self._failing is None:
                self._failing = detail
                self._say(f"rsttrace: --otlp {self.endpoint.url}: {detail}; retrying, records wait in a "
                          f"queue of {self.queue_size} (the other outputs are unaffected)")
            if attempt >= self.max_attempts:
                return {"failed": n}
            delay = min(wait, MAX_RETRY_AFTER_S) if wait is not None else backoff
            backoff = min(backoff * 2, self.max_backoff_s)
            if not self._sleep(delay):
                return {"unsent_at_exit": n}
            with self._cv:
                self._retries += 1

    def _sleep(self, seconds: float) -> bool:
        """Wait before a retry; False if the exit flush ends first (close() wakes the wait)."""
        end = time.monotonic() + seconds
        with self._cv:
            while True:
                now = time.monotonic()
                deadline = self._exit_deadline
                if self._final or (deadline is not None and now >= deadline):
                    return False
                if now >= end:
                    return True
                self._cv.wait(min(end, deadline if deadline is not None else end) - now)

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        ep = self.endpoint
        if self._conn is None:
            cls = http.client.HTTPSConnection if ep.scheme == "https" else http.client.HTTPConnection
            self._conn = cls(ep.host, ep.port, timeout=timeout)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def _post(self, body: bytes, timeout: float) -> tuple[str, Any, Any]:
        """One POST: (DONE, records rejected, message), (RETRY, why, Retry-After or None), or
        (REJECTED, why, None). A kept-alive connection the receiver closed meanwhile is reopened
        once at no cost of an attempt."""
        headers = {"User-Agent": f"rsttrace/{__version__}", **dict(self.endpoint.headers),
                   "Content-Type": "application/json"}
        if self.compress:
            headers["Content-Encoding"] = "gzip"
        for reused in (self._conn is not None, False):
            conn = self._connection(timeout)
            try:
                conn.request("POST", self.endpoint.path, body, headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                self._conn = None
                if reused and isinstance(err, (http.client.RemoteDisconnected, ConnectionResetError,
                                               BrokenPipeError)):
                    continue
                why = "timed out" if isinstance(err, TimeoutError) else getattr(err, "strerror", None) or str(err) \
                    or type(err).__name__
                return RETRY, why, None
            break
        if resp.will_close:
            conn.close()
            self._conn = None
        status = resp.status
        if 200 <= status < 300:
            rejected, message = 0, ""
            try:
                partial = (jsonenc.loads(data) or {}).get("partialSuccess") or {} if data else {}
                rejected = int(partial.get("rejectedLogRecords") or 0)
                message = str(partial.get("errorMessage") or "")
            except (jsonenc.DecodeError, AttributeError, TypeError, ValueError):
                pass
            return DONE, rejected, message
        why = f"HTTP {status} {resp.reason}".rstrip()
        text = data[:200].decode("utf-8", "replace").strip()
        if text:
            why += f": {' '.join(text.split())}"
        if status == 429 or status >= 500:
            return RETRY, why, _retry_after(resp.getheader("Retry-After"))
        return REJECTED, why, None
