"""The continuous-use outputs as pure logic: ECS mapping, RFC 5424 formatting, Prometheus exposition
and label bounds, --max-rate windows, and the shipped systemd unit and logrotate snippet.
(tests/kernel/test_continuous.py runs them end to end against rsyslogd and prometheus.)"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import jsonschema
import pytest

from tracer.sinks import ecs, metrics, records
from tracer.sinks.ratelimit import RateLimit
from tracer.sinks.syslog import SyslogTarget, format_message, sd_escape
from test_records import sample_event

REPO = Path(__file__).resolve().parents[2]
ECS = jsonschema.Draft202012Validator(json.loads((REPO / "schema" / "rsttrace-ecs-v1.schema.json").read_text()))
V1 = jsonschema.Draft202012Validator(json.loads((REPO / "schema" / "rsttrace-v1.schema.json").read_text()))
HOST = {"hostname": "web1", "name": "web1", "os": {"kernel": "6.18.0", "type": "linux"}}
COUNTS = {"rst_sent": {"no_listener": 7, "closed_with_unread_data": 2}}


def every_record_type() -> list[dict]:
    cov = records.coverage_record({"hooks": {"rst_sent": {"hook": "tracepoint:tcp:tcp_send_reset", "note": ""},
                                             "ack_dropped": {"hook": None, "note": "no kfree_skb"}},
                                   "blind_spots": []}, "6.18.0", {"ports": [80]}, 420.0)
    return [
        cov,
        records.event_record(sample_event()),
        records.lost_record(3, 10),
        records.suppressed_record(1.01, {"rst_sent": {"no_listener": 5}}, 12, 100, COUNTS, 0),
        records.listeners_record([]),
        records.reconciliation_record([]),
        records.summary_record({"rst_sent": {"no_listener": 2}}, 0, 9, 3.5, {"netns": "x", "delta": {}}, COUNTS,
                               None, suppressed=7, uncounted=0, skipped_runs={"raw_tracepoint:kfree_skb": 2}),
    ]


@pytest.mark.parametrize("rec", every_record_type(), ids=lambda r: r["type"])
def test_every_record_is_valid_v1_and_valid_ecs(rec):
    V1.validate(rec)
    doc = ecs.to_ecs(rec, HOST)
    ECS.validate(doc)
    assert doc["@timestamp"] == rec["time"] and doc["message"]
    json.dumps(doc)


def test_ecs_event_direction_follows_the_packet():
    sent = ecs.to_ecs(records.event_record(sample_event()), HOST)
    assert sent["source"] == {"ip": "::1", "port": 8080} and sent["network"]["direction"] == "egress"
    assert sent["process"] == {"pid": 42, "name": "nginx", "user": {"id": "33"}}
    assert sent["event"]["reason"] == "closed_with_unread_data" and sent["event"]["severity"] == 3
    dropped = ecs.to_ecs(records.event_record(sample_event(kind="syn_dropped")), HOST)
    assert dropped["source"]["port"] == 51234 and dropped["destination"]["port"] == 8080
    assert dropped["event"]["type"] == ["connection", "denied"] and dropped["network"]["direction"] == "ingress"


def test_ecs_schema_rejects_a_document_without_the_network_fields():
    doc = ecs.to_ecs(records.event_record(sample_event()), HOST)
    del doc["network"]
    assert not ECS.is_valid(doc)


# -- syslog -------------------------------------------------------------------------------------

# RFC 5424 §6: HEADER SP STRUCTURED-DATA [SP MSG]
RFC5424 = re.compile(r'^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\d+) (\S{1,32}) (-|\[.*\]) (.+)$', re.S)
SD_ELEMENT = re.compile(r'^\[rsttrace@32473( [^= \]"]{1,32}="(?:[^"\\\]]|\\["\\\]])*")+\]$')


@pytest.mark.parametrize("rec", every_record_type(), ids=lambda r: r["type"])
def test_syslog_messages_are_rfc5424_with_structured_data(rec):
    msg = format_message(rec, 3, "web1", 4242).decode()
    m = RFC5424.match(msg)
    assert m, msg
    pri, ts, host, app, pid, msgid, sd, text = m.groups()
    assert (host, app, pid) == ("web1", "rsttrace", "4242") and ts == rec["time"]
    assert sd == "-" or SD_ELEMENT.match(sd), sd
    assert "\n" not in msg
    if rec["type"] == "event":
        assert (int(pri), msgid) == (3 * 8 + 3, "rst_sent")        # daemon.err: closed with unread data
        assert 'reason="closed_with_unread_data"' in sd and 'unread_bytes="4096"' in sd
        assert text == rec["explanation"]


def test_sd_values_escape_quote_backslash_and_bracket():
    assert sd_escape('a"b\\c]d') == 'a\\"b\\\\c\\]d'


@pytest.mark.parametrize("text,ok", [("unix:/dev/log", True), ("udp:127.0.0.1:514", True), ("udp:[::1]:5514", True),
                                     ("udp:host:0", False), ("tcp:1.2.3.4:514", False), ("unix:dev/log", False),
                                     ("/dev/log", False)])
def test_syslog_targets(text, ok):
    if ok:
        assert SyslogTarget.parse(text).text == text
    else:
        with pytest.raises(ValueError, match="not a syslog target"):
            SyslogTarget.parse(text)


# -- Prometheus ---------------------------------------------------------------------------------

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*\})? -?[0-9.e+]+$')
OPENMETRICS = "application/openmetrics-text"
# What Debian 12's prometheus (2.42) sends when it scrapes (scrape/scrape.go, acceptHeader).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def series(name: str, **labels: object) -> str:
    """A sample's key in samples(): its name and labels, the labels in name order."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def row(event="rst_sent", reason="no_listener", netns=1, port=80, count=1, name="blue"):
    return {"event": event, "reason": reason, "netns": netns, "netns_name": name, "port": port, "count": count}


