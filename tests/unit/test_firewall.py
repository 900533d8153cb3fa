"""Naming the netfilter REJECT rule behind a reset or an ICMP unreachable, and the DNAT rules and
conntrack entries of an address a reset came from (tracer/enrich/firewall.py).

Parsing runs on outputs captured on nftables 1.0.6 / iptables-nft 1.8.9 / conntrack-tools 1.4.7
(tests/data/nft/): a netns with native nft rules (native.*), one with iptables-nft and ip6tables-nft
rules (iptables*), one with DNAT rules of both kinds, kube-proxy's chains among them (dnat*, made by
dnat.sh), and a router's conntrack entries (conntrack.txt, dnat.sh too). The rest builds such
rulesets in private netns, sends traffic into them, and reads them back as rsttrace does: `nft` and
`conntrack` run inside the netns.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tests_paths import DATA
from tracer.enrich import firewall
from tracer.enrich.firewall import (DnatRule, FirewallRules, RejectRule, conntrack_lines, describe, describe_dnat,
                                    dnat_rules, matching_dnat, reject_rules)

NFT = DATA / "nft"


def captured(name: str) -> list[RejectRule]:
    saves = {}
    if name == "iptables":
        saves = {"ip": (NFT / "iptables-save.txt").read_text(), "ip6": (NFT / "ip6tables-save.txt").read_text()}
    return reject_rules(json.loads((NFT / f"{name}.json").read_text()), (NFT / f"{name}.txt").read_text(), saves)


def by_handle(rules: list[RejectRule], family: str, table: str, handle: int) -> RejectRule:
    [rule] = [r for r in rules if (r.family, r.table, r.handle) == (family, table, handle)]
    return rule


# -- parsing captured outputs ---------------------------------------------------------------------

def test_native_reject_rules_are_named_with_their_table_chain_handle_and_text():
    rules = captured("native")
    assert [(r.family, r.table, r.chain, r.handle) for r in rules] == [
        ("inet", "rtf_fw", "input", 3), ("inet", "rtf_fw", "input", 4), ("inet", "rtf_fw", "input", 6),
        ("inet", "rtf_fw", "input", 7), ("inet", "rtf_fw", "input", 9), ("inet", "rtf_fw", "input", 10),
        ("inet", "rtf_fw", "input", 11), ("ip", "rtf_v4", "routed", 2)]      # handle 8 accepts: not one
    reset = by_handle(rules, "inet", "rtf_fw", 3)
    assert reset.answer == "tcp reset" and reset.origin == "nft" and reset.packets is None
    assert reset.text == "tcp dport 8100 reject with tcp reset"
    assert describe(reset) == "inet rtf_fw input handle 3: tcp dport 8100 reject with tcp reset"


def test_a_bare_reject_is_named_by_what_it_sends_in_its_family():
    rules = captured("native")
    assert by_handle(rules, "inet", "rtf_fw", 4).answer == "icmpx port-unreachable"
    assert by_handle(rules, "inet", "rtf_fw", 9).answer == "icmpx port-unreachable"
    assert by_handle(rules, "inet", "rtf_fw", 6).answer == "icmpx admin-prohibited"
    assert by_handle(rules, "inet", "rtf_fw", 7).answer == "icmp port-unreachable"
    assert by_handle(rules, "inet", "rtf_fw", 11).answer == "icmpv6 admin-prohibited"
    assert by_handle(rules, "ip", "rtf_v4", 2).answer == "icmp host-prohibited"
    bare_v4 = {"nftables": [{"rule": {"family": "ip", "table": "t", "chain": "c", "handle": 2,
                                      "expr": [{"reject": None}]}}]}
    assert reject_rules(bare_v4)[0].answer == "icmp port-unreachable"


def test_literal_ports_sets_and_ranges_are_kept_and_named_sets_are_not():
    rules = captured("native")
    assert by_handle(rules, "inet", "rtf_fw", 3).ports == ((8100, 8100),)
    assert by_handle(rules, "inet", "rtf_fw", 6).ports == ((8102, 8102), (8103, 8103))
    assert by_handle(rules, "inet", "rtf_fw", 7).ports == ((8104, 8106),)
    assert by_handle(rules, "inet", "rtf_fw", 10).ports == ()           # tcp dport @blocked
    assert by_handle(rules, "ip", "rtf_v4", 2).ports == ()              # tcp dport != 22
    assert by_handle(rules, "ip", "rtf_v4", 2).protocols == {"tcp"}
    assert by_handle(rules, "inet", "rtf_fw", 7).protocols == set()     # th dport: any transport
    assert by_handle(rules, "inet", "rtf_fw", 9).protocols == {"udp"}


def test_counters_are_read_where_the_rule_has_one():
    rules = captured("native")
    assert by_handle(rules, "inet", "rtf_fw", 4).packets == 0
    assert by_handle(rules, "inet", "rtf_fw", 3).packets is None


def test_a_comment_with_braces_and_set_elements_do_not_confuse_the_rule_text():
    rules = captured("native")
    assert by_handle(rules, "inet", "rtf_fw", 10).text == (
        'tcp dport @blocked counter packets 0 bytes 0 reject with tcp reset comment "blocked { ports }"')
    assert all(r.text for r in rules)


def test_iptables_nft_reject_rules_show_the_command_line_iptables_prints():
    rules = captured("iptables")
    reset = by_handle(rules, "ip", "filter", 2)
    assert reset.origin == "iptables-nft" and reset.answer == "tcp reset" and reset.chain == "INPUT"
    assert reset.iptables == "-A INPUT -p tcp -m tcp --dport 8200 -j REJECT --reject-with tcp-reset"
    assert describe(reset) == ("ip filter INPUT (iptables-nft): "
                               "-A INPUT -p tcp -m tcp --dport 8200 -j REJECT --reject-with tcp-reset")
    assert reset.text == "tcp dport 8200 counter packets 0 bytes 0 reject with tcp reset"


def test_an_inserted_iptables_rule_is_matched_by_its_place_in_the_chain():
    # `iptables -I INPUT 1` made handle 9, listed first by nft and by iptables-nft-save alike.
    rules = captured("iptables")
    first = by_handle(rules, "ip", "filter", 9)
    assert first.iptables == "-A INPUT -p udp -m udp --dport 53 -j REJECT --reject-with icmp-port-unreachable"
    assert first.answer == "icmp port-unreachable" and first.protocols == {"udp"}


def test_iptables_reject_with_types_become_nft_names():
    rules = captured("iptables")
    assert by_handle(rules, "ip", "filter", 3).answer == "icmp port-unreachable"
    assert by_handle(rules, "ip", "filter", 4).answer == "icmp host-prohibited"
    assert by_handle(rules, "ip", "filter", 7).answer == "icmp admin-prohibited"
    assert by_handle(rules, "ip", "filter", 7).chain == "RTF_CHAIN"
    assert by_handle(rules, "ip6", "filter", 2).answer == "tcp reset"
    assert by_handle(rules, "ip6", "filter", 3).answer == "icmpv6 admin-prohibited"


def test_multiport_ports_come_from_the_iptables_line():
    # nft's JSON holds `-m multiport` as an opaque xt match: only iptables-nft-save shows the ports.
    multiport = by_handle(captured("iptables"), "ip", "filter", 4)
    assert multiport.ports == ((8202, 8202), (8203, 8203), (8210, 8219))
    negated = by_handle(captured("iptables"), "ip6", "filter", 3)
    assert negated.ports == () and negated.protocols == {"tcp"}


def test_without_iptables_nft_save_the_answer_comes_from_nfts_translation():
    data = json.loads((NFT / "iptables.json").read_text())
    rules = reject_rules(data, (NFT / "iptables.txt").read_text())
    assert all(r.origin == "iptables-nft" and r.iptables is None for r in rules)
    assert by_handle(rules, "ip", "filter", 2).answer == "tcp reset"
    assert by_handle(rules, "ip", "filter", 4).answer == "icmp host-prohibited"
    assert by_handle(rules, "ip6", "filter", 3).answer == "icmpv6 admin-prohibited"
    assert describe(by_handle(rules, "ip", "filter", 2)) == (
        "ip filter INPUT handle 2 (iptables-nft): tcp dport 8200 counter packets 0 bytes 0 reject with tcp reset")
    # Neither the save nor the text: the rule is still a REJECT, of a type nobody could say.
    assert by_handle(reject_rules(data), "ip", "filter", 2).answer == "reject"


def test_a_chain_that_changed_between_the_reads_gets_no_iptables_line():
    data = json.loads((NFT / "iptables.json").read_text())
    save = (NFT / "iptables-save.txt").read_text().replace(
        "-A INPUT -p tcp -m tcp --dport 8204 -j ACCEPT\n", "")
    rules = reject_rules(data, (NFT / "iptables.txt").read_text(), {"ip": save})
    assert by_handle(rules, "ip", "filter", 2).iptables is None                 # INPUT: 6 rules, 5 lines
    assert by_handle(rules, "ip", "filter", 7).iptables is not None             # RTF_CHAIN: unchanged


def test_a_table_iptables_calls_incompatible_keeps_nfts_text():
    data = json.loads((NFT / "iptables.json").read_text())
    rules = reject_rules(data, (NFT / "iptables.txt").read_text(),
                         {"ip": "# Table `filter' is incompatible, use 'nft' tool.\n"})
    assert by_handle(rules, "ip", "filter", 2).iptables is None
    assert by_handle(rules, "ip", "filter", 2).answer == "tcp reset"


# -- DNAT rules and conntrack entries from captured outputs ----------------------------------------

def captured_dnat(saves: bool = True) -> list[DnatRule]:
    kept = {"ip": (NFT / "dnat-iptables-save.txt").read_text(),
            "ip6": (NFT / "dnat-ip6tables-save.txt").read_text()} if saves else {}
    return dnat_rules(json.loads((NFT / "dnat.json").read_text()), (NFT / "dnat.txt").read_text(), kept)


def dnat_by_handle(rules: list[DnatRule], family: str, table: str, handle: int) -> DnatRule:
    [rule] = [r for r in rules if (r.family, r.table, r.handle) == (family, table, handle)]
    return rule


def handles_for(rules: list[DnatRule], addr: str, port: int | None, protocol: str | None = "tcp") -> list:
    return [(r.table, r.chain, r.handle) for r in matching_dnat(rules, addr, port, protocol)]


def test_native_dnat_rules_are_named_with_their_matches_and_target():
    rules = captured_dnat()
    assert [r.handle for r in rules if r.table == "rtd_nat"] == [3, 6, 7, 8, 9, 10, 11, 13]  # 12 redirects
    rule = dnat_by_handle(rules, "ip", "rtd_nat", 3)
    assert (rule.chain, rule.daddrs, rule.ports, rule.to, rule.origin, rule.iptables) == (
        "prerouting", ("10.203.1.1",), ((8303, 8303),), "10.203.2.2:8303", "nft", None)
    assert rule.protocols == {"tcp"} and rule.via == ()
    assert describe_dnat(rule) == ("ip rtd_nat prerouting handle 3: "
                                   "ip daddr 10.203.1.1 tcp dport 8303 dnat to 10.203.2.2:8303")


def test_address_sets_prefixes_and_port_sets_and_ranges_are_kept():
    rules = captured_dnat()
    both = dnat_by_handle(rules, "ip", "rtd_nat", 6)
    assert both.daddrs == ("10.203.1.2", "10.203.1.3") and both.ports == ((80, 80), (8000, 8010))
    assert both.to == "10.203.2.3"
    prefix = dnat_by_handle(rules, "ip", "rtd_nat", 8)
    assert prefix.daddrs == ("10.203.1.0/24",) and prefix.to == "10.203.2.5:9100-9110"
    any_port = dnat_by_handle(rules, "ip", "rtd_nat", 9)
    assert any_port.ports == () and any_port.protocols == set()
    excluded = dnat_by_handle(rules, "ip", "rtd_nat", 10)
    assert excluded.daddrs == () and excluded.not_daddrs == ("10.203.1.10",)


def test_inet_and_ip6_dnat_rules_keep_their_ip_version():
    rules = captured_dnat()
    v4 = dnat_by_handle(rules, "inet", "rtd_inat", 2)
    v6 = dnat_by_handle(rules, "inet", "rtd_inat", 3)
    assert (v4.to, v4.version, v6.to, v6.version) == ("10.204.2.2:8443", 4, "[fd00:204::2]:8443", 6)
    bare = dnat_by_handle(rules, "inet", "rtd_inat", 4)            # tcp dport 8080 dnat ip6 to fd00:204::3
    assert bare.daddrs == () and bare.version == 6
    assert handles_for(rules, "fd00:204::9", 8080) == [("rtd_inat", "pre", 4)]
    assert handles_for(rules, "10.204.9.9", 8080) == []
    assert dnat_by_handle(rules, "ip6", "rtd_nat6", 2).to == "[fd00:206::2]:8080"


def test_redirect_and_masquerade_are_not_dnat_rules():
    rules = captured_dnat()
    assert not [r for r in rules if "redirect" in r.text or "masquerade" in r.text]
    assert not [r for r in rules if r.iptables and "-j DNAT" not in r.iptables]
    assert reject_rules(json.loads((NFT / "dnat.json").read_text())) == []


def test_iptables_nft_dnat_rules_show_the_command_line_iptables_prints():
    rules = captured_dnat()
    rule = dnat_by_handle(rules, "ip", "nat", 2)
    assert (rule.origin, rule.chain, rule.daddrs, rule.ports, rule.to) == (
        "iptables-nft", "PREROUTING", ("10.205.1.1",), ((8305, 8305),), "10.205.2.2:8305")
    assert rule.iptables == "-A PREROUTING -d 10.205.1.1/32 -p tcp -m tcp --dport 8305 -j DNAT --to-destination 10.205.2.2:8305"
    assert describe_dnat(rule) == f"ip nat PREROUTING (iptables-nft): {rule.iptables}"
    # -m multiport is an opaque xt match in nft's JSON: the ports come from iptables' line.
    assert dnat_by_handle(rules, "ip", "nat", 3).ports == ((81, 81), (82, 82))
    negated = dnat_by_handle(rules, "ip", "nat", 4)
    assert negated.daddrs == () and negated.not_daddrs == ("10.205.1.4",)
    assert dnat_by_handle(rules, "ip", "nat", 5).to == "10.205.2.4:8400-8410"


def test_without_iptables_nft_save_the_target_comes_from_nfts_translation():
    rules = captured_dnat(saves=False)
    rule = dnat_by_handle(rules, "ip", "nat", 2)
    assert (rule.origin, rule.iptables, rule.to) == ("iptables-nft", None, "10.205.2.2:8305")
    assert describe_dnat(rule) == ("ip nat PREROUTING handle 2 (iptables-nft): "
                                   "ip daddr 10.205.1.1 tcp dport 8305 counter packets 0 bytes 0 dnat to 10.205.2.2:8305")
    assert dnat_by_handle(rules, "ip", "nat", 3).ports == ()          # multiport unread: any port


def test_an_xt_dnat_nft_could_not_translate_takes_its_target_from_ip6tables_save():
    # nft 1.0.6 translates the xt targets of the first IP version it meets only: after ip nat's,
    # ip6 nat's DNAT is printed as nothing ("… counter packets 0 bytes 0 ").
    untranslated = dnat_by_handle(captured_dnat(saves=False), "ip6", "nat", 2)
    assert untranslated.text == "ip6 daddr fd00:205::1 tcp dport 80 counter packets 0 bytes 0"
    assert untranslated.to == "" and untranslated.daddrs == ("fd00:205::1",)
    assert describe_dnat(untranslated).endswith("counter packets 0 bytes 0 -j DNAT")
    saved = dnat_by_handle(captured_dnat(), "ip6", "nat", 2)
    assert saved.to == "[fd00:205::2]:8080"
    assert saved.iptables == "-A PREROUTING -d fd00:205::1/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [fd00:205::2]:8080"


def test_dnat_rules_for_an_address_and_port_exact_matches_first():
    rules = [DnatRule("ip", "t", "c", 1, "any", to="10.0.2.1"),
             DnatRule("ip", "t", "c", 2, "prefix", daddrs=("10.0.1.0/24",), ports=((80, 80),), to="10.0.2.2"),
             DnatRule("ip", "t", "c", 3, "exact, port range", daddrs=("10.0.1.1",), ports=((1, 1000),), to="10.0.2.3"),
             DnatRule("ip", "t", "c", 4, "exact", daddrs=("10.0.1.1",), ports=((80, 80),), to="10.0.2.4"),
             DnatRule("ip", "t", "c", 5, "other port", daddrs=("10.0.1.1",), ports=((81, 81),), to="10.0.2.5"),
             DnatRule("ip", "t", "c", 6, "range", daddrs=("10.0.0.1-10.0.1.200",), to="10.0.2.6")]
    assert [r.handle for r in matching_dnat(rules, "10.0.1.1", 80)] == [4, 3, 2, 6, 1]
    assert [r.handle for r in matching_dnat(rules, "10.0.1.201", 80)] == [2, 1]
    assert [r.handle for r in matching_dnat(rules, "10.0.1.1", None)] == [3, 4, 5, 2, 6, 1]   # any port


def test_other_addresses_ports_protocols_and_excluded_addresses_are_ruled_out():
    rules = captured_dnat()
    assert handles_for(rules, "10.203.1.1", 8303) == [("rtd_nat", "prerouting", 3), ("rtd_nat", "output", 13)]
    assert handles_for(rules, "10.203.1.1", 8304) == []
    assert handles_for(rules, "10.203.1.4", 8303) == []
    assert handles_for(rules, "10.203.1.3", 8005) == [("rtd_nat", "prerouting", 6)]
    assert handles_for(rules, "10.203.1.50", 9100) == [("rtd_nat", "prerouting", 8)]
    assert handles_for(rules, "10.203.1.10", 9200) == []                      # ip daddr != 10.203.1.10
    assert handles_for(rules, "10.203.1.11", 9200) == [("rtd_nat", "prerouting", 10)]
    assert handles_for(rules, "10.203.1.53", 53) == []                        # udp only
    assert handles_for(rules, "10.203.1.53", 53, "udp") == [("rtd_nat", "prerouting", 11)]
    assert handles_for(rules, "10.205.1.4", 8306) == []                       # ! -d 10.205.1.4
    assert handles_for(rules, "::ffff:10.205.1.5", 8306) == [("nat", "PREROUTING", 4)]
    assert handles_for(rules, "fd00:205::1", 80) == [("nat", "PREROUTING", 2)]


def test_kube_proxy_iptables_endpoints_are_found_through_the_services_jump():
    # KUBE-SEP-* DNAT rules match no address: KUBE-SERVICES' jump into KUBE-SVC-* does.
    rules = captured_dnat()
    assert handles_for(rules, "10.96.0.10", 53) == [("nat", "KUBE-SEP-A", 25), ("nat", "KUBE-SEP-B", 26)]
    assert [r.to for r in matching_dnat(rules, "10.96.0.10", 53)] == ["10.244.0.5:53", "10.244.0.6:53"]
    assert handles_for(rules, "10.96.0.11", 53) == [] and handles_for(rules, "10.96.0.10", 54) == []
    # A NodePort: the jump into KUBE-NODEPORTS asks `-m addrtype --dst-type LOCAL`, which nft's JSON hides.
    assert ("nat", "KUBE-SEP-W", 29) in handles_for(rules, "10.99.9.9", 30080)
    [(path,)] = dnat_by_handle(rules, "ip", "nat", 25).via
    assert path.daddrs == ("10.96.0.10",) and path.ports == ((53, 53),) and path.protocols == {"tcp"}


def test_kube_proxy_nftables_endpoints_are_found_through_its_verdict_maps():
    rules = captured_dnat()
    kube = [r for r in rules if r.table == "rtd_kube"]
    assert handles_for(kube, "10.97.0.10", 53) == [("rtd_kube", "endpoint-a", 21), ("rtd_kube", "endpoint-b", 22)]
    assert handles_for(kube, "10.97.0.10", 53, "udp") == [("rtd_kube", "endpoint-u", 23)]
    assert handles_for(kube, "10.97.0.11", 53) == []
    # the NodePort map's lookup asks `ip daddr @nodeport-ips`: a named set's elements count as literal
    assert handles_for(kube, "10.203.1.1", 30080) == [("rtd_kube", "endpoint-web", 25)]
    assert handles_for(kube, "10.203.1.2", 30080) == []
    # both kube-proxies' NodePort rules: the one that names the address first
    assert handles_for(rules, "10.203.1.1", 30080) == [("rtd_kube", "endpoint-web", 25), ("nat", "KUBE-SEP-W", 29)]


def test_a_chain_entered_in_a_way_that_cannot_be_read_is_taken_as_entered_by_anything():
    def rule(chain, handle, *expr):
        return {"rule": {"family": "ip", "table": "t", "chain": chain, "handle": handle, "expr": list(expr)}}
    daddr = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.0.0.1"}}
    dnat = {"dnat": {"addr": "10.0.9.9", "port": 80}}
    ruleset = {"nftables": [
        {"chain": {"family": "ip", "table": "t", "name": "pre", "hook": "prerouting"}},
        rule("pre", 1, daddr, {"jump": {"target": "svc"}}),
        rule("svc", 2, dnat),
        rule("pre", 3, {"vmap": {"key": {"meta": {"key": "mark"}}, "data": "@marks"}}),    # no such map here
        rule("other", 4, daddr, {"goto": {"target": "svc2"}}),
        rule("pre", 5, {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"map": {
            "key": {"meta": {"key": "mark"}}, "data": {"set": [[1, {"jump": {"target": "svc2"}}]]}}}}}),
        rule("svc2", 6, dnat)]}
    svc, svc2 = dnat_rules(ruleset)
    assert [g.daddrs for [g] in svc.via] == [("10.0.0.1",)]
    assert svc2.via == ()                   # an unread way in: anything may reach it
    assert [r.handle for r in matching_dnat([svc, svc2], "10.0.0.2", 80)] == [6]


def test_conntrack_entries_are_parsed_with_both_tuples_and_their_flags():
    entries = conntrack_lines((NFT / "conntrack.txt").read_text())
    assert [(e["family"], e["state"], e["original"]["dport"]) for e in entries] == [
        ("ipv4", "SYN_SENT", 8304), ("ipv4", "ESTABLISHED", 8303), ("ipv6", "ESTABLISHED", 8303)]
    syn, est, v6 = entries
    assert est["original"] == {"src": "10.203.1.2", "dst": "10.203.1.1", "sport": 43100, "dport": 8303}
    assert est["reply"] == {"src": "10.203.2.2", "dst": "10.203.1.2", "sport": 8303, "dport": 43100}
    assert (est["protocol"], est["timeout"], est["flags"], est["mark"], est["use"], est["id"]) == (
        "tcp", 431999, ["ASSURED"], 0, 1, 378381037)
    assert est["dnat"] == "10.203.2.2:8303" and v6["dnat"] == "[fd00:203:2::2]:8303"
    assert syn["flags"] == ["UNREPLIED"] and syn["reply"]["src"] == "10.203.2.2"
    # without -o extended: the same, the family told by the addresses
    plain = conntrack_lines("tcp      6 431999 ESTABLISHED src=fd00::2 dst=fd00::1 sport=1 dport=2 "
                            "src=fd00::1 dst=fd00::2 sport=2 dport=1 [ASSURED] mark=0 use=1\n")
    assert plain[0]["family"] == "ipv6" and plain[0]["state"] == "ESTABLISHED" and plain[0]["dnat"] is None


# -- choosing among the rules (the ruleset read is replaced) --------------------------------------

def rule(handle: int, answer: str, ports=(), packets=None, protocols=("tcp",), family="inet") -> RejectRule:
    return RejectRule(family, "t", "c", handle, answer, f"rule {handle}", packets, "nft",
                      ports=tuple((p, p) for p in ports), protocols=frozenset(protocols))


@pytest.fixture
def reads(monkeypatch):
    """Each read of the ruleset returns the next list; the netns is the test's own."""
    queue: list[list[RejectRule]] = []
    monkeypatch.setattr(firewall, "read_ruleset", lambda path: firewall.Ruleset(queue.pop(0), []))
    return queue


