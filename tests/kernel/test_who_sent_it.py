"""Who really sent an RST (bpf/origin.bpf.c, tracer/enrich/origins.py), against the wire and the netns counters.

A REJECT's RSTs and forged RSTs need --origins (per-packet hooks, off by default); REJECTs answering
with ICMP and RSTs that find no connection are reported without it.

Each test builds a real network in private netns (tests/kernel/netpaths.py: veth, nftables and
iptables-nft rules, conntrack), starts rsttrace, makes the traffic, and holds rsttrace's records to
what tcpdump captured on each host and to what each netns's kernel counted. netpaths' own tests
(test_netpaths.py) prove those facts without a tracer.
"""
from __future__ import annotations

import pytest

from conftest import events
from netpaths import ClosedService, ForgottenConnection, PathReset

N = 3


def reconciliation_of(records: list[dict], inode: int) -> dict:
    [final] = [r for r in records if r["type"] == "summary"]
    [row] = [n for n in final["reconciliation"] if n["inode"] == inode]
    return row


def same_rule(named: dict, rule: dict) -> bool:
    return all(named[k] == rule[k] for k in ("family", "table", "chain", "handle"))


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_a_reject_with_tcp_reset_is_the_firewalls_not_tcps(tracer, backend):
    with ClosedService(backend=backend, answer="tcp-reset", connections=N) as s:
        t = tracer("--json", "--port", str(s.port), "--origins")
        r = s.run()
        records = t.stop()

    assert r.client_errors == ["ECONNREFUSED"] * N
    on_wire = r.rsts(s.server, direction="out")
    assert len(on_wire) == N and r.delta[s.server.name]["TcpOutRsts"] == 0
    sent = events(records, event="rst_sent")
    assert {e["reason"] for e in sent} == {"firewall_reject"}
    # One record per RST that left the server, with the RST's own addresses: the service's in whose
    # name it was sent, and each client port
    assert sorted((e["local"]["addr"], e["local"]["port"], e["remote"]["addr"], e["remote"]["port"]) for e in sent) \
        == sorted((p.src, p.sport, p.dst, p.dport) for p in on_wire)
    assert {e["netns"]["inode"] for e in sent} == {s.server.inode}
    assert {e["kernel_reason"] for e in sent} == {None}
    for e in sent:
        assert [rule for rule in e["firewall"]["rules"] if same_rule(rule, s.rule)], e["firewall"]
        assert "nf_send_reset" in e["evidence"]["callers"]
        assert "REJECT" in e["explanation"]
    if backend == "iptables":       # the rule as iptables-nft shows it
        assert "-j REJECT --reject-with tcp-reset" in sent[0]["firewall"]["rules"][0]["text"]

    # The client's side: each RST received names the firewall's RST of this host (same 4-tuple), and
    # the rule that made it
    received = events(records, event="rst_received")
    assert len(received) == N and {e["netns"]["inode"] for e in received} == {s.client.inode}
    for e in received:
        assert e["reset_by"]["reason"] == "firewall_reject"
        assert same_rule(e["origin"]["made_by"]["rules"][0], s.rule)

    # Reconciliation: TCP sent none (TcpOutRsts 0, rst_sent 0); the REJECT's RSTs apart, and each seen
    # leaving the server's device as not TCP's
    row = reconciliation_of(records, s.server.inode)
    assert row["kernel"]["TcpOutRsts"] == 0
    assert row["counted"].get("rst_sent", 0) == 0 and row["counted"]["firewall_reject"] == N
    dev = row["device_rsts"]
    assert (dev["by_tcp"], dev["not_by_tcp"], dev["tcp_dropped"], dev["unexplained"]) == (0, N, 0, 0)
    client = reconciliation_of(records, s.client.inode)
    assert client["kernel"]["TcpEstabResets"] == 0 or client["kernel"]["TcpEstabResets"] is None


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_a_reject_with_icmp_is_reported_though_no_rst_exists(tracer, backend):
    with ClosedService(backend=backend, answer="icmp", connections=N) as s:
        t = tracer("--json", "--port", str(s.port))
        r = s.run()
        records = t.stop()

    assert r.client_errors == ["ECONNREFUSED"] * N
    unreachables = r.packets(s.server, direction="out", proto="icmp")
    assert len(unreachables) >= N and not r.rsts(s.server) and not r.rsts(s.client)
    sent = events(records, event="rst_sent")
    assert {e["reason"] for e in sent} == {"firewall_reject_icmp"}
    assert {e["kernel_reason"] for e in sent} == {"PORT_UNREACHABLE"}
    # One per ICMP error that left, answering the SYN each quotes
    assert sorted((e["remote"]["port"], e["evidence"]["tcp_flags"] == ["SYN"]) for e in sent) \
        == sorted((p.sport, True) for p in unreachables)
    assert len(sent) == r.delta[s.server.name]["IcmpOutDestUnreachs"]
    for e in sent:
        assert [rule for rule in e["firewall"]["rules"] if same_rule(rule, s.rule)], e["firewall"]
        assert "port unreachable" in e["explanation"]
    row = reconciliation_of(records, s.server.inode)
    assert row["counted"].get("rst_sent", 0) == 0 and row["counted"]["firewall_reject"] == len(sent)
    assert "device_rsts" not in row          # without --origins, no program on every packet
    assert not events(records, event="rst_received")


