"""Which netfilter REJECT rule answered a packet with a TCP reset or an ICMP unreachable.

The kernel tells rsttrace that a REJECT fired, and in which netns; it does not say which rule. The
rule is named from that netns's ruleset as nf_tables holds it, read inside the netns: `nft -j -a list
ruleset` for the structure (family, table, chain, handle, reject type, ports, counters), `nft -a list
ruleset` for the text the user knows, and, for rules iptables-nft made, the `-A …` line
`iptables-nft-save` prints. Rules read after the event are suspects, not a proof: the event's port
and the counters that moved since the previous read narrow them, and `Suspects` says which did.

The same read names the DNAT rules of the netns (`DnatRule`, `FirewallRules.dnat_for`): a reset sent
for no socket from an address:port that a DNAT rule rewrites is a segment that should have been
DNATed and was not (conntrack called it INVALID: its entry lost, or out of window), answered by this
host's own TCP (kubernetes/kubernetes#74839). `FirewallRules.conntrack_entries` reads what
conntrack holds for such an address, where the `conntrack` tool is installed.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

from .listeners import host_netns_path, netns_by_process

RUN_TIMEOUT = 2.0           # seconds per nft / iptables-nft-save run: an event is never held longer
MIN_INTERVAL = 1.0          # a netns's ruleset is read at most this often
MAX_NETNS = 64              # rulesets kept (least recently asked for go first)
SAVE_TOOLS = {"ip": "iptables-nft-save", "ip6": "ip6tables-nft-save"}
XT_TABLES = {"filter", "mangle", "raw", "nat", "security"}
# What a bare `reject` sends, by family (nft's own defaults).
DEFAULT_REJECT = {"ip": "icmp", "ip6": "icmpv6"}            # others (inet, bridge, netdev): icmpx
L4_NUMBERS = {6: "tcp", 17: "udp", 33: "dccp", 132: "sctp", 136: "udplite"}
DPORT_OPTIONS = {"--dport", "--dports", "--destination-port", "--destination-ports"}
CONNTRACK_INTERVAL = 0.5    # conntrack is run at most this often per netns
MAX_JUMP_DEPTH = 16         # nf_tables refuses deeper jump chains
MAX_PATHS = 64              # ways into one chain followed; past that, the chain is taken as entered by anything


@dataclass(frozen=True)
class RejectRule:
    family: str                     # nft family: ip, ip6, inet, bridge, netdev
    table: str
    chain: str
    handle: int
    answer: str                     # as nft names it: "tcp reset", "icmp port-unreachable", "icmpx admin-prohibited"
    text: str                       # as `nft -a list ruleset` prints it, without "# handle N"; "" if not read
    packets: int | None             # its counter at the read; None without a `counter`
    origin: str = "nft"             # "nft" or "iptables-nft"
    iptables: str | None = None     # "-A INPUT … -j REJECT …" as iptables-nft-save prints it
    ports: tuple[tuple[int, int], ...] = ()     # literal destination ports (ranges); () = any
    protocols: frozenset[str] = frozenset()     # transport protocols it matches; empty = any

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.family, self.table, self.chain, self.handle


@dataclass
class Suspects:
    rules: list[RejectRule] = field(default_factory=list)
    inferred: bool = True
    how: str = "none"       # "counter moved", "only rule", "candidates", "none", or why nothing was read


def describe(rule: RejectRule) -> str:
    """One line: where the rule is, and the rule as the tool that made it prints it."""
    where = f"{rule.family} {rule.table} {rule.chain}"
    if rule.iptables:
        return f"{where} (iptables-nft): {rule.iptables}"
    tag = " (iptables-nft)" if rule.origin == "iptables-nft" else ""
    return f"{where} handle {rule.handle}{tag}: {rule.text or '(rule text not read)'}"


# -- parsing (pure: tests feed it captured output) ----------------------------------------------

class _Index(NamedTuple):
    """One `nft -j -a list ruleset` output, by what its items are."""
    table_handles: dict[tuple[str, str], int]        # (family, table) → handle: where `nft -a` texts are keyed
    chains: dict[tuple[str, str, str], list[dict]]   # (family, table, chain) → its rules in order (none: [])
    base: set[tuple[str, str, str]]                  # the chains a hook enters
    sets: dict[tuple[str, str, str], dict]           # named sets and maps

    def text_of(self, r: dict, texts: dict) -> str | None:
        """A rule's text from rule_texts(), keyed by family, table handle and rule handle."""
        family, table = r.get("family"), r.get("table")
        return texts.get((family, self.table_handles.get((family, table)), r.get("handle")))


def _index(ruleset: dict, kinds: tuple[str, ...]) -> _Index:
    """The items of `kinds` (table, chain, rule, set, map) the caller reads; the others are not looked at,
    so an item of a shape only another reader needs cannot cost this one its rules."""
    index = _Index({}, {}, set(), {})
    for item in ruleset.get("nftables") or []:
        if not isinstance(item, dict):
            continue
        kind = next((k for k in kinds if k in item), None)
        if kind is None:
            continue
        value = item[kind]
        if kind in ("set", "map") and not isinstance(value, dict):
            continue                        # a set of a shape nft never gives: left out
        family, table = value.get("family"), value.get("table")
        if kind == "table":
            index.table_handles[(family, value.get("name"))] = value.get("handle")
        elif kind == "chain":
            index.chains.setdefault((family, table, value.get("name")), [])
            if value.get("hook"):
                index.base.add((family, table, value.get("name")))
        elif kind == "rule":
            index.chains.setdefault((family, table, value.get("chain")), []).append(value)
        else:                               # a set or map
            index.sets[(family, table, value.get("name"))] = value
    return index