@pytest.fixture
def sink():
    s = metrics.MetricsSink(("127.0.0.1", 0))
    s.start()
    yield s
    s.close()


def samples(text: str) -> dict[str, float]:
    """The text format 0.0.4, checked line by line, parsed by prometheus_client's own parser too."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        assert SAMPLE.match(line), line
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = series(s.name, **s.labels)
            assert key not in out, key
            out[key] = s.value
    return out


def om_families(text: str) -> dict:
    """OpenMetrics, parsed by prometheus_client's strict OpenMetrics parser (it wants the # EOF)."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
    assert text.endswith("# EOF\n")
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_exposition_is_valid_text_format(sink):
    sink.emit(every_record_type()[0])
    sink.update_counts([row(), row(reason="closed_with_unread_data", count=2)],
                       {"submitted": 3, "lost": 0, "skipped_runs": {"tracepoint:tcp:tcp_receive_reset": 7}})
    got = samples(sink.render())
    assert got[series("rsttrace_events_total", event="rst_sent", reason="no_listener", netns="blue", port=80)] == 1
    assert got[series("rsttrace_hook_attached", event="ack_dropped", hook="none")] == 0
    assert got["rsttrace_records_delivered_total"] == 3
    assert got[series("rsttrace_bpf_runs_skipped_total", hook="tracepoint:tcp:tcp_receive_reset")] == 7


def test_openmetrics_has_the_same_families_and_samples_as_the_text_format(sink):
    sink.emit(every_record_type()[0])
    sink.update_counts([row(), row(reason="closed_with_unread_data", count=2)],
                       {"submitted": 3, "lost": 0, "skipped_runs": {"tracepoint:tcp:tcp_receive_reset": 7},
                        "otlp": {"sent": 1, "failed": 0, "dropped_queue_full": 0, "unsent_at_exit": 0, "pending": 2}})
    text = sink.render()
    classic = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}
    om = om_families(sink.render(openmetrics=True))
    # A counter X_total is the family X in OpenMetrics, its sample still X_total: the same series.
    assert {(name + "_total" if family.type == "counter" else name): family.type for name, family in om.items()} == classic
    assert {series(s.name, **s.labels): s.value for f in om.values() for s in f.samples} == samples(text)
    assert om["rsttrace_events"].samples[0].name == "rsttrace_events_total"