def test_without_origins_a_rejects_rst_is_not_taken_for_tcps(tracer):
    with ClosedService(backend="nft", answer="tcp-reset", connections=N) as s:
        t = tracer("--json", "--port", str(s.port))
        r = s.run()
        records = t.stop()

    assert len(r.rsts(s.server, direction="out")) == N
    assert events(records, event="rst_sent") == []       # TcpOutRsts did not move either
    received = events(records, event="rst_received")
    assert len(received) == N and {e["reason"] for e in received} == {"peer_reset"}
    assert {e["reset_by"] is None for e in received} == {True} and not [e for e in received if "origin" in e]
    [summary] = [rec for rec in records if rec["type"] == "summary"]
    assert summary["origins"] is False
    assert any("hint: --origins" in line for line in t.stderr_lines)


@pytest.mark.parametrize("watch", ["every_netns", "client_netns_only"])
def test_a_reset_forged_on_the_path_is_told_by_its_ttl(tracer, watch):
    with PathReset() as s:
        args = ["--json", "--port", str(s.port), "--origins"]
        if watch == "client_netns_only":        # what a real client host sees: the router is elsewhere
            args += ["--netns", str(s.client.inode)]
        t = tracer(*args)
        r = s.run()
        records = t.stop()

    # What happened: the client was reset "by the server", which sent nothing
    assert r.client_errors == ["ECONNRESET"]
    assert r.delta[s.server.name]["TcpOutRsts"] == 0 and not r.rsts(s.server)
    assert r.delta[s.client.name]["TcpExtTCPChallengeACK"] == 0
    assert (r.rst_ttl, r.server_ttl) == (64, 63)

    [got] = events(records, event="rst_received")
    assert got["netns"]["inode"] == s.client.inode
    assert (got["local"]["port"], got["remote"]["addr"], got["remote"]["port"]) == (r.client_ports[0], s.server_addr,
                                                                                   s.port)
    assert got["reason"] == "suspected_injected"
    origin = got["origin"]
    assert (origin["ttl"], origin["peer_ttl"], origin["suspected_injected"]) == (r.rst_ttl, r.server_ttl, True)
    assert "TTL 64 where the peer's packets arrive with 63" in origin["evidence"]
    # The router is on this host: its rule is named, whatever netns rsttrace was told to watch
    assert origin["made_by"]["netns"]["inode"] == s.router.inode
    assert same_rule(origin["made_by"]["rules"][0], s.rule)
    assert "on the path" in got["explanation"]

    sent = events(records, event="rst_sent")
    assert not [e for e in sent if e["netns"]["inode"] == s.server.inode]     # the server sent nothing
    if watch == "every_netns":
        [made] = sent
        assert (made["reason"], made["netns"]["inode"]) == ("firewall_reject", s.router.inode)
        assert (made["local"]["addr"], made["remote"]["port"]) == (s.server_addr, r.client_ports[0])
    else:
        assert sent == []


@pytest.mark.parametrize("variant", ["no_listener", "listener"])
def test_a_connection_the_server_forgot_is_reset_for_no_socket(tracer, variant):
    with ForgottenConnection(variant) as s:
        t = tracer("--json", "--port", str(s.port))
        r = s.run()
        records = t.stop()

    assert r.client_errors == ["ECONNRESET"]
    on_wire = r.rsts(s.server, direction="out")
    assert len(on_wire) == r.delta[s.server.name]["TcpOutRsts"] == 1
    [sent] = events(records, event="rst_sent")
    assert sent["reason"] == "no_socket" and sent["netns"]["inode"] == s.server.inode
    assert sent["kernel_reason"] == ("NO_SOCKET" if variant == "no_listener" else "TCP_FLAGS")
    if variant == "listener":       # answered by the listener: the 4-tuple comes from the segment
        assert sent["state"] == "LISTEN"
    [p] = on_wire
    assert (sent["local"]["addr"], sent["local"]["port"], sent["remote"]["addr"], sent["remote"]["port"]) == \
        (p.src, p.sport, p.dst, p.dport)
    # The client's RST is genuine: the server's stack sent it
    [got] = events(records, event="rst_received")
    assert got["reason"] == "peer_reset" and got["reset_by"]["reason"] == "no_socket"
    assert not got.get("origin", {}).get("suspected_injected")
    row = reconciliation_of(records, s.server.inode)
    assert row["counted"]["rst_sent"] == row["kernel"]["TcpOutRsts"] == 1


