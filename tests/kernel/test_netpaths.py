"""The network paths of netpaths.py, proven without a tracer: each scenario's Result must agree with the
kernel's counters and with the wire on every host, so a test that holds a tracer to a Result holds it to
what really happened. Counts and orders only; nothing here depends on the machine's speed."""
from __future__ import annotations

import os

import pytest

from netpaths import ClosedService, ForgottenConnection, Host, PathReset, Scenario

N = 3


def no_trace_left(s: Scenario) -> None:
    for h in s.hosts:
        assert not os.path.exists(f"/run/netns/{h.name}"), f"{h.name} is still there"
    for a in s.agents:
        assert a.proc.poll() is not None, f"agent {a.pid} in {a.host.name} still runs"


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_firewall_reset_in_front_of_a_live_service_refuses_every_attempt(root, backend):
    with ClosedService(backend=backend, answer="tcp-reset", connections=N) as s:
        r = s.run()
    no_trace_left(s)

    assert r.client_errors == ["ECONNREFUSED"] * N
    # nf_reject's RSTs: TCP neither counted them nor saw the SYNs (nothing reached the listener).
    server = r.delta[s.server.name]
    assert server["TcpOutRsts"] == 0 and server["TcpInSegs"] == 0 and server["TcpPassiveOpens"] == 0
    syns = r.packets(s.client, direction="out", proto="tcp", flags="S")
    assert [p.sport for p in syns] == r.client_ports
    sent = r.rsts(s.server, direction="out")
    assert [(p.src, p.sport, p.dst, p.dport) for p in sent] == [
        (s.server_addr, s.port, s.client_addr, port) for port in r.client_ports]
    # An RST to a SYN: seq 0, ACK of the SYN, no TCP options.
    assert [(p.flags, p.seq, p.ack, p.has_timestamp_option) for p in sent] == [
        ("RA", 0, syn.seq + 1, False) for syn in syns]
    arrived = r.rsts(s.client, direction="in")
    assert [(p.sport, p.dport, p.ttl) for p in arrived] == [(s.port, port, 64) for port in r.client_ports]
    assert r.delta[s.client.name]["TcpAttemptFails"] == N

    if backend == "nft":
        assert {k: s.rule[k] for k in ("family", "table", "chain")} == dict(family="inet", table="rtp_fw",
                                                                           chain="input")
    else:   # iptables-nft: an xt REJECT rule in nf_tables' ip filter INPUT
        assert {k: s.rule[k] for k in ("family", "table", "chain")} == dict(family="ip", table="filter",
                                                                           chain="INPUT")
    assert isinstance(s.rule["handle"], int)


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_firewall_port_unreachable_in_front_of_a_live_service_refuses_every_attempt(root, backend):
    with ClosedService(backend=backend, answer="icmp", connections=N) as s:
        r = s.run()
    no_trace_left(s)

    # Linux turns ICMP port unreachable to a SYN into ECONNREFUSED as well (at once here: see ClosedService).
    assert r.client_errors == ["ECONNREFUSED"] * N
    server, client = r.delta[s.server.name], r.delta[s.client.name]
    assert server["TcpOutRsts"] == 0 and server["TcpInSegs"] == 0
    assert server["IcmpOutDestUnreachs"] == N and client["IcmpInDestUnreachs"] == N
    assert not r.rsts(s.server) and not r.rsts(s.client)
    for host, direction in ((s.server, "out"), (s.client, "in")):
        icmps = r.packets(host, direction=direction, proto="icmp")
        # (sport, dport) are the quoted SYN's: the client's port → the service's
        assert [(p.src, p.dst, p.icmp_type, p.icmp_code, p.sport, p.dport) for p in icmps] == [
            (s.server_addr, s.client_addr, 3, 3, port, s.port) for port in r.client_ports]
    assert len(r.packets(s.client, direction="out", proto="tcp", flags="S")) == N     # no SYN sent twice


@pytest.mark.parametrize("after_bytes", [100, 5000])
def test_router_forges_the_servers_reset_after_a_byte_quota(root, after_bytes):
    with PathReset(after_bytes=after_bytes) as s:
        r = s.run()
    no_trace_left(s)

    assert r.client_errors == ["ECONNRESET"] and r.error_call == "recv"
    [port] = r.client_ports
    client, server, router = r.delta[s.client.name], r.delta[s.server.name], r.delta[s.router.name]
    # The server sent no RST and never saw the request; the router's RST is not TCP's either.
    assert server["TcpOutRsts"] == 0 and not r.rsts(s.server)
    assert not r.packets(s.server, direction="in", proto="tcp", flags="PA")
    assert router["TcpOutRsts"] == 0
    # The client took the RST at once: exactly in window, no challenge ACK, nothing sent back.
    assert client["TcpExtTCPChallengeACK"] == 0 and client["TcpOutRsts"] == 0 and client["TcpEstabResets"] == 1

    [request] = r.packets(s.client, direction="out", proto="tcp", flags="PA")
    assert request.payload_len == s.request_bytes
    [rst] = r.rsts(s.client, direction="in")
    assert (rst.src, rst.sport, rst.dst, rst.dport) == (s.server_addr, s.port, s.client_addr, port)
    assert (rst.flags, rst.seq) == ("R", request.ack)       # nf_reject: seq = the request's ack, no ACK bit
    # The tell: the server's segments were routed (63), the RST was not (64).
    assert (r.rst_ttl, r.server_ttl) == (64, 63)
    served = r.packets(s.client, direction="in", proto="tcp", src=s.server_addr)
    assert sum(p.payload_len for p in served) == r.response_bytes

    # On the router: the request came in from the client and went no further; the RST went back.
    assert [p.dport for p in r.packets(s.router, direction="in", ifname="to-client", flags="PA")] == [s.port]
    assert not r.packets(s.router, ifname="to-server", flags="PA", src=s.client_addr)
    [forged] = r.rsts(s.router, direction="out")
    assert forged.ifname == "to-client" and forged.src == s.server_addr
    assert {k: s.rule[k] for k in ("family", "table", "chain")} == dict(family="inet", table="rtp_fw", chain="forward")