OWN = os.stat("/proc/thread-self/ns/net").st_ino


def test_a_port_rules_out_rules_for_other_ports_and_keeps_rules_for_any_port(reads):
    reads.append([rule(1, "tcp reset", [80]), rule(2, "tcp reset", [81]), rule(3, "tcp reset")])
    got = FirewallRules().suspects(OWN, "tcp reset", port=81)
    assert [r.handle for r in got.rules] == [2, 3] and got.how == "candidates" and got.inferred


def test_the_only_rule_that_sends_that_answer_is_still_inferred(reads):
    reads.append([rule(1, "tcp reset", [80]), rule(2, "icmpx port-unreachable", [80])])
    got = FirewallRules().suspects(OWN, "tcp reset", port=80)
    assert [r.handle for r in got.rules] == [1] and got.how == "only rule" and got.inferred


def test_icmp_means_any_icmp_type_and_protocols_must_fit(reads):
    reads.append([rule(1, "icmp host-prohibited"), rule(2, "icmpv6 admin-prohibited"),
                  rule(3, "icmpx port-unreachable", protocols=["udp"]), rule(4, "tcp reset")])
    got = FirewallRules().suspects(OWN, "icmp")
    assert [r.handle for r in got.rules] == [1, 2]


def test_the_other_ip_versions_tables_are_left_out_when_the_family_is_given(reads):
    reads.append([rule(1, "tcp reset", family="ip"), rule(2, "tcp reset", family="ip6"),
                  rule(3, "tcp reset", family="inet")])
    got = FirewallRules().suspects(OWN, "tcp reset", family="ipv6")
    assert [r.handle for r in got.rules] == [2, 3]


