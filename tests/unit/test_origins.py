"""Who really sent a reset, in user space: classification of the origin hooks' events, a received RST's
comparison with its flow's handshake, and the explanations (tracer/enrich/origins.py). The kernel side
is tested against real REJECT rules, routers and forgotten connections in tests/kernel/test_who_sent_it.py."""
from __future__ import annotations

from types import SimpleNamespace

from tracer.enrich import origins, reasons
from tracer.enrich.firewall import DnatRule, RejectRule, Suspects
from tracer.events.decode import Event

RULE = RejectRule(family="inet", table="fw", chain="forward", handle=7, answer="tcp reset",
                  text="tcp dport 8302 reject with tcp reset", packets=None)


def event(kind: str, **fields) -> Event:
    base = dict(kind=kind, ktime_ns=5_000_000_000, time_ns=0, family="ipv4", local_addr="10.0.1.2", local_port=40000,
                remote_addr="10.0.2.2", remote_port=8302, state="ESTABLISHED", netns=111, kernel_reason=None,
                softirq=True, task_pid=0, task_comm="swapper/0", task_uid=0, skaddr=0xffff1, sock_cookie=0,
                sock_ino=0, unread_bytes=0, linger=False, linger_jiffies=0, orphan=False, tcp_flags=0, callers=[])
    base.update(fields)
    return Event(**base)


class FakeProgram:
    def __init__(self, look=None, made=None):
        self.look, self.made = look, made
        self.asked: list[tuple] = []

    def rst_look(self, netns, family, lport, rport, laddr, raddr):
        self.asked.append(("rst_look", netns, family, lport, rport, laddr, raddr))
        return self.look

    def made_rst(self, family, lport, rport, laddr, raddr):
        self.asked.append(("made_rst", family, lport, rport, laddr, raddr))
        return self.made


class FakeRules:
    def __init__(self, found: Suspects, dnat=(), entries=None):
        self.found, self.dnat, self.entries = found, list(dnat), entries
        self.asked: list[tuple] = []

    def dnat_for(self, netns, addr, port, *, protocol="tcp"):
        self.asked.append(("dnat_for", netns, addr, port))
        return self.dnat

    def conntrack_entries(self, netns, *, orig_dst, orig_dport, orig_src=None, orig_sport=None):
        self.asked.append(("conntrack", netns, orig_dst, orig_dport, orig_src, orig_sport))
        return self.entries

    def suspects(self, netns, answer, *, port=None, family=None, protocol="tcp"):
        self.asked.append((netns, answer, port, family))
        return self.found


def look(ttl, peer_ttl, ts=0, peer_ts=1, at=5_000_000_000):
    return SimpleNamespace(seen_ns=at, ttl=ttl, timestamps=ts, peer_ttl=peer_ttl, peer_timestamps=peer_ts,
                           not_from_peer=int(bool(peer_ttl) and ttl != peer_ttl))


def test_the_origin_hooks_events_get_their_reasons():
    assert reasons.classify_fields("rst_sent", hook="net_dev_queue") == "firewall_reject"
    assert reasons.classify_fields("rst_sent", hook="icmp_send", kernel_reason="PORT_UNREACHABLE") == "firewall_reject_icmp"
    assert reasons.classify_fields("rst_received", verdict="rst_not_from_peer") == "suspected_injected"
    assert reasons.classify_fields("rst_received", kernel_reason="NO_SOCKET") == "no_socket"
    assert reasons.classify_fields("rst_received") == "peer_reset"
    # a listener's answer to a segment of a connection it does not have: the connection is forgotten
    assert reasons.classify_fields("rst_sent", kernel_reason="TCP_FLAGS", state="LISTEN", tcp_flags=0x18) == "no_socket"
    assert reasons.classify_fields("rst_sent", kernel_reason="TCP_FLAGS", state="ESTABLISHED") == "invalid_segment"
    # the same before 6.10, told from the callers: tcp_v4_send_reset from a listener, an ACK without SYN
    assert reasons.classify_fields("rst_sent", callers=["tcp_v4_send_reset"], state="LISTEN", tcp_flags=0x10) \
        == "no_socket"
    assert reasons.classify_fields("rst_sent", callers=["tcp_v4_send_reset"], state="LISTEN", tcp_flags=0x10,
                                   queue_full=True) == "accept_queue_full"


def test_a_received_rst_is_compared_with_the_peers_handshake():
    prog = FakeProgram(look=look(64, 63))
    o = origins.Origins(prog, rules=FakeRules(Suspects()))
    ev = event("rst_received", reason="suspected_injected")
    o.note(ev)
    got = ev.extra["origin"]
    assert (got["ttl"], got["peer_ttl"], got["suspected_injected"]) == (64, 63, True)
    assert got["evidence"] == ("TTL 64 where the peer's packets arrive with 63; no timestamp option though the flow "
                               "uses them (weak: TCP's RSTs for no socket have none)")
    assert "made_by" not in got
    # looked up under the flow as this end sees it
    assert prog.asked[0][:5] == ("rst_look", 111, 2, 40000, 8302)