def reject_rules(ruleset: dict, text: str = "", saves: dict[str, str] | None = None) -> list[RejectRule]:
    """The REJECT rules of one `nft -j -a list ruleset` output, in ruleset order, with their text
    from `nft -a list ruleset` and their iptables line from `ip(6)tables-nft-save` (by family)."""
    index = _index(ruleset, ("table", "rule"))
    texts = rule_texts(text)
    saved = {family: save_lines(out) for family, out in (saves or {}).items()}
    found = []
    for (family, table, chain), rules in index.chains.items():
        lines = saved.get(family, {}).get((table, chain), [])
        # iptables-nft-save lists a chain's rules in the kernel's order, as nft does: the nth line is
        # the nth rule only while both saw the same chain (same count; a REJECT on both sides).
        aligned = lines if len(lines) == len(rules) else []
        for i, r in enumerate(rules):
            line = aligned[i] if aligned and _target(aligned[i]) == "REJECT" else None
            rule = _reject_rule(r, index.text_of(r, texts), line)
            if rule:
                found.append(rule)
    return found


def _reject_rule(r: dict, text: str | None, line: str | None) -> RejectRule | None:
    exprs = r.get("expr") or []
    family = r.get("family")
    native = next((e["reject"] for e in exprs if isinstance(e, dict) and "reject" in e), False)
    xt = [e["xt"] for e in exprs if isinstance(e, dict) and "xt" in e]
    xt_reject = any(isinstance(x, dict) and x.get("type") == "target" and x.get("name") == "REJECT" for x in xt)
    # An xt target without a name (older nft's JSON) is a REJECT where iptables' own line says so.
    if native is False and not xt_reject and not (xt and line):
        return None
    if native is not False:
        answer = _native_answer(native, family)
    else:       # the xt target's options are not in nft's JSON: iptables' own line, else nft's translation
        answer = (_iptables_answer(line, family) if line else None) or _text_answer(text or "", family) or "reject"
    ports = _json_ports(exprs) or (_save_ports(line) if line else ())
    protocols = _json_protocols(exprs) or (_save_protocols(line) if line else frozenset())
    counter = next((e["counter"] for e in exprs if isinstance(e, dict) and "counter" in e), None)
    packets = counter.get("packets") if isinstance(counter, dict) else None     # a named counter: not here
    return RejectRule(family, r.get("table"), r.get("chain"), r.get("handle"), answer, text or "", packets,
                      "iptables-nft" if xt or line else "nft", line, ports, protocols)


def _native_answer(reject, family: str) -> str:
    reject = reject if isinstance(reject, dict) else {}
    kind = reject.get("type") or DEFAULT_REJECT.get(family, "icmpx")
    if kind == "tcp reset":
        return kind
    return f"{kind} {reject.get('expr') or 'port-unreachable'}"


_ICMP_NAMES = {"adm-prohibited": "admin-prohibited", "proto-unreachable": "prot-unreachable"}


def _iptables_answer(line: str, family: str) -> str | None:
    """--reject-with as nft names it: tcp-reset → "tcp reset", icmp-host-prohibited → "icmp host-prohibited"."""
    words = line.split()
    if "--reject-with" not in words[:-1]:
        return f"{DEFAULT_REJECT.get(family, 'icmp')} port-unreachable"
    value = words[words.index("--reject-with") + 1]
    if value == "tcp-reset":
        return "tcp reset"
    code = re.sub(r"^icmp6?-", "", value)
    return f"{'icmpv6' if family == 'ip6' else 'icmp'} {_ICMP_NAMES.get(code, code)}"


_TEXT_REJECT = re.compile(r"\breject(?: with (tcp reset|(icmpx|icmpv6|icmp)(?: type)? ([a-z-]+)))?")


def _text_answer(text: str, family: str) -> str | None:
    m = _TEXT_REJECT.search(text)
    if not m:
        return None
    if m.group(1) == "tcp reset":
        return "tcp reset"
    return f"{m.group(2) or DEFAULT_REJECT.get(family, 'icmpx')} {m.group(3) or 'port-unreachable'}"


def _json_ports(exprs: list) -> tuple[tuple[int, int], ...]:
    """Destination ports a `tcp/udp/th dport` match names literally (a port, a range, an anonymous
    set of them); () where it names none (no match, `!=`, a named set)."""
    for e in exprs:
        m = e.get("match") if isinstance(e, dict) else None
        left = (m or {}).get("left")
        payload = left.get("payload") if isinstance(left, dict) else None
        if not isinstance(payload, dict) or payload.get("field") != "dport" or m.get("op") not in ("==", "in"):
            continue
        right = m.get("right")
        values = right["set"] if isinstance(right, dict) and isinstance(right.get("set"), list) else [right]
        ranges = [_port_range(v) for v in values]
        if ranges and all(ranges):
            return tuple(ranges)
    return ()


def _port_range(value) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and isinstance(value.get("range"), list) and len(value["range"]) == 2:
        lo, hi = value["range"]
        if isinstance(lo, int) and isinstance(hi, int):
            return lo, hi
    return None


def _json_protocols(exprs: list) -> frozenset[str]:
    """The transport protocols a rule is limited to (`tcp dport …`, `meta l4proto tcp`, `ip protocol
    tcp`); empty where it is not (`th dport`, no such match, `meta l4proto != udp`)."""
    found: frozenset[str] | None = None
    for e in exprs:
        m = e.get("match") if isinstance(e, dict) else None
        left = (m or {}).get("left")
        if not isinstance(left, dict):
            continue
        payload, meta = left.get("payload"), left.get("meta")
        names = None
        if isinstance(payload, dict) and payload.get("protocol") in L4_NUMBERS.values():
            names = {payload["protocol"]}          # `tcp dport != 22` too: nft matches TCP first
        elif m.get("op") in ("==", "in") and _names_protocol(payload, meta):
            right = m.get("right")
            values = right["set"] if isinstance(right, dict) and isinstance(right.get("set"), list) else [right]
            names = {L4_NUMBERS.get(v, str(v)) if isinstance(v, int) else str(v) for v in values}
        if names is not None:
            found = frozenset(names) if found is None else found & names
    return found or frozenset()


def _names_protocol(payload, meta) -> bool:
    """`meta l4proto`, `ip protocol`, `ip6 nexthdr`: the left side of a protocol match."""
    if isinstance(meta, dict):
        return meta.get("key") == "l4proto"
    return isinstance(payload, dict) and payload.get("field") in ("protocol", "nexthdr")