def test_port_labels_are_bounded_and_series_stay_monotonic(sink, monkeypatch):
    monkeypatch.setattr(metrics, "MAX_PORTS", 3)
    rows = [row(port=p, count=10) for p in (80, 443, 8080)]
    sink.update_counts(rows, {})
    first = samples(sink.render())
    # A storm on many more ports: they all count as port="other", the first three keep their label.
    rows += [row(port=p, count=1) for p in range(20000, 20500)]
    rows[0]["count"] = 11
    sink.update_counts(rows, {})
    second = samples(sink.render())
    for got in (second, {series(s.name, **s.labels): s.value
                         for f in om_families(sink.render(openmetrics=True)).values() for s in f.samples}):
        events = [k for k in got if k.startswith("rsttrace_events_total")]
        assert len(events) == 4
        assert got[series("rsttrace_events_total", event="rst_sent", reason="no_listener", netns="blue",
                          port="other")] == 500
        assert all(got[k] >= v for k, v in first.items() if k.startswith("rsttrace_events_total"))
        assert got[series("rsttrace_events_total", event="rst_sent", reason="no_listener", netns="blue", port=80)] == 11


def test_netns_labels_are_bounded(sink, monkeypatch):
    monkeypatch.setattr(metrics, "MAX_NETNS", 2)
    sink.update_counts([row(netns=n, name=None, port=80 + n) for n in range(10)], {})
    netns = {re.search(r'netns="([^"]+)"', k).group(1) for k in samples(sink.render()) if "events_total" in k}
    assert netns == {"0", "1", "other"}
    om = om_families(sink.render(openmetrics=True))
    assert {s.labels["netns"] for s in om["rsttrace_events"].samples} == {"0", "1", "other"}


def test_listener_gauges_are_bounded(sink, monkeypatch):
    monkeypatch.setattr(metrics, "MAX_LISTENERS", 2)
    listeners = [{"netns": {"inode": 1, "name": "blue"}, "local": {"addr": "127.0.0.1", "port": p},
                  "accept_qlen": 1, "accept_qmax": 5, "drops": 0} for p in (80, 81, 82)]
    sink.emit({"type": "listeners", "listeners": listeners})
    got = samples(sink.render())
    assert len([k for k in got if k.startswith("rsttrace_listener_accept_queue_length")]) == 2
    assert got["rsttrace_listeners_not_shown"] == 1


def test_label_values_are_escaped(sink):
    name = 'a"b\\c\nd'
    sink.update_counts([row(name=name)], {})
    text = sink.render()
    assert 'netns="a\\"b\\\\c\\nd"' in text
    assert series("rsttrace_events_total", event="rst_sent", reason="no_listener", netns=name, port=80) in samples(text)
    om = om_families(sink.render(openmetrics=True))
    assert om["rsttrace_events"].samples[0].labels["netns"] == name