def test_a_counter_that_moved_since_the_previous_read_names_the_rule(reads):
    reads.append([rule(1, "tcp reset", packets=5), rule(2, "tcp reset", packets=7)])
    reads.append([rule(1, "tcp reset", packets=5), rule(2, "tcp reset", packets=8)])
    fw = FirewallRules(min_interval=0)
    assert fw.suspects(OWN, "tcp reset").how == "candidates"       # no read before: nothing moved yet
    got = fw.suspects(OWN, "tcp reset")
    assert [r.handle for r in got.rules] == [2] and got.how == "counter moved" and not got.inferred


def test_a_rule_without_a_counter_stays_a_suspect_beside_the_one_that_moved(reads):
    reads.append([rule(1, "tcp reset", packets=5), rule(2, "tcp reset")])
    reads.append([rule(1, "tcp reset", packets=6), rule(2, "tcp reset")])
    fw = FirewallRules(min_interval=0)
    fw.watch(OWN)
    got = fw.suspects(OWN, "tcp reset")
    assert [r.handle for r in got.rules] == [1, 2] and got.how == "counter moved" and got.inferred


def test_a_cached_read_is_no_evidence_of_a_later_packet(reads):
    reads.append([rule(1, "tcp reset", packets=5), rule(2, "tcp reset", packets=7)])
    reads.append([rule(1, "tcp reset", packets=5), rule(2, "tcp reset", packets=8)])
    fw = FirewallRules(min_interval=0)
    fw.watch(OWN)
    assert fw.suspects(OWN, "tcp reset").how == "counter moved"
    fw.min_interval = 60                # the next event finds the same read: it predates that event
    got = fw.suspects(OWN, "tcp reset")
    assert got.how == "candidates" and len(got.rules) == 2 and reads == []