def _save_ports(line: str) -> tuple[tuple[int, int], ...]:
    """--dport 80, --dports 80,443,8000:8100 (not negated) from an iptables-save line."""
    words = line.split()
    for i, word in enumerate(words[:-1]):
        if word in DPORT_OPTIONS and (i == 0 or words[i - 1] != "!"):
            ranges = []
            for part in words[i + 1].split(","):
                lo, sep, hi = part.partition(":")
                try:
                    ranges.append((int(lo or 0), int(hi or 65535) if sep else int(lo)))
                except ValueError:
                    return ()
            return tuple(ranges)
    return ()


def _save_protocols(line: str) -> frozenset[str]:
    words = line.split()
    for i, word in enumerate(words[:-1]):
        if word in ("-p", "--protocol") and (i == 0 or words[i - 1] != "!"):
            return frozenset([words[i + 1]])
    return frozenset()


def _target(line: str) -> str | None:
    words = line.split()
    return words[words.index("-j") + 1] if "-j" in words[:-1] else None


_HANDLE = re.compile(r"^(.*?) # handle (\d+)$")


def rule_texts(text: str) -> dict[tuple[str, int, int], str]:
    """(family, table handle, rule handle) → the rule's line, from `nft -a list ruleset`. Names are
    not parsed (nft quotes odd ones): tables and rules are told by handle, and nft's layout tells
    which lines are rules — one tab for a table's chains and sets, two for a chain's rules."""
    out: dict[tuple[str, int, int], str] = {}
    family, table, in_chain = None, None, False
    for line in text.splitlines():
        m = _HANDLE.match(line.rstrip())
        if not line.startswith("\t"):
            words = line.split()
            in_chain = False
            if m and words[:1] == ["table"] and len(words) > 1:
                family, table = words[1], int(m.group(2))
        elif not line.startswith("\t\t"):
            in_chain = line.lstrip().startswith("chain ")
        elif m and in_chain and family and table is not None:
            out[(family, table, int(m.group(2)))] = m.group(1).strip()
    return out


def save_lines(text: str) -> dict[tuple[str, str], list[str]]:
    """(table, chain) → its "-A CHAIN …" lines in order, from iptables-nft-save."""
    out: dict[tuple[str, str], list[str]] = {}
    table = None
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A ") and table and len(line.split()) > 1:
            out.setdefault((table, line.split()[1]), []).append(line.strip())
    return out


# -- DNAT rules (pure: tests feed them captured output) --------------------------------------------

@dataclass(frozen=True)
class Guard:
    """What one rule, or one way into its chain (a jump, a verdict map's element), literally asks of
    a packet's destination. An empty field asks nothing."""
    daddrs: tuple[str, ...] = ()                    # "10.0.0.1", "10.0.0.0/24", "10.0.0.1-10.0.0.9"
    ports: tuple[tuple[int, int], ...] = ()
    protocols: frozenset[str] = frozenset()
    not_daddrs: tuple[str, ...] = ()                # `ip daddr != …`, `! -d …`
    not_ports: tuple[tuple[int, int], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.daddrs or self.ports or self.protocols or self.not_daddrs or self.not_ports)

    def fit(self, addr, port: int | None, protocol: str | None) -> tuple[int, int] | None:
        """None where a `protocol` packet to addr:port cannot match; else how closely the guard names
        them, (address, port): 0 named exactly, 1 inside a prefix, range or port range, 2 not named.
        `addr` is an ipaddress address; a port or protocol of None is any."""
        if self.protocols and protocol is not None and protocol not in self.protocols:
            return None
        if self.not_daddrs and _addr_rank(addr, self.not_daddrs) in (0, 1):
            return None
        if self.not_ports and port is not None and _port_in(port, self.not_ports):
            return None
        a = _addr_rank(addr, self.daddrs)
        p = 2 if port is None or not self.ports else _port_rank(port, self.ports)
        return None if a is None or p is None else (a, p)


@dataclass(frozen=True)
class DnatRule:
    family: str                     # nft family: ip, ip6, inet
    table: str
    chain: str
    handle: int
    text: str                       # as `nft -a list ruleset` prints it, without "# handle N"; "" if not read
    daddrs: tuple[str, ...] = ()    # the literal destination addresses it matches ("a", "a/len", "a-b"); () = any
    ports: tuple[tuple[int, int], ...] = ()     # literal destination ports (ranges); () = any
    to: str = ""                    # as nft/iptables print it: "10.0.0.2:80", "[fd00::2]:8080"; "" if not read
    origin: str = "nft"             # "nft" or "iptables-nft"
    iptables: str | None = None     # "-A PREROUTING … -j DNAT --to-destination …" as iptables-nft-save prints it
    protocols: frozenset[str] = frozenset()     # transport protocols it matches; empty = any
    not_daddrs: tuple[str, ...] = ()            # addresses it literally leaves out (`!=`, `! -d`)
    not_ports: tuple[tuple[int, int], ...] = ()
    # The ways into its chain that ask something of the packet (the jumps and verdict-map elements
    # leading to it, outermost first); () where the chain is entered without a literal match asked
    # on at least one way (a base chain, a `-m addrtype` jump, a reference not understood).
    via: tuple[tuple[Guard, ...], ...] = ()

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.family, self.table, self.chain, self.handle

    @property
    def guard(self) -> Guard:
        return Guard(self.daddrs, self.ports, self.protocols, self.not_daddrs, self.not_ports)

    @property
    def version(self) -> int | None:
        """The IP version of the packets it rewrites (4, 6), or None where it cannot say."""
        if self.family in ("ip", "ip6"):
            return 4 if self.family == "ip" else 6
        return _to_version(self.to)

    def fit(self, addr, port: int | None = None, protocol: str | None = "tcp") -> tuple[int, int] | None:
        """None where this rule cannot rewrite a `protocol` packet to addr:port (its own match, or
        every way into its chain, rules it out); else how closely they name it (see Guard.fit)."""
        ip = _ip(addr)
        version = self.version
        if version is not None and ip.version != version:
            return None
        own = self.guard.fit(ip, port, protocol)
        if own is None or not self.via:
            return own
        best = None
        for path in self.via:
            ranks = [own]
            for guard in path:
                rank = guard.fit(ip, port, protocol)
                if rank is None:
                    break
                ranks.append(rank)
            else:
                rank = (min(r[0] for r in ranks), min(r[1] for r in ranks))
                best = rank if best is None else min(best, rank)
        return best


