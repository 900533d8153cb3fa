"""rsttrace as an unattended service: ECS lines for a SIEM, log rotation, syslog, Prometheus, --max-rate.

Real resets and listen-queue overflows in private network namespaces, a real rsttrace process, and
the real consumers — Debian's rsyslogd and prometheus, each on loopback or a private unix socket —
read back: what they received must be what the kernel counted in that netns.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import BURST, REPO, Background, events
from receivers import free_port, wait_for

PORT = random.randrange(20000, 30000)
ECS_SCHEMA = REPO / "schema" / "rsttrace-ecs-v1.schema.json"
UNREAD = 1000          # bytes the unread_close scenario's client sends and its server never reads


def read_json_lines(*paths: Path) -> list[dict]:
    records = []
    for path in paths:
        data = path.read_bytes()
        assert data.endswith(b"\n"), f"{path} ends inside a line"
        records += [json.loads(line) for line in data.decode().splitlines()]
    return records


def closed_port_resets(ns, n: int) -> None:
    for _ in range(n):
        assert ns.scenario("closed_port", "127.0.0.1", PORT)["error"] == "ECONNREFUSED"


# -- --format ecs -----------------------------------------------------------------------------

def test_ecs_lines_validate_and_map_the_unread_close_incident(netns, tracer, tmp_path):
    import jsonschema
    schema = json.loads(ECS_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    out = tmp_path / "rsttrace.json"
    t = tracer("--format", "ecs", "-o", str(out), "--port", str(PORT))
    before = netns.counters()
    facts = netns.scenario("unread_close", "127.0.0.1", PORT)
    closed_port_resets(netns, 2)
    after = netns.counters()
    t.stop()
    assert t.returncode == 0 and t.stdout == ""           # -o FILE: nothing on stdout

    docs = read_json_lines(out)
    for doc in docs:
        validator.validate(doc)
    assert docs[0]["rsttrace"]["record"] == "coverage" and docs[-1]["rsttrace"]["record"] == "summary"
    mine = [d for d in docs if d["rsttrace"]["record"] == "event" and d["rsttrace"]["netns"]["inode"] == netns.inode]
    sent = [d for d in mine if d["event"]["action"] == "rst_sent"]
    assert len(sent) == after["TcpOutRsts"] - before["TcpOutRsts"] == 3
    [abort] = [d for d in sent if d["event"]["reason"] == "closed_with_unread_data"]
    # The closing process's RST goes from its own socket to the peer: source = local.
    assert abort["network"] == {"transport": "tcp", "iana_number": "6", "type": "ipv4", "direction": "egress"}
    assert abort["source"] == {"ip": "127.0.0.1", "port": PORT}
    assert abort["destination"]["port"] == facts["client_port"]
    assert abort["process"]["pid"] == facts["server_pid"] and abort["process"]["user"] == {"id": "0"}
    assert abort["event"]["type"] == ["connection", "end"] and abort["event"]["severity"] == 3
    assert abort["rsttrace"]["kernel_reason"] == "TCP_ABORT_ON_CLOSE"
    assert abort["rsttrace"]["socket"]["unread_bytes"] == UNREAD
    assert "unread" in abort["message"]
    # An RST the client received comes from the peer: source = remote, direction ingress.
    received = [d for d in mine if d["event"]["action"] == "rst_received"]
    assert received and all(d["network"]["direction"] == "ingress" and d["source"]["port"] == PORT
                            for d in received)
    summary = docs[-1]["rsttrace"]["summary"]
    assert summary["exact_counts"]["rst_sent"] == {"closed_with_unread_data": 1, "no_listener": 2}


# -- --output and log rotation ----------------------------------------------------------------

def test_sighup_reopens_output_after_rotation_without_losing_or_cutting_a_line(netns, tracer, tmp_path):
    out = tmp_path / "rsttrace.json"
    t = tracer("--json", "-o", str(out), "--port", str(PORT))
    before = netns.counters()
    generations = []
    for rotation in range(2):
        closed_port_resets(netns, 3)
        wait_for(lambda: out.read_text().count('"event":"rst_sent"') == 3, 10, "3 RSTs in the current file")
        rotated = tmp_path / f"rsttrace.json.{rotation + 1}"
        os.rename(out, rotated)                      # what logrotate does, then its postrotate:
        t.proc.send_signal(signal.SIGHUP)
        generations.append(rotated)
        wait_for(out.exists, 10, "rsttrace to reopen its output after SIGHUP")
    closed_port_resets(netns, 3)
    after = netns.counters()
    t.stop()
    assert t.returncode == 0

    per_file = [read_json_lines(p) for p in (*generations, out)]
    sent = [[r for r in events(recs, event="rst_sent", netns__inode=netns.inode)] for recs in per_file]
    # Each RST is in exactly one file, none lost: the files together hold what the kernel counted.
    assert sum(map(len, sent)) == after["TcpOutRsts"] - before["TcpOutRsts"] == 9
    assert len({r["remote"]["port"] for recs in sent for r in recs}) == 9
    assert [len(recs) for recs in sent] == [3, 3, 3]      # each rotation took the lines written before it
    assert per_file[0][0]["type"] == "coverage" and per_file[-1][-1]["type"] == "summary"
    # Appending, never truncating: a file that already had lines keeps them.
    keep = tmp_path / "kept.json"
    keep.write_text('{"earlier":"line"}\n')
    t = tracer("--json", "-o", str(keep), "--port", str(PORT))
    closed_port_resets(netns, 1)
    t.stop()
    lines = keep.read_text().splitlines()
    assert lines[0] == '{"earlier":"line"}' and json.loads(lines[-1])["type"] == "summary"


def test_output_dash_is_stdout(netns, tracer):
    t = tracer("--json", "-o", "-", "--port", str(PORT))
    closed_port_resets(netns, 1)
    records = t.stop()
    assert len(events(records, event="rst_sent", netns__inode=netns.inode)) == 1


# -- --syslog against a real rsyslogd ---------------------------------------------------------

@pytest.mark.parametrize("transport", ["unix", "udp"])
def test_syslog_messages_parsed_by_rsyslog_carry_the_events(netns, tracer, rsyslog, transport):
    target = f"unix:{rsyslog.dir}/log.sock" if transport == "unix" else f"udp:127.0.0.1:{rsyslog.udp_port}"
    t = tracer("--json", "--port", str(PORT), "--syslog", target, "--syslog-facility", "local3")
    before = netns.counters()
    facts = netns.scenario("unread_close", "127.0.0.1", PORT)
    closed_port_resets(netns, 2)
    after = netns.counters()
    records = t.stop()
    assert t.returncode == 0
    json_events = events(records, netns__inode=netns.inode)

    # coverage + every event + summary, each parsed by rsyslog as RFC 5424 (MSGID and SD filled in).
    msgs = rsyslog.received(len(events(records)) + 2)
    assert {m["input"] for m in msgs} == {"imuxsock" if transport == "unix" else "imudp"}
    assert all(m["app"] == "rsttrace" and m["procid"] == str(t.proc.pid) and m["facility"] == "local3" for m in msgs)
    assert msgs[0]["msgid"] == "coverage" and msgs[-1]["msgid"] == "summary"
    mine = [m for m in msgs if m["params"].get("netns") == str(netns.inode)]
    sent = [m for m in mine if m["msgid"] == "rst_sent"]
    assert len(sent) == after["TcpOutRsts"] - before["TcpOutRsts"] == 3
    assert len(mine) == len(json_events)
    for m, rec in zip(mine, json_events):
        p = m["params"]
        assert (m["msgid"], p["reason"], int(p["lport"]), int(p["rport"])) == \
               (rec["event"], rec["reason"], rec["local"]["port"], rec["remote"]["port"])
        assert m["msg"] == rec["explanation"]
        assert m["time"][:26] == rec["time"][:26], (m, rec)          # rsyslog writes +00:00 for Z
    [abort] = [m for m in sent if m["params"]["reason"] == "closed_with_unread_data"]
    assert abort["severity"] == "err" and abort["params"]["pid"] == str(facts["server_pid"])
    assert abort["params"]["unread_bytes"] == str(UNREAD)


def test_syslog_target_that_nobody_listens_on_is_a_one_line_error(root, tmp_path):
    proc = subprocess.run([*__import__("conftest").RSTTRACE, "--syslog", f"unix:{tmp_path}/nobody.sock"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "cannot reach syslog" in proc.stderr


# -- --metrics scraped by a real Prometheus ---------------------------------------------------

class ScrapeRecorder:
    """A loopback HTTP relay between Prometheus and rsttrace's /metrics: it passes the scrape on as it
    came (Accept header included) and notes the Accept header asked and the Content-Type answered."""

    def __init__(self, target: str):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        self.seen: list[tuple[str, str]] = []
        recorder = self

        class Relay(BaseHTTPRequestHandler):
            def do_GET(self):
                accept = self.headers.get("Accept", "")
                request = urllib.request.Request(f"http://{target}{self.path}", headers={"Accept": accept})
                with urllib.request.urlopen(request, timeout=10) as resp:
                    body, content_type = resp.read(), resp.headers["Content-Type"]
                recorder.seen.append((accept, content_type))
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
        self.address = "127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_prometheus_scrapes_exact_counts_and_queue_gauges(netns, tracer, prometheus, tmp_path):
    port = free_port()
    out = tmp_path / "rsttrace.json"
    t = tracer("--json", "-o", str(out), "--port", str(PORT), "--metrics", f"127.0.0.1:{port}")
    relay = ScrapeRecorder(f"127.0.0.1:{port}")           # Prometheus scrapes rsttrace through it
    prometheus.start(relay.address)
    before = netns.counters()
    server = Background(netns, "server", "127.0.0.1", str(PORT), "5", "25")      # listens, never accepts
    clients = json.loads(netns.run("/usr/bin/python3", BURST, "clients", "127.0.0.1", str(PORT), "40", "2").stdout)
    after_burst = netns.counters()
    overflows = after_burst["TcpExtListenOverflows"] - before["TcpExtListenOverflows"]
    assert overflows > 0 and clients["outcome"]

    ns = netns.name
    # Prometheus, queried through its HTTP API, holds the kernel's count of SYN drops in that netns
    # (its target discovery alone takes up to 5 s).
    drops = wait_for(lambda: [r for r in prometheus.query(
        f'rsttrace_events_total{{netns="{ns}",event="syn_dropped",reason="accept_queue_full",port="{PORT}"}}')
        if int(r["value"][1]) == overflows], 40,
        lambda: f"prometheus to show {overflows} SYN drops; it has {prometheus.query('rsttrace_events_total')}, targets {prometheus.get('/api/v1/targets')}")
    assert drops[0]["metric"]["job"] == "rsttrace"
    qlen = wait_for(lambda: prometheus.query(f'rsttrace_listener_accept_queue_length{{netns="{ns}",port="{PORT}"}}'),
                    20, "the listener's accept queue gauge")
    limit = prometheus.query(f'rsttrace_listener_accept_queue_limit{{netns="{ns}",port="{PORT}"}}')
    assert (int(qlen[0]["value"][1]), int(limit[0]["value"][1])) == (6, 5)
    server.stop()                                                    # 6 queued connections reset
    closed_port_resets(netns, 2)
    after = netns.counters()
    rsts = after["TcpOutRsts"] - before["TcpOutRsts"]
    assert rsts == 8
    total = f'sum(rsttrace_events_total{{netns="{ns}",event="rst_sent"}})'
    wait_for(lambda: [r for r in prometheus.query(total) if int(r["value"][1]) == rsts], 20,
             f"prometheus to show {rsts} RSTs (TcpOutRsts)")
    by_reason = {r["metric"]["reason"]: int(r["value"][1]) for r in
                 prometheus.query(f'rsttrace_events_total{{netns="{ns}",event="rst_sent"}}')}
    assert by_reason == {"listener_closed": 6, "no_listener": 2}
    assert prometheus.query("rsttrace_records_lost_total")[0]["value"][1] == "0"
    hooks = {r["metric"]["event"]: r["metric"]["hook"] for r in prometheus.query("rsttrace_hook_attached == 1")}
    assert hooks["rst_sent"] == "tracepoint:tcp:tcp_send_reset"
    # Prometheus asked for OpenMetrics, got it from prometheus_client, and took every scrape: the
    # counters above came in that format, under the names of the text format (X_total).
    assert [r["value"][1] for r in prometheus.query('up{job="rsttrace"}')] == ["1"]
    relay.close()
    assert relay.seen and all(accept.startswith("application/openmetrics-text")
                              and content_type.startswith("application/openmetrics-text; version=1.0.0")
                              for accept, content_type in relay.seen), relay.seen
    t.stop()
    assert read_json_lines(out)[-1]["exact_counts"]["syn_dropped"]["accept_queue_full"] == overflows


@pytest.mark.parametrize("traced", ["--port", "every port"])
def test_resets_of_a_service_in_the_ephemeral_range_are_counted_under_its_port(netns, tracer, traced):
    # A service on 47811, inside the kernel's ephemeral range, whose clients' ports are lower: each
    # reset it sends, each its clients send, and each either side receives counts under the
    # service's port, not under the client's (one series per connection, until the label cap) —
    # whether --port names it or rsttrace has to tell the listener's side by itself.
    service = 47811
    netns.sysctl("net.ipv4.ip_local_port_range", "20000 20999")
    port = free_port()
    t = tracer("--json", *(["--port", str(service)] if traced == "--port" else []),
               "--metrics", f"127.0.0.1:{port}")
    clients = {netns.scenario("unread_close", "127.0.0.1", service)["client_port"] for _ in range(3)}
    clients |= {netns.scenario("client_abort", "127.0.0.1", service)["client_port"] for _ in range(2)}
    assert len(clients) == 5 and all(p < service for p in clients)

    def ours():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return [line for line in text.splitlines()
                if line.startswith("rsttrace_events_total{") and f'netns="{netns.name}"' in line]
    def ten_counted():
        rows = ours()
        return rows if sum(float(row.split()[-1]) for row in rows) >= 10 else None
    lines = wait_for(ten_counted, 15, "the ten resets in the metrics")
    t.stop()
    assert {re.search(r'port="(\d+)"', line).group(1) for line in lines} == {str(service)}, lines
    by_reason = {(re.search(r'event="(\w+)"', line).group(1), re.search(r'reason="(\w+)"', line).group(1)):
                 float(line.split()[-1]) for line in lines}
    assert by_reason == {("rst_sent", "closed_with_unread_data"): 3, ("rst_received", "peer_reset"): 5,
                         ("rst_sent", "linger_zero"): 2}, lines


def test_metrics_port_in_use_is_a_one_line_error(root):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([*__import__("conftest").RSTTRACE, "--metrics", f"127.0.0.1:{port}"],
                              cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "cannot serve --metrics" in proc.stderr


# -- --max-rate -------------------------------------------------------------------------------

def test_max_rate_caps_records_and_suppressed_records_carry_the_exact_counts(netns, tracer):
    t = tracer("--json", "--port", str(PORT), "--max-rate", "5")
    before = netns.counters()
    netns.run("/usr/bin/python3", "-c", f"""
