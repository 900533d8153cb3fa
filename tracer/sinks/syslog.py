"""--syslog: RFC 5424 messages with structured data, to a unix datagram socket or UDP.

    <PRI>1 TIMESTAMP HOSTNAME rsttrace PID MSGID [rsttrace@32473 event="rst_sent" reason="..." ...] MSG

MSGID is the event kind (rst_sent, syn_dropped, ...) or the record type (lost, suppressed, coverage,
summary); MSG is the one-line explanation. 32473 is the enterprise number RFC 5612 reserves for
examples: rsttrace has none of its own, and SD-IDs with @ are free for private use. Periodic
`listeners`/`reconciliation` records are left to --json and --metrics: syslog is for what happened.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass

from .records import SYSLOG_SEVERITY, one_line, severity_of

SD_ID = "rsttrace@32473"
FACILITIES = {"kern": 0, "user": 1, "daemon": 3, "auth": 4, "syslog": 5, "authpriv": 10,
              **{f"local{i}": 16 + i for i in range(8)}}
SENT_TYPES = ("event", "lost", "suppressed", "coverage", "summary", "storm", "aggregate", "connection")
SEND_TIMEOUT_S = 1.0        # a stalled syslog daemon costs at most this per message, then it is dropped
RECONNECT_EVERY_S = 1.0


@dataclass(frozen=True)
class SyslogTarget:
    family: int
    address: str | tuple[str, int]
    text: str

    @classmethod
    def parse(cls, text: str) -> "SyslogTarget":
        """unix:PATH or udp:HOST:PORT (udp:[v6]:PORT); ValueError with the reason otherwise."""
        scheme, _, rest = text.partition(":")
        if scheme == "unix" and rest.startswith("/"):
            return cls(socket.AF_UNIX, rest, text)
        if scheme == "udp":
            host, _, port = rest.rpartition(":")
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            if host and port.isdigit() and 1 <= int(port) <= 65535:
                return cls(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, int(port)), text)
        raise ValueError(f"{text!r} is not a syslog target (unix:/PATH or udp:HOST:PORT)")


def sd_escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def structured_data(rec: dict) -> str:
    kind = rec["type"]
    params: dict[str, object] = {}
    if kind == "event":
        proc = rec.get("process") or {}
        queues = rec.get("queues") or {}
        params = {
            "event": rec["event"], "reason": rec["reason"], "kernel_reason": rec["kernel_reason"],
            "family": rec["family"],
            "laddr": rec["local"]["addr"], "lport": rec["local"]["port"],
            "raddr": rec["remote"]["addr"], "rport": rec["remote"]["port"],
            "state": rec["state"], "netns": rec["netns"]["inode"], "netns_name": rec["netns"]["name"],
            "context": rec["context"],
            "pid": proc.get("pid"), "comm": proc.get("comm"), "uid": proc.get("uid"),
            "container": (proc.get("container") or {}).get("id"),
            "unread_bytes": (rec.get("socket") or {}).get("unread_bytes"),
            "accept_qlen": queues.get("accept_qlen"), "accept_qmax": queues.get("accept_qmax"),
            "inferred": str(rec["inferred"]).lower(),
        }
    elif kind == "connection":
        client, server = rec["client"], rec["server"]
        netns = server["netns"] or client["netns"] or {}
        params = {
            "outcome": rec["outcome"], "errno": rec["errno"], "family": rec["family"],
            "caddr": client["addr"], "cport": client["port"], "saddr": server["addr"], "sport": server["port"],
            "netns": netns.get("inode"), "netns_name": netns.get("name"),
            "pid": (client["process"] or {}).get("pid"), "comm": (client["process"] or {}).get("comm"),
            "server_pid": (server["process"] or {}).get("pid"),
            "syn_drops": rec["drops"]["syn"], "ack_drops": rec["drops"]["ack"],
            "syn_retransmits": rec["retransmits"]["syn"], "duration_s": rec["duration_s"],
        }
    elif kind == "lost":
        params = {"lost": rec["lost"], "total_lost": rec["total_lost"]}
    elif kind == "suppressed":
        params = {"suppressed": rec["suppressed"], "total_suppressed": rec["total_suppressed"],
                  "max_rate": rec["max_rate"]}
    elif kind == "summary":
        params = {"lost": rec["lost"], "suppressed": rec.get("suppressed", 0), "delivered": rec["delivered"],
                  "aggregated": rec.get("aggregated", 0)}
    elif kind == "storm":
        params = {"phase": rec["phase"], "written": rec["written"], "aggregated": rec["aggregated"], "lost": rec["lost"]}
    elif kind == "aggregate":
        proc = rec.get("process") or {}
        params = {"event": rec["event"], "reason": rec["reason"], "count": rec["count"], "port": rec["port"],
                  "netns": rec["netns"]["inode"], "netns_name": rec["netns"]["name"], "pid": proc.get("pid"),
                  "comm": proc.get("comm")}
    body = "".join(f' {name}="{sd_escape(value)}"' for name, value in params.items() if value is not None)
    return f"[{SD_ID}{body}]" if body else "-"


def format_message(rec: dict, facility: int, hostname: str, pid: int) -> bytes:
    pri = facility * 8 + SYSLOG_SEVERITY[severity_of(rec)]
    msgid = rec["event"] if rec["type"] == "event" else rec["type"]
    header = f"<{pri}>1 {rec['time']} {hostname or '-'} rsttrace {pid} {msgid}"
    return f"{header} {structured_data(rec)} {one_line(rec)}".encode("utf-8", errors="replace")


class SyslogSink:
    def __init__(self, target: SyslogTarget, facility: str = "daemon"):
        self.target = target
        self.facility = FACILITIES[facility]
        self.hostname = socket.gethostname()[:255]
        self.pid = os.getpid()
        self.failed = 0                       # messages syslog did not take
        self._sock: socket.socket | None = None
        self._next_try = 0.0
        self._connect()                       # OSError here: the caller says it in one line and exits

    def _connect(self) -> None:
        sock = socket.socket(self.target.family, socket.SOCK_DGRAM)
        sock.settimeout(SEND_TIMEOUT_S)
        try:
            sock.connect(self.target.address)
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def emit(self, record: dict) -> None:
        if record["type"] not in SENT_TYPES:
            return
        message = format_message(record, self.facility, self.hostname, self.pid)
        if self._sock is None:
            if time.monotonic() < self._next_try:
                self.failed += 1
                return
            try:
                self._connect()
                print(f"rsttrace: syslog {self.target.text} reachable again ({self.failed} messages dropped)",
                      file=sys.stderr, flush=True)
            except OSError:
                self._next_try = time.monotonic() + RECONNECT_EVERY_S
                self.failed += 1
                return
        try:
            self._sock.send(message)
        except OSError as err:
            # The daemon restarted or stalled: drop this message, reconnect at most once a second.
            self.failed += 1
            print(f"rsttrace: syslog {self.target.text}: {err.strerror or err}; messages are dropped until it "
                  "answers again (the JSON output and the kernel's counts are unaffected)", file=sys.stderr, flush=True)
            self._sock.close()
            self._sock = None
            self._next_try = time.monotonic() + RECONNECT_EVERY_S

    def reopen(self) -> None:
        """SIGHUP: reconnect (the daemon may have been restarted with the logs)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._next_try = 0.0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
