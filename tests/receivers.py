"""The real consumers of rsttrace's exports, for the kernel tests that read back what they received:
Debian's rsyslogd, Debian's prometheus and an OTLP/HTTP logs receiver, each on loopback or a private
unix socket (the host's /dev/log and ports in use are untouched). tests/conftest.py has the
`rsyslog` and `prometheus` fixtures that start and stop the first two.
"""
from __future__ import annotations

import gzip
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what, interval: float = 0.2):
    """Poll condition() until it is true and return its value; `what` (a string, or a function
    called at the deadline) names what was awaited in the AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


# -- rsyslogd ---------------------------------------------------------------------------------

RSYSLOG_CONF = """
global(workDirectory="{dir}")
module(load="imuxsock" SysSock.Use="off")
module(load="imudp")
input(type="imuxsock" Socket="{dir}/log.sock" UseSpecialParser="off" ParseHostname="on" IgnoreTimestamp="off")
input(type="imudp" Address="127.0.0.1" Port="{udp_port}")
template(name="fields" type="list" option.jsonf="on") {{
  property(outname="facility" name="syslogfacility-text" format="jsonf")
  property(outname="severity" name="syslogseverity-text" format="jsonf")
  property(outname="time" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="app" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="sd" name="structured-data" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
  property(outname="input" name="inputname" format="jsonf")
}}
*.* action(type="omfile" file="{dir}/received.json" template="fields")
"""

SD_PARAM = re.compile(r'(\w+)="((?:[^"\\\]]|\\.)*)"')


class Rsyslog:
    """Debian's rsyslogd on a private unix socket (dir/log.sock) and a loopback UDP port, writing what
    it parsed (RFC 5424 fields: MSGID, STRUCTURED-DATA, ...) as JSON lines."""

    def __init__(self, d: Path):
        rsyslogd = shutil.which("rsyslogd")
        assert rsyslogd, "rsyslogd missing: scripts/setup installs Debian's rsyslog"
        d.mkdir()
        self.dir, self.udp_port = d, free_port()
        (d / "rsyslog.conf").write_text(RSYSLOG_CONF.format(dir=d, udp_port=self.udp_port))
        self.proc = subprocess.Popen([rsyslogd, "-n", "-f", str(d / "rsyslog.conf"), "-i", str(d / "rsyslogd.pid")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: (d / "log.sock").exists() or self.proc.poll() is not None, 15, "rsyslogd's socket")
        assert self.proc.poll() is None, self.proc.stderr.read()

    def received(self, count: int) -> list[dict]:
        """The messages rsyslogd wrote, once it wrote at least `count`; each with its SD params
        unescaped under "params"."""
        path = self.dir / "received.json"
        text = wait_for(lambda: path.exists() and len(path.read_text().splitlines()) >= count and path.read_text(),
                        15, f"rsyslog to write {count} messages")
        out = []
        for line in text.splitlines():
            msg = json.loads(line)
            msg["params"] = {k: re.sub(r"\\(.)", r"\1", v) for k, v in SD_PARAM.findall(msg["sd"])}
            out.append(msg)
        return out

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# -- prometheus -------------------------------------------------------------------------------

class Prometheus:
    """Debian's prometheus on loopback, scraping the targets given to start() every second."""

    def __init__(self, d: Path):
        self.binary = shutil.which("prometheus")
        assert self.binary, "prometheus missing: scripts/setup installs Debian's prometheus"
        d.mkdir()
        self.dir = d
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = None

    def start(self, *targets: str) -> None:
        listed = ", ".join(f"'{t}'" for t in targets)
        (self.dir / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs: [{{job_name: rsttrace, static_configs: [{{targets: [{listed}]}}]}}]\n")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.get("/-/ready", raw=True), 30, "prometheus to be ready")

    def get(self, path: str, raw: bool = False):
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                body = resp.read().decode()
        except OSError:
            return None
        return body if raw else json.loads(body)

    def query(self, promql: str) -> list[dict]:
        answer = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        return answer["data"]["result"] if answer and answer["status"] == "success" else []

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


# -- OTLP/HTTP --------------------------------------------------------------------------------

class OtlpReceiver:
    """An OTLP/HTTP logs endpoint on loopback: keeps every log record and resource it is sent, or,
    with keep=False (a benchmark's storm), only counts the records."""

    def __init__(self, keep: bool = True):
        self.received = 0
        self.records: list[dict] = []
        self.resources: list[dict] = []
        self.record_resources: list[dict] = []     # the resource of each of `records`
        got = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = json.loads(body)
                for rl in request["resourceLogs"]:
                    for sl in rl["scopeLogs"]:
                        got.received += len(sl["logRecords"])
                        if keep:
                            got.resources.append(rl["resource"])
                            got.records.extend(sl["logRecords"])
                            got.record_resources.extend([rl["resource"]] * len(sl["logRecords"]))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attrs(record: dict) -> dict:
    """An OTLP log record's (or resource's) attributes as {key: value}, intValues as ints."""
    out = {}
    for kv in record["attributes"]:
        (kind, v), = kv["value"].items()
        out[kv["key"]] = int(v) if kind == "intValue" else v
    return out