import socket
for _ in range(150):
    try: socket.create_connection(("127.0.0.1", {PORT}))
    except ConnectionRefusedError: pass
""")
    after = netns.counters()
    time.sleep(1.2)                                  # let the window close with a `suppressed` record
    records = t.stop()
    kernel = after["TcpOutRsts"] - before["TcpOutRsts"]
    assert kernel == 150

    written = events(records)
    suppressed = [r for r in records if r["type"] == "suppressed"]
    summary = records[-1]
    assert suppressed and all(r["max_rate"] == 5 for r in suppressed)
    # At most 5 records per one-second window got through; what was held back was counted, by reason.
    assert len(written) <= 5 * (math.ceil(summary["duration_s"]) + 1) < 300
    held = sum(r["suppressed"] for r in suppressed)
    assert held == suppressed[-1]["total_suppressed"] == summary["suppressed"]
    assert len(written) + held == 300 == summary["delivered"]        # 150 RSTs sent + 150 received
    # The kernel's exact counts, in the last suppressed record and the summary, equal TcpOutRsts.
    assert suppressed[-1]["exact_counts"]["rst_sent"] == {"no_listener": kernel}
    assert summary["exact_counts"]["rst_sent"] == {"no_listener": kernel}
    assert summary["lost"] == 0 and summary["uncounted"] == 0
    assert sum(n for by in suppressed for n in by["by_reason"].get("rst_sent", {}).values()) + \
        len(events(records, event="rst_sent")) == kernel