def describe_dnat(rule: DnatRule) -> str:
    """One line: where the DNAT rule is, and the rule as the tool that made it prints it."""
    where = f"{rule.family} {rule.table} {rule.chain}"
    if rule.iptables:
        return f"{where} (iptables-nft): {rule.iptables}"
    tag = " (iptables-nft)" if rule.origin == "iptables-nft" else ""
    text = rule.text or "(rule text not read)"
    if rule.text and not re.search(r"\bdnat\b", rule.text):
        # nft 1.0.6 cannot translate an xt DNAT of the second IP version it meets: no target printed.
        text += f" dnat to {rule.to}" if rule.to else " -j DNAT"
    return f"{where} handle {rule.handle}{tag}: {text}"


def matching_dnat(rules: list[DnatRule], addr, port: int | None = None,
                  protocol: str | None = "tcp") -> list[DnatRule]:
    """The rules that could rewrite a `protocol` packet to addr:port, those that name the address
    (then the port) exactly first, then in a prefix or range, then those that do not name it; in
    ruleset order within each."""
    ip = _ip(addr)
    fits = [(fit, i, rule) for i, rule in enumerate(rules) if (fit := rule.fit(ip, port, protocol)) is not None]
    return [rule for _, _, rule in sorted(fits, key=lambda t: t[:2])]


def dnat_rules(ruleset: dict, text: str = "", saves: dict[str, str] | None = None) -> list[DnatRule]:
    """The DNAT rules of one `nft -j -a list ruleset` output, in ruleset order, with their text from
    `nft -a list ruleset`, their iptables line from `ip(6)tables-nft-save [-t nat]` (by family), and
    the ways into their chains."""
    index = _index(ruleset, ("table", "chain", "rule", "set", "map"))
    chains, base, sets = index.chains, index.base, index.sets
    texts = rule_texts(text)
    saved = {family: save_lines(out) for family, out in (saves or {}).items()}
    lines: dict[tuple[str, str, str], list[str | None]] = {}
    for key, rules in chains.items():
        got = saved.get(key[0], {}).get(key[1:], [])
        # The nth line is the nth rule only while both reads saw the same chain (see reject_rules).
        lines[key] = got if len(got) == len(rules) else [None] * len(rules)
    entries = _ways_in(chains, lines, sets)
    memo: dict = {}
    found = []
    for key, rules in chains.items():
        family, table, _ = key
        for r, line in zip(rules, lines[key]):
            if line is not None and _target(line) != "DNAT":
                line = None
            rule = _dnat_rule(r, index.text_of(r, texts), line, sets, _paths(key, entries, base, memo))
            if rule:
                found.append(rule)
    return found


def _dnat_rule(r: dict, text: str | None, line: str | None, sets: dict,
               via: tuple[tuple[Guard, ...], ...]) -> DnatRule | None:
    exprs = r.get("expr") or []
    native = next((e["dnat"] for e in exprs if isinstance(e, dict) and "dnat" in e), None)
    xt = [e["xt"] for e in exprs if isinstance(e, dict) and "xt" in e]
    xt_dnat = any(isinstance(x, dict) and x.get("type") == "target" and x.get("name") == "DNAT" for x in xt)
    # An xt target without a name (older nft's JSON) is a DNAT where iptables' own line says so.
    if native is None and not xt_dnat and not (xt and line):
        return None
    to = ((_save_to(line) if line else None) or (_json_to(native) if isinstance(native, dict) else None)
          or _text_to(text or "") or "")
    guard = _rule_guard(r, sets, line)
    return DnatRule(r.get("family"), r.get("table"), r.get("chain"), r.get("handle"), text or "",
                    guard.daddrs, guard.ports, to, "iptables-nft" if xt or line else "nft", line,
                    guard.protocols, guard.not_daddrs, guard.not_ports, via)


def _rule_guard(r: dict, sets: dict, line: str | None) -> Guard:
    """The literal destination matches of a rule: its JSON, and where that has none (an opaque xt
    match such as multiport), its iptables line."""
    scope = (r.get("family"), r.get("table"))
    exprs = r.get("expr") or []
    daddrs, ports, not_daddrs, not_ports = (), (), (), ()
    for e in exprs:
        m = e.get("match") if isinstance(e, dict) else None
        if not isinstance(m, dict) or m.get("op") not in ("==", "in", "!="):
            continue
        kind = _selector(m.get("left"))
        if kind == "daddr":
            values = _values(m.get("right"), sets, scope, _addr_value)
        elif kind == "dport":
            values = _values(m.get("right"), sets, scope, _port_value)
        else:
            continue
        if not values:                      # not literal: asks nothing we can tell
            continue
        if m["op"] == "!=" and kind == "daddr":
            not_daddrs += values
        elif m["op"] == "!=":
            not_ports += values
        elif kind == "daddr":
            daddrs = daddrs or values
        else:
            ports = ports or values
    protocols = _json_protocols(exprs)
    if line:
        ports = ports or _save_ports(line)
        protocols = protocols or _save_protocols(line)
        if not daddrs and not not_daddrs:
            daddrs, not_daddrs = _save_daddrs(line)
    return Guard(daddrs, ports, protocols, not_daddrs, not_ports)


def _selector(left) -> str | None:
    """What the left side of a match, or a part of a map's key, selects: "daddr", "dport", "proto"."""
    if not isinstance(left, dict):
        return None
    payload = left.get("payload")
    if isinstance(payload, dict):
        if payload.get("field") == "daddr" and payload.get("protocol") in ("ip", "ip6"):
            return "daddr"
        if payload.get("field") == "dport":
            return "dport"
    return "proto" if _names_protocol(payload, left.get("meta")) else None


def _values(right, sets: dict, scope: tuple, convert) -> tuple | None:
    """The literal values of a match's right side (a value, an anonymous set, a named set with
    constant elements), converted; None where any of them is not literal."""
    if isinstance(right, str) and right.startswith("@"):
        named = sets.get((*scope, right[1:]))
        flags = named.get("flags") if isinstance(named, dict) else None
        if not isinstance(named, dict) or "dynamic" in (flags if isinstance(flags, list) else [flags]):
            return None
        right = {"set": named.get("elem") or []}
    elements = right["set"] if isinstance(right, dict) and isinstance(right.get("set"), list) else [right]
    values = tuple(convert(_elem(v)) for v in elements)
    return values if values and all(v is not None for v in values) else None