def test_counters_reset_by_nft_count_again_from_zero(reads):
    reads.append([rule(1, "tcp reset", packets=50), rule(2, "tcp reset", packets=70)])
    reads.append([rule(1, "tcp reset", packets=0), rule(2, "tcp reset", packets=1)])
    fw = FirewallRules(min_interval=0)
    fw.watch(OWN)
    assert [r.handle for r in fw.suspects(OWN, "tcp reset").rules] == [2]


def test_a_rule_deleted_meanwhile_leaves_no_suspect(reads):
    reads.append([rule(1, "tcp reset", [80])])
    reads.append([])
    fw = FirewallRules(min_interval=0)
    fw.watch(OWN)
    got = fw.suspects(OWN, "tcp reset", port=80)
    assert got.rules == [] and got.how == "none" and got.inferred


def test_rulesets_are_kept_for_a_bounded_number_of_netns(monkeypatch):
    monkeypatch.setattr(firewall, "read_ruleset", lambda path: firewall.Ruleset([], []))
    monkeypatch.setattr(FirewallRules, "_path", lambda self, inode, ns: None)
    fw = FirewallRules(max_netns=3)
    for inode in range(10):
        fw.suspects(inode, "tcp reset")
    assert list(fw._netns) == [7, 8, 9]


# -- failures: an empty answer that says why -------------------------------------------------------

