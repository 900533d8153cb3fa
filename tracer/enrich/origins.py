"""Who really sent a reset: the firewall rule behind a REJECT, and whether a received RST came from the peer.

bpf/origin.bpf.c reports RSTs (and ICMP errors) that TCP did not make, and keeps two small maps that
this module reads per event: `rst_looks`, each received RST's TTL and timestamp option beside those of
its flow's handshake, and `made_rsts`, the RSTs made outside TCP on this host, by the flow their
receiver sees. Rules are named from the netns's ruleset (enrich/firewall.py).
"""
from __future__ import annotations

import socket
from typing import Any

from ..events.decode import Event
from .firewall import FirewallRules, describe, describe_dnat

FIREWALL_REASONS = ("firewall_reject", "firewall_reject_icmp")
# How long after it was made a REJECT's RST still names the rule behind an RST received for its flow.
MADE_RST_WINDOW_NS = 2_000_000_000
ICMP_ANSWERS = {"PORT_UNREACHABLE": "ICMP port unreachable", "PROT_UNREACHABLE": "ICMP protocol unreachable",
                "NET_PROHIBITED": "ICMP net prohibited", "HOST_PROHIBITED": "ICMP host prohibited",
                "ADMIN_PROHIBITED": "ICMP admin prohibited"}


def _packed(ev: Event) -> tuple[int, bytes, bytes]:
    family = socket.AF_INET6 if ev.family == "ipv6" else socket.AF_INET
    return family, socket.inet_pton(family, ev.local_addr), socket.inet_pton(family, ev.remote_addr)


class Origins:
    def __init__(self, program, rules: FirewallRules | None = None, netns_name=lambda inode: None):
        """program: the loaded RstProgram (its rst_look/made_rst readers); netns_name: inode → name."""
        self.program = program
        self.rules = rules if rules is not None else FirewallRules()
        self.netns_name = netns_name

    def note(self, ev: Event) -> None:
        """Before the explanation: the rule of a REJECT; a received RST's looks and maker."""
        if ev.reason in FIREWALL_REASONS:
            ev.extra["firewall"] = self.firewall(ev.netns, "tcp reset" if ev.reason == "firewall_reject" else "icmp",
                                                 ev.local_port, ev.family)
        elif ev.kind == "rst_received":
            origin = self.received(ev)
            if origin:
                ev.extra["origin"] = origin
        elif ev.kind == "rst_sent" and ev.reason == "no_socket":
            nat = self.skipped_dnat(ev)
            if nat:
                ev.extra["nat"] = nat

    def skipped_dnat(self, ev: Event) -> dict[str, Any] | None:
        """An RST for no socket from an address:port a DNAT rule of its netns rewrites: the segment should
        have gone to the backend, and reached this host's own stack instead — conntrack marked it INVALID
        (its entry lost, or the segment out of window) and it skipped NAT (kubernetes#74839)."""
        rules = self.rules.dnat_for(ev.netns, ev.local_addr, ev.local_port)
        if not rules:
            return None
        entries = self.rules.conntrack_entries(ev.netns, orig_dst=ev.local_addr, orig_dport=ev.local_port,
                                               orig_src=ev.remote_addr, orig_sport=ev.remote_port)
        return {"dnat_rules": [describe_dnat(r) for r in rules],
                "conntrack": None if entries is None else [
                    {"state": e.get("state"), "dnat": e.get("dnat"), "flags": e.get("flags")} for e in entries]}

    def firewall(self, netns: int, answer: str, port: int, family: str) -> dict[str, Any]:
        found = self.rules.suspects(netns, answer, port=port, family=family)
        return {"netns": {"inode": netns, "name": self.netns_name(netns)},
                "rules": [{"family": r.family, "table": r.table, "chain": r.chain, "handle": r.handle,
                           "text": describe(r), "origin": r.origin} for r in found.rules],
                "inferred": found.inferred, "how": found.how}

    def received(self, ev: Event) -> dict[str, Any] | None:
        family, laddr, raddr = _packed(ev)
        origin: dict[str, Any] = {}
        look = self.program.rst_look(ev.netns, family, ev.local_port, ev.remote_port, laddr, raddr)
        if look is not None and abs(ev.ktime_ns - look.seen_ns) < MADE_RST_WINDOW_NS:
            origin.update({
                "ttl": look.ttl, "timestamps": bool(look.timestamps),
                "peer_ttl": look.peer_ttl or None,
                "peer_timestamps": bool(look.peer_timestamps) if look.peer_ttl else None,
                "suspected_injected": bool(look.not_from_peer),
                "evidence": evidence(look),
            })
        made = self.program.made_rst(family, ev.local_port, ev.remote_port, laddr, raddr)
        if made is not None and 0 <= ev.ktime_ns - made.seen_ns < MADE_RST_WINDOW_NS:
            origin["made_by"] = self.firewall(made.netns, "tcp reset", ev.remote_port, ev.family)
        return origin or None