@pytest.mark.parametrize("variant", ["no_listener", "listener"])
def test_server_that_forgot_a_connection_resets_the_clients_next_segment(root, variant):
    with ForgottenConnection(variant) as s:
        port = s.client_port
        before = s.sockets_before_run
        r = s.run()
    no_trace_left(s)

    # Set-up: the server kept no trace of the connection (only its listener, if it still listens);
    # the client still has it established.
    assert [c["state"] for c in before[s.client.name]] == ["ESTAB"]
    assert [c["state"] for c in before[s.server.name]] == (["LISTEN"] if variant == "listener" else [])

    assert r.client_errors == ["ECONNRESET"]
    assert r.delta[s.server.name]["TcpOutRsts"] == 1 and r.delta[s.client.name]["TcpOutRsts"] == 0
    [data] = r.packets(s.server, direction="in", proto="tcp", flags="PA")
    [rst] = r.rsts(s.server, direction="out")
    assert (rst.src, rst.sport, rst.dst, rst.dport) == (s.server_addr, s.port, s.client_addr, port)
    assert (rst.flags, rst.seq) == ("R", data.ack)
    [arrived] = r.rsts(s.client, direction="in")
    assert (arrived.seq, arrived.ttl) == (rst.seq, 64)


def test_reset_for_a_connection_the_client_forgot_is_dropped_in_silence(root):
    with ForgottenConnection("rst_in") as s:
        port = s.client_port
        before = s.sockets_before_run
        r = s.run()
    no_trace_left(s)

    assert before[s.client.name] == []
    assert "ESTAB" in [c["state"] for c in before[s.server.name]]
    assert r.client_errors == []
    server, client = r.delta[s.server.name], r.delta[s.client.name]
    assert server["TcpOutRsts"] == 1 and server["TcpEstabResets"] == 1
    # The RST arrived, and the client's netns sent nothing in answer.
    [rst] = r.rsts(s.client, direction="in")
    assert (rst.src, rst.sport, rst.dst, rst.dport, rst.flags) == (s.server_addr, s.port, s.client_addr, port, "RA")
    assert client["TcpInSegs"] == 1 and client["TcpOutRsts"] == 0 and client["TcpOutSegs"] == 0
    assert not r.packets(s.client, direction="out")


def test_router_answers_for_a_service_whose_conntrack_entry_is_gone(root):
    # kubernetes#74839: with the entry gone and nf_conntrack_tcp_loose=0, the client's next segment is
    # INVALID, escapes DNAT, and the router's own stack resets it from the service address.
    with ForgottenConnection("conntrack") as s:
        port = s.client_port
        r = s.run()
    no_trace_left(s)

    assert s.dnat == {"service": (s.service_addr, s.port), "backend": (s.server_addr, s.port)}
    assert s.service_addr != s.server_addr and s.conntrack_entry["state"] == "ESTABLISHED"
    assert r.client_errors == ["ECONNRESET"]
    router = r.delta[s.router.name]
    assert router["TcpOutRsts"] == 1 and router["TcpInSegs"] == 1
    [rst] = r.rsts(s.router, direction="out")
    assert (rst.ifname, rst.src, rst.sport, rst.dst, rst.dport) == ("to-client", s.service_addr, s.port,
                                                                     s.client_addr, port)
    [arrived] = r.rsts(s.client, direction="in")
    assert (arrived.src, arrived.ttl) == (s.service_addr, 64)
    # The backend saw nothing of it.
    assert r.wire[s.server.name] == [] and r.delta[s.server.name]["TcpInSegs"] == 0


def test_a_failed_set_up_leaves_no_netns_and_no_process(root):
    class Broken(ForgottenConnection):
        def forget(self):
            raise RuntimeError("set-up fails half-way")

    s = Broken("no_listener")
    with pytest.raises(RuntimeError):
        with s:
            pass
    assert len(s.hosts) == 2 and len(s.agents) == 2
    no_trace_left(s)


def test_hosts_have_unique_rtp_names_and_their_own_counters(root):
    with ClosedService(connections=1) as a, ClosedService(connections=1) as b:
        names = [h.name for h in a.hosts + b.hosts]
        assert len(set(names)) == 4 and all(n.startswith("rtp-") for n in names)
        assert all(h.inode == os.stat(f"/run/netns/{h.name}").st_ino for h in a.hosts + b.hosts)
        r = a.run()
        assert r.client_errors == ["ECONNREFUSED"]
        counters = b.client.counters()          # b saw none of a's traffic
        assert counters["TcpActiveOpens"] == 0 and "TcpExtTCPChallengeACK" in counters
        assert isinstance(b.client, Host)
