"""Records (the JSON schema) and their plain-line view, from a fixed decoded event."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from tracer.enrich import reasons
from tracer.events.decode import Event
from tracer.sinks import records
from tracer.kernel.loader import attach_point
from tracer.sinks.summary import print_summary
from tracer.sinks.plain import format_event

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "schema" / "rsttrace-v1.schema.json").read_text())


def sample_event(**kw) -> Event:
    ev = Event(kind="rst_sent", ktime_ns=123, time_ns=1_763_804_626_123_456_789, family="ipv6",
               local_addr="::1", local_port=8080, remote_addr="::1", remote_port=51234, state="CLOSE",
               netns=4026531833, kernel_reason="TCP_ABORT_ON_CLOSE", softirq=False, task_pid=42,
               task_comm="nginx", task_uid=33, skaddr=1, sock_cookie=0, sock_ino=77, unread_bytes=4096,
               linger=False, linger_jiffies=0, orphan=False, tcp_flags=0, callers=[1, 2])
    for k, v in kw.items():
        setattr(ev, k, v)
    ev.reason = reasons.classify(ev)
    ev.process = {"pid": 42, "comm": "nginx", "uid": 33, "source": "task"}
    ev.explanation = reasons.explain(ev)
    return ev


def test_event_record_validates_and_keeps_kernel_name_beside_ours():
    ev = sample_event()
    ev.caller_names = ["fn1", "fn2"]
    rec = records.event_record(ev)
    jsonschema.validate(rec, SCHEMA)
    assert rec["reason"] == "closed_with_unread_data" and rec["kernel_reason"] == "TCP_ABORT_ON_CLOSE"
    assert rec["time"] == "2025-11-22T09:43:46.123456Z"
    assert rec["evidence"]["callers"] == ["fn1", "fn2"]
    assert "nginx (pid 42)" in rec["explanation"] and "4096 unread bytes" in rec["explanation"]


def test_plain_line_is_one_line_without_escape_codes():
    line = format_event(records.event_record(sample_event()))
    assert "\n" not in line and "\x1b" not in line
    assert "closed_with_unread_data [TCP_ABORT_ON_CLOSE] [::1]:8080 > [::1]:51234" in line
    assert "nginx/42" in line and "unread=4096" in line


def test_other_record_types_validate():
    for rec in (records.coverage_record({"hooks": {}, "blind_spots": []}, "6.18", {}, 12.5),
                records.lost_record(3, 10),
                records.summary_record({"rst_sent": {"no_listener": 2}}, 0, 2, 1.0, {}, {"rst_sent": {"no_listener": 2}})):
        jsonschema.validate(rec, SCHEMA)


def test_help_has_examples_and_explain_lists_every_reason():
    out = subprocess.run([sys.executable, "-m", "tracer", "--help"], capture_output=True, text=True, check=True).stdout
    assert "Examples:" in out and "sudo rsttrace --port 8100" in out
    out = subprocess.run([sys.executable, "-m", "tracer", "explain"], capture_output=True, text=True, check=True).stdout
    assert all(name in out for name in reasons.CATALOG)
    out = subprocess.run([sys.executable, "-m", "tracer", "explain", "closed_with_unread_data"],
                         capture_output=True, text=True, check=True).stdout
    assert "TCPAbortOnClose" in out and "TCP_ABORT_ON_CLOSE" in out


def test_process_cgroup_and_container_validate_and_show_in_the_plain_line():
    ev = sample_event()
    cid = "ab" * 32
    ev.process = {"pid": 42, "comm": "nginx", "uid": 33, "source": "port_listener",
                  "cgroup": {"id": 9137, "path": f"/system.slice/docker-{cid}.scope"},
                  "container": {"id": cid, "runtime": "docker", "pod_uid": None}}
    rec = records.event_record(ev)
    jsonschema.validate(rec, SCHEMA)
    assert rec["process"]["container"]["id"] == cid
    assert f"nginx/42 container={cid[:12]}" in format_event(rec)
    ev.process["container"] = {"id": "not-hex", "runtime": "docker"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(records.event_record(ev), SCHEMA)
    # Records of older producers (no cgroup/container keys) stay valid: the fields are optional.
    ev.process = {"pid": 42, "comm": "nginx", "uid": 33, "source": "task"}
    jsonschema.validate(records.event_record(ev), SCHEMA)


@pytest.mark.parametrize("program, where", [
    ("tracepoint__tcp__tcp_send_reset", "tracepoint:tcp:tcp_send_reset"),
    ("raw_tracepoint__kfree_skb", "raw_tracepoint:kfree_skb"),
    ("tp_btf__inet_sock_set_state", "tp_btf:inet_sock_set_state"),
    ("kfunc__vmlinux__tcp_conn_request", "fentry:tcp_conn_request"),
    ("kprobe__tcp_v4_send_reset", "kprobe:tcp_v4_send_reset"),
    ("something_else", "something_else"),
])
def test_skipped_runs_name_the_attach_point(program, where):
    assert attach_point(program) == where


def test_summary_says_what_the_kernel_skipped():
    lines = []
    summary = records.summary_record({"rst_sent": {"linger_zero": 5}}, 0, 5, 1.0, {"netns": "x", "delta": {}},
                                     {"rst_sent": {"linger_zero": 5}},
                                     skipped_runs={"tracepoint:tcp:tcp_receive_reset": 40, "tracepoint:tcp:tcp_send_reset": 2})
    print_summary(summary, out=lines.append)
    said = [line for line in lines if "skipped" in line]
    assert len(said) == 1 and "skipped 42 runs" in said[0]
    assert said[0].index("tcp_receive_reset 40") < said[0].index("tcp_send_reset 2")
