"""Naming the netfilter REJECT rule behind a reset or an ICMP unreachable (tracer/enrich/firewall.py).

Parsing runs on outputs captured on nftables 1.0.6 / iptables-nft 1.8.9 (tests/data/nft/): a netns
with native nft rules (native.*) and one with iptables-nft and ip6tables-nft rules (iptables*). The
rest builds such rulesets in private netns, sends traffic into them, and reads them back as rsttrace
does: `nft` run inside the netns.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from tests_paths import DATA
from tracer.enrich import firewall
from tracer.enrich.firewall import FirewallRules, RejectRule, describe, reject_rules

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


# -- choosing among the rules (the ruleset read is replaced) --------------------------------------

def rule(handle: int, answer: str, ports=(), packets=None, protocols=("tcp",), family="inet") -> RejectRule:
    return RejectRule(family, "t", "c", handle, answer, f"rule {handle}", packets, "nft",
                      ports=tuple((p, p) for p in ports), protocols=frozenset(protocols))


@pytest.fixture
def reads(monkeypatch):
    """Each read of the ruleset returns the next list; the netns is the test's own."""
    queue: list[list[RejectRule]] = []
    monkeypatch.setattr(firewall, "read_rules", lambda path: queue.pop(0))
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
    monkeypatch.setattr(firewall, "read_rules", lambda path: [])
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


# -- real rulesets in private netns ---------------------------------------------------------------

class Netns:
    def __init__(self):
        self.name = f"rtf-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.inode = os.stat(f"/run/netns/{self.name}").st_ino
        self.run("ip", "link", "set", "lo", "up")

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

    def make() -> Netns:
        made.append(Netns())
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
