"""Real resets in private network namespaces, traced by a real rsttrace process.

Each test reproduces an incident with real sockets (scripts/repro/resets.py), lets rsttrace's
BPF programs report it, and checks the report — reason, addresses, ports, state, process — and
that rsttrace saw exactly as many RSTs as the kernel counted (TcpOutRsts in that netns).
"""
from __future__ import annotations

import random

import pytest

from conftest import events

PORT = random.randrange(20000, 30000)   # not a port other suites running beside this one use


def sent_in(records, ns):
    return events(records, event="rst_sent", netns__inode=ns.inode)


def assert_matches_kernel_count(records, ns, before, after):
    kernel = after["TcpOutRsts"] - before["TcpOutRsts"]
    assert kernel > 0
    assert len(sent_in(records, ns)) == kernel, f"rsttrace reported {len(sent_in(records, ns))}, kernel counted {kernel}"


def test_connect_to_closed_port_reports_no_listener_and_blames_nobody(netns, tracer):
    t = tracer("--json", "--port", str(PORT))
    before = netns.counters()
    facts = netns.scenario("closed_port", "127.0.0.1", PORT)
    after = netns.counters()
    records = t.stop()

    assert facts["error"] == "ECONNREFUSED"
    [rst] = sent_in(records, netns)
    assert rst["reason"] == "no_listener"
    assert rst["kernel_reason"] == "NO_SOCKET"
    assert rst["local"] == {"addr": "127.0.0.1", "port": PORT}
    assert rst["remote"] == {"addr": "127.0.0.1", "port": facts["client_port"]}
    assert rst["netns"] == {"inode": netns.inode, "name": netns.name}
    assert "SYN" in rst["evidence"]["tcp_flags"]
    # The RST is sent in softirq while the *client* happens to be on the CPU: it must not be blamed.
    assert rst["context"] == "softirq"
    assert rst["evidence"]["task_on_cpu"]["pid"] == facts["client_pid"]
    assert rst["process"] is None
    [received] = events(records, event="rst_received", netns__inode=netns.inode)
    assert received["state"] == "SYN_SENT"
    assert received["local"]["port"] == facts["client_port"]
    assert received["process"]["pid"] == facts["client_pid"]
    assert_matches_kernel_count(records, netns, before, after)
    # The kernel-side exact counts (kept even when records are lost) agree with the records.
    summary = records[-1]
    assert summary["type"] == "summary"
    assert summary["exact_counts"] == {"rst_sent": {"no_listener": 1}, "rst_received": {"peer_reset": 1}}


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def test_close_with_unread_data_reports_abort_on_close(netns, tracer, addr):
    t = tracer("--json", "--port", str(PORT))
    before = netns.counters()
    facts = netns.scenario("unread_close", addr, PORT, "1000")
    after = netns.counters()
    records = t.stop()

    assert facts["client_error"] == "ECONNRESET"
    [rst] = sent_in(records, netns)
    assert rst["reason"] == "closed_with_unread_data"
    assert rst["kernel_reason"] == "TCP_ABORT_ON_CLOSE"
    assert rst["family"] == ("ipv6" if ":" in addr else "ipv4")
    assert rst["local"] == {"addr": addr, "port": PORT}
    assert rst["remote"] == {"addr": addr, "port": facts["client_port"]}
    assert rst["socket"]["unread_bytes"] == 1000
    assert rst["context"] == "process"
    assert rst["process"]["pid"] == facts["server_pid"]
    assert rst["process"]["comm"] == "python3"
    assert rst["process"]["uid"] == 0
    assert "1000 unread bytes" in rst["explanation"]
    # The other side: the client's socket received it ("Connection reset by peer").
    [received] = events(records, event="rst_received", netns__inode=netns.inode)
    assert received["reason"] == "peer_reset"
    assert received["state"] == "ESTABLISHED"
    assert received["local"] == {"addr": addr, "port": facts["client_port"]}
    assert received["process"]["pid"] == facts["client_pid"]
    assert after["TcpExtTCPAbortOnClose"] - before["TcpExtTCPAbortOnClose"] == 1
    assert_matches_kernel_count(records, netns, before, after)


def test_so_linger_zero_reports_linger_zero(netns, tracer):
    t = tracer("--json", "--port", str(PORT))
    before = netns.counters()
    facts = netns.scenario("linger_zero", "127.0.0.1", PORT)
    after = netns.counters()
    records = t.stop()

    assert facts["client_error"] == "ECONNRESET"
    [rst] = sent_in(records, netns)
    assert rst["reason"] == "linger_zero"
    assert rst["kernel_reason"] == "TCP_STATE"
    assert rst["socket"]["linger"] is True
    assert rst["socket"]["unread_bytes"] == 0
    assert rst["process"]["pid"] == facts["server_pid"]
    assert rst["local"]["port"] == PORT and rst["remote"]["port"] == facts["client_port"]
    assert after["TcpExtTCPAbortOnData"] - before["TcpExtTCPAbortOnData"] == 1   # the kernel's counter for it
    assert_matches_kernel_count(records, netns, before, after)


def test_every_reset_of_a_mixed_run_is_counted_once(netns, tracer):
    t = tracer("--json")          # no filter: everything on the host
    before = netns.counters()
    for _ in range(3):
        netns.scenario("closed_port", "127.0.0.1", 9)
        netns.scenario("unread_close", "::1", PORT)
        netns.scenario("linger_zero", "127.0.0.1", PORT + 1)
    after = netns.counters()
    records = t.stop()
    reasons = sorted(r["reason"] for r in sent_in(records, netns))
    assert reasons == sorted(["no_listener"] * 3 + ["closed_with_unread_data"] * 3 + ["linger_zero"] * 3)
    assert_matches_kernel_count(records, netns, before, after)
    summary = [r for r in records if r["type"] == "summary"][-1]
    assert summary["lost"] == 0


def test_events_from_two_netns_carry_their_own_netns_and_netns_filters_them(make_netns, tracer):
    a, b = make_netns(), make_netns()
    t = tracer("--json", "--port", str(PORT))
    only_a = tracer("--json", "--port", str(PORT), "--netns", a.name)               # by `ip netns` name
    only_b = tracer("--json", "--port", str(PORT), "--netns", str(b.inode))         # by inode
    a.scenario("closed_port", "127.0.0.1", PORT)
    b.scenario("closed_port", "127.0.0.1", PORT)
    records, records_a, records_b = t.stop(), only_a.stop(), only_b.stop()
    assert a.inode != b.inode
    assert len(sent_in(records, a)) == 1 and len(sent_in(records, b)) == 1
    assert sent_in(records, a)[0]["netns"] == {"inode": a.inode, "name": a.name}
    assert sent_in(records, b)[0]["netns"] == {"inode": b.inode, "name": b.name}
    for filtered, ns in ((records_a, a), (records_b, b)):
        assert {r["netns"]["inode"] for r in events(filtered)} == {ns.inode}
        assert len(sent_in(filtered, ns)) == 1
        assert filtered[0]["type"] == "coverage" and filtered[0]["filters"]["netns"] == [ns.inode]
        # Filtered in the kernel: the other netns' RST was not even counted there.
        assert filtered[-1]["exact_counts"] == {"rst_sent": {"no_listener": 1}, "rst_received": {"peer_reset": 1}}
        # ... and only that netns' kernel counters are reconciled with.
        final = [r for r in filtered if r["type"] == "reconciliation"][-1]
        assert [n["inode"] for n in final["netns"]] == [ns.inode]
        assert final["netns"][0]["kernel"]["TcpOutRsts"] == 1
