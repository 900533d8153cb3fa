"""Connections' stories and RST pairs: what the kernel's acts did to the connection at the other end.

The kernel follows each connection a drop or a SYN retransmit hurt (bpf/story.bpf.c) and hands over
one `connection` event when its story ends. Here it becomes one `connection` record, told from both
ends where both are on this host:

    events of the story   syn_dropped / ack_dropped / syn_cookie / rst_sent at the listener, kept per
                          4-tuple (bounded) so that the record can name them and say why they dropped
    connection event      outcome, errno, counts (struct rsttrace_story) → a `connection` record
    idle / exit           stories whose ends were silent (a remote client that gave up) are taken out
                          of the kernel's map here and written as `open`
    rst_received          names the rst_sent of this host that caused it (same 4-tuple reversed,
                          within PAIR_WINDOW_NS), or says it found none: never a guess

Per listener (server netns, port) the outcomes are counted for the summary, the `listeners`
records, the UI and metrics: never established, established late (with the added delay), reset,
established on the client only.
"""
from __future__ import annotations

import errno as errno_names
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..events.decode import Event, endpoint
from ..kernel import layout
from . import origins, reasons

# How long after an RST is sent its receipt on this host is taken to be its pair: loopback and veth
# deliver within microseconds; a second leaves room for a loaded machine, not for a guess.
PAIR_WINDOW_NS = 1_000_000_000
# Stories nothing happened to for this long are ended here as `open`: longer than a client's whole
# SYN retry schedule (tcp_syn_retries 6: 127 s).
IDLE_S = 180.0
SWEEP_EVERY_S = 30.0
MAX_TRACKED = 65536             # 4-tuples whose events are kept for their story (oldest dropped first)
MAX_REFS = 16                   # events named per story
DELAYS_KEPT = 4096              # added delays kept per listener for p50/p99 (the most recent)

STORY = struct.Struct(layout.struct_layout(layout.RawStory)[0])     # struct rsttrace_story
F_CONNECT_SEEN = layout.DEFINES["RSTTRACE_STORY_F_CONNECT_SEEN"]
F_BY_CLIENT = layout.DEFINES["RSTTRACE_STORY_F_BY_CLIENT"]
LISTENER_KINDS = ("syn_dropped", "ack_dropped", "syn_cookie")


@dataclass
class Story:
    """struct rsttrace_story, decoded."""
    start_ns: int
    syn_drops: int
    syn_cookies: int
    ack_drops: int
    syn_retrans: int
    synack_retrans: int
    data_retrans: int
    rsts: int
    old_state: int
    flags: int
    server_netns: int
    server_tgid: int
    err: int
    client_netns: int

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Story":
        return cls(*STORY.unpack(raw[:STORY.size]))


@dataclass
class ListenerOutcomes:
    """Per listener: the connections it hurt, by outcome, and the delay added to those that made it."""
    outcomes: dict[str, int] = field(default_factory=dict)
    delays: list[float] = field(default_factory=list)

    def add(self, outcome: str, delay_s: float | None) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if delay_s is not None:
            self.delays.append(delay_s)
            if len(self.delays) > DELAYS_KEPT:
                del self.delays[:len(self.delays) - DELAYS_KEPT]

    def as_dict(self) -> dict[str, Any]:
        late = sorted(self.delays)
        return {"never_established": self.outcomes.get("never_established", 0),
                "established_late": self.outcomes.get("established", 0),
                "reset": self.outcomes.get("reset", 0),
                "client_only": self.outcomes.get("client_only", 0),
                "open": self.outcomes.get("open", 0),
                "added_delay_s": {"p50": _quantile(late, 0.50), "p99": _quantile(late, 0.99)} if late else None}


def _quantile(values: list[float], q: float) -> float:
    return round(values[min(len(values) - 1, int(q * len(values)))], 6)


def raw_addr(addr: str) -> bytes:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return socket.inet_pton(family, addr).ljust(16, b"\0")


def sender(ev: Event) -> dict[str, Any]:
    """What an rst_received's `reset_by` says of the rst_sent that caused it."""
    return {"reason": ev.reason, "netns": ev.netns, "process": _brief(ev.process)}


def ref(ev: Event) -> tuple[str, str, int]:
    """How a connection record names one of its events (records carry ktime_ns: unique enough);
    kept as a tuple, made a dict only in the record (tens of thousands may wait in a flood)."""
    return (ev.kind, ev.reason, ev.ktime_ns)


@dataclass(frozen=True, slots=True)
class Why:
    """What a story's explanation needs of the listener event that hurt it, and nothing more: a flood
    keeps one per connection followed."""
    reason: str
    queues: tuple[int, int, int, int] | None        # accept_qlen, accept_qmax, syn_qlen, syn_qmax
    process: dict | None                            # shared per process by the attributor

    @classmethod
    def of(cls, ev: Event) -> "Why":
        q = ev.queues
        return cls(ev.reason, (q["accept_qlen"], q["accept_qmax"], q["syn_qlen"], q["syn_qmax"]) if q else None,
                   ev.process)