def evidence(look) -> str:
    """The comparison in words. The TTL is the strong signal; a missing timestamp option is weak (TCP's own
    RSTs for no socket carry no options either)."""
    if not look.peer_ttl:
        return f"TTL {look.ttl}; no handshake of this flow seen (it began before rsttrace): nothing to compare with"
    if look.not_from_peer:
        text = f"TTL {look.ttl} where the peer's packets arrive with {look.peer_ttl}"
    else:
        text = f"TTL {look.ttl}, as the peer's packets"
    if look.peer_timestamps and not look.timestamps:
        text += "; no timestamp option though the flow uses them (weak: TCP's RSTs for no socket have none)"
    return text


def rule_text(firewall: dict[str, Any]) -> str:
    """The rule(s) a `firewall` block names, for an explanation."""
    rules = firewall["rules"]
    where = firewall["netns"]["name"] or firewall["netns"]["inode"]
    if not rules:
        return f"no REJECT rule found in netns {where} now ({firewall['how']})"
    if len(rules) == 1:
        hedge = "" if firewall["how"] == "counter moved" and not firewall["inferred"] else " (likely: " + firewall["how"] + ")"
        return f"rule {rules[0]['text']} in netns {where}{hedge}"
    return f"one of {len(rules)} REJECT rules in netns {where} ({firewall['how']}): {rules[0]['text']}; ..."


def explain(ev: Event, who: str) -> str | None:
    """The explanation of the reasons this module knows more about, or None."""
    if ev.reason == "firewall_reject":
        fw = ev.extra.get("firewall")
        named = rule_text(fw) if fw else "a REJECT rule"
        return (f"RST to {ev.remote} made by a firewall REJECT in the name of {ev.local}, not by TCP (TcpOutRsts does "
                f"not count it; the service never saw the segment): {named} — change the rule or allow the client")
    if ev.reason == "firewall_reject_icmp":
        fw = ev.extra.get("firewall")
        named = rule_text(fw) if fw else "a REJECT rule"
        answer = ICMP_ANSWERS.get(ev.kernel_reason or "", "ICMP unreachable")
        return (f"segment from {ev.remote} to {ev.local} answered with {answer} by a firewall REJECT (no RST: the "
                f"client sees \"Connection refused\"): {named} — change the rule, or give the service endpoints")
    origin = ev.extra.get("origin") or {}
    if ev.reason == "suspected_injected":
        made = origin.get("made_by")
        sender = f"; made on this host by {rule_text(made)}" if made else ""
        return (f"{who}'s connection {ev.local} ↔ {ev.remote} was reset in the peer's name by something on the path, "
                f"not by the peer's stack: {origin.get('evidence', 'its TTL differs from the peer')}{sender} — look "
                f"at firewalls, load balancers and IPS between the two, not at the peer")
    nat = ev.extra.get("nat")
    if ev.reason == "no_socket" and nat:
        live = nat["conntrack"]
        entry = ("; its conntrack entry is still there: the segment was out of window" if live else
                 "; no conntrack entry for it now: the entry expired or was deleted" if live is not None else "")
        return (f"{ev.local} has no connection from {ev.remote}, but {ev.local} is a DNAT address "
                f"({nat['dnat_rules'][0]}): the segment skipped DNAT because conntrack marked it INVALID, and this "
                f"host's own stack reset it{entry} — drop INVALID packets before they reach the stack (ct state "
                f"invalid drop) or set net.netfilter.nf_conntrack_tcp_be_liberal=1 (kubernetes#74839)")
    if ev.kind == "rst_received" and ev.reason == "no_socket":
        return (f"an RST from {ev.remote} reached {ev.local}, a connection this host no longer has: the peer still "
                f"had it — this end restarted or forgot it, NAT/conntrack state expired, or a load balancer "
                f"failed over; compare idle timeouts and look for restarts")
    return None