def _elem(value):
    """A set element without its wrapper ({"elem": {"val": …, "timeout": …}})."""
    if isinstance(value, dict) and isinstance(value.get("elem"), dict):
        return value["elem"].get("val")
    return value


def _addr_value(value) -> str | None:
    """An address, prefix or range as a string ("a", "a/len", "a-b"); None if it is not one."""
    if isinstance(value, dict) and isinstance(value.get("prefix"), dict):
        value = f"{value['prefix'].get('addr')}/{value['prefix'].get('len')}"
    elif isinstance(value, dict) and isinstance(value.get("range"), list) and len(value["range"]) == 2:
        value = f"{value['range'][0]}-{value['range'][1]}"
    if not isinstance(value, str):
        return None
    try:
        _span(value)
    except ValueError:
        return None
    return value


def _port_value(value) -> tuple[int, int] | None:
    return _port_range(value)


@lru_cache(maxsize=4096)
def _span(value: str) -> tuple[int, int, int, bool]:
    """(first, last, version, whether it is one address) of "a", "a/len" or "a-b". Raises ValueError."""
    if "-" in value:
        lo, _, hi = value.partition("-")
        first, last = ipaddress.ip_address(lo), ipaddress.ip_address(hi)
        if first.version != last.version:
            raise ValueError(value)
        return int(first), int(last), first.version, first == last
    net = ipaddress.ip_network(value, strict=False)
    return int(net.network_address), int(net.broadcast_address), net.version, net.num_addresses == 1


def _ip(addr) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as ipaddress has it, an IPv4-mapped IPv6 address as IPv4. Raises ValueError."""
    ip = addr if isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(str(addr))
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip


def _addr_rank(ip, values: tuple[str, ...]) -> int | None:
    if not values:
        return 2
    best = None
    for value in values:
        first, last, version, single = _span(value)
        if version == ip.version and first <= int(ip) <= last:
            if single:
                return 0
            best = 1
    return best


def _port_rank(port: int, ranges: tuple[tuple[int, int], ...]) -> int | None:
    if (port, port) in ranges:
        return 0
    return 1 if _port_in(port, ranges) else None


def _to_version(to: str) -> int | None:
    if not to:
        return None
    if to.startswith("[") or to.count(":") >= 2:
        return 6
    try:
        return ipaddress.ip_address(re.split(r"[:/-]", to)[0]).version
    except ValueError:
        return None


def _json_to(dnat: dict) -> str | None:
    """`dnat to` as nft prints it, from the JSON statement; None where it is not literal (a map)."""
    addr, port = dnat.get("addr"), dnat.get("port")
    a = _addr_value(addr) if addr is not None else None
    if addr is not None and a is None:
        return None
    if port is None:
        return a
    ports = _port_range(port)
    if ports is None:
        return None
    p = str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"
    if a is None:
        return f":{p}"
    return f"[{a}]:{p}" if ":" in a else f"{a}:{p}"


_TEXT_DNAT = re.compile(r'\bdnat(?: ip6?)? to (.+?)(?: comment ".*")?$')


def _text_to(text: str) -> str | None:
    m = _TEXT_DNAT.search(text)
    if not m:
        return None
    rest = m.group(1).strip()
    first = rest.split()[0]
    return first if re.fullmatch(r"[\[\]0-9A-Fa-f.:/-]+", first) else rest


def _save_to(line: str) -> str | None:
    words = line.split()
    return words[words.index("--to-destination") + 1] if "--to-destination" in words[:-1] else None


def _save_daddrs(line: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(-d addresses, ! -d addresses) of an iptables-save line; /32 and /128 dropped, as nft prints them."""
    words = line.split()
    for i, word in enumerate(words[:-1]):
        if word in ("-d", "--destination", "--dst"):
            values = []
            for part in words[i + 1].split(","):
                value = part[:part.index("/")] if part.endswith(("/32", "/128")) else part
                if _addr_value(value) is None:
                    return (), ()
                values.append(value)
            return ((), tuple(values)) if i and words[i - 1] == "!" else (tuple(values), ())
    return (), ()