def scrape(sink, accept: str | None = None) -> tuple[str, str]:
    host, port = sink.address
    request = urllib.request.Request(f"http://{host}:{port}/metrics", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


def test_scrape_over_http_serves_fresh_counts_or_the_last_ones(sink):
    host, port = sink.address
    sink.update_counts([row(count=5)], {})
    content_type, body = scrape(sink)
    assert content_type.startswith("text/plain; version=0.0.4")
    # nobody refreshed: the last counts, after SCRAPE_WAIT_S
    assert samples(body)[series("rsttrace_events_total", event="rst_sent", reason="no_listener", netns="blue",
                                port=80)] == 5
    assert sink.wants_counts()                      # ... and the session is asked for fresh ones
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://{host}:{port}/other", timeout=5)


@pytest.mark.parametrize("accept,openmetrics", [
    (None, False),
    ("text/plain;version=0.0.4", False),
    ("*/*", False),
    (PROMETHEUS_ACCEPT, True),
    ("application/openmetrics-text", True),
    ("application/openmetrics-text; version=1.0.0", True),
    # prometheus_client reads no q: OpenMetrics, offered at all, wins
    ("text/plain;version=0.0.4;q=0.9,application/openmetrics-text;version=1.0.0;q=0.1", True),
])
def test_scrape_negotiates_openmetrics_by_the_accept_header(sink, accept, openmetrics):
    sink.update_counts([row(count=5)], {"submitted": 4})
    content_type, body = scrape(sink, accept)
    if openmetrics:
        assert content_type.startswith(OPENMETRICS + "; version=1.0.0")
        om = om_families(body)
        assert om["rsttrace_records_delivered"].samples[0].value == 4
    else:
        assert content_type.startswith("text/plain; version=0.0.4")
        assert "# EOF" not in body and samples(body)["rsttrace_records_delivered_total"] == 4


def test_metrics_without_prometheus_client_is_a_one_line_error(tmp_path):
    # A prometheus_client that cannot be imported: only --metrics needs it, and says so.
    (tmp_path / "prometheus_client").mkdir()
    (tmp_path / "prometheus_client" / "__init__.py").write_text("raise ImportError('gone', name='prometheus_client')\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[2]}"}
    proc = subprocess.run([sys.executable, "-m", "tracer", "--metrics", "127.0.0.1:9465"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--metrics needs the Python package prometheus_client" in proc.stderr
    # Nothing else imports it.
    proc = subprocess.run([sys.executable, "-c", "import sys, tracer.cli, tracer.session, tracer.sinks.otlp, "
                           "tracer.sinks.syslog; assert 'prometheus_client' not in sys.modules"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("text,expected", [("127.0.0.1:9465", ("127.0.0.1", 9465)), (":9465", ("0.0.0.0", 9465)),
                                           ("[::1]:9465", ("::1", 9465))])
def test_metrics_addresses(text, expected):
    assert metrics.parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["9465", "localhost:", "1.2.3.4:70000", "a:b"])
def test_bad_metrics_addresses(text):
    with pytest.raises(ValueError, match="not ADDR:PORT"):
        metrics.parse_listen_address(text)


# -- --max-rate ---------------------------------------------------------------------------------

def test_rate_limit_windows():
    limit = RateLimit(2)
    assert [limit.allow(0.0, "rst_sent", "no_listener") for _ in range(5)] == [True, True, False, False, False]
    assert not limit.window_over(0.5) and limit.window_over(1.0)
    length, held = limit.close_window(1.0)
    assert (length, held, limit.total_held_back) == (1.0, {"rst_sent": {"no_listener": 3}}, 3)
    assert limit.allow(1.1, "rst_sent", "no_listener")                 # a new window lets records through
    assert limit.close_window(2.1) is None                               # and held nothing back
    with pytest.raises(ValueError):
        RateLimit(0)


# -- the CLI's one-line errors (no root needed: they come before anything is loaded) -------------

@pytest.mark.parametrize("args,says", [
    (["--syslog", "tcp:1.2.3.4:514"], "not a syslog target"),
    (["--metrics", "9465"], "not ADDR:PORT"),
    (["--otlp", "collector:4318"], "not an OTLP/HTTP URL"),
    (["--format", "xml"], "'xml' is not one of"),
    (["--json", "--format", "ecs"], "choose one output format"),
    (["--max-rate", "0"], "--max-rate"),
])
def test_bad_output_options_are_one_line_usage_errors(args, says):
    proc = subprocess.run([sys.executable, "-m", "tracer", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and says in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


# -- contrib/ -----------------------------------------------------------------------------------

def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: scripts/setup installs systemd"
    # Verified as shipped, except ExecStart pointing at this checkout's rsttrace (systemd checks it exists).
    unit = tmp_path / "rsttrace.service"
    rsttrace = Path(sys.executable).with_name("rsttrace")
    assert rsttrace.exists(), rsttrace
    unit.write_text((REPO / "contrib" / "rsttrace.service").read_text().replace("/usr/local/bin/rsttrace", str(rsttrace)))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "" and proc.stdout.strip() == "", proc.stderr
    text = unit.read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text and "--output /var/log/rsttrace/" in text


def test_logrotate_snippet_parses_and_signals_instead_of_truncating(tmp_path):
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    snippet = (REPO / "contrib" / "rsttrace.logrotate").read_text()
    assert "copytruncate" not in snippet.replace("never copytruncate", "").replace("copytruncate loses", "")
    assert "pkill -HUP -x rsttrace" in snippet
    proc = subprocess.run([logrotate, "-d", "-s", str(tmp_path / "state"), str(REPO / "contrib" / "rsttrace.logrotate")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "error" not in proc.stderr.lower(), proc.stderr


def test_output_to_dev_null_closes_cleanly():
    from tracer.sinks.output import LineOutput
    out = LineOutput("/dev/null")          # the unit-file example: syslog and metrics only
    out.write_line("x")
    out.reopen()
    out.close()