def fake_tool(tmp_path, monkeypatch, script: str) -> None:
    (tmp_path / "nft").write_text("#!/bin/sh\n" + script)
    (tmp_path / "nft").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))


def test_without_nft_installed_the_answer_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    got = FirewallRules().suspects(OWN, "tcp reset")
    assert got.rules == [] and got.how == "nft not found"


def test_nft_that_hangs_is_given_up_on(tmp_path, monkeypatch):
    fake_tool(tmp_path, monkeypatch, "exec /bin/sleep 5\n")
    monkeypatch.setattr(firewall, "RUN_TIMEOUT", 0.2)
    assert FirewallRules().suspects(OWN, "tcp reset").how == "nft timed out"


def test_nft_output_that_is_not_json_is_reported(tmp_path, monkeypatch):
    fake_tool(tmp_path, monkeypatch, "echo 'table inet x {'\n")
    assert FirewallRules().suspects(OWN, "tcp reset").how == "nft gave bad JSON"


def test_nft_json_of_an_unexpected_shape_is_reported(tmp_path, monkeypatch):
    fake_tool(tmp_path, monkeypatch, """echo '{"nftables": [{"rule": 5}]}'\n""")
    assert FirewallRules().suspects(OWN, "tcp reset").how == "nft gave unexpected JSON"