def _targets(obj):
    """The chains a JSON statement (or anything nested in it) jumps or goes to."""
    if isinstance(obj, dict):
        for kind in ("jump", "goto"):
            verdict = obj.get(kind)
            if isinstance(verdict, dict) and isinstance(verdict.get("target"), str):
                yield verdict["target"]
        for value in obj.values():
            yield from _targets(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _targets(value)


_ANYTHING = None        # a way into a chain that asks nothing we can tell


def _ways_in(chains: dict, lines: dict, sets: dict) -> dict[tuple[str, str, str], list]:
    """chain → the ways into it: (guards, chain they come from), or _ANYTHING."""
    entries: dict[tuple[str, str, str], list] = {}
    read_maps: set[tuple[str, str, str]] = set()
    for here, rules in chains.items():
        family, table, _ = here
        for r, line in zip(rules, lines[here]):
            guard = None
            for e in r.get("expr") or []:
                if not isinstance(e, dict):
                    continue
                verdict = e.get("jump") or e.get("goto")
                if isinstance(verdict, dict) and isinstance(verdict.get("target"), str):
                    guard = guard if guard is not None else _rule_guard(r, sets, line)
                    entries.setdefault((family, table, verdict["target"]), []).append(((guard,), here))
                elif isinstance(e.get("vmap"), dict):
                    guard = guard if guard is not None else _rule_guard(r, sets, line)
                    for target, key_guard in _vmap_ways(e["vmap"], sets, (family, table), read_maps):
                        way = _ANYTHING if key_guard is None else ((guard, key_guard), here)
                        entries.setdefault((family, table, target), []).append(way)
                else:
                    for target in _targets(e):
                        entries.setdefault((family, table, target), []).append(_ANYTHING)
    # A verdict map no rule read here was looked up by something else: its chains are entered unasked.
    for key, s in sets.items():
        if key not in read_maps:
            for target in _targets(s.get("elem")):
                entries.setdefault((key[0], key[1], target), []).append(_ANYTHING)
    return entries


def _vmap_ways(vmap: dict, sets: dict, scope: tuple, read_maps: set) -> list[tuple[str, Guard | None]]:
    """(chain, what the element's key asks) for each element of a verdict map lookup; the guard is
    None where the key cannot be read."""
    key, data = vmap.get("key"), vmap.get("data")
    parts = key["concat"] if isinstance(key, dict) and isinstance(key.get("concat"), list) else [key]
    kinds = [_selector(p) for p in parts]
    if isinstance(data, str) and data.startswith("@") and isinstance(sets.get((*scope, data[1:])), dict):
        read_maps.add((*scope, data[1:]))
        elements = sets[(*scope, data[1:])].get("elem") or []
    elif isinstance(data, dict) and isinstance(data.get("set"), list):
        elements = data["set"]
    else:
        return [(target, None) for target in _targets(data)]
    ways = []
    for element in elements:
        if not (isinstance(element, list) and len(element) == 2):
            ways += [(target, None) for target in _targets(element)]
            continue
        ways += [(target, _key_guard(_elem(element[0]), kinds)) for target in _targets(element[1])]
    return ways


def _key_guard(key, kinds: list[str | None]) -> Guard | None:
    values = key["concat"] if isinstance(key, dict) and isinstance(key.get("concat"), list) else [key]
    if len(values) != len(kinds):
        return None
    daddrs, ports, protocols = (), (), frozenset()
    for kind, value in zip(kinds, values):
        if kind == "daddr" and (addr := _addr_value(value)) is not None:
            daddrs = (addr,)
        elif kind == "dport" and (port := _port_range(value)) is not None:
            ports = (port,)
        elif kind == "proto" and isinstance(value, (str, int)):
            protocols = frozenset([L4_NUMBERS.get(value, str(value)) if isinstance(value, int) else value])
    return Guard(daddrs, ports, protocols)


def _paths(chain: tuple[str, str, str], entries: dict, base: set, memo: dict, depth: int = 0,
           seen: frozenset = frozenset()) -> tuple[tuple[Guard, ...], ...]:
    """The ways from a base chain into `chain`, each the guards met on it (outermost first); ()
    where one of them asks nothing (a base chain itself, an unread reference, a chain nothing
    jumps to, too many ways)."""
    if chain in base or chain not in entries or depth > MAX_JUMP_DEPTH:
        return ()
    if chain in memo:
        return memo[chain]
    out: list[tuple[Guard, ...]] = []
    for way in entries[chain]:
        if way is _ANYTHING:
            memo[chain] = ()
            return ()
        guards, source = way
        if source in seen or source == chain:
            continue                        # a loop: nf_tables refuses them
        for path in _paths(source, entries, base, memo, depth + 1, seen | {chain}) or ((),):
            path = tuple(g for g in (*path, *guards) if g)
            if not path or len(out) >= MAX_PATHS:
                memo[chain] = ()
                return ()
            out.append(path)
    memo[chain] = tuple(dict.fromkeys(out))
    return memo[chain]


# -- conntrack entries (pure: tests feed them captured output) ------------------------------------

_TUPLE_KEYS = ("src", "dst", "sport", "dport")


def conntrack_lines(text: str) -> list[dict]:
    """Entries of `conntrack -L [-o extended,id]`: family, protocol, timeout, state, the original
    and reply tuples, flags ("ASSURED", "UNREPLIED", …), other key=value fields (mark, use, id,
    zone, …), `dnat` (where the reply comes from, if not the original destination) and the line."""
    entries = []
    for line in text.splitlines():
        words = line.split()
        if not words or not any("=" in w for w in words):
            continue
        entry: dict = {"family": None, "protocol": None, "timeout": None, "state": None,
                       "original": {}, "reply": {}, "flags": []}
        heads, tuples, current = [], [entry["original"], entry["reply"]], 0
        for word in words:
            if word.startswith("[") and word.endswith("]"):
                entry["flags"].append(word[1:-1])
                continue
            name, sep, value = word.partition("=")
            if not sep:
                if not any(tuples):
                    heads.append(word)
                continue
            number = int(value) if value.isdigit() else value
            if name in _TUPLE_KEYS:
                if name in tuples[current] and current == 0:
                    current = 1
                tuples[current][name] = number
            else:
                entry[name] = number
        if heads and heads[0] in ("ipv4", "ipv6"):
            entry["family"], heads = heads[0], heads[2:]
        elif ":" in str(entry["original"].get("src", "")):
            entry["family"] = "ipv6"
        else:
            entry["family"] = "ipv4"
        if heads:
            entry["protocol"] = heads[0]
        if len(heads) > 2 and heads[2].isdigit():
            entry["timeout"] = int(heads[2])
        if len(heads) > 3:
            entry["state"] = heads[3]
        orig, reply = entry["original"], entry["reply"]
        entry["dnat"] = None
        if reply.get("src") and (reply.get("src"), reply.get("sport")) != (orig.get("dst"), orig.get("dport")):
            src = reply["src"]
            host = f"[{src}]" if ":" in src else src
            entry["dnat"] = f"{host}:{reply['sport']}" if reply.get("sport") is not None else src
        entry["line"] = line.strip()
        entries.append(entry)
    return entries


def _same_flow(entry: dict, dst, dport: int, src, sport: int | None) -> bool:
    orig = entry.get("original") or {}
    try:
        if _ip(orig.get("dst")) != dst or orig.get("dport") != dport:
            return False
        if src is not None and _ip(orig.get("src")) != src:
            return False
    except ValueError:
        return False
    return sport is None or orig.get("sport") == sport


# -- choosing ----------------------------------------------------------------------------------

def could_send(rule: RejectRule, answer: str, protocol: str, family: str | None = None) -> bool:
    """Whether the rule can answer `protocol` packets of that IP version with `answer`."""
    if answer == "tcp reset":
        if rule.answer not in ("tcp reset", "reject"):
            return False
    elif not rule.answer.startswith(("icmp", "reject")):
        return False
    if rule.protocols and protocol not in rule.protocols:
        return False
    return not ((family == "ipv4" and rule.family == "ip6") or (family == "ipv6" and rule.family == "ip"))


def _port_in(port: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


def _moved(packets: int | None, before: int | None) -> bool:
    # After `nft reset counters` a counter starts again from 0: any packet since is a move.
    if packets is None or before is None:
        return False
    return packets > before or 0 < packets < before


# -- reading -------------------------------------------------------------------------------------

class _Failed(Exception):
    """Why a ruleset could not be read, in a few words (it becomes Suspects.how)."""


def netns_path(inode: int) -> str | None:
    """A path that enters the netns: the host's, an `ip netns` name, or a process inside it."""
    candidates = [host_netns_path()]
    try:
        candidates += sorted(e.path for e in os.scandir("/run/netns"))
    except OSError:
        pass
    for path in candidates:
        try:
            if os.stat(path).st_ino == inode:
                return path
        except OSError:
            continue
    return netns_by_process().get(inode)       # a scan of /proc: only for a netns met no other way


def _run(argv: list[str], ns_path: str | None) -> str:
    tool = argv[0]
    if shutil.which(tool) is None:
        raise _Failed(f"{tool} not found")
    if ns_path is not None:
        argv = ["nsenter", f"--net={ns_path}", *argv]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except FileNotFoundError:
        raise _Failed(f"{argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise _Failed(f"{tool} timed out") from None
    except OSError as err:
        raise _Failed(f"{tool}: {err.strerror}") from None
    if proc.returncode != 0:
        if ns_path is not None and not os.path.exists(ns_path):
            raise _Failed("netns gone")
        first = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[0]
        raise _Failed(f"{tool} failed: {first[:120]}")
    return proc.stdout


class Ruleset(NamedTuple):
    rejects: list[RejectRule]
    dnat: list[DnatRule]


def read_ruleset(ns_path: str | None) -> Ruleset:
    """The REJECT and DNAT rules of the netns at `ns_path` (None: the calling thread's own). Raises _Failed."""
    got = _read_once(ns_path)
    # The JSON and the text are two reads, not one snapshot: a rule changed between them has no text.
    return got if all(r.text for r in (*got.rejects, *got.dnat)) else _read_once(ns_path)


def _read_once(ns_path: str | None) -> Ruleset:
    try:
        ruleset = json.loads(_run(["nft", "-j", "-a", "list", "ruleset"], ns_path))
    except ValueError:
        raise _Failed("nft gave bad JSON") from None
    if not isinstance(ruleset, dict):
        raise _Failed("nft gave bad JSON")
    text = _run(["nft", "-a", "list", "ruleset"], ns_path)
    try:
        rules, dnat = reject_rules(ruleset, text), _dnat_rules(ruleset, text)
        # iptables-nft-save only where iptables-nft may have made a REJECT rule: its tables and families;
        # with -t nat where it made DNAT rules (an xt target: a native `dnat` has all nft's JSON can say).
        wanted = {r.family for r in rules if r.family in SAVE_TOOLS and (r.origin != "nft" or r.table in XT_TABLES)}
        nat = {r.family for r in dnat if r.family in SAVE_TOOLS and r.origin != "nft"} - wanted
        if not wanted and not nat:
            return Ruleset(rules, dnat)
        saves = {family: _save(SAVE_TOOLS[family], ns_path) for family in wanted}
        saves.update({family: _save(SAVE_TOOLS[family], ns_path, "-t", "nat") for family in nat})
        return Ruleset(reject_rules(ruleset, text, saves), _dnat_rules(ruleset, text, saves))
    except (AttributeError, KeyError, TypeError, ValueError):      # JSON of a shape this nft never gave
        raise _Failed("nft gave unexpected JSON") from None


def _dnat_rules(ruleset: dict, text: str, saves: dict[str, str] | None = None) -> list[DnatRule]:
    # A shape the DNAT reading does not know costs the DNAT rules only, never the REJECT rules.
    try:
        return dnat_rules(ruleset, text, saves)
    except (AttributeError, KeyError, TypeError, ValueError, RecursionError):
        return []


def _save(tool: str, ns_path: str | None, *args: str) -> str:
    # Only the iptables line rides on this: without the tool, nft's own text stands.
    try:
        return _run([tool, *args], ns_path)
    except _Failed:
        return ""


def read_conntrack(ns_path: str | None, dst: str, dport: int) -> list[dict]:
    """The TCP conntrack entries whose original destination is dst:dport. Raises _Failed."""
    family = "ipv6" if _ip(dst).version == 6 else "ipv4"
    return conntrack_lines(_run(["conntrack", "-L", "-f", family, "-p", "tcp", "--orig-dst", dst,
                                 "--dport", str(dport), "-o", "extended,id"], ns_path))


@dataclass
class _Netns:
    path: str | None = None         # a path that enters it; None: the calling thread's own netns
    rules: list[RejectRule] = field(default_factory=list)
    dnat: list[DnatRule] = field(default_factory=list)
    error: str | None = None
    read_at: float = 0.0
    counted: dict[tuple, int | None] | None = None     # counters at the last good read
    before: dict[tuple, int | None] | None = None      # ... and at the good read before it


@dataclass
class _Conntrack:
    path: str | None = None
    ran_at: float = 0.0             # the last run of conntrack in this netns (monotonic)
    answers: dict[tuple[str, int], tuple[float, list[dict] | None]] = field(default_factory=dict)


class FirewallRules:
    """The REJECT and DNAT rules of each netns events come from, read when asked, at most every
    `min_interval` seconds per netns, for at most `max_netns` namespaces; and its conntrack entries
    for one destination, read at most every `conntrack_interval` seconds per netns."""

    def __init__(self, min_interval: float = MIN_INTERVAL, max_netns: int = MAX_NETNS,
                 conntrack_interval: float = CONNTRACK_INTERVAL):
        self.min_interval = min_interval
        self.max_netns = max_netns
        self.conntrack_interval = conntrack_interval
        self._netns: OrderedDict[int, _Netns] = OrderedDict()
        self._lock = threading.Lock()
        self._conntrack: OrderedDict[int, _Conntrack] = OrderedDict()
        self._conntrack_lock = threading.Lock()

    def watch(self, netns_inode: int) -> None:
        """Read the netns now: the counters of its first event's rule then have a read to move from."""
        with self._lock:
            self._current(netns_inode)

    def suspects(self, netns_inode: int, answer: str, *, protocol: str = "tcp", port: int | None = None,
                 family: str | None = None) -> Suspects:
        """The REJECT rules of the netns that could have answered a `protocol` packet to `port`
        with `answer` ("tcp reset", or "icmp" for any ICMP/ICMPv6/icmpx type); `family` ("ipv4" or
        "ipv6"), where given, leaves out the other IP version's tables."""
        if answer != "tcp reset" and not answer.startswith("icmp"):
            return Suspects([], True, f"unknown answer {answer!r}")
        with self._lock:
            ns, fresh = self._current(netns_inode)
            return self._choose(ns, fresh, "icmp" if answer.startswith("icmp") else answer, protocol, port, family)

    def dnat_for(self, netns_inode: int, addr, port: int | None, *, protocol: str | None = "tcp") -> list[DnatRule]:
        """The DNAT rules of the netns that could rewrite a `protocol` packet to addr:port: their
        literal destination address match includes addr, or they have none, and their destination
        port match includes port, or they have none; the ways into their chains (jumps, verdict
        maps) must allow it too. Exact matches first (see matching_dnat). [] when nothing could be
        read; never raises."""
        try:
            with self._lock:
                ns, _ = self._current(netns_inode)
                rules = [] if ns.error else ns.dnat
            return matching_dnat(rules, addr, port, protocol)
        except (OSError, ValueError, TypeError, _Failed):
            return []

    def conntrack_entries(self, netns_inode: int, *, orig_dst, orig_dport: int, orig_src=None,
                          orig_sport: int | None = None) -> list[dict] | None:
        """The TCP conntrack entries of the netns whose original direction goes to orig_dst:orig_dport
        (and comes from orig_src:orig_sport, where given), as conntrack_lines parses them. None where
        they cannot be read: no `conntrack` tool, a netns that cannot be entered, a run that failed
        or timed out, or another destination asked of that netns within `conntrack_interval` (one
        run per netns per interval; the same destination gets that run's answer meanwhile)."""
        try:
            dst, dport = _ip(orig_dst), int(orig_dport)
            src = _ip(orig_src) if orig_src is not None else None
            sport = int(orig_sport) if orig_sport is not None else None
        except (ValueError, TypeError):
            return None
        key = (str(dst), dport)
        with self._conntrack_lock:
            ct = self._conntrack.get(netns_inode)
            if ct is None:
                ct = self._conntrack[netns_inode] = _Conntrack()
                while len(self._conntrack) > self.max_netns:
                    self._conntrack.popitem(last=False)
            self._conntrack.move_to_end(netns_inode)
            now = time.monotonic()
            ct.answers = {k: a for k, a in ct.answers.items() if now - a[0] < self.conntrack_interval}
            if key in ct.answers:
                entries = ct.answers[key][1]
            elif ct.ran_at and now - ct.ran_at < self.conntrack_interval:
                return None
            else:
                ct.ran_at = now
                try:
                    entries = read_conntrack(self._path(netns_inode, ct), *key)
                except (_Failed, OSError, ValueError):
                    entries = None
                ct.answers[key] = (now, entries)
        if entries is None:
            return None
        return [{**e, "original": dict(e["original"]), "reply": dict(e["reply"]), "flags": list(e["flags"])}
                for e in entries if _same_flow(e, dst, dport, src, sport)]

    @staticmethod
    def _choose(ns: _Netns, fresh: bool, answer: str, protocol: str, port: int | None,
                family: str | None) -> Suspects:
        if ns.error:
            return Suspects([], True, ns.error)
        rules = [r for r in ns.rules if could_send(r, answer, protocol, family)]
        if port is not None:
            # A rule for other literal ports did not see this packet; rules without one may have.
            rules = ([r for r in rules if r.ports and _port_in(port, r.ports)] +
                     [r for r in rules if not r.ports])
        if not rules:
            return Suspects([], True, "none")
        # A read made before the event cannot show its packet: only a fresh read's moves are evidence.
        before = ns.before if fresh else None
        moved = [r for r in rules if before is not None and _moved(r.packets, before.get(r.key, 0))]
        if moved:
            uncounted = [r for r in rules if r.packets is None]     # may have fired unseen
            return Suspects(moved + uncounted, len(moved) + len(uncounted) != 1, "counter moved")
        # Read after the event, not told by it: even the only rule that fits is inferred.
        return Suspects(rules, True, "only rule" if len(rules) == 1 else "candidates")

    def _current(self, inode: int) -> tuple[_Netns, bool]:
        """The netns's entry, read again if it is older than min_interval; True if read now."""
        ns = self._netns.get(inode)
        if ns is None:
            ns = self._netns[inode] = _Netns()
            while len(self._netns) > self.max_netns:
                self._netns.popitem(last=False)
        self._netns.move_to_end(inode)
        if ns.read_at and time.monotonic() - ns.read_at < self.min_interval:
            return ns, False
        self._read(inode, ns)
        return ns, True

    def _read(self, inode: int, ns: _Netns) -> None:
        ns.read_at = time.monotonic()
        try:
            rules, dnat = read_ruleset(self._path(inode, ns))
        except _Failed as why:
            ns.rules, ns.dnat, ns.error = [], [], str(why)     # the counters keep their last good read to move from
            return
        ns.before, ns.counted = ns.counted, {r.key: r.packets for r in rules}
        ns.rules, ns.dnat, ns.error = rules, dnat, None

    def _path(self, inode: int, ns: _Netns | _Conntrack) -> str | None:
        # subprocesses start in the calling thread's netns (the listener sampler moves its own thread)
        if os.stat("/proc/thread-self/ns/net").st_ino == inode:
            return None
        try:
            if ns.path and os.stat(ns.path).st_ino == inode:
                return ns.path
        except OSError:
            pass
        ns.path = netns_path(inode)
        if ns.path is None:
            raise _Failed("netns gone")
        return ns.path
