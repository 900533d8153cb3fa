"""The proxy that reset its upstream (incident 1 of DESIGN.md), with a real nginx in a private netns.

scripts/repro/nginx_incident.py runs the Debian nginx (own prefix, `user nobody` workers, 4 x 4k proxy
buffers, proxy_temp_path under a root-only directory) in front of an upstream server (comm `upstream`)
that serves a 16 KB and a 2 MB file. Large downloads make the worker spill to its temp dir, fail with
Permission denied and close the upstream connection with the response half read: the kernel resets it
(TCP_ABORT_ON_CLOSE) and the upstream sees "Connection reset by peer". rsttrace must name the worker —
not the master — with its uid, the unread bytes, and the upstream's side of the same reset.
"""
from __future__ import annotations

import json
import pwd
import random
import re

from conftest import REPO, events, failures_kept_by

INCIDENT = str(REPO / "scripts" / "repro" / "nginx_incident.py")
PROXY_PORT = random.randrange(20000, 30000, 2)   # not ports other suites running beside this one use
UPSTREAM_PORT = PROXY_PORT + 1
NOBODY = pwd.getpwnam("nobody").pw_uid


def run_incident(ns, n_small: int = 2, n_big: int = 2) -> dict:
    out = ns.run("/usr/bin/python3", INCIDENT, "incident", "127.0.0.1", str(PROXY_PORT), str(UPSTREAM_PORT),
                 str(n_small), str(n_big), timeout=90)
    return json.loads(out.stdout.strip().splitlines()[-1])


def during(rec: dict, downloads: list[dict]) -> bool:
    return any(d["start_ns"] <= rec["ktime_ns"] <= d["end_ns"] for d in downloads)


def test_nginx_without_a_writable_proxy_temp_dir_resets_its_upstream(netns, tracer):
    t = tracer("--json", "--port", str(UPSTREAM_PORT), "--app-errors")
    before = netns.counters()
    facts = run_incident(netns)
    after = netns.counters()
    records = t.stop()

    # The incident itself: small downloads work, large ones are cut short, nginx says why, the
    # upstream sees resets.
    small = [d for d in facts["downloads"] if d["path"] == "/small"]
    big = [d for d in facts["downloads"] if d["path"] == "/big"]
    assert all(d["complete"] for d in small), small
    assert all(d["status"] == 200 and 0 < d["received"] < d["content_length"] for d in big), big
    denied = [line for line in facts["error_log"] if "proxy_temp" in line and "(13: Permission denied)" in line]
    assert len(denied) == len(big), facts["error_log"]
    upstream_errors = [u["outcome"] for u in facts["upstream_log"] if u["path"] == "/big"]
    assert all("reset by peer" in o or "Broken pipe" in o for o in upstream_errors), upstream_errors

    [worker] = facts["worker_pids"]
    assert worker != facts["master_pid"] and facts["worker_uid"] == NOBODY and facts["master_uid"] == 0

    # rsttrace: one RST per failed download, sent by the worker (in process context: close()) to the
    # upstream, with the response bytes it never read.
    sent = events(records, event="rst_sent", netns__inode=netns.inode)
    assert len(sent) == len(big) == after["TcpOutRsts"] - before["TcpOutRsts"]
    assert after["TcpExtTCPAbortOnClose"] - before["TcpExtTCPAbortOnClose"] == len(big)
    for rst in sent:
        assert (rst["reason"], rst["kernel_reason"]) == ("closed_with_unread_data", "TCP_ABORT_ON_CLOSE")
        assert rst["remote"] == {"addr": "127.0.0.1", "port": UPSTREAM_PORT}
        assert rst["local"]["addr"] == "127.0.0.1"
        assert rst["socket"]["unread_bytes"] > 0
        assert rst["context"] == "process"
        assert rst["process"]["pid"] == worker
        assert (rst["process"]["comm"], rst["process"]["uid"], rst["process"]["source"]) == ("nginx", NOBODY, "task")
        assert rst["netns"] == {"inode": netns.inode, "name": netns.name}
        assert f"nginx (pid {worker})" in rst["explanation"] and "proxy aborting its upstream" in rst["explanation"]
        assert f"{rst['socket']['unread_bytes']} unread bytes" in rst["explanation"]
        assert during(rst, big)

    # What nginx's error log says, without the log: each reset carries the worker's failed open() of
    # its temp file — the path and errno of the log line — and the explanation leads with it.
    logged = sorted(re.search(r'open\(\) "([^"]+)" failed \(13: Permission denied\)', line).group(1) for line in denied)
    told = []
    for rst in sent:
        failures = [f for f in rst["app_errors"] if f["errno"] == "EACCES"]
        assert failures and all(f["tid"] == worker and f["syscall"] in ("open", "openat") for f in failures), rst
        assert all(0 <= f["before_ms"] <= 5000 for f in rst["app_errors"])
        told.append(failures[-1]["path"])
        assert rst["explanation"].startswith(
            f'{failures[-1]["syscall"]}("{failures[-1]["path"]}") failed with EACCES (Permission denied) '
            f'in nginx (pid {worker})'), rst
        assert f"its user (uid {NOBODY}, nobody) may not use that path; nginx (pid {worker}) closed" in rst["explanation"]
    assert sorted(told) == logged

    # The upstream's side of each reset, named after the upstream server whoever was on the CPU.
    received = events(records, event="rst_received", netns__inode=netns.inode)
    assert sorted(r["remote"]["port"] for r in received) == sorted(r["local"]["port"] for r in sent)
    for r in received:
        assert r["reason"] == "peer_reset" and r["local"] == {"addr": "127.0.0.1", "port": UPSTREAM_PORT}
        assert (r["process"]["pid"], r["process"]["comm"]) == (facts["upstream_pid"], "upstream")

    # Small downloads fit the in-memory buffers: not a single event while they ran.
    assert not [r for r in events(records, netns__inode=netns.inode) if during(r, small)]


def test_comm_filter_separates_the_proxy_from_its_upstream(netns, tracer):
    # --netns keeps other namespaces' traffic out of the kernel's exact counts compared below.
    only_nginx = tracer("--json", "--port", str(UPSTREAM_PORT), "--netns", netns.name, "--comm", "nginx",
                        "--app-errors")
    only_upstream = tracer("--json", "--port", str(UPSTREAM_PORT), "--netns", netns.name, "--comm", "upstream",
                           "--app-errors")
    facts = run_incident(netns, n_small=0, n_big=1)
    # The failed syscalls are kept in the kernel only for the processes the filters let through.
    [worker] = facts["worker_pids"]
    assert worker in failures_kept_by(only_nginx.proc.pid)
    assert worker not in failures_kept_by(only_upstream.proc.pid)
    nginx_records, upstream_records = only_nginx.stop(), only_upstream.stop()

    [rst] = events(nginx_records)
    assert rst["event"] == "rst_sent" and rst["process"]["pid"] == worker
    assert any(f["errno"] == "EACCES" for f in rst["app_errors"])
    [received] = events(upstream_records)
    assert received["event"] == "rst_received" and received["process"]["pid"] == facts["upstream_pid"]
    # Both saw both in the kernel: the comm filter runs after attribution, in user space.
    for records in (nginx_records, upstream_records):
        assert records[-1]["exact_counts"] == {"rst_sent": {"closed_with_unread_data": 1},
                                               "rst_received": {"peer_reset": 1}}