def test_an_rst_for_a_connection_this_host_forgot_is_reported(tracer):
    with ForgottenConnection("rst_in") as s:
        t = tracer("--json", "--port", str(s.port))
        r = s.run()
        records = t.stop()

    arrived = r.rsts(s.client, direction="in")
    assert len(arrived) == 1 and r.delta[s.client.name]["TcpOutRsts"] == 0
    got = [e for e in events(records, event="rst_received") if e["netns"]["inode"] == s.client.inode]
    assert len(got) == 1
    [e] = got
    assert (e["reason"], e["kernel_reason"], e["state"]) == ("no_socket", "NO_SOCKET", None)
    [p] = arrived
    assert (e["local"]["port"], e["remote"]["addr"], e["remote"]["port"]) == (p.dport, p.src, p.sport)
    assert "no longer has" in e["explanation"]
    # the server's abort that sent it, as TCP's own
    [sent] = [x for x in events(records, event="rst_sent") if x["netns"]["inode"] == s.server.inode]
    assert sent["reason"] == "linger_zero"


def test_conntrack_state_lost_on_the_way_is_a_reset_from_the_nat_host_itself(tracer):
    with ForgottenConnection("conntrack") as s:
        t = tracer("--json", "--port", str(s.port))
        r = s.run()
        records = t.stop()

    assert r.client_errors == ["ECONNRESET"]
    assert r.delta[s.router.name]["TcpOutRsts"] == 1 and not r.rsts(s.server)
    [sent] = events(records, event="rst_sent")
    # The INVALID segment skipped DNAT and met the router's own stack: no socket for the service address
    assert (sent["reason"], sent["kernel_reason"], sent["netns"]["inode"]) == ("no_socket", "NO_SOCKET", s.router.inode)
    assert (sent["local"]["addr"], sent["local"]["port"]) == s.dnat["service"]
    # ... from an address the router's DNAT rule rewrites: told apart from an ordinary forgotten connection
    backend = "%s:%d" % s.dnat["backend"]
    assert [rule for rule in sent["nat"]["dnat_rules"] if f"dnat to {backend}" in rule], sent["nat"]
    assert sent["nat"]["conntrack"] == []            # the entry was deleted (conntrack -D)
    assert "skipped DNAT because conntrack marked it INVALID" in sent["explanation"]


CONNECT = """
import socket, sys
for port in sys.argv[1:]:
    s = socket.socket()
    s.settimeout(0.4)
    try:
        s.connect(("127.0.0.1", int(port)))
    except OSError:
        pass
    s.close()
"""


def test_every_rst_tcp_counted_left_a_device_or_was_dropped_on_the_way(tracer, netns):
    """The third count beside TcpOutRsts and rst_sent: RSTs leaving the devices, and TCP's RSTs freed on
    their way out (here: an OUTPUT rule drops the refusals of one port)."""
    netns.run("sh", "-c", "nft add table inet rt_out && nft add chain inet rt_out out '{ type filter hook output "
              "priority 0; }' && nft add rule inet rt_out out tcp sport 8312 tcp flags rst drop")
    t = tracer("--json", "--port", "8311", "--port", "8312", "--origins", "--netns", str(netns.inode))
    before = netns.counters()
    netns.run("/usr/bin/python3", "-c", CONNECT, "8311", "8311", "8312", "8312", "8312")
    after = netns.counters()
    records = t.stop()

    out_rsts = after["TcpOutRsts"] - before["TcpOutRsts"]
    sent = events(records, event="rst_sent")
    assert out_rsts >= 5 and len(sent) == out_rsts       # each refused SYN, retransmits included
    dev = reconciliation_of(records, netns.inode)["device_rsts"]
    refused_8311 = len([e for e in sent if e["local"]["port"] == 8311])
    assert (dev["by_tcp"], dev["tcp_dropped"], dev["not_by_tcp"], dev["forwarded"]) == (
        refused_8311, out_rsts - refused_8311, 0, 0)
    assert dev["unexplained"] == 0


def test_ipv6_a_rejects_rst_and_tcps_own_reply_are_told_apart(tracer, netns):
    """IPv6: TCP's replies leave without a socket on the skb, like a REJECT's; tcp_v6_send_response() on
    the stack tells them apart."""
    netns.run("sh", "-c", "nft add table inet rt6 && nft add chain inet rt6 in '{ type filter hook input priority 0; }'"
              " && nft add rule inet rt6 in tcp dport 8321 reject with tcp reset")
    t = tracer("--json", "--port", "8321", "--port", "8322", "--origins", "--netns", str(netns.inode))
    before = netns.counters()
    netns.run("/usr/bin/python3", "-c", CONNECT.replace('"127.0.0.1"', '"::1"').replace("socket.socket()",
              "socket.socket(socket.AF_INET6)"), "8321", "8322")
    after = netns.counters()
    records = t.stop()

    sent = events(records, event="rst_sent")
    assert sorted((e["local"]["port"], e["reason"], e["family"]) for e in sent) == [
        (8321, "firewall_reject", "ipv6"), (8322, "no_listener", "ipv6")]
    assert after["TcpOutRsts"] - before["TcpOutRsts"] == 1
    dev = reconciliation_of(records, netns.inode)["device_rsts"]
    assert (dev["by_tcp"], dev["not_by_tcp"], dev["unexplained"]) == (1, 1, 0)
