"""Which netfilter REJECT rule answered a packet with a TCP reset or an ICMP unreachable.

The kernel tells rsttrace that a REJECT fired, and in which netns; it does not say which rule. The
rule is named from that netns's ruleset as nf_tables holds it, read inside the netns: `nft -j -a list
ruleset` for the structure (family, table, chain, handle, reject type, ports, counters), `nft -a list
ruleset` for the text the user knows, and, for rules iptables-nft made, the `-A …` line
`iptables-nft-save` prints. Rules read after the event are suspects, not a proof: the event's port
and the counters that moved since the previous read narrow them, and `Suspects` says which did.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

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

def reject_rules(ruleset: dict, text: str = "", saves: dict[str, str] | None = None) -> list[RejectRule]:
    """The REJECT rules of one `nft -j -a list ruleset` output, in ruleset order, with their text
    from `nft -a list ruleset` and their iptables line from `ip(6)tables-nft-save` (by family)."""
    items = ruleset.get("nftables") or []
    table_handles: dict[tuple[str, str], int] = {}
    chains: dict[tuple[str, str, str], list[dict]] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        if "table" in item:
            t = item["table"]
            table_handles[(t.get("family"), t.get("name"))] = t.get("handle")
        elif "rule" in item:
            r = item["rule"]
            chains.setdefault((r.get("family"), r.get("table"), r.get("chain")), []).append(r)
    texts = rule_texts(text)
    saved = {family: save_lines(out) for family, out in (saves or {}).items()}
    found = []
    for (family, table, chain), rules in chains.items():
        lines = saved.get(family, {}).get((table, chain), [])
        # iptables-nft-save lists a chain's rules in the kernel's order, as nft does: the nth line is
        # the nth rule only while both saw the same chain (same count; a REJECT on both sides).
        aligned = lines if len(lines) == len(rules) else []
        for i, r in enumerate(rules):
            line = aligned[i] if aligned and _target(aligned[i]) == "REJECT" else None
            rule = _reject_rule(r, texts.get((family, table_handles.get((family, table)), r.get("handle"))), line)
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


def read_rules(ns_path: str | None) -> list[RejectRule]:
    """The REJECT rules of the netns at `ns_path` (None: the calling thread's own). Raises _Failed."""
    rules = _read_once(ns_path)
    # The JSON and the text are two reads, not one snapshot: a rule changed between them has no text.
    return rules if all(r.text for r in rules) else _read_once(ns_path)


def _read_once(ns_path: str | None) -> list[RejectRule]:
    try:
        ruleset = json.loads(_run(["nft", "-j", "-a", "list", "ruleset"], ns_path))
    except ValueError:
        raise _Failed("nft gave bad JSON") from None
    if not isinstance(ruleset, dict):
        raise _Failed("nft gave bad JSON")
    text = _run(["nft", "-a", "list", "ruleset"], ns_path)
    try:
        rules = reject_rules(ruleset, text)
        # iptables-nft-save only where iptables-nft may have made a REJECT rule: its tables and families.
        wanted = {r.family for r in rules if r.family in SAVE_TOOLS and (r.origin != "nft" or r.table in XT_TABLES)}
        if not wanted:
            return rules
        return reject_rules(ruleset, text, {family: _save(SAVE_TOOLS[family], ns_path) for family in wanted})
    except (AttributeError, KeyError, TypeError, ValueError):      # JSON of a shape this nft never gave
        raise _Failed("nft gave unexpected JSON") from None


def _save(tool: str, ns_path: str | None) -> str:
    # Only the iptables line rides on this: without the tool, nft's own text stands.
    try:
        return _run([tool], ns_path)
    except _Failed:
        return ""


@dataclass
class _Netns:
    path: str | None = None         # a path that enters it; None: the calling thread's own netns
    rules: list[RejectRule] = field(default_factory=list)
    error: str | None = None
    read_at: float = 0.0
    counted: dict[tuple, int | None] | None = None     # counters at the last good read
    before: dict[tuple, int | None] | None = None      # ... and at the good read before it


class FirewallRules:
    """The REJECT rules of each netns events come from, read when asked, at most every
    `min_interval` seconds per netns, for at most `max_netns` namespaces."""

    def __init__(self, min_interval: float = MIN_INTERVAL, max_netns: int = MAX_NETNS):
        self.min_interval = min_interval
        self.max_netns = max_netns
        self._netns: OrderedDict[int, _Netns] = OrderedDict()
        self._lock = threading.Lock()

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
            rules = read_rules(self._path(inode, ns))
        except _Failed as why:
            ns.rules, ns.error = [], str(why)     # the counters keep their last good read to move from
            return
        ns.before, ns.counted = ns.counted, {r.key: r.packets for r in rules}
        ns.rules, ns.error = rules, None

    def _path(self, inode: int, ns: _Netns) -> str | None:
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