def test_an_answer_that_is_neither_a_reset_nor_icmp_is_refused_without_a_read(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert FirewallRules().suspects(OWN, "drop").how == "unknown answer 'drop'"


def test_nft_that_fails_is_reported_with_its_message(tmp_path, monkeypatch):
    fake_tool(tmp_path, monkeypatch, "echo 'Error: Operation not permitted' >&2; exit 1\n")
    assert FirewallRules().suspects(OWN, "tcp reset").how == "nft failed: Error: Operation not permitted"


# -- DNAT rules and conntrack entries as FirewallRules reads them (the tools are replaced) --------

def tools(tmp_path, monkeypatch, **scripts: str) -> Path:
    """Fake tools on an otherwise empty PATH; each logs its arguments to log.txt first."""
    for name, script in scripts.items():
        (tmp_path / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {tmp_path}/log.txt\n{script}')
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    return tmp_path / "log.txt"


def ruleset_of(tmp_path, tables: set[str]) -> None:
    """dnat.json and dnat.txt's tables `tables`, as `nft -j -a` / `nft -a list ruleset` print them."""
    def table(item):
        body = next(iter(item.values()))
        return body.get("name") if "table" in item else body.get("table")
    items = json.loads((NFT / "dnat.json").read_text())["nftables"]
    (tmp_path / "ruleset.json").write_text(json.dumps({"nftables": [
        i for i in items if "metainfo" in i or table(i) in tables]}))
    blocks = [b if b.startswith("table ") else "table " + b for b in (NFT / "dnat.txt").read_text().split("\ntable ")]
    (tmp_path / "ruleset.txt").write_text("\n".join(b for b in blocks if b.split()[2] in tables))


NFT_SCRIPT = 'if [ "$1" = -j ]; then /bin/cat "${0%/*}/ruleset.json"; else /bin/cat "${0%/*}/ruleset.txt"; fi\n'


def test_native_dnat_rules_are_read_without_iptables_nft_save(tmp_path, monkeypatch):
    ruleset_of(tmp_path, {"rtd_nat"})
    log = tools(tmp_path, monkeypatch, nft=NFT_SCRIPT, **{"iptables-nft-save": "", "ip6tables-nft-save": ""})
    [rule] = FirewallRules().dnat_for(OWN, "10.203.1.50", 9100)
    assert rule.handle == 8 and rule.text.startswith("ip daddr 10.203.1.0/24 tcp dport 9100 dnat to")
    assert log.read_text().splitlines() == ["nft -j -a list ruleset", "nft -a list ruleset"]


def test_iptables_nft_dnat_rules_bring_their_nat_tables_save(tmp_path, monkeypatch):
    ruleset_of(tmp_path, {"rtd_nat", "nat"})
    log = tools(tmp_path, monkeypatch, nft=NFT_SCRIPT,
                **{"iptables-nft-save": f"/bin/cat {NFT}/dnat-iptables-save.txt\n",
                   "ip6tables-nft-save": f"/bin/cat {NFT}/dnat-ip6tables-save.txt\n"})
    fw = FirewallRules()
    [rule] = fw.dnat_for(OWN, "10.205.1.2", 82)
    assert rule.iptables == "-A PREROUTING -d 10.205.1.2/32 -p tcp -m multiport --dports 81,82 -j DNAT --to-destination 10.205.2.3"
    assert [r.to for r in fw.dnat_for(OWN, "fd00:205::1", 80)] == ["[fd00:205::2]:8080"]
    assert sorted(log.read_text().splitlines()[2:]) == ["ip6tables-nft-save -t nat", "iptables-nft-save -t nat"]
    assert len(log.read_text().splitlines()) == 4           # one read for both questions


def test_dnat_for_is_empty_when_nothing_can_be_read(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert FirewallRules().dnat_for(OWN, "10.0.0.1", 80) == []
    ruleset_of(tmp_path, {"rtd_nat"})
    tools(tmp_path, monkeypatch, nft=NFT_SCRIPT)
    assert FirewallRules().dnat_for(OWN, "not an address", 80) == []


def test_a_shape_the_dnat_reading_does_not_know_costs_the_dnat_rules_only(tmp_path, monkeypatch):
    reject = {"rule": {"family": "ip", "table": "t", "chain": "c", "handle": 2,
                       "expr": [{"reject": {"type": "tcp reset"}}]}}
    (tmp_path / "ruleset.json").write_text(json.dumps({"nftables": [
        {"table": {"family": "ip", "name": "t", "handle": 1}}, {"chain": "not an object"}, reject]}))
    (tmp_path / "ruleset.txt").write_text("table ip t { # handle 1\n\tchain c { # handle 1\n"
                                          "\t\treject with tcp reset # handle 2\n\t}\n}\n")
    tools(tmp_path, monkeypatch, nft=NFT_SCRIPT)
    fw = FirewallRules()
    assert fw.dnat_for(OWN, "10.0.0.1", 80) == []
    assert [r.text for r in fw.suspects(OWN, "tcp reset").rules] == ["reject with tcp reset"]


CONNTRACK_SCRIPT = f"/bin/cat {NFT}/conntrack.txt\n"


def test_conntrack_entries_of_one_destination_are_read_in_the_netns(tmp_path, monkeypatch):
    log = tools(tmp_path, monkeypatch, conntrack=CONNTRACK_SCRIPT)
    fw = FirewallRules()
    [entry] = fw.conntrack_entries(OWN, orig_dst="10.203.1.1", orig_dport=8303)
    assert entry["state"] == "ESTABLISHED" and entry["dnat"] == "10.203.2.2:8303"
    assert log.read_text() == "conntrack -L -f ipv4 -p tcp --orig-dst 10.203.1.1 --dport 8303 -o extended,id\n"
    # The same destination within the interval: the same run's answer, narrowed to the client asked for.
    assert fw.conntrack_entries(OWN, orig_dst="10.203.1.1", orig_dport=8303, orig_src="10.203.1.2",
                                orig_sport=43100) == [entry]
    assert fw.conntrack_entries(OWN, orig_dst="10.203.1.1", orig_dport=8303, orig_sport=1) == []
    assert len(log.read_text().splitlines()) == 1


def test_conntrack_runs_at_most_once_per_netns_per_interval(tmp_path, monkeypatch):
    log = tools(tmp_path, monkeypatch, conntrack=CONNTRACK_SCRIPT)
    fw = FirewallRules(conntrack_interval=60)
    assert len(fw.conntrack_entries(OWN, orig_dst="10.203.1.1", orig_dport=8304)) == 1
    # another destination meanwhile: no run, no answer (not an empty one: nothing was asked)
    assert fw.conntrack_entries(OWN, orig_dst="fd00:203:1::1", orig_dport=8303) is None
    assert len(log.read_text().splitlines()) == 1
    fw.conntrack_interval = 0
    [v6] = fw.conntrack_entries(OWN, orig_dst="fd00:203:1::1", orig_dport=8303)
    assert v6["family"] == "ipv6" and log.read_text().splitlines()[-1].startswith("conntrack -L -f ipv6 ")
    fw.conntrack_entries(OWN, orig_dst="fd00:203:1::1", orig_dport=8303)
    assert len(log.read_text().splitlines()) == 3


@pytest.mark.parametrize("script", [
    None, "echo 'conntrack v1.4.7 (conntrack-tools): Operation not permitted' >&2; exit 1\n", "exec /bin/sleep 5\n"])
def test_conntrack_that_is_missing_fails_or_hangs_gives_none(tmp_path, monkeypatch, script):
    monkeypatch.setenv("PATH", str(tmp_path))
    if script:
        tools(tmp_path, monkeypatch, conntrack=script)
    monkeypatch.setattr(firewall, "RUN_TIMEOUT", 0.2)
    assert FirewallRules().conntrack_entries(OWN, orig_dst="10.203.1.1", orig_dport=8303) is None


def test_conntrack_entries_for_a_netns_that_is_gone_or_a_bad_address_are_none(make_ns):
    ns = make_ns("rtd")
    inode = ns.inode
    ns.delete()
    assert FirewallRules().conntrack_entries(inode, orig_dst="10.0.0.1", orig_dport=80) is None
    assert FirewallRules().conntrack_entries(OWN, orig_dst="10.0.0", orig_dport=80) is None


# -- real rulesets in private netns ---------------------------------------------------------------

class Netns:
    def __init__(self, prefix: str = "rtf"):
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self.inode = os.stat(f"/run/netns/{self.name}").st_ino
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise

    def run(self, *argv: str, stdin: str | None = None) -> str:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], input=stdin, capture_output=True,
                              text=True, check=True, timeout=30).stdout

    def connect(self, port: int) -> str:
        """A connection to 127.0.0.1:port from inside: the errno a REJECT turned it away with."""
        probe = textwrap.dedent(f"""
            import errno, socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=3).close(); print("connected")
            except OSError as err:
                print(errno.errorcode.get(err.errno, type(err).__name__))
        """)
        return self.run(sys.executable, "-c", probe).strip()

    def handles(self, family: str, table: str, chain: str) -> dict[str, int]:
        """Rule text → handle, as `nft -a list chain` prints them (the reference the tests check against)."""
        out = {}
        for line in self.run("nft", "-a", "list", "chain", family, table, chain).splitlines():
            text, sep, handle = line.strip().rpartition(" # handle ")
            if sep and not text.endswith("{"):
                out[text] = int(handle)
        return out

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def make_ns(root):
    made: list[Netns] = []

    def make(prefix: str = "rtf") -> Netns:
        made.append(Netns(prefix))
        return made[-1]
    yield make
    for ns in made:
        ns.delete()


NFT_RULES = """
table inet rtf_fw {
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 8100 reject with tcp reset
        tcp dport 8101 reject with icmpx admin-prohibited
        tcp dport 8102 counter accept
        tcp dport 8103 counter reject with tcp reset
        tcp dport 8104 counter reject with tcp reset
    }
}
"""


@pytest.fixture
def nft_ns(make_ns):
    ns = make_ns()
    ns.run("nft", "-f", "-", stdin=NFT_RULES)
    return ns


def test_an_nft_reset_rule_is_named_with_the_handle_nft_lists(nft_ns):
    handles = nft_ns.handles("inet", "rtf_fw", "input")
    got = FirewallRules().suspects(nft_ns.inode, "tcp reset", port=8100)
    assert got.how == "only rule" and got.inferred
    [r] = got.rules
    assert (r.family, r.table, r.chain, r.answer, r.origin) == ("inet", "rtf_fw", "input", "tcp reset", "nft")
    assert r.text == "tcp dport 8100 reject with tcp reset" and r.handle == handles[r.text]
    assert describe(r) == f"inet rtf_fw input handle {r.handle}: tcp dport 8100 reject with tcp reset"


def test_an_nft_icmp_rule_answers_for_icmp_only(nft_ns):
    handles = nft_ns.handles("inet", "rtf_fw", "input")
    got = FirewallRules().suspects(nft_ns.inode, "icmp", port=8101)
    assert [(r.handle, r.answer) for r in got.rules] == [
        (handles["tcp dport 8101 reject with icmpx admin-prohibited"], "icmpx admin-prohibited")]
    assert all(r.answer == "tcp reset" for r in FirewallRules().suspects(nft_ns.inode, "tcp reset").rules)


def test_an_accept_rule_is_never_a_suspect(nft_ns):
    got = FirewallRules().suspects(nft_ns.inode, "tcp reset", port=8102)
    assert got.how == "none" and got.rules == []


def test_a_refused_connection_moves_the_counter_that_names_its_rule(nft_ns):
    fw = FirewallRules(min_interval=0)
    before = fw.suspects(nft_ns.inode, "tcp reset")
    assert before.how == "candidates" and len(before.rules) == 3
    assert nft_ns.connect(8104) == "ECONNREFUSED"
    got = fw.suspects(nft_ns.inode, "tcp reset", port=8104)
    [r] = got.rules
    assert got.how == "counter moved" and not got.inferred
    assert r.text.startswith("tcp dport 8104 counter packets 1 ") and r.packets == 1
    # Without the port, the rule with no counter may have sent it too: kept, and the answer inferred.
    assert nft_ns.connect(8104) == "ECONNREFUSED"
    got = fw.suspects(nft_ns.inode, "tcp reset")
    assert [x.text.split(" counter")[0] for x in got.rules] == ["tcp dport 8104",
                                                                "tcp dport 8100 reject with tcp reset"]
    assert got.how == "counter moved" and got.inferred


def test_a_rule_deleted_before_the_read_is_reported_as_none(nft_ns):
    handle = nft_ns.handles("inet", "rtf_fw", "input")["tcp dport 8100 reject with tcp reset"]
    nft_ns.run("nft", "delete", "rule", "inet", "rtf_fw", "input", "handle", str(handle))
    got = FirewallRules().suspects(nft_ns.inode, "tcp reset", port=8100)
    assert got.rules == [] and got.how == "none"


def test_a_netns_without_rules_has_no_suspect(make_ns):
    got = FirewallRules().suspects(make_ns().inode, "tcp reset")
    assert got.rules == [] and got.how == "none"


def test_a_netns_that_is_gone_is_reported(make_ns):
    ns = make_ns()
    inode = ns.inode
    ns.delete()
    assert FirewallRules().suspects(inode, "tcp reset").how == "netns gone"


@pytest.fixture
def iptables_ns(make_ns):
    ns = make_ns()
    ns.run("iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "8200", "-j", "REJECT", "--reject-with", "tcp-reset")
    ns.run("iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "8201", "-j", "REJECT")
    ns.run("iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "8202", "-j", "ACCEPT")
    ns.run("iptables-nft", "-A", "INPUT", "-p", "tcp", "-m", "multiport", "--dports", "8203,8204", "-j", "REJECT",
           "--reject-with", "icmp-admin-prohibited")
    ns.run("ip6tables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "8200", "-j", "REJECT", "--reject-with", "tcp-reset")
    return ns


def test_an_iptables_nft_reset_rule_is_named_with_its_iptables_line(iptables_ns):
    handles = iptables_ns.handles("ip", "filter", "INPUT")
    got = FirewallRules().suspects(iptables_ns.inode, "tcp reset", port=8200)
    assert got.how == "candidates" and [r.family for r in got.rules] == ["ip", "ip6"]
    got = FirewallRules().suspects(iptables_ns.inode, "tcp reset", port=8200, family="ipv4")
    [r] = got.rules
    assert (r.family, r.table, r.chain, r.origin, r.answer) == ("ip", "filter", "INPUT", "iptables-nft", "tcp reset")
    assert r.iptables == "-A INPUT -p tcp -m tcp --dport 8200 -j REJECT --reject-with tcp-reset"
    assert r.handle == handles[r.text]
    assert describe(r) == ("ip filter INPUT (iptables-nft): "
                           "-A INPUT -p tcp -m tcp --dport 8200 -j REJECT --reject-with tcp-reset")


def test_an_iptables_nft_icmp_reject_is_narrowed_by_its_counter(iptables_ns):
    fw = FirewallRules(min_interval=0)
    assert len(fw.suspects(iptables_ns.inode, "icmp", family="ipv4").rules) == 2
    assert iptables_ns.connect(8204) == "EHOSTUNREACH"             # what admin-prohibited becomes
    got = fw.suspects(iptables_ns.inode, "icmp", family="ipv4")
    [r] = got.rules
    assert got.how == "counter moved" and not got.inferred and r.packets == 1
    assert r.answer == "icmp admin-prohibited" and r.ports == ((8203, 8203), (8204, 8204))
    assert r.iptables == "-A INPUT -p tcp -m multiport --dports 8203,8204 -j REJECT --reject-with icmp-admin-prohibited"


# -- DNAT rules and conntrack entries of real netns -----------------------------------------------

NAT_RULES = """
table ip rtd_nat {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 10.203.1.1 tcp dport 8303 dnat to 10.203.2.2:8303
        ip daddr { 10.203.1.5, 10.203.1.6 } tcp dport 8000-8010 dnat to 10.203.2.5
    }
}
"""


@pytest.fixture
def nat_ns(make_ns):
    ns = make_ns("rtd")
    ns.run("nft", "-f", "-", stdin=NAT_RULES)
    ns.run("iptables-nft", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-d", "10.203.1.7", "--dport", "8307",
           "-j", "DNAT", "--to-destination", "10.203.2.7:8307")
    return ns


def test_dnat_rules_of_a_netns_are_found_for_their_address_and_port(nat_ns):
    fw = FirewallRules()
    [native] = fw.dnat_for(nat_ns.inode, "10.203.1.1", 8303)
    handles = nat_ns.handles("ip", "rtd_nat", "prerouting")
    assert native.handle == handles["ip daddr 10.203.1.1 tcp dport 8303 dnat to 10.203.2.2:8303"]
    assert describe_dnat(native) == (f"ip rtd_nat prerouting handle {native.handle}: "
                                     "ip daddr 10.203.1.1 tcp dport 8303 dnat to 10.203.2.2:8303")
    assert (native.origin, native.to) == ("nft", "10.203.2.2:8303")
    [made] = fw.dnat_for(nat_ns.inode, "10.203.1.7", 8307)
    assert (made.family, made.table, made.chain, made.origin, made.to) == (
        "ip", "nat", "PREROUTING", "iptables-nft", "10.203.2.7:8307")
    assert describe_dnat(made) == ("ip nat PREROUTING (iptables-nft): "
                                   "-A PREROUTING -d 10.203.1.7/32 -p tcp -m tcp --dport 8307 -j DNAT --to-destination 10.203.2.7:8307")
    assert [r.to for r in fw.dnat_for(nat_ns.inode, "10.203.1.6", 8010)] == ["10.203.2.5"]
    for addr, port in [("10.203.1.1", 8304), ("10.203.1.2", 8303), ("10.203.1.7", 8303), ("10.203.1.6", 8011),
                       ("fd00::1", 8303)]:
        assert fw.dnat_for(nat_ns.inode, addr, port) == [], (addr, port)


def test_a_netns_without_dnat_rules_has_none(make_ns):
    assert FirewallRules().dnat_for(make_ns("rtd").inode, "10.203.1.1", 8303) == []


class Process:
    """A Python snippet inside a netns: one line of output read, then it waits for its stdin to close."""

    def __init__(self, ns: Netns, code: str):
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", textwrap.dedent(code)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.line = self.proc.stdout.readline().strip()       # bounded: the snippets time out themselves

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def routed(make_ns):
    """client 10.203.1.2 – router 10.203.1.1 / 10.203.2.1 – server 10.203.2.2, over veth; the router
    forwards (in its own netns only) and DNATs its own 10.203.1.1:8303 to the server."""
    client, router, server = make_ns("rtd"), make_ns("rtd"), make_ns("rtd")
    subprocess.run(["ip", "link", "add", "cr0", "netns", client.name, "type", "veth", "peer", "name", "rc0",
                    "netns", router.name], check=True)
    subprocess.run(["ip", "link", "add", "rs0", "netns", router.name, "type", "veth", "peer", "name", "sr0",
                    "netns", server.name], check=True)
    for ns, dev, addr in [(client, "cr0", "10.203.1.2/24"), (router, "rc0", "10.203.1.1/24"),
                          (router, "rs0", "10.203.2.1/24"), (server, "sr0", "10.203.2.2/24")]:
        ns.run("ip", "addr", "add", addr, "dev", dev)
        ns.run("ip", "link", "set", dev, "up")
    server.run("ip", "route", "add", "default", "via", "10.203.2.1")
    router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    router.run("nft", "-f", "-", stdin=NAT_RULES)
    return client, router, server


def test_conntrack_holds_the_entry_of_a_connection_through_the_dnat(routed):
    client, router, server = routed
    listener = Process(server, """
        import socket, sys
        s = socket.create_server(("10.203.2.2", 8303)); s.settimeout(5)
        print("listening", flush=True)
        c, _ = s.accept(); c.send(b"x"); sys.stdin.read()
    """)
    connected = None
    try:
        assert listener.line == "listening"
        # Once the client has the server's byte, the server has accepted: the handshake's last ACK
        # went through the router, whose entry is then ESTABLISHED and ASSURED.
        connected = Process(client, """
            import socket, sys
            c = socket.create_connection(("10.203.1.1", 8303), timeout=5); assert c.recv(1) == b"x"
            print(c.getsockname()[1], flush=True); sys.stdin.read()
        """)
        sport = int(connected.line)
        fw = FirewallRules()
        [entry] = fw.conntrack_entries(router.inode, orig_dst="10.203.1.1", orig_dport=8303)
        assert (entry["family"], entry["protocol"], entry["state"], entry["flags"]) == (
            "ipv4", "tcp", "ESTABLISHED", ["ASSURED"])
        assert entry["original"] == {"src": "10.203.1.2", "dst": "10.203.1.1", "sport": sport, "dport": 8303}
        assert entry["reply"] == {"src": "10.203.2.2", "dst": "10.203.1.2", "sport": 8303, "dport": sport}
        assert entry["dnat"] == "10.203.2.2:8303"
        assert fw.conntrack_entries(router.inode, orig_dst="10.203.1.1", orig_dport=8303,
                                    orig_src="10.203.1.2", orig_sport=sport) == [entry]
        assert fw.conntrack_entries(router.inode, orig_dst="10.203.1.1", orig_dport=8303, orig_sport=sport + 1) == []
        assert FirewallRules().conntrack_entries(router.inode, orig_dst="10.203.1.1", orig_dport=8304) == []
        assert FirewallRules().conntrack_entries(server.inode, orig_dst="10.203.1.1", orig_dport=8303) == []
        # and the rule that made it
        assert [r.to for r in fw.dnat_for(router.inode, "10.203.1.1", 8303)] == ["10.203.2.2:8303"]
    finally:
        for proc in (connected, listener):
            if proc:
                proc.stop()