def test_a_flow_that_began_before_rsttrace_has_nothing_to_compare_with():
    o = origins.Origins(FakeProgram(look=look(64, 0, peer_ts=0)), rules=FakeRules(Suspects()))
    ev = event("rst_received", reason="peer_reset")
    o.note(ev)
    assert ev.extra["origin"]["peer_ttl"] is None and ev.extra["origin"]["suspected_injected"] is False
    assert "nothing to compare with" in ev.extra["origin"]["evidence"]


def test_an_old_look_is_not_this_rsts():
    o = origins.Origins(FakeProgram(look=look(64, 63, at=1_000_000_000)), rules=FakeRules(Suspects()))
    ev = event("rst_received", reason="peer_reset")
    o.note(ev)
    assert "origin" not in ev.extra


def test_a_reject_on_this_host_that_made_the_rst_is_named_with_its_rule():
    rules = FakeRules(Suspects([RULE], inferred=True, how="only rule"))
    made = SimpleNamespace(seen_ns=4_999_000_000, netns=222)
    o = origins.Origins(FakeProgram(look=look(64, 63), made=made), rules=rules, netns_name={222: "router"}.get)
    ev = event("rst_received", reason="suspected_injected")
    o.note(ev)
    by = ev.extra["origin"]["made_by"]
    assert by["netns"] == {"inode": 222, "name": "router"}
    assert by["rules"][0]["handle"] == 7 and by["how"] == "only rule"
    assert rules.asked == [(222, "tcp reset", 8302, "ipv4")]     # the service port: the RST's source
    text = origins.explain(ev, "curl (pid 9)")
    assert text.startswith("curl (pid 9)'s connection 10.0.1.2:40000 ↔ 10.0.2.2:8302 was reset in the peer's name")
    assert "TTL 64 where the peer's packets arrive with 63" in text
    assert "made on this host by rule inet fw forward handle 7: tcp dport 8302 reject with tcp reset in netns router " \
           "(likely: only rule)" in text


def test_a_reject_names_its_rule_and_says_how_sure():
    found = Suspects([RULE], inferred=False, how="counter moved")
    o = origins.Origins(FakeProgram(), rules=FakeRules(found), netns_name={111: "shop"}.get)
    ev = event("rst_sent", reason="firewall_reject", local_port=8302, remote_port=40000)
    o.note(ev)
    assert ev.extra["firewall"]["inferred"] is False
    text = origins.explain(ev, "")
    assert text == ("RST to 10.0.2.2:40000 made by a firewall REJECT in the name of 10.0.1.2:8302, not by TCP (TcpOutRsts "
                    "does not count it; the service never saw the segment): rule inet fw forward handle 7: tcp dport "
                    "8302 reject with tcp reset in netns shop — change the rule or allow the client")
    none = origins.Origins(FakeProgram(), rules=FakeRules(Suspects(how="netns gone")), netns_name=lambda i: None)
    ev2 = event("rst_sent", reason="firewall_reject_icmp", kernel_reason="ADMIN_PROHIBITED")
    none.note(ev2)
    assert "answered with ICMP admin prohibited" in origins.explain(ev2, "")
    assert "no REJECT rule found in netns 111 now (netns gone)" in origins.explain(ev2, "")


def test_an_rst_for_no_connection_says_the_peer_still_had_it():
    ev = event("rst_received", reason="no_socket", kernel_reason="NO_SOCKET", state=None)
    assert "a connection this host no longer has" in origins.explain(ev, "")
    assert origins.explain(event("rst_received", reason="peer_reset"), "x") is None


def test_an_rst_for_no_socket_from_a_dnat_address_says_the_segment_skipped_nat():
    dnat = DnatRule(family="ip", table="nat", chain="prerouting", handle=3, text="ip daddr 10.0.1.1 tcp dport 8303 "
                    "dnat to 10.0.2.2:8303", daddrs=("10.0.1.1",), ports=((8303, 8303),), to="10.0.2.2:8303")
    rules = FakeRules(Suspects(), dnat=[dnat], entries=[])
    o = origins.Origins(FakeProgram(), rules=rules)
    ev = event("rst_sent", reason="no_socket", kernel_reason="NO_SOCKET", local_addr="10.0.1.1", local_port=8303,
               remote_addr="10.0.1.2", remote_port=40000, state=None)
    o.note(ev)
    assert ev.extra["nat"] == {"dnat_rules": ["ip nat prerouting handle 3: ip daddr 10.0.1.1 tcp dport 8303 dnat to "
                                              "10.0.2.2:8303"], "conntrack": []}
    assert ("conntrack", 111, "10.0.1.1", 8303, "10.0.1.2", 40000) in rules.asked
    text = origins.explain(ev, "")
    assert "skipped DNAT because conntrack marked it INVALID" in text
    assert "no conntrack entry for it now" in text and "kubernetes#74839" in text
    # an ordinary forgotten connection: no DNAT rule for the address, no nat block, the catalog's text
    plain = event("rst_sent", reason="no_socket", kernel_reason="NO_SOCKET")
    origins.Origins(FakeProgram(), rules=FakeRules(Suspects())).note(plain)
    assert "nat" not in plain.extra and origins.explain(plain, "") is None