class Stories:
    """Connections' stories and RST pairs, between the pipeline's enrichment and its records."""

    def __init__(self, attributor):
        self.attributor = attributor
        # Story key (family, client addr, client port, server addr, server port) → its events, and the
        # last listener event (the drop that says why).
        self.refs: OrderedDict[tuple, list[tuple]] = OrderedDict()
        self.why: dict[tuple, Why] = {}
        # RSTs sent, by (src addr, src port, dst addr, dst port) raw: (ktime, sender(), its event)
        self.sent: dict[tuple, tuple[int, dict | None, Event | None]] = {}
        self.per_listener: dict[tuple[int, int], ListenerOutcomes] = {}
        # Handshakes completed per listener (netns, port) of a traced port, as the kernel counted them
        # (the session refreshes it): the connections that got through, hurt or not. None: not counted.
        self.handshakes: dict[tuple[int, int], int] | None = None
        self.written = 0
        self.unpaired = 0
        self.paired = 0

    # -- the events of a story, and RST pairs -----------------------------------------------
    def note(self, ev: Event) -> None:
        """Every event that passed the filters, after it is classified and attributed."""
        kind = ev.kind
        if kind in LISTENER_KINDS or (kind == "rst_sent" and ev.state == "LISTEN"):
            self._keep(_key(ev.family, ev.remote_addr, ev.remote_port, ev.local_addr, ev.local_port), ev)
        if kind == "rst_sent":
            self.note_sent(raw_addr(ev.local_addr), ev.local_port, raw_addr(ev.remote_addr), ev.remote_port,
                           ev.ktime_ns, sender(ev), ev)
        elif kind == "rst_received":
            self._pair(ev)

    def note_sent(self, laddr: bytes, lport: int, raddr: bytes, rport: int, ktime: int, who: dict,
                  ev: Event | None = None) -> None:
        """An RST this host sent: `who` (sender()) is what its receiver's record will name. The fast
        path calls this for the RSTs it writes itself (ev None: the explanation is the reason's)."""
        key = (laddr, lport, raddr, rport)
        prev = self.sent.get(key)
        if prev is not None and ktime - prev[0] < PAIR_WINDOW_NS and (prev[1] is None or prev[1]["netns"] != who["netns"]):
            who, ev = None, None    # the same 4-tuple sent from two netns at once: no pair can be told
        self.sent[key] = (ktime, who, ev)
        if len(self.sent) > MAX_TRACKED:
            for old in list(self.sent)[:MAX_TRACKED // 4]:
                del self.sent[old]

    def _pair(self, ev: Event) -> None:
        hit = self.sent.get((raw_addr(ev.remote_addr), ev.remote_port, raw_addr(ev.local_addr), ev.local_port))
        if hit is None or hit[1] is None or not 0 < ev.ktime_ns - hit[0] < PAIR_WINDOW_NS:
            ev.extra["reset_by"] = None
            self.unpaired += 1
            return
        ev.extra["reset_by"] = dict(hit[1], ktime_ns=hit[0])
        ev.extra["reset_by_event"] = hit[2]
        self.paired += 1
        self._keep(_key(ev.family, ev.local_addr, ev.local_port, ev.remote_addr, ev.remote_port), ev, why=False)

    def explain_pair(self, ev: Event, base: str) -> str:
        """rst_received's explanation, naming the rst_sent of this host that caused it where known."""
        by = ev.extra.get("reset_by")
        if not by:
            return base
        sent = ev.extra.pop("reset_by_event", None)
        state = f" in state {ev.state}" if ev.state else ""
        if by["reason"] == "firewall_reject":       # no socket sent it: a rule, named where it was read
            if ev.reason == "suspected_injected":    # the explanation names the rule and the TTLs already
                return f"{base} (its rst_sent, reason firewall_reject)"
            fw = sent.extra.get("firewall") if sent is not None else None
            named = origins.rule_text(fw) if fw else "a REJECT rule"
            return (f"{ev.local} ↔ {ev.remote} reset{state} by a firewall REJECT on this host, not by the peer's "
                    f"TCP: {named} (its rst_sent, reason firewall_reject)")
        who = _who(by["process"], "a socket nobody holds")
        why = reasons.CATALOG[by["reason"]].title if by["reason"] in reasons.CATALOG else by["reason"]
        if sent is not None and sent.queues and by["reason"] == "accept_queue_full":
            q = sent.queues
            why = f"its accept queue was full ({q['accept_qlen']}/{q['accept_qmax']})"
        return (f"{ev.local} ↔ {ev.remote} reset{state} by {who} on this host: {why} "
                f"(its rst_sent, reason {by['reason']})")

    def _keep(self, key: tuple, ev: Event, why: bool = True) -> None:
        refs = self.refs.get(key)
        if refs is None:
            refs = self.refs[key] = []
            if len(self.refs) > MAX_TRACKED:
                old, _ = self.refs.popitem(last=False)
                self.why.pop(old, None)
        if len(refs) < MAX_REFS:
            refs.append(ref(ev))
        if why and ev.kind in LISTENER_KINDS:
            self.why[key] = Why.of(ev)

    # -- a story's end ----------------------------------------------------------------------
    def connection(self, ev: Event) -> dict[str, Any]:
        """The fields of the `connection` record (sinks/records.py) of a story the kernel ended
        (ev.kind == "connection")."""
        story = Story.from_bytes(ev.extra["story_raw"])
        by_client = bool(story.flags & F_BY_CLIENT)
        if by_client:
            client = (ev.local_addr, ev.local_port)
            server = (ev.remote_addr, ev.remote_port)
        else:
            client = (ev.remote_addr, ev.remote_port)
            server = (ev.local_addr, ev.local_port)
        outcome = ev.verdict       # the decoder names the outcome (enum rsttrace_outcome)
        ended_by = "client" if by_client else "server"
        client_process = ev.process if by_client else None
        return self._record(ev.family, client, server, story, outcome, ev.ktime_ns, ev.time_ns, ended_by,
                            client_process, ev.netns if by_client else story.client_netns, ev.netns_name if by_client else None)

    def open_story(self, key_raw: bytes, val_raw: bytes, now_mono_ns: int, mono_to_wall: int, why: str) -> dict:
        """A story still open in the kernel's map (idle, or at exit): its `open` record's fields."""
        key = layout.RawStoryKey.from_buffer_copy(key_raw)
        fam = socket.AF_INET6 if key.family == socket.AF_INET6 else socket.AF_INET
        width = 16 if fam == socket.AF_INET6 else 4
        client = (socket.inet_ntop(fam, bytes(key.caddr)[:width]), key.cport)
        server = (socket.inet_ntop(fam, bytes(key.saddr)[:width]), key.sport)
        story = Story.from_bytes(val_raw)
        return self._record("ipv6" if fam == socket.AF_INET6 else "ipv4", client, server, story, "open",
                            now_mono_ns, now_mono_ns + mono_to_wall, why, None, story.client_netns, None)

    def _record(self, family: str, client: tuple, server: tuple, story: Story, outcome: str, end_ns: int,
                wall_ns: int, ended_by: str, client_process: dict | None, client_netns: int,
                client_netns_name: str | None) -> dict[str, Any]:
        key = _key(family, client[0], client[1], server[0], server[1])
        refs = [{"event": kind, "reason": reason, "ktime_ns": ktime} for kind, reason, ktime in self.refs.pop(key, [])]
        why = self.why.pop(key, None)
        # The listener's owner as the kernel recorded it at listen() (its drop event's process), else
        # as /proc knows it now (it may have exited: then its pid alone).
        server_process = _brief(why.process) if why is not None and why.process else None
        if server_process is None and story.server_tgid:
            server_process = _brief(self.attributor.recorded_owner(story.server_tgid, "", "listener_owner"))
            server_process["comm"] = server_process["comm"] or None
        err = errno_names.errorcode.get(story.err) if story.err else None
        duration_s = round((end_ns - story.start_ns) / 1e9, 6)
        delay_s = duration_s if outcome == "established" else None
        netns_names = self.attributor.netns
        rec = dict(
            wall_ns=wall_ns, ktime_ns=end_ns, outcome=outcome, errno=err,
            abandoned=outcome == "never_established" and not story.err,
            family=family,
            client={"addr": client[0], "port": client[1], "local": bool(client_netns),
                    "netns": ({"inode": client_netns, "name": client_netns_name or netns_names.name(client_netns)}
                              if client_netns else None),
                    "process": _brief(client_process)},
            server={"addr": server[0], "port": server[1], "local": bool(story.server_netns),
                    "netns": ({"inode": story.server_netns, "name": netns_names.name(story.server_netns)}
                              if story.server_netns else None),
                    "process": server_process},
            start_ktime_ns=story.start_ns, start="connect" if story.flags & F_CONNECT_SEEN else "first_drop",
            duration_s=duration_s, delay_s=delay_s,
            drops={"syn": story.syn_drops, "ack": story.ack_drops, "syn_cookies": story.syn_cookies},
            retransmits={"syn": story.syn_retrans, "synack": story.synack_retrans, "data": story.data_retrans},
            resets_sent=story.rsts, ended_by=ended_by, events=refs)
        rec["explanation"] = explain_connection(rec, why)
        if story.server_netns:
            self.per_listener.setdefault((story.server_netns, server[1]), ListenerOutcomes()).add(outcome, delay_s)
        self.written += 1
        return rec

    def listener_outcomes(self, netns: int, port: int) -> dict[str, Any] | None:
        found = self.per_listener.get((netns, port))
        done = self.handshakes.get((netns, port)) if self.handshakes is not None else None
        if found is None and not done:
            return None
        return dict((found or ListenerOutcomes()).as_dict(), established=done)

    def summary(self, not_followed: int) -> dict[str, Any]:
        """The summary's `connections`: records written, stories the kernel could not follow (its map
        was full), RST pairs, and per listener the connections it hurt."""
        return {"written": self.written, "not_followed": not_followed,
                "rst_pairs": {"paired": self.paired, "unpaired": self.unpaired},
                "per_listener": [{"netns": netns, "netns_name": self.attributor.netns.name(netns), "port": port,
                                  **self.listener_outcomes(netns, port)}
                                 for netns, port in sorted(set(self.per_listener) | set(self.handshakes or {}))]}


def _key(family: str, caddr: str, cport: int, saddr: str, sport: int) -> tuple:
    return (family, caddr, cport, saddr, sport)


def _brief(process: dict | None) -> dict | None:
    if not process:
        return None
    return {"pid": process.get("pid"), "comm": process.get("comm")}


def _who(process: dict | None, fallback: str) -> str:
    return f"{process['comm']} (pid {process['pid']})" if process else fallback


def _n(count: int, what: str) -> str:
    return f"{count} {what}" + ("" if count == 1 else "s")


def _took(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.3g} s"


def explain_connection(rec: dict[str, Any], why: Why | None) -> str:
    """One line: the connection, what hurt it and where, how it ended."""
    c, s = rec["client"], rec["server"]
    client = endpoint(c["addr"], c["port"])
    if c["process"]:
        client += f" ({c['process']['comm']}/{c['process']['pid']})"
    server_name = _who(s["process"], endpoint(s["addr"], s["port"]))
    drops, retrans = rec["drops"], rec["retransmits"]
    where = f"{server_name}'s"
    if why is not None and why.queues:
        accept_qlen, accept_qmax, syn_qlen, syn_qmax = why.queues
        if why.reason == "accept_queue_full":
            where += f" full accept queue ({accept_qlen}/{accept_qmax})"
        elif why.reason in ("syn_queue_full", "syn_backlog_reserve"):
            where += f" full SYN queue ({syn_qlen}/{syn_qmax})"
        else:
            where += f" listener ({why.reason})"
    else:
        where += " listener"
    hurt = []
    if drops["syn"]:
        hurt.append(f"{_n(drops['syn'], 'SYN')} dropped at {where}")
    if drops["ack"]:
        hurt.append(f"{_n(drops['ack'], 'final ACK')} dropped at {where}")
    if drops["syn_cookies"]:
        hurt.append(f"{_n(drops['syn_cookies'], 'SYN')} answered with a cookie")
    if not drops["syn"] and retrans["syn"]:
        hurt.append(f"{_n(retrans['syn'], 'SYN')} retransmitted unanswered")
    if retrans["synack"]:
        hurt.append(f"{_n(retrans['synack'], 'SYN-ACK retransmit')}")
    if retrans["data"]:
        hurt.append(f"{_n(retrans['data'], 'data retransmit')}")
    story = "; ".join(hurt) or "no drop seen"
    took = _took(rec["duration_s"])
    outcome = rec["outcome"]
    if outcome == "never_established":
        if rec["abandoned"]:
            end = f"the client gave up after {took} (closed while connecting: no errno)"
        else:
            end = f"connect() failed with {rec['errno']} after {took}"
        return f"{client} never connected to {endpoint(s['addr'], s['port'])}: {story}; {end}"
    if outcome == "established":
        return f"{client} connected to {endpoint(s['addr'], s['port'])} {took} late: {story}"
    if outcome == "client_only":
        return (f"{client} thought itself connected to {endpoint(s['addr'], s['port'])}, but the server never had the "
                f"connection: {story}; the client's socket ended after {took}")
    if outcome == "reset":
        by = f" by {server_name}" if rec["resets_sent"] else ""
        return (f"{client} connected to {endpoint(s['addr'], s['port'])}, then was reset{by} {took} later: {story}; "
                f"the application sees ECONNRESET on its next read or write")
    return (f"{client} → {endpoint(s['addr'], s['port'])} still open when rsttrace looked ({rec['ended_by']}): {story}; "
            f"no end seen for {took} (a client elsewhere gave up or is still retrying)")
